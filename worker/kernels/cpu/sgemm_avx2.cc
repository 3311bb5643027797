// The AVX2+FMA SGEMM micro-kernel: a 6x16 tile held in 12 ymm accumulators; per step of k it
// loads 16 floats of B (two ymm), broadcasts 6 floats of A and issues 12 FMAs, leaving 3 of the 16
// ymm registers for operands. Variants for 1..5 rows handle the row edge, and a vectorised packer
// handles B. Compiled with a per-function target attribute, so this file builds
// for the baseline ISA and the kernel runs only when DetectSimdLevel() >= kAvx2.
#include <immintrin.h>

#include "worker/kernels/cpu/avx2_transpose.h"
#include "worker/kernels/cpu/sgemm_microkernel.h"

namespace qtrain::kernels::sgemm_internal {
namespace {

constexpr int kMr = 6;
constexpr int kNr = 16;

#define QTRAIN_AVX2_FMA __attribute__((target("avx2,fma")))

// kRows x 16 tile (kRows <= 6); the A panel is packed with stride kMr whatever kRows is.
template <int kRows>
QTRAIN_AVX2_FMA void KernelRowsX16(int64_t kc, const float* a, const float* b, float* c,
                                   int64_t ldc, float alpha, float beta) {
  __m256 acc[kRows][2];
#pragma GCC unroll 6
  for (int i = 0; i < kRows; ++i) {
    acc[i][0] = _mm256_setzero_ps();
    acc[i][1] = _mm256_setzero_ps();
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + kNr - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(b);
    const __m256 b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
    for (int i = 0; i < kRows; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i);
      acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
    }
    a += kMr;
    b += kNr;
  }
  const __m256 valpha = _mm256_set1_ps(alpha);
  if (beta == 0.0f) {
#pragma GCC unroll 6
    for (int i = 0; i < kRows; ++i) {
      _mm256_storeu_ps(c + i * ldc, _mm256_mul_ps(valpha, acc[i][0]));
      _mm256_storeu_ps(c + i * ldc + 8, _mm256_mul_ps(valpha, acc[i][1]));
    }
  } else {
    const __m256 vbeta = _mm256_set1_ps(beta);
#pragma GCC unroll 6
    for (int i = 0; i < kRows; ++i) {
      float* ci = c + i * ldc;
      _mm256_storeu_ps(ci, _mm256_add_ps(_mm256_mul_ps(valpha, acc[i][0]),
                                         _mm256_mul_ps(vbeta, _mm256_loadu_ps(ci))));
      _mm256_storeu_ps(ci + 8, _mm256_add_ps(_mm256_mul_ps(valpha, acc[i][1]),
                                             _mm256_mul_ps(vbeta, _mm256_loadu_ps(ci + 8))));
    }
  }
}

using avx2_internal::Transpose8x8;

// B packer for 16-wide strips.
//  - Not transposed (op(B)(p, j) = b[p*ldb + j]): row by row across all strips, so each row of B
//    is read sequentially; reading strip by strip touches one cache line per row and, when ldb is
//    a multiple of 4 KiB, the lines collide in the cache before the next strip uses them.
//  - Transposed (op(B)(p, j) = b[j*ldb + p]): in 8x8 blocks moved through registers.
QTRAIN_AVX2_FMA void PackB16(Transpose trans, const float* b, int64_t ldb, int64_t kb, int64_t nb,
                             float* dst) {
  const int64_t full_strips = nb / kNr;
  const int64_t tail = nb - full_strips * kNr;
  const int64_t strip_size = kNr * kb;
  if (trans == Transpose::kNo) {
    for (int64_t p = 0; p < kb; ++p) {
      const float* src = b + p * ldb;
      float* out = dst + p * kNr;
      for (int64_t s = 0; s < full_strips; ++s) {
        _mm256_store_ps(out + s * strip_size, _mm256_loadu_ps(src + s * kNr));
        _mm256_store_ps(out + s * strip_size + 8, _mm256_loadu_ps(src + s * kNr + 8));
      }
      if (tail > 0) {
        float* last = out + full_strips * strip_size;
        for (int64_t j = 0; j < kNr; ++j) last[j] = j < tail ? src[full_strips * kNr + j] : 0.0f;
      }
    }
    return;
  }
  for (int64_t s = 0; s < full_strips; ++s) {
    const float* strip = b + s * kNr * ldb;
    float* out = dst + s * strip_size;
    int64_t p = 0;
    for (; p + 8 <= kb; p += 8) {
      for (int half = 0; half < 2; ++half) {
        const float* src = strip + half * 8 * ldb + p;
        __m256 r[8];
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(src + q * ldb);
        Transpose8x8(r);
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) _mm256_store_ps(out + (p + q) * kNr + half * 8, r[q]);
      }
    }
    for (; p < kb; ++p) {
      for (int64_t j = 0; j < kNr; ++j) out[p * kNr + j] = strip[j * ldb + p];
    }
  }
  if (tail > 0) {
    const float* strip = b + full_strips * kNr * ldb;
    float* out = dst + full_strips * strip_size;
    for (int64_t p = 0; p < kb; ++p) {
      for (int64_t j = 0; j < kNr; ++j) out[p * kNr + j] = j < tail ? strip[j * ldb + p] : 0.0f;
    }
  }
}

#undef QTRAIN_AVX2_FMA

}  // namespace

MicroKernel Avx2MicroKernel() {
  // KC: the 16 x KC panel of B (16 KiB) stays in a 32 KiB L1d while A streams past it.
  // MC: the MC x KC block of A (144 KiB) sits in L2. NC: the KC x NC panel of B sits in L3.
  MicroKernel kernel{SgemmBlocking{.mr = kMr, .nr = kNr, .mc = 144, .kc = 256, .nc = 4080},
                     &KernelRowsX16<kMr>};
  kernel.partial_rows[1] = &KernelRowsX16<1>;
  kernel.partial_rows[2] = &KernelRowsX16<2>;
  kernel.partial_rows[3] = &KernelRowsX16<3>;
  kernel.partial_rows[4] = &KernelRowsX16<4>;
  kernel.partial_rows[5] = &KernelRowsX16<5>;
  kernel.pack_b = &PackB16;
  return kernel;
}

}  // namespace qtrain::kernels::sgemm_internal
