#include "worker/kernels/cpu/pooling.h"

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
