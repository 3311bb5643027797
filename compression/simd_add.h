// out[i] += src[i] for a little-endian float array at an unaligned byte address: the inner loop
// of fp32 DecodeAdd. Internal to compression/. Cost: one streaming pass.
#ifndef QTRAIN_COMPRESSION_SIMD_ADD_H_
#define QTRAIN_COMPRESSION_SIMD_ADD_H_

#include <cstdint>
#include <span>

namespace qtrain::compression {

// `fast` selects the AVX2 loop (caller checked CpuHasAvx2); results are identical either way.
void AddLittleEndianFloats(const uint8_t* src, std::span<float> out, bool fast);

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_SIMD_ADD_H_
