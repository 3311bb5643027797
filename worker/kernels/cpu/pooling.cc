#include "worker/kernels/cpu/pooling.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/elementwise.h"

namespace qtrain::kernels {
namespace {

// Aim for at least this many input elements per parallel chunk.
constexpr int64_t kElementsPerChunk = 1 << 14;

int64_t PlaneGrain(int64_t plane_size) {
  return std::max<int64_t>(1, kElementsPerChunk / std::max<int64_t>(1, plane_size));
}

void CheckShape(const Pool2dShape& shape) {
  const absl::Status status = ValidatePool2dShape(shape);
  QTRAIN_CHECK(status.ok()) << status.ToString();
}

// The in-bounds part [lo, hi) of the window starting at `start` of length `kernel` in [0, size).
struct Range {
  int64_t lo;
  int64_t hi;
};
Range Clip(int64_t start, int64_t kernel, int64_t size) {
  return Range{std::max<int64_t>(start, 0), std::min(start + kernel, size)};
}

float Divisor(const Pool2dShape& s, AvgPoolDivisor divisor, Range rows, Range cols) {
  if (divisor == AvgPoolDivisor::kWindowSize) return static_cast<float>(s.kernel_h * s.kernel_w);
  return static_cast<float>((rows.hi - rows.lo) * (cols.hi - cols.lo));
}

// One output of a 2x2, stride-2, unpadded max pool over rows r0 and r1 at column iw (offsets
// relative to the plane), with the generic loop's rules: row-major order, strictly greater
// replaces, a NaN wins once.
inline void Max2x2(const float* xp, int64_t i0, int64_t i1, float* y, int32_t* argmax) {
  const int64_t idx[4] = {i0, i0 + 1, i1, i1 + 1};
  float best = xp[idx[0]];
  int64_t best_index = idx[0];
  for (int q = 1; q < 4; ++q) {
    const float v = xp[idx[q]];
    if (v > best || (std::isnan(v) && !std::isnan(best))) {
      best = v;
      best_index = idx[q];
    }
  }
  *y = best;
  *argmax = static_cast<int32_t>(best_index);
}

bool IsMax2x2(const Pool2dShape& s) {
  return s.kernel_h == 2 && s.kernel_w == 2 && s.stride_h == 2 && s.stride_w == 2 && s.pad_h == 0 &&
         s.pad_w == 0;
}

// The 2x2 stride-2 unpadded max pool of the CNNs, 8 outputs at a time: even and odd columns are
// split with shuffles and compared in the generic loop's order with the same NaN rule.
__attribute__((target("avx2,fma"))) void MaxPool2x2PlanesAvx2(const Pool2dShape& s,
                                                              const float* x, float* y,
                                                              int32_t* argmax, int64_t begin,
                                                              int64_t end) {
  const int64_t oh_n = s.out_height();
  const int64_t ow_n = s.out_width();
  const int64_t w = s.in_width;
  const __m256i lane2 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  for (int64_t p = begin; p < end; ++p) {
    const float* xp = x + p * s.in_plane();
    float* yp = y + p * s.out_plane();
    int32_t* ap = argmax + p * s.out_plane();
    for (int64_t oh = 0; oh < oh_n; ++oh) {
      const int64_t r0 = 2 * oh * w;
      const int64_t r1 = r0 + w;
      int64_t ow = 0;
      for (; ow + 8 <= ow_n; ow += 8) {
        const int64_t c = 2 * ow;
        __m256 v[4];
        __m256i iv[4];
        const int64_t rows[2] = {r0, r1};
        for (int h = 0; h < 2; ++h) {
          const __m256 lo = _mm256_loadu_ps(xp + rows[h] + c);
          const __m256 hi = _mm256_loadu_ps(xp + rows[h] + c + 8);
          // shuffle gives [0 2 8 10 4 6 12 14]; permute4x64 0xD8 restores [0 2 4 6 8 10 12 14].
          v[2 * h] = _mm256_castpd_ps(_mm256_permute4x64_pd(
              _mm256_castps_pd(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
          v[2 * h + 1] = _mm256_castpd_ps(_mm256_permute4x64_pd(
              _mm256_castps_pd(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
          const __m256i base = _mm256_add_epi32(
              lane2, _mm256_set1_epi32(static_cast<int32_t>(rows[h] + c)));
          iv[2 * h] = base;
          iv[2 * h + 1] = _mm256_add_epi32(base, _mm256_set1_epi32(1));
        }
        __m256 best = v[0];
        __m256i best_index = iv[0];
        for (int q = 1; q < 4; ++q) {
          const __m256 take = _mm256_or_ps(
              _mm256_cmp_ps(v[q], best, _CMP_GT_OQ),
              _mm256_and_ps(_mm256_cmp_ps(v[q], v[q], _CMP_UNORD_Q),
                            _mm256_cmp_ps(best, best, _CMP_ORD_Q)));
          best = _mm256_blendv_ps(best, v[q], take);
          best_index = _mm256_castps_si256(_mm256_blendv_ps(
              _mm256_castsi256_ps(best_index), _mm256_castsi256_ps(iv[q]), take));
        }
        _mm256_storeu_ps(yp + oh * ow_n + ow, best);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ap + oh * ow_n + ow), best_index);
      }
      for (; ow < ow_n; ++ow) {
        Max2x2(xp, r0 + 2 * ow, r1 + 2 * ow, yp + oh * ow_n + ow, ap + oh * ow_n + ow);
      }
    }
  }
}

}  // namespace

absl::Status ValidatePool2dShape(const Pool2dShape& s) {
  if (s.batch < 1 || s.channels < 1 || s.in_height < 1 || s.in_width < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool2d: batch, channels, height and width must be >= 1, got ", s.batch, "x",
                     s.channels, "x", s.in_height, "x", s.in_width));
  }
  if (s.kernel_h < 1 || s.kernel_w < 1 || s.stride_h < 1 || s.stride_w < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool2d: kernel and stride must be >= 1, got kernel ", s.kernel_h, "x",
                     s.kernel_w, " stride ", s.stride_h, "x", s.stride_w));
  }
  if (s.pad_h < 0 || s.pad_w < 0 || s.pad_h >= s.kernel_h || s.pad_w >= s.kernel_w) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool2d: padding must be in [0, kernel), got ", s.pad_h, "x", s.pad_w));
  }
  if (s.in_height + 2 * s.pad_h < s.kernel_h || s.in_width + 2 * s.pad_w < s.kernel_w) {
    return absl::InvalidArgumentError("pool2d: the kernel is larger than the padded input");
  }
  return absl::OkStatus();
}

void MaxPool2dForward(const CpuContext& ctx, const Pool2dShape& s, const float* x, float* y,
                      int32_t* argmax) {
  CheckShape(s);
  const int64_t oh_n = s.out_height();
  const int64_t ow_n = s.out_width();
  if (IsMax2x2(s) && static_cast<int>(ctx.effective_simd()) >= static_cast<int>(SimdLevel::kAvx2)) {
    ParallelFor(ctx.pool, s.batch * s.channels, PlaneGrain(s.in_plane()),
                [&](int64_t begin, int64_t end) {
                  MaxPool2x2PlanesAvx2(s, x, y, argmax, begin, end);
                });
    return;
  }
  ParallelFor(ctx.pool, s.batch * s.channels, PlaneGrain(s.in_plane()),
              [&](int64_t begin, int64_t end) {
                for (int64_t p = begin; p < end; ++p) {
                  const float* xp = x + p * s.in_plane();
                  float* yp = y + p * s.out_plane();
                  int32_t* ap = argmax + p * s.out_plane();
                  for (int64_t oh = 0; oh < oh_n; ++oh) {
                    const Range rows = Clip(oh * s.stride_h - s.pad_h, s.kernel_h, s.in_height);
                    for (int64_t ow = 0; ow < ow_n; ++ow) {
                      const Range cols = Clip(ow * s.stride_w - s.pad_w, s.kernel_w, s.in_width);
                      int64_t best_index = rows.lo * s.in_width + cols.lo;
                      float best = xp[best_index];
                      for (int64_t ih = rows.lo; ih < rows.hi; ++ih) {
                        for (int64_t iw = cols.lo; iw < cols.hi; ++iw) {
                          const float v = xp[ih * s.in_width + iw];
                          // Strictly greater keeps the first maximum; a NaN wins once.
                          if (v > best || (std::isnan(v) && !std::isnan(best))) {
                            best = v;
                            best_index = ih * s.in_width + iw;
                          }
                        }
                      }
                      yp[oh * ow_n + ow] = best;
                      ap[oh * ow_n + ow] = static_cast<int32_t>(best_index);
                    }
                  }
                }
              });
}

void MaxPool2dBackward(const CpuContext& ctx, const Pool2dShape& s, const float* dy,
                       const int32_t* argmax, float* dx) {
  CheckShape(s);
  ParallelFor(ctx.pool, s.batch * s.channels, PlaneGrain(s.in_plane()),
              [&](int64_t begin, int64_t end) {
                for (int64_t p = begin; p < end; ++p) {
                  float* dxp = dx + p * s.in_plane();
                  const float* dyp = dy + p * s.out_plane();
                  const int32_t* ap = argmax + p * s.out_plane();
                  std::fill(dxp, dxp + s.in_plane(), 0.0f);
                  for (int64_t o = 0; o < s.out_plane(); ++o) dxp[ap[o]] += dyp[o];
                }
              });
}

void AvgPool2dForward(const CpuContext& ctx, const Pool2dShape& s, AvgPoolDivisor divisor,
                      const float* x, float* y) {
  CheckShape(s);
  const int64_t oh_n = s.out_height();
  const int64_t ow_n = s.out_width();
  ParallelFor(ctx.pool, s.batch * s.channels, PlaneGrain(s.in_plane()),
              [&](int64_t begin, int64_t end) {
                for (int64_t p = begin; p < end; ++p) {
                  const float* xp = x + p * s.in_plane();
                  float* yp = y + p * s.out_plane();
                  for (int64_t oh = 0; oh < oh_n; ++oh) {
                    const Range rows = Clip(oh * s.stride_h - s.pad_h, s.kernel_h, s.in_height);
                    for (int64_t ow = 0; ow < ow_n; ++ow) {
                      const Range cols = Clip(ow * s.stride_w - s.pad_w, s.kernel_w, s.in_width);
                      float sum = 0.0f;
                      for (int64_t ih = rows.lo; ih < rows.hi; ++ih) {
                        for (int64_t iw = cols.lo; iw < cols.hi; ++iw) {
                          sum += xp[ih * s.in_width + iw];
                        }
                      }
                      yp[oh * ow_n + ow] = sum / Divisor(s, divisor, rows, cols);
                    }
                  }
                }
              });
}

void AvgPool2dBackward(const CpuContext& ctx, const Pool2dShape& s, AvgPoolDivisor divisor,
                       const float* dy, float* dx) {
  CheckShape(s);
  const int64_t oh_n = s.out_height();
  const int64_t ow_n = s.out_width();
  ParallelFor(ctx.pool, s.batch * s.channels, PlaneGrain(s.in_plane()),
              [&](int64_t begin, int64_t end) {
                for (int64_t p = begin; p < end; ++p) {
                  float* dxp = dx + p * s.in_plane();
                  const float* dyp = dy + p * s.out_plane();
                  std::fill(dxp, dxp + s.in_plane(), 0.0f);
                  for (int64_t oh = 0; oh < oh_n; ++oh) {
                    const Range rows = Clip(oh * s.stride_h - s.pad_h, s.kernel_h, s.in_height);
                    for (int64_t ow = 0; ow < ow_n; ++ow) {
                      const Range cols = Clip(ow * s.stride_w - s.pad_w, s.kernel_w, s.in_width);
                      const float g = dyp[oh * ow_n + ow] / Divisor(s, divisor, rows, cols);
                      for (int64_t ih = rows.lo; ih < rows.hi; ++ih) {
                        for (int64_t iw = cols.lo; iw < cols.hi; ++iw) {
                          dxp[ih * s.in_width + iw] += g;
                        }
                      }
                    }
                  }
                }
              });
}

void GlobalAvgPoolForward(const CpuContext& ctx, int64_t batch, int64_t channels, int64_t spatial,
                          const float* x, float* y) {
  QTRAIN_CHECK(batch >= 0 && channels >= 0 && spatial >= 1)
      << "batch=" << batch << " channels=" << channels << " spatial=" << spatial;
  const CpuContext inner = ctx.SingleThreaded();
  ParallelFor(ctx.pool, batch * channels, PlaneGrain(spatial), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      y[p] = static_cast<float>(Sum(inner, spatial, x + p * spatial) / spatial);
    }
  });
}

void GlobalAvgPoolBackward(const CpuContext& ctx, int64_t batch, int64_t channels, int64_t spatial,
                           const float* dy, float* dx) {
  QTRAIN_CHECK(batch >= 0 && channels >= 0 && spatial >= 1)
      << "batch=" << batch << " channels=" << channels << " spatial=" << spatial;
  ParallelFor(ctx.pool, batch * channels, PlaneGrain(spatial), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      std::fill(dx + p * spatial, dx + (p + 1) * spatial, dy[p] / static_cast<float>(spatial));
    }
  });
}

}  // namespace qtrain::kernels
