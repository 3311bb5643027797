// Device-side building blocks shared by the kernels of this folder (private: include from .cu
// files only): a grid-stride element-wise launcher, deterministic flat and segmented reductions
// (shapes in launch_util.h), and scalar helpers that reproduce the CPU code's exact operations.
//
// Exactness: the .cu files of this folder are compiled with --fmad=false (see CMakeLists.txt), so
// a*b+c is a rounded product then a rounded sum, as on the CPU (-ffp-contract=off). Division and
// square root are IEEE (nvcc's defaults -prec-div=true -prec-sqrt=true -ftz=false). Only the
// transcendental functions (tanhf, logf, expf, exp, log, pow) differ from glibc, by a few ulp.
//
// A reduction is described by an Op functor passed by value to the kernels:
//   using Acc = ...;                                 // trivially constructible, <= 64 bytes
//   __device__ Acc Identity() const;
//   __device__ void Accumulate(Acc& acc, int64_t i) const;          // flat; may write element i
//   __device__ void Accumulate(Acc& acc, int64_t seg, int64_t j) const;  // segmented
//   __device__ Acc Combine(const Acc& a, const Acc& b) const;
//   __device__ void Finish(const Acc& total) const;                 // flat: one thread
//   __device__ void Finish(int64_t seg, const Acc& total) const;    // segmented: one per segment
// Accumulate may write outputs of element i (fused passes): each element is visited exactly once.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_KERNEL_UTIL_CUH_
#define QTRAIN_WORKER_KERNELS_CUDA_KERNEL_UTIL_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cuda/cuda_context.h"
#include "worker/kernels/cuda/launch_util.h"

namespace qtrain::kernels::cuda::detail {

// ---- Scalar helpers mirroring the CPU code ---------------------------------------------------

// std::clamp(v, lo, hi): v < lo ? lo : (hi < v ? hi : v) (NaN passes through).
__device__ __forceinline__ float Clamp(float v, float lo, float hi) {
  return v < lo ? lo : (hi < v ? hi : v);
}
// std::max(a, b) / std::min(a, b) for floats and doubles, with the standard's operand choice.
__device__ __forceinline__ float StdMax(float a, float b) { return a < b ? b : a; }
__device__ __forceinline__ float StdMin(float a, float b) { return b < a ? b : a; }
__device__ __forceinline__ double StdMax(double a, double b) { return a < b ? b : a; }
__device__ __forceinline__ double StdMin(double a, double b) { return b < a ? b : a; }

// quant::RoundNonNegative: float(int32(v + 0.5f)), truncating. Precondition 0 <= v < 2^31.
__device__ __forceinline__ float RoundNonNegative(float v) {
  return static_cast<float>(static_cast<int32_t>(v + 0.5f));
}
// quant::RoundUnit with Discretize::kOn.
__device__ __forceinline__ float RoundUnit(float v, float n) { return RoundNonNegative(v * n) / n; }

__device__ __forceinline__ int64_t GlobalThread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t GridThreads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// ---- Element-wise ---------------------------------------------------------------------------

template <class F>
__global__ void __launch_bounds__(kThreads) MapKernel(int64_t n, F f) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) f(i);
}

// Runs f(i) for i in [0, n) (nothing for n <= 0), grid-stride, at most kElementwiseMaxBlocks
// blocks. Returns the launch status naming `name`.
template <class F>
absl::Status LaunchMap(const CudaContext& ctx, const char* name, int64_t n, const F& f) {
  if (n <= 0) return absl::OkStatus();
  MapKernel<<<GridFor(n, kThreads, static_cast<unsigned>(kElementwiseMaxBlocks)), kThreads, 0,
              ctx.stream>>>(n, f);
  return LaunchStatus(name);
}

// ---- Deterministic reductions ----------------------------------------------------------------

// Combines the kThreads values of a block in a fixed tree; the result is valid in every thread.
// Call at most once per kernel (the shared array is reused without a leading barrier).
template <class Op>
__device__ typename Op::Acc BlockReduce(const Op& op, const typename Op::Acc& value) {
  using Acc = typename Op::Acc;
  __shared__ Acc shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      shared[threadIdx.x] = op.Combine(shared[threadIdx.x], shared[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  return shared[0];
}

template <class Op>
__global__ void __launch_bounds__(kThreads)
    ReducePartialKernel(Op op, int64_t n, typename Op::Acc* partial) {
  typename Op::Acc acc = op.Identity();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    op.Accumulate(acc, i);
  }
  acc = BlockReduce(op, acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <class Op>
__global__ void __launch_bounds__(kThreads)
    ReduceFinalKernel(Op op, int num_partials, const typename Op::Acc* partial) {
  typename Op::Acc acc = op.Identity();
  for (int i = threadIdx.x; i < num_partials; i += kThreads) acc = op.Combine(acc, partial[i]);
  acc = BlockReduce(op, acc);
  if (threadIdx.x == 0) op.Finish(acc);
}

// Flat reduction of op over [0, n) (n >= 0; n == 0 finishes with the identity). The partials use
// the first kReducePartialBytes of `workspace`.
template <class Op>
absl::Status LaunchReduce(const CudaContext& ctx, const char* name, int64_t n, const Op& op,
                          void* workspace) {
  static_assert(sizeof(typename Op::Acc) <= kMaxReduceAccBytes, "accumulator too large");
  auto* partial = static_cast<typename Op::Acc*>(workspace);
  const int blocks = ReduceBlocks(n);
  ReducePartialKernel<<<blocks, kThreads, 0, ctx.stream>>>(op, n, partial);
  absl::Status status = LaunchStatus(name);
  if (!status.ok()) return status;
  ReduceFinalKernel<<<1, kThreads, 0, ctx.stream>>>(op, blocks, partial);
  return LaunchStatus(name);
}

// Segmented: block b handles segment b / split, part b % split, elements
// j = part * T + t + k * (split * T) of that segment.
template <class Op>
__global__ void __launch_bounds__(kThreads)
    SegmentPartialKernel(Op op, int64_t length, int split, typename Op::Acc* partial) {
  const int64_t segment = blockIdx.x / split;
  const int part = static_cast<int>(blockIdx.x % split);
  typename Op::Acc acc = op.Identity();
  const int64_t stride = static_cast<int64_t>(split) * kThreads;
  for (int64_t j = static_cast<int64_t>(part) * kThreads + threadIdx.x; j < length; j += stride) {
    op.Accumulate(acc, segment, j);
  }
  acc = BlockReduce(op, acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <class Op>
__global__ void __launch_bounds__(kThreads)
    SegmentFinalKernel(Op op, int64_t segments, int split, const typename Op::Acc* partial) {
  const int64_t segment = GlobalThread();
  if (segment >= segments) return;
  typename Op::Acc acc = partial[segment * split];
  for (int p = 1; p < split; ++p) acc = op.Combine(acc, partial[segment * split + p]);
  op.Finish(segment, acc);
}

// `segments` reductions of `length` elements each (segments >= 1, length >= 0). The partials use
// the first SegmentPartialBytes(segments, length, sizeof(Acc)) bytes of `partial_space`.
template <class Op>
absl::Status LaunchSegmentedReduce(const CudaContext& ctx, const char* name, int64_t segments,
                                   int64_t length, const Op& op, void* partial_space) {
  auto* partial = static_cast<typename Op::Acc*>(partial_space);
  const int split = SegmentSplit(length);
  const int64_t blocks = segments * split;
  SegmentPartialKernel<<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream>>>(op, length,
                                                                                   split, partial);
  absl::Status status = LaunchStatus(name);
  if (!status.ok()) return status;
  const unsigned final_blocks = static_cast<unsigned>((segments + kThreads - 1) / kThreads);
  SegmentFinalKernel<<<final_blocks, kThreads, 0, ctx.stream>>>(op, segments, split, partial);
  return LaunchStatus(name);
}

// The scalar scratch that follows the partials of a flat reduction.
template <class T>
T* ReduceScalars(void* workspace) {
  return reinterpret_cast<T*>(static_cast<char*>(workspace) + kReducePartialBytes);
}

// Accumulators.
struct Sum1 {
  double s;
};
struct Sum2 {
  double s0;
  double s1;
};
struct Sum3 {
  double s0;
  double s1;
  double s2;
};

}  // namespace qtrain::kernels::cuda::detail

#endif  // QTRAIN_WORKER_KERNELS_CUDA_KERNEL_UTIL_CUH_
