// onebit (1-bit SGD with error feedback) on the GPU. Math, column partition and byte layout are
// compression/onebit.h's: bit i = (v_i >= 0), two means per column (mean_neg, mean_pos) as
// float(double(sum) / double(count)), params = [L], payload bit i%8 of byte i/8.
//
// Differences from the CPU codec:
//   - The class sums are taken by a shuffle tree over the block (each thread first adds its own
//     elements in increasing order), not in the CPU's 8-accumulator order, so a mean may differ
//     from the CPU's in its last bits (the sums of same-sign values agree to about
//     (L/8 + log2 L) * 2^-24 relative). The bits (signs of v = grad + residual, computed
//     identically) never differ; the residual differs exactly where the mean does.
//   - A column whose mean is not finite keeps its old residual and marks the blob invalid (the
//     CPU codec returns INVALID_ARGUMENT).
//
// Encode with error feedback, columns of up to 8192 elements (all 1-D tensors, and [out, in]
// weights with in <= 8192): one block per column holds v in registers, so grad and residual are
// read once and payload, scales and residual written once. Longer columns: one 1024-thread block
// per column reads the column twice (once for the means, once for bits and residual): 8 more
// bytes per element, usually from L2, and parallel only over columns.
// Decode-add: validates the scales, then one pass over out (the bit word and the column's means
// are broadcast loads).
#include <algorithm>

#include "compression/cuda/codec_kernels.h"
#include "compression/cuda/device_util.cuh"

namespace qtrain::compression::cuda {
namespace {

struct ColumnMeans {
  float neg;
  float pos;
  bool finite;
};

// Reduces the block's class sums and returns the column's means to every thread; thread 0 writes
// them to the scales and marks the blob on a non-finite mean.
__device__ ColumnMeans FinishColumn(const OneBitEncodeArgs& a, uint64_t column, uint32_t len,
                                    float pos, float neg, uint32_t count) {
  __shared__ float smem_f[32];
  __shared__ uint32_t smem_u[32];
  pos = BlockReduce(pos, FloatSumOp(), 0.0f, smem_f);
  neg = BlockReduce(neg, FloatSumOp(), 0.0f, smem_f);
  count = BlockReduce(count, SumOp(), 0u, smem_u);
  ColumnMeans m;
  m.neg = ClassMean(neg, len - count);
  m.pos = ClassMean(pos, count);
  m.finite = IsFiniteF(m.neg) && IsFiniteF(m.pos);
  if (threadIdx.x == 0) {
    float* scales = reinterpret_cast<float*>(a.blob + a.scales_offset);
    scales[2 * column] = m.neg;
    scales[2 * column + 1] = m.pos;
    if (!m.finite) MarkNonFinite(a.blob);
  }
  return m;
}

// Stores the ballot word of a warp group whose first element is `first` (global index).
__device__ __forceinline__ void StoreBitWord(const OneBitEncodeArgs& a, uint64_t first,
                                             uint32_t word) {
  uint32_t* payload = reinterpret_cast<uint32_t*>(a.blob + a.payload_offset);
  const uint64_t index = first >> 5;
  const uint32_t s = static_cast<uint32_t>(first & 31);
  if (!a.atomic_bits) {
    payload[index] = word;  // first % 32 == 0
    return;
  }
  if (word == 0) return;
  atomicOr(payload + index, word << s);
  if (s != 0 && index + 1 < a.payload_words && (word >> (32 - s)) != 0) {
    atomicOr(payload + index + 1, word >> (32 - s));
  }
}

// One column per block, v in registers: element j of the column is item j / blockDim.x of thread
// j % blockDim.x.
template <int kItems>
__global__ void __launch_bounds__(256) OneBitEncodeRegisters(OneBitEncodeArgs a) {
  const uint64_t column = blockIdx.x;
  const uint64_t begin = column * a.column;
  const uint32_t len = static_cast<uint32_t>(min(uint64_t{a.column}, a.n - begin));
  const float* grad = a.grad + begin;
  float* residual = a.residual != nullptr ? a.residual + begin : nullptr;
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
  float pos = 0.0f, neg = 0.0f;
  uint32_t count = 0;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = k * blockDim.x + threadIdx.x;
    if (j >= len) continue;
    if (v[k] >= 0.0f) {
      pos = AddRn(pos, v[k]);
      ++count;
    } else {
      neg = AddRn(neg, v[k]);
    }
  }
  const ColumnMeans m = FinishColumn(a, column, len, pos, neg, count);
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const uint32_t j = k * blockDim.x + threadIdx.x;
    const bool in = j < len;
    const uint32_t word = __ballot_sync(kFullMask, in && v[k] >= 0.0f);
    const uint32_t group = k * blockDim.x + 32 * WarpId();  // the warp's first element
    if (LaneId() == 0 && group < len) StoreBitWord(a, begin + group, word);
    if (in && residual != nullptr && m.finite) {
      residual[j] = SubRn(v[k], v[k] >= 0.0f ? m.pos : m.neg);
    }
  }
}

// One column per 1024-thread block, read twice.
__global__ void __launch_bounds__(kLoopThreads) OneBitEncodeLoop(OneBitEncodeArgs a) {
  const uint64_t column = blockIdx.x;
  const uint64_t begin = column * a.column;
  const uint32_t len = static_cast<uint32_t>(min(uint64_t{a.column}, a.n - begin));
  const float* grad = a.grad + begin;
  float* residual = a.residual != nullptr ? a.residual + begin : nullptr;
  float pos = 0.0f, neg = 0.0f;
  uint32_t count = 0;
  for (uint32_t j = threadIdx.x; j < len; j += blockDim.x) {
    const float v = residual != nullptr ? AddRn(grad[j], residual[j]) : grad[j];
    if (v >= 0.0f) {
      pos = AddRn(pos, v);
      ++count;
    } else {
      neg = AddRn(neg, v);
    }
  }
  const ColumnMeans m = FinishColumn(a, column, len, pos, neg, count);
  for (uint32_t base = 0; base < len; base += blockDim.x) {  // uniform trip count: ballots
    const uint32_t j = base + threadIdx.x;
    const bool in = j < len;
    float v = 0.0f;
    if (in) v = residual != nullptr ? AddRn(grad[j], residual[j]) : grad[j];
    const uint32_t word = __ballot_sync(kFullMask, in && v >= 0.0f);
    const uint32_t group = base + 32 * WarpId();
    if (LaneId() == 0 && group < len) StoreBitWord(a, begin + group, word);
    if (in && residual != nullptr && m.finite) residual[j] = SubRn(v, v >= 0.0f ? m.pos : m.neg);
  }
}

constexpr uint32_t kThreads = 256;
constexpr uint32_t kItems = 4;

__global__ void __launch_bounds__(kThreads) OneBitCheckScales(DecodeArgs a) {
  if (*a.error != kDecodeOk) return;
  const DevBlobHeader h = ReadBlobHeader(a.blob);
  const DevBlobLayout l = BlobLayoutFor(h.num_scales, h.num_params, h.payload_bytes);
  const float* scales = reinterpret_cast<const float*>(a.blob + l.scales_offset);
  for (uint64_t k = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; k < h.num_scales;
       k += uint64_t{gridDim.x} * blockDim.x) {
    if (!IsFiniteF(scales[k])) ReportError(a.error, kErrScaleValue);
  }
}

__global__ void __launch_bounds__(kThreads) OneBitDecodeAddKernel(DecodeArgs a) {
  if (*a.error != kDecodeOk) return;
  const DevBlobLayout l = BlobLayoutOf(a.blob);
  const uint32_t column = LoadLe32(a.blob + l.params_offset);
  const float* scales = reinterpret_cast<const float*>(a.blob + l.scales_offset);
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
    const uint32_t bit = (payload[i >> 5] >> (i & 31)) & 1u;
    const uint32_t c = static_cast<uint32_t>(i) / column;   // i < 2^31
    a.out[i] = AddRn(o[k], scales[2 * uint64_t{c} + bit]);  // [mean_neg, mean_pos]
  }
}

uint32_t Blocks(uint64_t n) {
  return static_cast<uint32_t>((n + kThreads * kItems - 1) / (kThreads * kItems));
}

}  // namespace

cudaError_t LaunchOneBitEncode(const OneBitEncodeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  const uint64_t columns = (a.n + a.column - 1) / a.column;
  const SegmentPlan plan = PlanSegment(a.column);
  const dim3 grid(static_cast<uint32_t>(columns));
  if (plan.loop) {
    OneBitEncodeLoop<<<grid, kLoopThreads, 0, stream>>>(a);
  } else if (plan.items == 4) {
    OneBitEncodeRegisters<4><<<grid, plan.threads, 0, stream>>>(a);
  } else if (plan.items == 8) {
    OneBitEncodeRegisters<8><<<grid, plan.threads, 0, stream>>>(a);
  } else if (plan.items == 16) {
    OneBitEncodeRegisters<16><<<grid, plan.threads, 0, stream>>>(a);
  } else {
    OneBitEncodeRegisters<32><<<grid, plan.threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t LaunchOneBitDecodeAdd(const DecodeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  const uint32_t blocks = Blocks(a.n);
  const uint32_t check_blocks = std::min(blocks, 1024u);
  OneBitCheckScales<<<check_blocks, kThreads, 0, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  OneBitDecodeAddKernel<<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace qtrain::compression::cuda
