#include "worker/kernels/cpu/conv.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/aligned_buffer.h"
#include "worker/kernels/cpu/elementwise.h"
#include "worker/kernels/cpu/sgemm.h"

namespace qtrain::kernels {
namespace {

void CheckShape(const Conv2dShape& shape) {
  const absl::Status status = ValidateConv2dShape(shape);
  QTRAIN_CHECK(status.ok()) << status.ToString();
}

// A 1x1 kernel with unit stride and no padding: im2col would copy the image unchanged.
bool IsPointwise(const Conv2dShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 &&
         s.pad_w == 0;
}

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t CeilDiv(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// The output columns [lo, hi) whose input column ow*stride - pad + kw lies inside [0, width).
struct ColumnRange {
  int64_t lo;
  int64_t hi;
};
ColumnRange ValidColumns(const Conv2dShape& s, int64_t kw) {
  const int64_t ow_n = s.out_width();
  const int64_t lo = std::clamp<int64_t>(CeilDiv(s.pad_w - kw, s.stride_w), 0, ow_n);
  const int64_t hi =
      std::clamp<int64_t>(FloorDiv(s.in_width - 1 + s.pad_w - kw, s.stride_w) + 1, lo, ow_n);
  return ColumnRange{lo, hi};
}

// Runs fn(gemm_ctx, col_buffer, n) for every image n. With at least as many images as threads the
// images are split over the pool and each chunk gets its own column buffer and a single-threaded
// context; otherwise images run in turn and fn's GEMMs use the whole pool.
template <class Fn>
void ForEachImage(const CpuContext& ctx, int64_t batch, int64_t col_size, Fn&& fn) {
  if (batch >= ctx.num_threads()) {
    const CpuContext inner = ctx.SingleThreaded();
    ParallelFor(ctx.pool, batch, 1, [&](int64_t begin, int64_t end) {
      AlignedBuffer col(col_size);
      for (int64_t n = begin; n < end; ++n) fn(inner, col.data(), n);
    });
  } else {
    AlignedBuffer col(col_size);
    for (int64_t n = 0; n < batch; ++n) fn(ctx, col.data(), n);
  }
}

}  // namespace

absl::Status ValidateConv2dShape(const Conv2dShape& s) {
  if (s.batch < 1 || s.in_channels < 1 || s.in_height < 1 || s.in_width < 1 || s.out_channels < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "conv2d: batch, channels and input size must be >= 1, got input ", s.batch, "x",
        s.in_channels, "x", s.in_height, "x", s.in_width, ", out_channels ", s.out_channels));
  }
  if (s.kernel_h < 1 || s.kernel_w < 1 || s.stride_h < 1 || s.stride_w < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("conv2d: kernel and stride must be >= 1, got kernel ", s.kernel_h, "x",
                     s.kernel_w, " stride ", s.stride_h, "x", s.stride_w));
  }
  if (s.pad_h < 0 || s.pad_w < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("conv2d: padding must be >= 0, got ", s.pad_h, "x", s.pad_w));
  }
  if (s.in_height + 2 * s.pad_h < s.kernel_h || s.in_width + 2 * s.pad_w < s.kernel_w) {
    return absl::InvalidArgumentError(absl::StrCat(
        "conv2d: kernel ", s.kernel_h, "x", s.kernel_w, " is larger than the padded input ",
        s.in_height + 2 * s.pad_h, "x", s.in_width + 2 * s.pad_w));
  }
  return absl::OkStatus();
}

void Im2Col(const Conv2dShape& s, const float* image, float* col) {
  const int64_t oh_n = s.out_height();
  const int64_t ow_n = s.out_width();
  for (int64_t c = 0; c < s.in_channels; ++c) {
    const float* plane = image + c * s.in_height * s.in_width;
    for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
        float* row = col + ((c * s.kernel_h + kh) * s.kernel_w + kw) * oh_n * ow_n;
        const ColumnRange cols = ValidColumns(s, kw);
        for (int64_t oh = 0; oh < oh_n; ++oh) {
          float* out = row + oh * ow_n;
          const int64_t ih = oh * s.stride_h - s.pad_h + kh;
          if (ih < 0 || ih >= s.in_height) {
            std::fill(out, out + ow_n, 0.0f);
            continue;
          }
          const float* in = plane + ih * s.in_width - s.pad_w + kw;  // in[ow * stride_w]
          std::fill(out, out + cols.lo, 0.0f);
          if (s.stride_w == 1) {
            std::memcpy(out + cols.lo, in + cols.lo, sizeof(float) * (cols.hi - cols.lo));
          } else {
            for (int64_t ow = cols.lo; ow < cols.hi; ++ow) out[ow] = in[ow * s.stride_w];
          }
          std::fill(out + cols.hi, out + ow_n, 0.0f);
        }
      }
    }
  }
}

void Col2Im(const Conv2dShape& s, const float* col, float* image) {
  const int64_t oh_n = s.out_height();
  const int64_t ow_n = s.out_width();
  std::fill(image, image + s.in_channels * s.in_height * s.in_width, 0.0f);
  for (int64_t c = 0; c < s.in_channels; ++c) {
    float* plane = image + c * s.in_height * s.in_width;
    for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
        const float* row = col + ((c * s.kernel_h + kh) * s.kernel_w + kw) * oh_n * ow_n;
        const ColumnRange cols = ValidColumns(s, kw);
        for (int64_t oh = 0; oh < oh_n; ++oh) {
          const int64_t ih = oh * s.stride_h - s.pad_h + kh;
          if (ih < 0 || ih >= s.in_height) continue;
          const float* out = row + oh * ow_n;
          float* in = plane + ih * s.in_width - s.pad_w + kw;
          for (int64_t ow = cols.lo; ow < cols.hi; ++ow) in[ow * s.stride_w] += out[ow];
        }
      }
    }
  }
}

void Conv2dForward(const CpuContext& ctx, const Conv2dShape& s, const float* x, const float* w,
                   const float* bias, float* y) {
  CheckShape(s);
  const int64_t kdim = s.col_rows();
  const int64_t spatial = s.col_cols();
  const int64_t in_size = s.in_channels * s.in_height * s.in_width;
  const int64_t out_size = s.out_channels * spatial;
  const bool pointwise = IsPointwise(s);
  ForEachImage(ctx, s.batch, pointwise ? 0 : kdim * spatial,
               [&](const CpuContext& gemm_ctx, float* col, int64_t n) {
                 const float* xn = x + n * in_size;
                 float* yn = y + n * out_size;
                 const float* cols = xn;
                 if (!pointwise) {
                   Im2Col(s, xn, col);
                   cols = col;
                 }
                 // The bias is written first and the GEMM accumulates onto it (beta = 1).
                 float beta = 0.0f;
                 if (bias != nullptr) {
                   for (int64_t k = 0; k < s.out_channels; ++k) {
                     std::fill(yn + k * spatial, yn + (k + 1) * spatial, bias[k]);
                   }
                   beta = 1.0f;
                 }
                 Sgemm(gemm_ctx, Transpose::kNo, Transpose::kNo, s.out_channels, spatial, kdim,
                       1.0f, w, kdim, cols, spatial, beta, yn, spatial);
               });
}

void Conv2dBackwardData(const CpuContext& ctx, const Conv2dShape& s, const float* dy,
                        const float* w, float* dx) {
  CheckShape(s);
  const int64_t kdim = s.col_rows();
  const int64_t spatial = s.col_cols();
  const int64_t in_size = s.in_channels * s.in_height * s.in_width;
  const int64_t out_size = s.out_channels * spatial;
  const bool pointwise = IsPointwise(s);
  ForEachImage(ctx, s.batch, pointwise ? 0 : kdim * spatial,
               [&](const CpuContext& gemm_ctx, float* dcol, int64_t n) {
                 const float* dyn = dy + n * out_size;
                 float* dxn = dx + n * in_size;
                 // dcol = w^T * dy_n; a pointwise convolution writes it straight into dx_n.
                 float* target = pointwise ? dxn : dcol;
                 Sgemm(gemm_ctx, Transpose::kYes, Transpose::kNo, kdim, spatial, s.out_channels,
                       1.0f, w, kdim, dyn, spatial, 0.0f, target, spatial);
                 if (!pointwise) Col2Im(s, dcol, dxn);
               });
}

void Conv2dBackwardWeights(const CpuContext& ctx, const Conv2dShape& s, const float* x,
                           const float* dy, float* dw, float* dbias) {
  CheckShape(s);
  const int64_t kdim = s.col_rows();
  const int64_t spatial = s.col_cols();
  const int64_t in_size = s.in_channels * s.in_height * s.in_width;
  const int64_t out_size = s.out_channels * spatial;
  const int64_t dw_size = s.out_channels * kdim;
  const bool pointwise = IsPointwise(s);

  // Accumulates images [begin, end) into dw_part (overwritten) and dbias_part (added to).
  auto accumulate = [&](const CpuContext& gemm_ctx, int64_t begin, int64_t end, float* dw_part,
                        double* dbias_part) {
    AlignedBuffer col(pointwise ? 0 : kdim * spatial);
    const CpuContext inner = gemm_ctx.SingleThreaded();
    for (int64_t n = begin; n < end; ++n) {
      const float* dyn = dy + n * out_size;
      const float* cols = x + n * in_size;
      if (!pointwise) {
        Im2Col(s, cols, col.data());
        cols = col.data();
      }
      // dw += dy_n (K x OH*OW) * col^T (OH*OW x C*KH*KW).
      Sgemm(gemm_ctx, Transpose::kNo, Transpose::kYes, s.out_channels, kdim, spatial, 1.0f, dyn,
            spatial, cols, spatial, n == begin ? 0.0f : 1.0f, dw_part, kdim);
      if (dbias_part != nullptr) {
        for (int64_t k = 0; k < s.out_channels; ++k) {
          dbias_part[k] += Sum(inner, spatial, dyn + k * spatial);
        }
      }
    }
  };

  if (s.batch < ctx.num_threads()) {
    std::vector<double> dbias_sum(s.out_channels, 0.0);
    accumulate(ctx, 0, s.batch, dw, dbias != nullptr ? dbias_sum.data() : nullptr);
    if (dbias != nullptr) {
      for (int64_t k = 0; k < s.out_channels; ++k) dbias[k] = static_cast<float>(dbias_sum[k]);
    }
    return;
  }

  // One partial dw per chunk of images (chunk 0 writes dw itself), summed in chunk order.
  const int64_t chunks = NumChunks(ctx.pool, s.batch, 1);
  std::vector<AlignedBuffer> dw_partial(chunks > 1 ? chunks - 1 : 0);
  std::vector<double> dbias_partial(chunks * s.out_channels, 0.0);
  const CpuContext inner = ctx.SingleThreaded();
  ParallelForChunks(ctx.pool, s.batch, 1, [&](int64_t chunk, int64_t begin, int64_t end) {
    float* dw_part = chunk == 0 ? dw : dw_partial[chunk - 1].Reserve(dw_size);
    accumulate(inner, begin, end, dw_part,
               dbias != nullptr ? dbias_partial.data() + chunk * s.out_channels : nullptr);
  });
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    Add(ctx, dw_size, dw, dw_partial[chunk - 1].data(), dw);
  }
  if (dbias != nullptr) {
    for (int64_t k = 0; k < s.out_channels; ++k) {
      double total = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        total += dbias_partial[chunk * s.out_channels + k];
      }
      dbias[k] = static_cast<float>(total);
    }
  }
}

}  // namespace qtrain::kernels
