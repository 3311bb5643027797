#include "worker/kernels/cpu/batch_norm.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "common/logging.h"
#include "worker/kernels/cpu/elementwise.h"

namespace qtrain::kernels {
namespace {

#define QTRAIN_AVX2 __attribute__((target("avx2,fma")))

// Aim for at least this many elements per parallel chunk of channels.
constexpr int64_t kElementsPerChunk = 1 << 14;

// y = (x - mean) * scale + shift. Subtracting first keeps precision when |mean| >> std.
void NormalizeScalar(int64_t n, const float* x, float mean, float scale, float shift, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * scale + shift;
}

QTRAIN_AVX2 void NormalizeAvx2(int64_t n, const float* x, float mean, float scale, float shift,
                               float* y) {
  const __m256 vmean = _mm256_set1_ps(mean);
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 vshift = _mm256_set1_ps(shift);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 centered = _mm256_sub_ps(_mm256_loadu_ps(x + i), vmean);
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_mul_ps(centered, vscale), vshift));
  }
  for (; i < n; ++i) y[i] = (x[i] - mean) * scale + shift;
}

// dx = k_dy * dy + k_x * (x - mean) + k0.
void BackwardScalar(int64_t n, const float* x, const float* dy, float mean, float k_dy, float k_x,
                    float k0, float* dx) {
  for (int64_t i = 0; i < n; ++i) dx[i] = (k_dy * dy[i] + k_x * (x[i] - mean)) + k0;
}

QTRAIN_AVX2 void BackwardAvx2(int64_t n, const float* x, const float* dy, float mean, float k_dy,
                              float k_x, float k0, float* dx) {
  const __m256 vmean = _mm256_set1_ps(mean);
  const __m256 vk_dy = _mm256_set1_ps(k_dy);
  const __m256 vk_x = _mm256_set1_ps(k_x);
  const __m256 vk0 = _mm256_set1_ps(k0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 centered = _mm256_sub_ps(_mm256_loadu_ps(x + i), vmean);
    const __m256 sum =
        _mm256_add_ps(_mm256_mul_ps(vk_dy, _mm256_loadu_ps(dy + i)), _mm256_mul_ps(vk_x, centered));
    _mm256_storeu_ps(dx + i, _mm256_add_ps(sum, vk0));
  }
  for (; i < n; ++i) dx[i] = (k_dy * dy[i] + k_x * (x[i] - mean)) + k0;
}

#undef QTRAIN_AVX2

bool UseAvx2(const CpuContext& ctx) {
  return static_cast<int>(ctx.effective_simd()) >= static_cast<int>(SimdLevel::kAvx2);
}

void Normalize(bool avx2, int64_t n, const float* x, float mean, float scale, float shift,
               float* y) {
  if (avx2) {
    NormalizeAvx2(n, x, mean, scale, shift, y);
  } else {
    NormalizeScalar(n, x, mean, scale, shift, y);
  }
}

int64_t ChannelGrain(const BatchNormShape& s) {
  return std::max<int64_t>(1, kElementsPerChunk / std::max<int64_t>(1, s.batch * s.spatial));
}

void CheckShape(const BatchNormShape& s) {
  QTRAIN_CHECK(s.batch >= 1 && s.channels >= 1 && s.spatial >= 1)
      << "batch norm shape " << s.batch << "x" << s.channels << "x" << s.spatial;
}

}  // namespace

void BatchNormTrainForward(const CpuContext& ctx, const BatchNormShape& s,
                           const BatchNormOptions& options, const float* x, const float* gamma,
                           const float* beta, float* y, float* saved_mean, float* saved_inv_std,
                           float* running_mean, float* running_var) {
  CheckShape(s);
  const bool avx2 = UseAvx2(ctx);
  const CpuContext inner = ctx.SingleThreaded();
  const int64_t count = s.batch * s.spatial;
  const int64_t stride = s.channels * s.spatial;  // from one sample's plane c to the next's
  ParallelFor(ctx.pool, s.channels, ChannelGrain(s), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const float* xc = x + c * s.spatial;
      double sum = 0.0;
      for (int64_t n = 0; n < s.batch; ++n) sum += Sum(inner, s.spatial, xc + n * stride);
      const double mean = sum / count;
      double squared = 0.0;
      for (int64_t n = 0; n < s.batch; ++n) {
        squared += SumSquaredDeviation(inner, s.spatial, xc + n * stride, mean);
      }
      const double var = squared / count;
      const double inv_std = 1.0 / std::sqrt(var + options.epsilon);
      const float mean_f = static_cast<float>(mean);
      saved_mean[c] = mean_f;
      saved_inv_std[c] = static_cast<float>(inv_std);
      const float scale = static_cast<float>(gamma[c] * inv_std);
      for (int64_t n = 0; n < s.batch; ++n) {
        Normalize(avx2, s.spatial, xc + n * stride, mean_f, scale, beta[c],
                  y + c * s.spatial + n * stride);
      }
      const double unbiased = count > 1 ? squared / (count - 1) : var;
      const double m = options.momentum;
      running_mean[c] = static_cast<float>((1.0 - m) * running_mean[c] + m * mean);
      running_var[c] = static_cast<float>((1.0 - m) * running_var[c] + m * unbiased);
    }
  });
}

void BatchNormEvalForward(const CpuContext& ctx, const BatchNormShape& s,
                          const BatchNormOptions& options, const float* x, const float* gamma,
                          const float* beta, const float* running_mean, const float* running_var,
                          float* y) {
  CheckShape(s);
  const bool avx2 = UseAvx2(ctx);
  const int64_t stride = s.channels * s.spatial;
  ParallelFor(ctx.pool, s.channels, ChannelGrain(s), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const double inv_std = 1.0 / std::sqrt(static_cast<double>(running_var[c]) + options.epsilon);
      const float scale = static_cast<float>(gamma[c] * inv_std);
      for (int64_t n = 0; n < s.batch; ++n) {
        const int64_t offset = c * s.spatial + n * stride;
        Normalize(avx2, s.spatial, x + offset, running_mean[c], scale, beta[c], y + offset);
      }
    }
  });
}

void BatchNormBackward(const CpuContext& ctx, const BatchNormShape& s, const float* x,
                       const float* dy, const float* gamma, const float* saved_mean,
                       const float* saved_inv_std, float* dx, float* dgamma, float* dbeta) {
  CheckShape(s);
  const bool avx2 = UseAvx2(ctx);
  const CpuContext inner = ctx.SingleThreaded();
  const int64_t count = s.batch * s.spatial;
  const int64_t stride = s.channels * s.spatial;
  ParallelFor(ctx.pool, s.channels, ChannelGrain(s), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum_dy = 0.0;
      double sum_dy_x = 0.0;
      for (int64_t n = 0; n < s.batch; ++n) {
        const int64_t offset = c * s.spatial + n * stride;
        sum_dy += Sum(inner, s.spatial, dy + offset);
        sum_dy_x += Dot(inner, s.spatial, dy + offset, x + offset);
      }
      const double mean = saved_mean[c];
      const double inv_std = saved_inv_std[c];
      // sum dy * xhat = inv_std * (sum dy * x - mean * sum dy); products are exact in double.
      const double dgamma_c = inv_std * (sum_dy_x - mean * sum_dy);
      dgamma[c] = static_cast<float>(dgamma_c);
      dbeta[c] = static_cast<float>(sum_dy);
      const double k_dy = gamma[c] * inv_std;
      const double k_x = -k_dy * inv_std * dgamma_c / count;
      const double k0 = -k_dy * sum_dy / count;
      for (int64_t n = 0; n < s.batch; ++n) {
        const int64_t offset = c * s.spatial + n * stride;
        if (avx2) {
          BackwardAvx2(s.spatial, x + offset, dy + offset, saved_mean[c], static_cast<float>(k_dy),
                       static_cast<float>(k_x), static_cast<float>(k0), dx + offset);
        } else {
          BackwardScalar(s.spatial, x + offset, dy + offset, saved_mean[c],
                         static_cast<float>(k_dy), static_cast<float>(k_x), static_cast<float>(k0),
                         dx + offset);
        }
      }
    }
  });
}

}  // namespace qtrain::kernels
