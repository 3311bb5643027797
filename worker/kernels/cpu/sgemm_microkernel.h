// Internal to sgemm.cc: the micro-kernel interface and the per-ISA kernels.
//
// A micro-kernel computes one mr x nr tile of C from packed panels:
//   a: kc x mr, a[p * mr + i] = alpha-free op(A)(i, p)
//   b: kc x nr, b[p * nr + j] = op(B)(p, j), 64-byte aligned
//   c[i * ldc + j] = alpha * sum_p a[p*mr+i] * b[p*nr+j] + (beta == 0 ? 0 : beta * c[i*ldc+j])
// beta == 0 must not read c. kc >= 1.
#ifndef QTRAIN_WORKER_KERNELS_CPU_SGEMM_MICROKERNEL_H_
#define QTRAIN_WORKER_KERNELS_CPU_SGEMM_MICROKERNEL_H_

#include <cstdint>

#include "worker/kernels/cpu/sgemm.h"

namespace qtrain::kernels::sgemm_internal {

using MicroKernelFn = void (*)(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                               float alpha, float beta);

// Packs the kb x nb block of op(B) whose top-left element is at `b` into ceil(nb / nr) strips,
// strip s holding dst[s*nr*kb + p*nr + j] = op(B)(p, s*nr + j), columns past nb zero.
using PackBFn = void (*)(Transpose trans, const float* b, int64_t ldb, int64_t kb, int64_t nb,
                         float* dst);

inline constexpr int kMaxMr = 12;

struct MicroKernel {
  SgemmBlocking blocking;
  MicroKernelFn fn;  // the full mr x nr tile
  // partial_rows[r], 1 <= r < mr: the same for an r x nr tile (a still packed with stride mr), so
  // row edges (m % mr != 0) neither waste work nor go through scratch. nullptr: use scratch.
  MicroKernelFn partial_rows[kMaxMr] = {};
  // An ISA-specific packer for B; nullptr: the portable one.
  PackBFn pack_b = nullptr;
};
// Defined in sgemm_avx2.cc / sgemm_avx512.cc; the kernels inside carry target attributes and may
// only be called when the CPU supports the ISA.
MicroKernel Avx2MicroKernel();
MicroKernel Avx512MicroKernel();

}  // namespace qtrain::kernels::sgemm_internal

#endif  // QTRAIN_WORKER_KERNELS_CPU_SGEMM_MICROKERNEL_H_
