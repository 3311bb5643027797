// Device helpers shared by the CUDA codec kernels: deterministic warp and block reductions and
// scans (a fixed shuffle tree, so a given block size always adds in the same order), packing of a
// warp's b-bit codes into payload words, and the blob's non-finite mark.
//
// Only for .cu files of compression/cuda/. Every block-level helper must be reached by all
// threads of the block (it calls __syncthreads) and takes a __shared__ scratch array of 32 slots.
#ifndef QTRAIN_COMPRESSION_CUDA_DEVICE_UTIL_CUH_
#define QTRAIN_COMPRESSION_CUDA_DEVICE_UTIL_CUH_

#include <cstdint>

#include "compression/cuda/blob_check.h"
#include "compression/cuda/codec_math.h"

namespace qtrain::compression::cuda {

inline constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ uint32_t LaneId() { return threadIdx.x & 31u; }
__device__ __forceinline__ uint32_t WarpId() { return threadIdx.x >> 5; }
__device__ __forceinline__ uint32_t NumWarps() { return (blockDim.x + 31u) >> 5; }

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct FloatSumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return __fadd_rn(a, b); }
};
struct DoubleSumOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return __dadd_rn(a, b); }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

// Tree reduction over the warp; the result is in lane 0.
template <typename T, typename Op>
__device__ __forceinline__ T WarpReduce(T x, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_down_sync(kFullMask, x, offset));
  return x;
}

// Reduction over the block (blockDim.x a multiple of 32); the result is returned to every thread.
template <typename T, typename Op>
__device__ __forceinline__ T BlockReduce(T x, Op op, T identity, T* smem) {
  x = WarpReduce(x, op);
  if (LaneId() == 0) smem[WarpId()] = x;
  __syncthreads();
  if (WarpId() == 0) {
    T y = LaneId() < NumWarps() ? smem[LaneId()] : identity;
    y = WarpReduce(y, op);
    if (LaneId() == 0) smem[0] = y;
  }
  __syncthreads();
  const T result = smem[0];
  __syncthreads();  // smem may be reused by the caller
  return result;
}

// Exclusive prefix sum over the block of an unsigned integer; *total receives the block's sum.
template <typename T>
__device__ __forceinline__ T BlockExclusiveSum(T x, T* smem, T* total) {
  T inclusive = x;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T y = __shfl_up_sync(kFullMask, inclusive, offset);
    if (LaneId() >= static_cast<uint32_t>(offset)) inclusive += y;
  }
  if (LaneId() == 31) smem[WarpId()] = inclusive;
  __syncthreads();
  if (WarpId() == 0) {
    T w = LaneId() < NumWarps() ? smem[LaneId()] : T{0};
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const T y = __shfl_up_sync(kFullMask, w, offset);
      if (LaneId() >= static_cast<uint32_t>(offset)) w += y;
    }
    smem[LaneId()] = w;  // inclusive scan of the warp totals
  }
  __syncthreads();
  const T warp_prefix = WarpId() > 0 ? smem[WarpId() - 1] : T{0};
  *total = smem[NumWarps() - 1];
  __syncthreads();
  return warp_prefix + inclusive - x;
}

// Exclusive prefix maximum over the block (identity 0).
__device__ __forceinline__ uint64_t BlockExclusiveMax(uint64_t x, uint64_t* smem) {
  uint64_t inclusive = x;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const uint64_t y = __shfl_up_sync(kFullMask, inclusive, offset);
    if (LaneId() >= static_cast<uint32_t>(offset) && y > inclusive) inclusive = y;
  }
  uint64_t exclusive = __shfl_up_sync(kFullMask, inclusive, 1);
  if (LaneId() == 0) exclusive = 0;
  if (LaneId() == 31) smem[WarpId()] = inclusive;
  __syncthreads();
  uint64_t warp_prefix = 0;
  for (uint32_t w = 0; w < WarpId(); ++w)
    warp_prefix = smem[w] > warp_prefix ? smem[w] : warp_prefix;
  __syncthreads();
  return exclusive > warp_prefix ? exclusive : warp_prefix;
}

// Shuffles of an EntryRun (field by field).
__device__ __forceinline__ EntryRun ShflUpRun(const EntryRun& r, int offset) {
  EntryRun o;
  o.count = __shfl_up_sync(kFullMask, r.count, offset);
  o.first = __shfl_up_sync(kFullMask, r.first, offset);
  o.last = __shfl_up_sync(kFullMask, r.last, offset);
  o.unused = 0;
  o.inner = __shfl_up_sync(kFullMask, r.inner, offset);
  return o;
}
__device__ __forceinline__ EntryRun ShflDownRun(const EntryRun& r, int offset) {
  EntryRun o;
  o.count = __shfl_down_sync(kFullMask, r.count, offset);
  o.first = __shfl_down_sync(kFullMask, r.first, offset);
  o.last = __shfl_down_sync(kFullMask, r.last, offset);
  o.unused = 0;
  o.inner = __shfl_down_sync(kFullMask, r.inner, offset);
  return o;
}

// In-order combination of the block's runs (thread t's run precedes thread t + 1's); the result is
// returned to every thread.
__device__ __forceinline__ EntryRun BlockCombineRuns(EntryRun r, EntryRun* smem) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const EntryRun other = ShflDownRun(r, offset);
    // Lane l combines with lane l + offset (a later run); lanes whose partner is past the warp
    // keep theirs. Lane 0 ends with the whole warp, in order.
    if (LaneId() + offset < 32) r = CombineRuns(r, other);
  }
  if (LaneId() == 0) smem[WarpId()] = r;
  __syncthreads();
  EntryRun total = EmptyRun();
  for (uint32_t w = 0; w < NumWarps(); ++w) total = CombineRuns(total, smem[w]);
  __syncthreads();
  return total;
}

// In-order exclusive scan of the block's runs: thread t gets the combination of threads < t.
__device__ __forceinline__ EntryRun BlockExclusiveRuns(EntryRun r, EntryRun* smem,
                                                       EntryRun* total) {
  EntryRun inclusive = r;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const EntryRun before = ShflUpRun(inclusive, offset);
    if (LaneId() >= static_cast<uint32_t>(offset)) inclusive = CombineRuns(before, inclusive);
  }
  EntryRun exclusive = ShflUpRun(inclusive, 1);
  if (LaneId() == 0) exclusive = EmptyRun();
  if (LaneId() == 31) smem[WarpId()] = inclusive;
  __syncthreads();
  EntryRun warp_prefix = EmptyRun();
  for (uint32_t w = 0; w < WarpId(); ++w) warp_prefix = CombineRuns(warp_prefix, smem[w]);
  EntryRun all = EmptyRun();
  for (uint32_t w = 0; w < NumWarps(); ++w) all = CombineRuns(all, smem[w]);
  *total = all;
  __syncthreads();
  return CombineRuns(warp_prefix, exclusive);
}

// Stores the warp's 32 codes of b <= 16 bits (lane e's code at global bits
// [first_bit + e*b, first_bit + e*b + b)): each lane ORs its code's pieces (PlaceCode) into the
// warp's row of shared words, then lanes w < WordsSpanned(b, s) store word w whole (when the
// group starts on a word boundary and owns its words: atomic == false), else atomicOr it into a
// payload the caller zeroed. Words at or past payload_words are dropped. Every lane must call it.
__device__ __forceinline__ void StoreCodeWords(uint32_t* payload, uint64_t payload_words,
                                               uint64_t first_bit, uint32_t code, uint32_t b,
                                               bool atomic) {
  __shared__ uint32_t rows[32][kMaxGroupWords];  // one row per warp of the block
  uint32_t* row = rows[WarpId()];
  const uint32_t s = static_cast<uint32_t>(first_bit & 31);
  const uint32_t lane = LaneId();
  const uint32_t spanned = WordsSpanned(b, s);
  if (lane < spanned) row[lane] = 0;
  __syncwarp();
  const CodePlace p = PlaceCode(code, lane, b, s);
  if (p.low != 0) atomicOr(row + p.word, p.low);
  if (p.high != 0) atomicOr(row + p.word + 1, p.high);
  __syncwarp();
  const uint32_t word = lane < spanned ? row[lane] : 0;
  __syncwarp();  // the row is reused by the warp's next group
  const uint64_t index = (first_bit >> 5) + lane;
  if (lane < spanned && index < payload_words) {
    if (atomic) {
      if (word != 0) atomicOr(payload + index, word);
    } else {
      payload[index] = word;
    }
  }
}

// Marks the blob invalid (the encoder met a non-finite value); see compression/packed_blob.h.
__device__ __forceinline__ void MarkNonFinite(uint8_t* blob) {
  atomicOr(reinterpret_cast<unsigned int*>(blob + kDevReservedOffset), kDevBlobReservedNonFinite);
}

// Records a decode error: the largest code wins, so the report does not depend on timing.
__device__ __forceinline__ void ReportError(int32_t* error, int32_t code) {
  if (code != kDecodeOk) atomicMax(error, code);
}

}  // namespace qtrain::compression::cuda

#endif  // QTRAIN_COMPRESSION_CUDA_DEVICE_UTIL_CUH_
