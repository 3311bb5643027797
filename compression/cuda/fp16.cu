// fp16 on the GPU: the math and byte layout are compression/fp16.h's (round to nearest even,
// saturating at +-65504, NaN kept; payload = n little-endian binary16 values). The conversion is
// FloatToHalfBits / HalfBitsToFloat of codec_math.h, a bit-for-bit port of the CPU reference,
// so GPU and CPU payloads and residuals are identical. There is no reduction, so nothing differs
// in order.
//
// Encode with error feedback: one pass, reading grad and residual once and writing the payload
// (2n bytes) and the residual once. Decode-add: one pass, reading the payload and out, writing out.
#include "compression/cuda/codec_kernels.h"
#include "compression/cuda/device_util.cuh"

namespace qtrain::compression::cuda {
namespace {

constexpr uint32_t kThreads = 256;
constexpr uint32_t kItems = 4;

__global__ void __launch_bounds__(kThreads) Fp16EncodeKernel(Fp16EncodeArgs a) {
  uint16_t* payload = reinterpret_cast<uint16_t*>(a.blob + a.payload_offset);
  const uint64_t base = uint64_t{blockIdx.x} * (kThreads * kItems) + threadIdx.x;
  float g[kItems], r[kItems];
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    g[k] = i < a.n ? a.grad[i] : 0.0f;
    r[k] = (a.residual != nullptr && i < a.n) ? a.residual[i] : 0.0f;
  }
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    if (i >= a.n) continue;
    const float v = a.residual != nullptr ? AddRn(g[k], r[k]) : g[k];
    const uint16_t h = FloatToHalfBits(v);
    payload[i] = h;
    // Odd n: the last payload word's upper half is padding, which must be zero (the header
    // kernel zeroes only the whole words after the payload).
    if (i + 1 == a.n && (a.n & 1) != 0) payload[a.n] = 0;
    if (a.residual != nullptr) a.residual[i] = SubRn(v, HalfBitsToFloat(h));
  }
}

__global__ void __launch_bounds__(kThreads) Fp16DecodeAddKernel(DecodeArgs a) {
  if (*a.error != kDecodeOk) return;
  const DevBlobLayout l = BlobLayoutOf(a.blob);
  const uint16_t* payload = reinterpret_cast<const uint16_t*>(a.blob + l.payload_offset);
  const uint64_t base = uint64_t{blockIdx.x} * (kThreads * kItems) + threadIdx.x;
  uint16_t h[kItems];
  float o[kItems];
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    h[k] = i < a.n ? payload[i] : 0;
    o[k] = i < a.n ? a.out[i] : 0.0f;
  }
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    if (i < a.n) a.out[i] = AddRn(o[k], HalfBitsToFloat(h[k]));
  }
}

uint32_t Blocks(uint64_t n) {
  return static_cast<uint32_t>((n + kThreads * kItems - 1) / (kThreads * kItems));
}

}  // namespace

cudaError_t LaunchFp16Encode(const Fp16EncodeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  Fp16EncodeKernel<<<Blocks(a.n), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t LaunchFp16DecodeAdd(const DecodeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  Fp16DecodeAddKernel<<<Blocks(a.n), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace qtrain::compression::cuda
