#include "worker/kernels/cpu/activation.h"

#include <immintrin.h>

#include "worker/kernels/cpu/elementwise.h"

namespace qtrain::kernels {
namespace {

#define QTRAIN_AVX2 __attribute__((target("avx2,fma")))

void ReluForwardScalar(int64_t n, const float* x, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

QTRAIN_AVX2 void ReluForwardAvx2(int64_t n, const float* x, float* y) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  // max(x, 0) returns its second operand for NaN and for +-0, matching the scalar select.
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_max_ps(_mm256_loadu_ps(x + i), zero));
  for (; i < n; ++i) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void ReluBackwardScalar(int64_t n, const float* x, const float* dy, float* dx) {
  for (int64_t i = 0; i < n; ++i) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
}

QTRAIN_AVX2 void ReluBackwardAvx2(int64_t n, const float* x, const float* dy, float* dx) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 positive = _mm256_cmp_ps(_mm256_loadu_ps(x + i), zero, _CMP_GT_OQ);
    _mm256_storeu_ps(dx + i, _mm256_and_ps(positive, _mm256_loadu_ps(dy + i)));
  }
  for (; i < n; ++i) dx[i] = x[i] > 0.0f ? dy[i] : 0.0f;
}

#undef QTRAIN_AVX2

bool UseAvx2(const CpuContext& ctx) {
  return static_cast<int>(ctx.effective_simd()) >= static_cast<int>(SimdLevel::kAvx2);
}

}  // namespace

void ReluForward(const CpuContext& ctx, int64_t n, const float* x, float* y) {
  const bool avx2 = UseAvx2(ctx);
  ParallelFor(ctx.pool, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      ReluForwardAvx2(end - begin, x + begin, y + begin);
    } else {
      ReluForwardScalar(end - begin, x + begin, y + begin);
    }
  });
}

void ReluBackward(const CpuContext& ctx, int64_t n, const float* x, const float* dy, float* dx) {
  const bool avx2 = UseAvx2(ctx);
  ParallelFor(ctx.pool, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      ReluBackwardAvx2(end - begin, x + begin, dy + begin, dx + begin);
    } else {
      ReluBackwardScalar(end - begin, x + begin, dy + begin, dx + begin);
    }
  });
}

}  // namespace qtrain::kernels
