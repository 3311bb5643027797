// Single-precision general matrix multiply on the GPU, the project's own (cuBLAS appears only as
// the yardstick in worker/bench/kernel_bench_cuda_gemm.cc). Same contract as the CPU Sgemm in
// worker/kernels/cpu/sgemm.h:
//
//   C = alpha * op(A) * op(B) + beta * C      op(X) = X or X^T, all matrices row-major
//
// op(A) is m x k, op(B) is k x n, C is m x n; lda/ldb/ldc are row strides in elements of the
// matrices as stored (A stored m x k with lda >= k when not transposed, k x m with lda >= m when
// transposed; likewise B; ldc >= n). beta == 0 overwrites C without reading it (NaN in C does not
// propagate); k == 0 or alpha == 0 reads neither A nor B (C = beta * C). Elements of C past
// column n (the padding of ldc) are never touched. a, b and c are device pointers; A and B must
// not overlap C.
//
// Implementation (gemm_tile.cuh): a register-blocked SIMT kernel, 256 threads per block, the
// operands staged through double-buffered shared memory (A transposed there), float4 global
// loads when A and B are 16-byte aligned with lda, ldb multiples of 4 (otherwise element loads;
// ragged edges are zero-filled in every case). Tiles: 128 x 128 x 8 with 8 x 8 accumulators per
// thread when the output has at least 256 such tiles and more than 64 rows and columns, else
// 64 x 64 x 16 with 4 x 4 (small and skinny products still fill the GPU). No tensor cores, no TF32.
//
// Numerics: fmaf in a fixed order, so results are deterministic and bitwise reproducible; they
// differ from the CPU kernel only in rounding. Both obey the bound of a length-k float dot
// product: |C - exact| <= ~k * 2^-24 * (|alpha| |op(A)| |op(B)| + |beta| |C|) element-wise.
//
// Asynchronous: enqueued on ctx.stream, no host synchronization, no allocation (safe inside CUDA
// graph capture). The Status reports argument errors (INVALID_ARGUMENT, checked before anything
// is enqueued) and launch errors; faults during execution surface at the next synchronization.
// Thread-safe as the stream is. Cost: 2*m*n*k flops.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_SGEMM_H_
#define QTRAIN_WORKER_KERNELS_CUDA_SGEMM_H_

#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cpu/sgemm.h"
#include "worker/kernels/cuda/cuda_context.h"

namespace qtrain::kernels::cuda {

using ::qtrain::kernels::Transpose;

// INVALID_ARGUMENT for negative sizes, sizes of 2^30 or more, short leading dimensions, or a null
// pointer that would be read or written; m == 0 or n == 0 is an OK no-op.
absl::Status Sgemm(const CudaContext& ctx, Transpose trans_a, Transpose trans_b, int64_t m,
                   int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                   int64_t ldb, float beta, float* c, int64_t ldc);

// The block tile Sgemm uses for an m x n output (for tests that want to cover both, and for
// benchmarks that report it).
enum class SgemmTile {
  k64x64,
  k128x128,
};
SgemmTile SgemmTileFor(int64_t m, int64_t n);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_SGEMM_H_
