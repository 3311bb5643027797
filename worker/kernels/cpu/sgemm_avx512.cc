// The AVX-512F SGEMM micro-kernel: a 12x32 tile held in 24 zmm accumulators; per step of k it
// loads 32 floats of B (two zmm), broadcasts 12 floats of A and issues 24 FMAs. Compiled with a
// per-function target attribute, so this file builds on any x86-64 compiler and the kernel runs
// only when DetectSimdLevel() == kAvx512.
#include <immintrin.h>

#include <utility>

#include "worker/kernels/cpu/sgemm_microkernel.h"

namespace qtrain::kernels::sgemm_internal {
namespace {

constexpr int kMr = 12;
constexpr int kNr = 32;

#define QTRAIN_AVX512 __attribute__((target("avx512f")))

// kRows x 32 tile (kRows <= 12); the A panel is packed with stride kMr whatever kRows is.
template <int kRows>
QTRAIN_AVX512 void KernelRowsX32(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                                 float alpha, float beta) {
  __m512 acc[kRows][2];
#pragma GCC unroll 12
  for (int i = 0; i < kRows; ++i) {
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = _mm512_setzero_ps();
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + kNr - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 2
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 b0 = _mm512_load_ps(b);
    const __m512 b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
    a += kMr;
    b += kNr;
  }
  const __m512 valpha = _mm512_set1_ps(alpha);
  if (beta == 0.0f) {
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      _mm512_storeu_ps(c + i * ldc, _mm512_mul_ps(valpha, acc[i][0]));
      _mm512_storeu_ps(c + i * ldc + 16, _mm512_mul_ps(valpha, acc[i][1]));
    }
  } else {
    const __m512 vbeta = _mm512_set1_ps(beta);
#pragma GCC unroll 12
    for (int i = 0; i < kRows; ++i) {
      float* ci = c + i * ldc;
      _mm512_storeu_ps(ci, _mm512_add_ps(_mm512_mul_ps(valpha, acc[i][0]),
                                         _mm512_mul_ps(vbeta, _mm512_loadu_ps(ci))));
      _mm512_storeu_ps(ci + 16, _mm512_add_ps(_mm512_mul_ps(valpha, acc[i][1]),
                                              _mm512_mul_ps(vbeta, _mm512_loadu_ps(ci + 16))));
    }
  }
}

#undef QTRAIN_AVX512

template <int... kRows>
void AddPartialRows(MicroKernel& kernel, std::integer_sequence<int, kRows...>) {
  ((kernel.partial_rows[kRows] = kRows == 0                    ? nullptr
                                 : &KernelRowsX32 < kRows == 0 ? 1
                                                               : kRows >),
   ...);
}

}  // namespace

MicroKernel Avx512MicroKernel() {
  // Untuned (no AVX-512 machine to measure on): KC keeps the 32 x KC panel of B (32 KiB) near L1,
  // the 144 x KC block of A (144 KiB) in L2.
  MicroKernel kernel{SgemmBlocking{.mr = kMr, .nr = kNr, .mc = 144, .kc = 256, .nc = 4096},
                     &KernelRowsX32<kMr>};
  AddPartialRows(kernel, std::make_integer_sequence<int, kMr>{});
  return kernel;
}

}  // namespace qtrain::kernels::sgemm_internal
