// Shared body of the per-codec libFuzzer targets (one binary per decoder, see CMakeLists.txt).
//
// Input layout (all little-endian), chosen so the fuzzer reaches deep into each decoder
// without a corpus:
//   byte 0      flags: bit0 wrong codec id, bits1-2 version offset (0 -> version 1),
//               bit3 go through the serialized-proto path (wire.h Parse), bit4 encode mode
//   bytes 1-2   num_elements (<= 65535)
//   byte 3      number of scales, byte 4 number of params
//   then        scales (4 bytes each), params (4 bytes each), and the rest is the payload.
// Decode mode: DecodeAdd must either succeed or fail leaving the output untouched.
// Encode mode: the payload bytes are floats; encoding them (with error feedback) and decoding
// the result must succeed whenever encoding did.
#ifndef QTRAIN_TESTS_FUZZ_DECODE_FUZZER_H_
#define QTRAIN_TESTS_FUZZ_DECODE_FUZZER_H_

#include <cstddef>
#include <cstdint>

namespace qtrain::compression {

int FuzzCodec(const char* spec, const uint8_t* data, size_t size);

}  // namespace qtrain::compression

#endif  // QTRAIN_TESTS_FUZZ_DECODE_FUZZER_H_
