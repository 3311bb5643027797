// TernGrad on the GPU. Math and byte layout are compression/terngrad.h's: statistics of v (sum
// and sum of squares in double, max |v|), the local scale s = min(max|v|, float(c * sigma)),
// b_i = StreamUniform(key, i) < min(|v_i|, s) * (1 / scale), 2-bit codes (01 = +1, 10 = -1) at
// bits [2*(i%4), 2*(i%4)+1] of byte i/4, scales = [scale], no params.
//
// Differences from the CPU codec:
//   - The double sums are taken per thread in index order, then by a shuffle tree over each of
//     TernStatsBlocks(n) blocks and over the blocks (the CPU uses 8 accumulators in index
//     order). In double the difference is ~1e-16 relative, so the float scale c * sigma differs
//     from the CPU's only when it lies that close to a rounding boundary; max|v| (the scale when
//     clipping does not bite, and always with clip=0) is exact.
//   - A non-finite v, or a shared scale that is not finite and >= 0, marks the blob invalid and
//     leaves the residual unchanged (the CPU codec returns INVALID_ARGUMENT, also leaving it).
//
// The scale of the whole tensor must be known before any element is ternarized, so encoding
// reads v twice: a statistics pass (grad + residual: 8 bytes per element) and the ternarize pass
// (8 bytes read, the residual's 4 written, n/4 bytes of payload). PrepareScale / EncodeWithScale
// (the shared-scale steps) read v three times: statistics (writing v into the residual), local
// statistics again for the clip level, ternarize. Decode-add: one kernel checks every code for
// the invalid 11, a second adds (one pass over out).
#include <algorithm>

#include "compression/cuda/codec_kernels.h"
#include "compression/cuda/device_util.cuh"

namespace qtrain::compression::cuda {
namespace {

constexpr uint32_t kThreads = 256;
constexpr uint32_t kMaxStatsBlocks = 1024;

// Folds one element of v into a thread's statistics.
__device__ __forceinline__ void TernTake(const TernStatsArgs& a, float v, double* sum,
                                         double* sum_squares, uint32_t* max_bits) {
  const uint32_t bits = FloatBits(v) & 0x7fffffffu;
  *max_bits = bits > *max_bits ? bits : *max_bits;
  if (a.sums) {
    const double d = v;
    *sum = DAddRn(*sum, d);
    *sum_squares = DAddRn(*sum_squares, DMulRn(d, d));
  }
}

__device__ __forceinline__ void TernTake4(const TernStatsArgs& a, float4 v, double* sum,
                                          double* sum_squares, uint32_t* max_bits) {
  TernTake(a, v.x, sum, sum_squares, max_bits);
  TernTake(a, v.y, sum, sum_squares, max_bits);
  TernTake(a, v.z, sum, sum_squares, max_bits);
  TernTake(a, v.w, sum, sum_squares, max_bits);
}

// v = x + y (y may be null) for 4 consecutive elements, stored back into y when write_sum.
__device__ __forceinline__ float4 TernSum4(const TernStatsArgs& a, uint64_t j) {
  float4 v = reinterpret_cast<const float4*>(a.x)[j];
  if (a.y != nullptr) {
    const float4 y = reinterpret_cast<const float4*>(a.y)[j];
    v = make_float4(AddRn(v.x, y.x), AddRn(v.y, y.y), AddRn(v.z, y.z), AddRn(v.w, y.w));
    if (a.write_sum) reinterpret_cast<float4*>(a.y)[j] = v;
  }
  return v;
}

__global__ void __launch_bounds__(kThreads) TernStatsKernel(TernStatsArgs a) {
  double sum = 0.0, sum_squares = 0.0;
  uint32_t max_bits = 0;
  const uint64_t stride = uint64_t{gridDim.x} * kThreads;
  const uint64_t tid = uint64_t{blockIdx.x} * kThreads + threadIdx.x;
  // 16-byte loads where x and y allow them (cudaMalloc'd tensors do); each thread still adds its
  // elements in index order. The last n % 4 elements (or all, unaligned) go one by one.
  uint64_t scalar_from = 0;
  const bool aligned = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(a.y) % 16 == 0;
  if (aligned) {
    const uint64_t n4 = a.n / 4;
    uint64_t j = tid;
    // Two vectors in flight per thread for memory-level parallelism.
    for (; j + stride < n4; j += 2 * stride) {
      const float4 v0 = TernSum4(a, j);
      const float4 v1 = TernSum4(a, j + stride);
      TernTake4(a, v0, &sum, &sum_squares, &max_bits);
      TernTake4(a, v1, &sum, &sum_squares, &max_bits);
    }
    for (; j < n4; j += stride) {
      const float4 v0 = TernSum4(a, j);
      TernTake4(a, v0, &sum, &sum_squares, &max_bits);
    }
    scalar_from = 4 * n4;
  }
  for (uint64_t i = scalar_from + tid; i < a.n; i += stride) {
    float v = a.x[i];
    if (a.y != nullptr) {
      v = AddRn(v, a.y[i]);
      if (a.write_sum) a.y[i] = v;
    }
    TernTake(a, v, &sum, &sum_squares, &max_bits);
  }
  __shared__ double smem_d[32];
  __shared__ uint32_t smem_u[32];
  sum = BlockReduce(sum, DoubleSumOp(), 0.0, smem_d);
  sum_squares = BlockReduce(sum_squares, DoubleSumOp(), 0.0, smem_d);
  max_bits = BlockReduce(max_bits, MaxOp(), 0u, smem_u);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = TernPartial{sum, sum_squares, max_bits, 0};
}

// One block of kMaxStatsBlocks threads combines the partials in a fixed tree.
__global__ void __launch_bounds__(kMaxStatsBlocks)
    TernFinalizeKernel(TernStatsArgs a, uint32_t blocks) {
  TernPartial p{0.0, 0.0, 0, 0};
  if (threadIdx.x < blocks) p = a.partials[threadIdx.x];
  __shared__ double smem_d[32];
  __shared__ uint32_t smem_u[32];
  const double sum = BlockReduce(p.sum, DoubleSumOp(), 0.0, smem_d);
  const double sum_squares = BlockReduce(p.sum_squares, DoubleSumOp(), 0.0, smem_d);
  const uint32_t max_bits = BlockReduce(p.max_abs_bits, MaxOp(), 0u, smem_u);
  if (threadIdx.x == 0) {
    *a.local_out = TernScaleFromStats(sum, sum_squares, max_bits, a.n, a.clip_sigma);
  }
}

constexpr uint32_t kItems = 4;

__global__ void __launch_bounds__(kThreads) TernarizeKernel(TernarizeArgs a) {
  const float clip_at = *a.clip_at;
  const float raw_scale = *a.scale;
  // CheckScale (terngrad.cc): the scale sent must be finite and >= 0; -0 is sent as +0.
  const bool valid = IsFiniteF(clip_at) && IsFiniteF(raw_scale) && raw_scale >= 0.0f;
  const float scale = raw_scale == 0.0f ? 0.0f : raw_scale;
  const float inv = valid ? TernInverse(scale) : 0.0f;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    reinterpret_cast<float*>(a.blob + a.scales_offset)[0] = valid ? scale : raw_scale;
    if (!valid) MarkNonFinite(a.blob);
  }
  uint32_t* payload = reinterpret_cast<uint32_t*>(a.blob + a.payload_offset);
  const uint64_t base = uint64_t{blockIdx.x} * (kThreads * kItems) + threadIdx.x;
  float v[kItems];
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    v[k] = i < a.n ? a.x[i] : 0.0f;
  }
  if (a.y != nullptr) {
#pragma unroll
    for (uint32_t k = 0; k < kItems; ++k) {
      const uint64_t i = base + k * kThreads;
      if (i < a.n) v[k] = AddRn(v[k], a.y[i]);
    }
  }
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    const bool in = i < a.n;
    const uint32_t code =
        (in && valid) ? TernCode(v[k], static_cast<uint32_t>(i), a.key, clip_at, inv) : 0u;
    const uint32_t low = __ballot_sync(kFullMask, (code & 1u) != 0);
    const uint32_t high = __ballot_sync(kFullMask, (code & 2u) != 0);
    // The warp's 32 elements start at a multiple of 32: payload words 2g and 2g + 1.
    const uint64_t group = (base - LaneId() + k * kThreads) >> 5;
    const uint64_t index = 2 * group + LaneId();
    if (LaneId() < 2 && index < a.payload_words) payload[index] = TwoBitWord(low, high, LaneId());
    if (in && valid && a.residual != nullptr) {
      a.residual[i] = SubRn(v[k], TernValue(code, scale));
    }
  }
}

__global__ void __launch_bounds__(kThreads) TernCheckCodes(DecodeArgs a) {
  if (*a.error != kDecodeOk) return;
  const DevBlobHeader h = ReadBlobHeader(a.blob);
  const DevBlobLayout l = BlobLayoutFor(h.num_scales, h.num_params, h.payload_bytes);
  const uint32_t* payload = reinterpret_cast<const uint32_t*>(a.blob + l.payload_offset);
  const uint64_t words = (h.payload_bytes + 3) / 4;  // the bytes past the payload are zero
  const uint64_t stride = uint64_t{gridDim.x} * blockDim.x;
  for (uint64_t w = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; w < words; w += stride) {
    if (TernWordInvalid(payload[w])) ReportError(a.error, kErrInvalidTernaryCode);
  }
}

__global__ void __launch_bounds__(kThreads) TernDecodeAddKernel(DecodeArgs a) {
  if (*a.error != kDecodeOk) return;
  const DevBlobLayout l = BlobLayoutOf(a.blob);
  const float scale = *reinterpret_cast<const float*>(a.blob + l.scales_offset);
  const uint32_t* payload = reinterpret_cast<const uint32_t*>(a.blob + l.payload_offset);
  const uint64_t base = uint64_t{blockIdx.x} * (kThreads * kItems) + threadIdx.x;
  float o[kItems];
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    o[k] = i < a.n ? a.out[i] : 0.0f;
  }
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    if (i >= a.n) continue;
    const uint32_t code = (payload[i >> 4] >> (2 * (i & 15))) & 3u;
    a.out[i] = AddRn(o[k], TernValue(code, scale));  // code 00 adds +0.0f, as the CPU does
  }
}

uint32_t Blocks(uint64_t n) {
  return static_cast<uint32_t>((n + kThreads * kItems - 1) / (kThreads * kItems));
}

}  // namespace

uint32_t TernStatsBlocks(uint64_t n) {
  const uint64_t blocks = (n + 2047) / 2048;
  return static_cast<uint32_t>(blocks < 1 ? 1
                                          : (blocks > kMaxStatsBlocks ? kMaxStatsBlocks : blocks));
}

cudaError_t LaunchTernLocalScale(const TernStatsArgs& a, cudaStream_t stream) {
  const uint32_t blocks = TernStatsBlocks(a.n);
  TernStatsKernel<<<blocks, kThreads, 0, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  TernFinalizeKernel<<<1, kMaxStatsBlocks, 0, stream>>>(a, blocks);
  return cudaGetLastError();
}

cudaError_t LaunchTernarize(const TernarizeArgs& a, cudaStream_t stream) {
  // At least one block: block 0 writes the scale even for an empty tensor.
  const uint32_t blocks = a.n == 0 ? 1 : Blocks(a.n);
  TernarizeKernel<<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t LaunchTernDecodeAdd(const DecodeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  const uint32_t blocks = Blocks(a.n);
  const uint32_t check_blocks = std::min(blocks, 1024u);
  TernCheckCodes<<<check_blocks, kThreads, 0, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  TernDecodeAddKernel<<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace qtrain::compression::cuda
