// QSGD, dense coding, on the GPU. Math and byte layout are compression/qsgd.h's: per bucket of d
// elements norm = sqrtf(sum v^2), l_i = min(floorf(|v_i| * (s / norm) + U_i), s) with
// U_i = StreamUniform(key, i), code = l | sign << (b - 1) at bits [i*b, i*b + b), scales = the
// bucket norms, params = [s, d]. The Elias coding stays on the CPU.
//
// Differences from the CPU codec:
//   - The sum of squares is a shuffle tree over the warp or block that owns the bucket (each
//     thread first adds its own elements in order), not the CPU's 8-accumulator order, so a norm
//     may differ from the CPU's in its last bits (relative difference below about
//     (d/8 + log2 d) * 2^-24). Through s / norm that can move r_i + U_i across an integer, which
//     changes the level of an element by one with probability about that relative difference
//     times s: a handful of elements in millions. Everything else (the draws U_i, the rounding of
//     each product) is the CPU's.
//   - A bucket whose norm is not finite keeps its old residual and marks the blob invalid (the
//     CPU codec returns INVALID_ARGUMENT).
//
// Encode with error feedback holds v in registers, so grad and residual are read once and codes,
// norm and residual written once: buckets of up to 1024 elements (the default 512 included) go
// one per warp, eight to a block, with no block barrier; buckets of up to 8192 one per block.
// The codes of each warp's 32 consecutive elements are assembled into b words in shared memory
// (StoreCodeWords) and stored whole (or OR-ed into a zeroed payload when buckets do not start on
// 32-element boundaries). Buckets over 8192 elements are read twice by one 1024-thread block each.
// Decode-add: one kernel validates every norm and code, a second adds (one pass over out); for
// buckets of up to 1024 elements both go one bucket per warp and read its norm once.
#include <algorithm>

#include "compression/cuda/codec_kernels.h"
#include "compression/cuda/device_util.cuh"

namespace qtrain::compression::cuda {
namespace {

// Blocks of the one-bucket-per-warp kernels (buckets of up to kMaxWarpBucket elements).
constexpr uint32_t kWarpBucketThreads = 256;
constexpr uint64_t kMaxWarpBucket = 1024;

// The bucket's norm from the block's partial sums of squares; thread 0 stores it (and marks the
// blob on a non-finite norm).
__device__ float FinishBucket(const QsgdEncodeArgs& a, uint64_t bucket, float sum_squares) {
  __shared__ float smem[32];
  const float total = BlockReduce(sum_squares, FloatSumOp(), 0.0f, smem);
  const float norm = SqrtRn(total);
  if (threadIdx.x == 0) {
    reinterpret_cast<float*>(a.blob + a.scales_offset)[bucket] = norm;
    if (!IsFiniteF(norm)) MarkNonFinite(a.blob);
  }
  return norm;
}
// The same for a bucket owned by one warp: lane 0 stores the norm.
__device__ __forceinline__ float FinishWarpBucket(const QsgdEncodeArgs& a, uint64_t bucket,
                                                  float sum_squares) {
  const float total = __shfl_sync(kFullMask, WarpReduce(sum_squares, FloatSumOp()), 0);
  const float norm = SqrtRn(total);
  if (LaneId() == 0) {
    reinterpret_cast<float*>(a.blob + a.scales_offset)[bucket] = norm;
    if (!IsFiniteF(norm)) MarkNonFinite(a.blob);
  }
  return norm;
}

// Quantizes v (element i of the tensor; `in` false past the bucket's end), packs the warp's codes
// and writes the residual.
__device__ __forceinline__ void QuantizeAndStore(const QsgdEncodeArgs& a, float v, bool in,
                                                 uint64_t i, uint64_t group_first, bool store_group,
                                                 QsgdBucketParams p, bool finite,
                                                 float* residual_slot) {
  const float levels_f = static_cast<float>(a.levels);
  uint32_t level = 0;
  bool negative = false;
  if (in) {
    level = QsgdLevel(v, static_cast<uint32_t>(i), a.key, p.scale, levels_f);
    negative = level != 0 && (FloatBits(v) >> 31) != 0;
  }
  const uint32_t code = level | (uint32_t{negative} << (a.bits - 1));
  if (store_group) {  // warp-uniform
    StoreCodeWords(reinterpret_cast<uint32_t*>(a.blob + a.payload_offset), a.payload_words,
                   group_first * a.bits, code, a.bits, a.atomic_bits);
  }
  if (in && residual_slot != nullptr && finite) {
    *residual_slot = SubRn(v, QsgdDecodedValue(level, negative, p.unit));
  }
}

template <int kItems>
__global__ void __launch_bounds__(256) QsgdEncodeRegisters(QsgdEncodeArgs a) {
  const uint64_t bucket = blockIdx.x;
  const uint64_t lo = bucket * a.bucket;
  const uint32_t len = static_cast<uint32_t>(min(uint64_t{a.bucket}, a.n - lo));
  const float* grad = a.grad + lo;
  float* residual = a.residual != nullptr ? a.residual + lo : nullptr;
  float v[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = k * blockDim.x + threadIdx.x;
    v[k] = j < len ? grad[j] : 0.0f;
  }
  if (residual != nullptr) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const uint32_t j = k * blockDim.x + threadIdx.x;
      if (j < len) v[k] = AddRn(v[k], residual[j]);
    }
  }
  float sum_squares = 0.0f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = k * blockDim.x + threadIdx.x;
    if (j < len) sum_squares = AddRn(sum_squares, MulRn(v[k], v[k]));
  }
  const float norm = FinishBucket(a, bucket, sum_squares);
  const QsgdBucketParams p = QsgdParamsFor(norm, a.levels);
  const bool finite = IsFiniteF(norm);
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = k * blockDim.x + threadIdx.x;
    const uint32_t group = k * blockDim.x + 32 * WarpId();
    QuantizeAndStore(a, v[k], j < len, lo + j, lo + group, group < len, p, finite,
                     residual != nullptr ? residual + j : nullptr);
  }
}

// One bucket of up to 32 * kItems elements per warp (8 per block, no block barrier): element j of
// the bucket is item j / 32 of lane j % 32.
template <int kItems>
__global__ void __launch_bounds__(kWarpBucketThreads) QsgdEncodeWarps(QsgdEncodeArgs a,
                                                                       uint64_t buckets) {
  const uint64_t bucket = uint64_t{blockIdx.x} * (kWarpBucketThreads / 32) + WarpId();
  if (bucket >= buckets) return;  // warp-uniform
  const uint64_t lo = bucket * a.bucket;
  const uint32_t len = static_cast<uint32_t>(min(uint64_t{a.bucket}, a.n - lo));
  const float* grad = a.grad + lo;
  float* residual = a.residual != nullptr ? a.residual + lo : nullptr;
  const uint32_t lane = LaneId();
  float v[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = 32 * k + lane;
    v[k] = j < len ? grad[j] : 0.0f;
  }
  if (residual != nullptr) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const uint32_t j = 32 * k + lane;
      if (j < len) v[k] = AddRn(v[k], residual[j]);
    }
  }
  float sum_squares = 0.0f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (32 * k + lane < len) sum_squares = AddRn(sum_squares, MulRn(v[k], v[k]));
  }
  const float norm = FinishWarpBucket(a, bucket, sum_squares);
  const QsgdBucketParams p = QsgdParamsFor(norm, a.levels);
  const bool finite = IsFiniteF(norm);
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = 32 * k + lane;
    QuantizeAndStore(a, v[k], j < len, lo + j, lo + 32 * k, 32 * k < len, p, finite,
                     residual != nullptr ? residual + j : nullptr);
  }
}

__global__ void __launch_bounds__(kLoopThreads) QsgdEncodeLoop(QsgdEncodeArgs a) {
  const uint64_t bucket = blockIdx.x;
  const uint64_t lo = bucket * a.bucket;
  const uint32_t len = static_cast<uint32_t>(min(uint64_t{a.bucket}, a.n - lo));
  const float* grad = a.grad + lo;
  float* residual = a.residual != nullptr ? a.residual + lo : nullptr;
  float sum_squares = 0.0f;
  for (uint32_t j = threadIdx.x; j < len; j += blockDim.x) {
    const float v = residual != nullptr ? AddRn(grad[j], residual[j]) : grad[j];
    sum_squares = AddRn(sum_squares, MulRn(v, v));
  }
  const float norm = FinishBucket(a, bucket, sum_squares);
  const QsgdBucketParams p = QsgdParamsFor(norm, a.levels);
  const bool finite = IsFiniteF(norm);
  for (uint32_t base = 0; base < len; base += blockDim.x) {  // uniform trip count: shuffles
    const uint32_t j = base + threadIdx.x;
    const bool in = j < len;
    float v = 0.0f;
    if (in) v = residual != nullptr ? AddRn(grad[j], residual[j]) : grad[j];
    const uint32_t group = base + 32 * WarpId();
    QuantizeAndStore(a, v, in, lo + j, lo + group, group < len, p, finite,
                     residual != nullptr ? residual + j : nullptr);
  }
}

constexpr uint32_t kThreads = 256;
constexpr uint32_t kItems = 4;

// Every norm finite with its sign bit clear; every code valid for its bucket.
__global__ void __launch_bounds__(kThreads) QsgdCheckPayload(QsgdDecodeArgs q) {
  const DecodeArgs& a = q.d;
  if (*a.error != kDecodeOk) return;
  const DevBlobLayout l = BlobLayoutOf(a.blob);
  const float* norms = reinterpret_cast<const float*>(a.blob + l.scales_offset);
  const uint32_t* payload = reinterpret_cast<const uint32_t*>(a.blob + l.payload_offset);
  const uint64_t stride = uint64_t{gridDim.x} * blockDim.x;
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < a.n; i += stride) {
    const uint32_t k = static_cast<uint32_t>(i) / q.bucket;  // i < 2^31
    const float norm = norms[k];
    if (static_cast<uint32_t>(i) % q.bucket == 0 && !QsgdNormValid(norm)) {
      ReportError(a.error, kErrScaleValue);
    }
    const uint32_t code = ReadCode(payload, i, q.bits);
    ReportError(a.error, QsgdCodeError(code, q.levels, q.bits, norm == 0.0f));
  }
}

__global__ void __launch_bounds__(kThreads) QsgdDecodeAddKernel(QsgdDecodeArgs q) {
  const DecodeArgs& a = q.d;
  if (*a.error != kDecodeOk) return;
  const DevBlobLayout l = BlobLayoutOf(a.blob);
  const float* norms = reinterpret_cast<const float*>(a.blob + l.scales_offset);
  const uint32_t* payload = reinterpret_cast<const uint32_t*>(a.blob + l.payload_offset);
  const uint32_t level_mask = (1u << (q.bits - 1)) - 1;
  const uint64_t base = uint64_t{blockIdx.x} * (kThreads * kItems) + threadIdx.x;
  float o[kItems];
  uint32_t code[kItems];
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    o[k] = i < a.n ? a.out[i] : 0.0f;
    code[k] = i < a.n ? ReadCode(payload, i, q.bits) : 0;
  }
#pragma unroll
  for (uint32_t k = 0; k < kItems; ++k) {
    const uint64_t i = base + k * kThreads;
    const uint32_t level = code[k] & level_mask;
    if (i >= a.n || level == 0) continue;  // level-0 elements stay untouched (-0.0 included)
    const float norm = norms[static_cast<uint32_t>(i) / q.bucket];
    const float unit = QsgdParamsFor(norm, q.levels).unit;
    a.out[i] = AddRn(o[k], QsgdDecodedValue(level, (code[k] >> (q.bits - 1)) != 0, unit));
  }
}

// Decode with one bucket of up to 32 * kItems elements per warp, element j of the bucket in item
// j / 32 of lane j % 32: the norm (and the unit derived from it) is read once per bucket.
// WarpBucketOf gives the warp its bucket; live is false (the whole warp returns) once an error is
// recorded or past the last bucket.
struct WarpBucket {
  bool live;
  float norm;
  const uint32_t* payload;
  uint64_t lo;   // its first element
  uint32_t len;  // its elements
};
__device__ __forceinline__ WarpBucket WarpBucketOf(const QsgdDecodeArgs& q, uint64_t buckets) {
  WarpBucket w{};
  const uint64_t bucket = uint64_t{blockIdx.x} * (kWarpBucketThreads / 32) + WarpId();
  if (*q.d.error != kDecodeOk || bucket >= buckets) return w;
  const DevBlobLayout l = BlobLayoutOf(q.d.blob);
  w.live = true;
  w.norm = reinterpret_cast<const float*>(q.d.blob + l.scales_offset)[bucket];
  w.payload = reinterpret_cast<const uint32_t*>(q.d.blob + l.payload_offset);
  w.lo = bucket * q.bucket;
  w.len = static_cast<uint32_t>(min(uint64_t{q.bucket}, q.d.n - w.lo));
  return w;
}

template <int kItems>
__global__ void __launch_bounds__(kWarpBucketThreads) QsgdCheckWarps(QsgdDecodeArgs q,
                                                                      uint64_t buckets) {
  const WarpBucket w = WarpBucketOf(q, buckets);
  if (!w.live) return;
  if (LaneId() == 0 && !QsgdNormValid(w.norm)) ReportError(q.d.error, kErrScaleValue);
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = 32 * k + LaneId();
    if (j < w.len) {
      const uint32_t code = ReadCode(w.payload, w.lo + j, q.bits);
      ReportError(q.d.error, QsgdCodeError(code, q.levels, q.bits, w.norm == 0.0f));
    }
  }
}

template <int kItems>
__global__ void __launch_bounds__(kWarpBucketThreads) QsgdDecodeAddWarps(QsgdDecodeArgs q,
                                                                          uint64_t buckets) {
  const WarpBucket w = WarpBucketOf(q, buckets);
  if (!w.live) return;
  const float unit = QsgdParamsFor(w.norm, q.levels).unit;
  const uint32_t level_mask = (1u << (q.bits - 1)) - 1;
  float* out = q.d.out + w.lo;
  float o[kItems];
  uint32_t code[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = 32 * k + LaneId();
    o[k] = j < w.len ? out[j] : 0.0f;
    code[k] = j < w.len ? ReadCode(w.payload, w.lo + j, q.bits) : 0;
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = 32 * k + LaneId();
    const uint32_t level = code[k] & level_mask;
    if (j >= w.len || level == 0) continue;  // level-0 elements stay untouched (-0.0 included)
    out[j] = AddRn(o[k], QsgdDecodedValue(level, (code[k] >> (q.bits - 1)) != 0, unit));
  }
}

// Items per lane for one bucket per warp: the smallest power of two with 32 * items >= bucket.
uint32_t WarpItems(uint64_t bucket) {
  uint32_t items = 1;
  while (32 * uint64_t{items} < bucket) items *= 2;
  return items;
}

// Launches KERNEL<items>(args, buckets) for one bucket per warp.
#define QTRAIN_LAUNCH_WARP_BUCKETS(KERNEL, items, buckets, stream, args)                      \
  do {                                                                                        \
    const uint32_t grid_ = static_cast<uint32_t>(((buckets) + kWarpBucketThreads / 32 - 1) / \
                                                 (kWarpBucketThreads / 32));                  \
    switch (items) {                                                                          \
      case 1: KERNEL<1><<<grid_, kWarpBucketThreads, 0, stream>>>(args, buckets); break;     \
      case 2: KERNEL<2><<<grid_, kWarpBucketThreads, 0, stream>>>(args, buckets); break;     \
      case 4: KERNEL<4><<<grid_, kWarpBucketThreads, 0, stream>>>(args, buckets); break;     \
      case 8: KERNEL<8><<<grid_, kWarpBucketThreads, 0, stream>>>(args, buckets); break;     \
      case 16: KERNEL<16><<<grid_, kWarpBucketThreads, 0, stream>>>(args, buckets); break;   \
      default: KERNEL<32><<<grid_, kWarpBucketThreads, 0, stream>>>(args, buckets); break;   \
    }                                                                                         \
  } while (0)

uint32_t Blocks(uint64_t n) {
  return static_cast<uint32_t>((n + kThreads * kItems - 1) / (kThreads * kItems));
}

}  // namespace

cudaError_t LaunchQsgdEncode(const QsgdEncodeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  const uint64_t buckets = (a.n + a.bucket - 1) / a.bucket;
  const uint64_t len = a.n < a.bucket ? a.n : a.bucket;
  if (len <= kMaxWarpBucket) {
    QTRAIN_LAUNCH_WARP_BUCKETS(QsgdEncodeWarps, WarpItems(len), buckets, stream, a);
    return cudaGetLastError();
  }
  const SegmentPlan plan = PlanSegment(len);
  const dim3 grid(static_cast<uint32_t>(buckets));
  if (plan.loop) {
    QsgdEncodeLoop<<<grid, kLoopThreads, 0, stream>>>(a);
  } else if (plan.items == 4) {
    QsgdEncodeRegisters<4><<<grid, plan.threads, 0, stream>>>(a);
  } else if (plan.items == 8) {
    QsgdEncodeRegisters<8><<<grid, plan.threads, 0, stream>>>(a);
  } else if (plan.items == 16) {
    QsgdEncodeRegisters<16><<<grid, plan.threads, 0, stream>>>(a);
  } else {
    QsgdEncodeRegisters<32><<<grid, plan.threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t LaunchQsgdDecodeAdd(const QsgdDecodeArgs& q, cudaStream_t stream) {
  if (q.d.n == 0) return cudaSuccess;
  const uint64_t len = q.d.n < q.bucket ? q.d.n : q.bucket;
  if (len <= kMaxWarpBucket) {
    const uint64_t buckets = (q.d.n + q.bucket - 1) / q.bucket;
    const uint32_t items = WarpItems(len);
    QTRAIN_LAUNCH_WARP_BUCKETS(QsgdCheckWarps, items, buckets, stream, q);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    QTRAIN_LAUNCH_WARP_BUCKETS(QsgdDecodeAddWarps, items, buckets, stream, q);
    return cudaGetLastError();
  }
  const uint32_t blocks = Blocks(q.d.n);
  const uint32_t check_blocks = std::min(blocks * kItems, 4096u);
  QsgdCheckPayload<<<check_blocks, kThreads, 0, stream>>>(q);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  QsgdDecodeAddKernel<<<blocks, kThreads, 0, stream>>>(q);
  return cudaGetLastError();
}

}  // namespace qtrain::compression::cuda
