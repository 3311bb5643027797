#include "worker/kernels/cpu/elementwise.h"

#include <immintrin.h>

#include <vector>

namespace qtrain::kernels {
namespace {

#define QTRAIN_AVX2 __attribute__((target("avx2,fma")))

// Each op has a scalar form and an 8-lane AVX2 form computing the same IEEE operations.
struct AddOp {
  float Scalar(float a, float b) const { return a + b; }
  QTRAIN_AVX2 __m256 Vec(__m256 a, __m256 b) const { return _mm256_add_ps(a, b); }
};
struct SubOp {
  float Scalar(float a, float b) const { return a - b; }
  QTRAIN_AVX2 __m256 Vec(__m256 a, __m256 b) const { return _mm256_sub_ps(a, b); }
};
struct MulOp {
  float Scalar(float a, float b) const { return a * b; }
  QTRAIN_AVX2 __m256 Vec(__m256 a, __m256 b) const { return _mm256_mul_ps(a, b); }
};
// y = alpha * x + y (Axpy) and y = alpha * x + beta * y (Axpby); a is x, b is y.
struct AxpyOp {
  float alpha;
  float Scalar(float x, float y) const { return alpha * x + y; }
  QTRAIN_AVX2 __m256 Vec(__m256 x, __m256 y) const {
    return _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(alpha), x), y);
  }
};
struct AxpbyOp {
  float alpha;
  float beta;
  float Scalar(float x, float y) const { return alpha * x + beta * y; }
  QTRAIN_AVX2 __m256 Vec(__m256 x, __m256 y) const {
    return _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(alpha), x),
                         _mm256_mul_ps(_mm256_set1_ps(beta), y));
  }
};
struct ScaleOp {
  float alpha;
  float Scalar(float x) const { return alpha * x; }
  QTRAIN_AVX2 __m256 Vec(__m256 x) const { return _mm256_mul_ps(_mm256_set1_ps(alpha), x); }
};
struct AddScalarOp {
  float alpha;
  float Scalar(float x) const { return x + alpha; }
  QTRAIN_AVX2 __m256 Vec(__m256 x) const { return _mm256_add_ps(x, _mm256_set1_ps(alpha)); }
};
struct CopyOp {
  float Scalar(float x) const { return x; }
  QTRAIN_AVX2 __m256 Vec(__m256 x) const { return x; }
};

template <class Op>
void BinaryScalar(const Op& op, int64_t n, const float* a, const float* b, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = op.Scalar(a[i], b[i]);
}

template <class Op>
QTRAIN_AVX2 void BinaryAvx2(const Op& op, int64_t n, const float* a, const float* b, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, op.Vec(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  }
  for (; i < n; ++i) out[i] = op.Scalar(a[i], b[i]);
}

template <class Op>
void UnaryScalar(const Op& op, int64_t n, const float* x, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = op.Scalar(x[i]);
}

template <class Op>
QTRAIN_AVX2 void UnaryAvx2(const Op& op, int64_t n, const float* x, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, op.Vec(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = op.Scalar(x[i]);
}

bool UseAvx2(const CpuContext& ctx) {
  return static_cast<int>(ctx.effective_simd()) >= static_cast<int>(SimdLevel::kAvx2);
}

template <class Op>
void Binary(const CpuContext& ctx, const Op& op, int64_t n, const float* a, const float* b,
            float* out) {
  const bool avx2 = UseAvx2(ctx);
  ParallelFor(ctx.pool, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      BinaryAvx2(op, end - begin, a + begin, b + begin, out + begin);
    } else {
      BinaryScalar(op, end - begin, a + begin, b + begin, out + begin);
    }
  });
}

template <class Op>
void Unary(const CpuContext& ctx, const Op& op, int64_t n, const float* x, float* out) {
  const bool avx2 = UseAvx2(ctx);
  ParallelFor(ctx.pool, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    if (avx2) {
      UnaryAvx2(op, end - begin, x + begin, out + begin);
    } else {
      UnaryScalar(op, end - begin, x + begin, out + begin);
    }
  });
}

// ---- Reductions -------------------------------------------------------------------------------

QTRAIN_AVX2 double HorizontalSum(__m256d v) {
  const __m128d lo = _mm256_castpd256_pd128(v);
  const __m128d hi = _mm256_extractf128_pd(v, 1);
  const __m128d s = _mm_add_pd(lo, hi);
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

double SumScalar(int64_t n, const float* x) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += x[i];
  return acc;
}

QTRAIN_AVX2 double SumAvx2(int64_t n, const float* x) {
  __m256d acc0 = _mm256_setzero_pd();
  __m256d acc1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  double acc = HorizontalSum(_mm256_add_pd(acc0, acc1));
  for (; i < n; ++i) acc += x[i];
  return acc;
}

double DotScalar(int64_t n, const float* a, const float* b) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(a[i]) * b[i];
  return acc;
}

QTRAIN_AVX2 double DotAvx2(int64_t n, const float* a, const float* b) {
  __m256d acc0 = _mm256_setzero_pd();
  __m256d acc1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 va = _mm256_loadu_ps(a + i);
    const __m256 vb = _mm256_loadu_ps(b + i);
    // A product of two floats is exact in double, so the FMA rounds only the sum.
    acc0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(va)),
                           _mm256_cvtps_pd(_mm256_castps256_ps128(vb)), acc0);
    acc1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(va, 1)),
                           _mm256_cvtps_pd(_mm256_extractf128_ps(vb, 1)), acc1);
  }
  double acc = HorizontalSum(_mm256_add_pd(acc0, acc1));
  for (; i < n; ++i) acc += static_cast<double>(a[i]) * b[i];
  return acc;
}

double SumSquaredDeviationScalar(int64_t n, const float* x, double center) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = x[i] - center;
    acc += d * d;
  }
  return acc;
}

QTRAIN_AVX2 double SumSquaredDeviationAvx2(int64_t n, const float* x, double center) {
  const __m256d vc = _mm256_set1_pd(center);
  __m256d acc0 = _mm256_setzero_pd();
  __m256d acc1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), vc);
    const __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), vc);
    acc0 = _mm256_fmadd_pd(d0, d0, acc0);
    acc1 = _mm256_fmadd_pd(d1, d1, acc1);
  }
  double acc = HorizontalSum(_mm256_add_pd(acc0, acc1));
  for (; i < n; ++i) {
    const double d = x[i] - center;
    acc += d * d;
  }
  return acc;
}

#undef QTRAIN_AVX2

// Sums fn(begin, end) over chunks, combining the partials in chunk order (deterministic for a
// given thread count).
template <class Fn>
double ChunkedReduce(const CpuContext& ctx, int64_t n, Fn fn) {
  const int64_t chunks = NumChunks(ctx.pool, n, kElementwiseGrain);
  if (chunks <= 1) return n > 0 ? fn(0, n) : 0.0;
  std::vector<double> partial(chunks, 0.0);
  ParallelForChunks(ctx.pool, n, kElementwiseGrain,
                    [&](int64_t c, int64_t begin, int64_t end) { partial[c] = fn(begin, end); });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

void Fill(const CpuContext& ctx, int64_t n, float value, float* out) {
  ParallelFor(ctx.pool, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = value;
  });
}

void Copy(const CpuContext& ctx, int64_t n, const float* x, float* out) {
  Unary(ctx, CopyOp{}, n, x, out);
}

void Add(const CpuContext& ctx, int64_t n, const float* a, const float* b, float* out) {
  Binary(ctx, AddOp{}, n, a, b, out);
}

void Sub(const CpuContext& ctx, int64_t n, const float* a, const float* b, float* out) {
  Binary(ctx, SubOp{}, n, a, b, out);
}

void Mul(const CpuContext& ctx, int64_t n, const float* a, const float* b, float* out) {
  Binary(ctx, MulOp{}, n, a, b, out);
}

void Scale(const CpuContext& ctx, int64_t n, float alpha, const float* x, float* out) {
  Unary(ctx, ScaleOp{alpha}, n, x, out);
}

void AddScalar(const CpuContext& ctx, int64_t n, float alpha, const float* x, float* out) {
  Unary(ctx, AddScalarOp{alpha}, n, x, out);
}

void Axpy(const CpuContext& ctx, int64_t n, float alpha, const float* x, float* y) {
  Binary(ctx, AxpyOp{alpha}, n, x, y, y);
}

void Axpby(const CpuContext& ctx, int64_t n, float alpha, const float* x, float beta, float* y) {
  Binary(ctx, AxpbyOp{alpha, beta}, n, x, y, y);
}

double Sum(const CpuContext& ctx, int64_t n, const float* x) {
  const bool avx2 = UseAvx2(ctx);
  return ChunkedReduce(ctx, n, [&](int64_t begin, int64_t end) {
    return avx2 ? SumAvx2(end - begin, x + begin) : SumScalar(end - begin, x + begin);
  });
}

double Dot(const CpuContext& ctx, int64_t n, const float* a, const float* b) {
  const bool avx2 = UseAvx2(ctx);
  return ChunkedReduce(ctx, n, [&](int64_t begin, int64_t end) {
    return avx2 ? DotAvx2(end - begin, a + begin, b + begin)
                : DotScalar(end - begin, a + begin, b + begin);
  });
}

double SumSquaredDeviation(const CpuContext& ctx, int64_t n, const float* x, double center) {
  const bool avx2 = UseAvx2(ctx);
  return ChunkedReduce(ctx, n, [&](int64_t begin, int64_t end) {
    return avx2 ? SumSquaredDeviationAvx2(end - begin, x + begin, center)
                : SumSquaredDeviationScalar(end - begin, x + begin, center);
  });
}

}  // namespace qtrain::kernels
