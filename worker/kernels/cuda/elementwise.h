// Element-wise vector kernels on device float arrays and deterministic reductions into device
// scalars: the CUDA counterparts of kernels/cpu/elementwise.h.
//
// The element-wise ops compute the same IEEE operations in the same order as the CPU kernels
// (no FMA contraction: this folder builds with --fmad=false), so their results are identical bit
// for bit to kernels::Fill, Copy, Add, ... `out` may alias an input.
//
// The reductions accumulate in double (products of two floats are exact in double) and write a
// device scalar (double and/or float), never the host: the result can feed the next kernel of a
// captured CUDA graph. Their summation order is a fixed function of n (launch_util.h), so results
// are identical run to run; they differ from the CPU's order by ~1e-16 relative (before the
// float conversion).
//
// Every function is asynchronous on ctx.stream, never synchronizes and never allocates; the
// Status reports argument errors (INVALID_ARGUMENT: negative n, a null pointer with n > 0, a bad
// workspace) and launch errors. n == 0 launches nothing for element-wise ops; a reduction over
// n == 0 writes 0. Cost: one memory-bound pass over the operands; a reduction adds a one-block
// final pass.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_ELEMENTWISE_H_
#define QTRAIN_WORKER_KERNELS_CUDA_ELEMENTWISE_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cuda/cuda_context.h"
#include "worker/kernels/cuda/launch_util.h"

namespace qtrain::kernels::cuda {

// out = value
absl::Status Fill(const CudaContext& ctx, int64_t n, float value, float* out);
// out = x
absl::Status Copy(const CudaContext& ctx, int64_t n, const float* x, float* out);
// out = a + b, a - b, a * b
absl::Status Add(const CudaContext& ctx, int64_t n, const float* a, const float* b, float* out);
absl::Status Sub(const CudaContext& ctx, int64_t n, const float* a, const float* b, float* out);
absl::Status Mul(const CudaContext& ctx, int64_t n, const float* a, const float* b, float* out);
// out = alpha * x
absl::Status Scale(const CudaContext& ctx, int64_t n, float alpha, const float* x, float* out);
// out = x + alpha
absl::Status AddScalar(const CudaContext& ctx, int64_t n, float alpha, const float* x, float* out);
// y = alpha * x + y
absl::Status Axpy(const CudaContext& ctx, int64_t n, float alpha, const float* x, float* y);
// y = alpha * x + beta * y (beta == 0 still reads y, as on the CPU).
absl::Status Axpby(const CudaContext& ctx, int64_t n, float alpha, const float* x, float beta,
                   float* y);

// Where a reduction writes its result: either pointer may be null, not both. f32 receives the
// double result rounded to float.
struct DeviceScalarOut {
  double* f64 = nullptr;
  float* f32 = nullptr;
};

// sum_i x_i; sum_i a_i b_i; sum_i x_i^2. `workspace`: kReductionWorkspaceBytes of device memory,
// 16-byte aligned, not used concurrently by another stream.
absl::Status Sum(const CudaContext& ctx, int64_t n, const float* x, DeviceScalarOut out,
                 void* workspace);
absl::Status Dot(const CudaContext& ctx, int64_t n, const float* a, const float* b,
                 DeviceScalarOut out, void* workspace);
absl::Status SumSquares(const CudaContext& ctx, int64_t n, const float* x, DeviceScalarOut out,
                        void* workspace);
// With e = a - b: pos = scale * e and neg = -scale * e (either may be null), and
// *sum_sq += sum_i e_i^2 in double, in the flat reductions' fixed order (guided training's
// distance and its two gradients in one pass). `workspace` as for Sum.
absl::Status DiffScaledSumSquares(const CudaContext& ctx, int64_t n, const float* a,
                                  const float* b, float scale, float* pos, float* neg,
                                  double* sum_sq, void* workspace);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_ELEMENTWISE_H_
