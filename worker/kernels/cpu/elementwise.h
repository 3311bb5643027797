// Element-wise vector kernels on float arrays (optimizer updates, residual adds, gradient
// accumulation) and the double-accumulated reductions other kernels build on.
//
// Each has an AVX2 path and a scalar fallback chosen from ctx.simd. The element-wise ops use the
// same IEEE operations in the same order on both paths (no FMA contraction), so their results are
// identical bit for bit across SIMD levels and thread counts. The reductions accumulate in double;
// their summation order differs by SIMD level and thread count (results agree to ~1e-15 relative).
//
// Arrays of n floats, any alignment; `out` may alias an input (element-wise ops only). Large n is
// split over ctx.pool in chunks of at least kElementwiseGrain elements. Thread-safe for
// non-overlapping outputs. Cost: one pass over the operands, memory-bound.
#ifndef QTRAIN_WORKER_KERNELS_CPU_ELEMENTWISE_H_
#define QTRAIN_WORKER_KERNELS_CPU_ELEMENTWISE_H_

#include <cstdint>

#include "worker/kernels/cpu/cpu_context.h"

namespace qtrain::kernels {

// Below this many elements per thread a parallel split is not worth a wake-up.
inline constexpr int64_t kElementwiseGrain = 1 << 15;

// out = value
void Fill(const CpuContext& ctx, int64_t n, float value, float* out);
// out = x
void Copy(const CpuContext& ctx, int64_t n, const float* x, float* out);
// out = a + b, a - b, a * b
void Add(const CpuContext& ctx, int64_t n, const float* a, const float* b, float* out);
void Sub(const CpuContext& ctx, int64_t n, const float* a, const float* b, float* out);
void Mul(const CpuContext& ctx, int64_t n, const float* a, const float* b, float* out);
// out = alpha * x
void Scale(const CpuContext& ctx, int64_t n, float alpha, const float* x, float* out);
// out = x + alpha
void AddScalar(const CpuContext& ctx, int64_t n, float alpha, const float* x, float* out);
// y += alpha * x
void Axpy(const CpuContext& ctx, int64_t n, float alpha, const float* x, float* y);
// y = alpha * x + beta * y (beta == 0 still reads y: 0 * NaN is NaN, as written).
void Axpby(const CpuContext& ctx, int64_t n, float alpha, const float* x, float beta, float* y);

// Reductions, accumulated in double.
double Sum(const CpuContext& ctx, int64_t n, const float* x);
double Dot(const CpuContext& ctx, int64_t n, const float* a, const float* b);
// sum_i (x_i - center)^2, each difference formed in double (two-pass variance).
double SumSquaredDeviation(const CpuContext& ctx, int64_t n, const float* x, double center);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_ELEMENTWISE_H_
