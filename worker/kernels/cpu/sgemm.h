// Single-precision general matrix multiply, the workhorse behind fully-connected layers and
// convolutions (im2col + GEMM):
//
//   C = alpha * op(A) * op(B) + beta * C      op(X) = X or X^T, all matrices row-major
//
// op(A) is m x k, op(B) is k x n, C is m x n. lda/ldb/ldc are row strides in elements of the
// matrices as stored (A stored m x k with lda >= k when not transposed, k x m with lda >= m when
// transposed; likewise B). As in BLAS: beta == 0 overwrites C without reading it (NaN or garbage
// in C does not propagate), and when k == 0 or alpha == 0 A and B are not read (C = beta * C).
//
// Implementation: GotoBLAS/BLIS-style blocking. B is packed in KC x NC panels, A in MC x KC
// blocks, both into aligned thread-local buffers, and a register-blocked micro-kernel computes
// MR x NR tiles: 6x16 with AVX2+FMA, 12x32 with AVX-512F, 4x8 portable scalar, chosen at run time
// from ctx.simd (clamped to what the CPU supports). With a pool of T > 1 threads and enough work,
// C is split into T column (or row) slabs computed in parallel.
//
// Results are deterministic and do not depend on the thread count (each element sees the same
// depth blocking and arithmetic whichever slab computes it); different SIMD levels round
// differently (FMA, summation order). Error is that of a length-k float dot product:
// |C - exact| <= ~k * 2^-24 * (|alpha| * |op(A)| |op(B)| + |beta| |C|) element-wise.
//
// Thread-safe: concurrent calls are fine when their C do not overlap. Cost: 2*m*n*k flops plus
// packing (m*k*ceil(n/NC) + k*n reads).
#ifndef QTRAIN_WORKER_KERNELS_CPU_SGEMM_H_
#define QTRAIN_WORKER_KERNELS_CPU_SGEMM_H_

#include <cstdint>

#include "worker/kernels/cpu/cpu_context.h"

namespace qtrain::kernels {

enum class Transpose {
  kNo,   // use the matrix as stored
  kYes,  // use its transpose
};

// Preconditions (checked; programmer errors abort): m, n, k >= 0; leading dimensions large enough
// for the stored shapes; A, B and C do not overlap C.
void Sgemm(const CpuContext& ctx, Transpose trans_a, Transpose trans_b, int64_t m, int64_t n,
           int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
           float beta, float* c, int64_t ldc);

// The register tile and cache blocking used at a SIMD level (for benchmarks and tests that want
// sizes straddling the block edges).
struct SgemmBlocking {
  int mr;  // micro-tile rows
  int nr;  // micro-tile columns
  int mc;  // rows of A packed per block (multiple of mr)
  int kc;  // depth packed per block
  int nc;  // columns of B packed per panel (multiple of nr)
};
SgemmBlocking SgemmBlockingFor(SimdLevel level);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_SGEMM_H_
