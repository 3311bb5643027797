// 2-D convolution over NCHW float tensors by im2col + SGEMM, forward and both backward passes.
//
// Per image n (x_n: C x H x W, y_n: K x OH x OW, weights w: K x C x KH x KW = K x (C*KH*KW)):
//   forward:          col = im2col(x_n)            (C*KH*KW) x (OH*OW)
//                     y_n = w * col + bias
//   backward data:    dx_n = col2im(w^T * dy_n)
//   backward weights: dw = sum_n dy_n * im2col(x_n)^T,  dbias = sum_n,oh,ow dy_n
// A 1x1 kernel with stride 1 and no padding skips im2col (col is x_n itself).
//
// Output position (oh, ow) reads input rows oh*stride_h - pad_h + kh (zero outside the image);
// OH = (H + 2*pad_h - KH) / stride_h + 1 (floor), likewise OW. No dilation or groups.
//
// Paths. With AVX2 (ctx.simd) every non-pointwise pass runs as an implicit GEMM (no im2col
// buffer): the output positions of the whole batch form one column index cut into 16-wide strips,
// packed straight from a zero-padded copy of the input and multiplied with the SGEMM micro-kernel.
// Backward data of a unit-stride convolution is run as the forward convolution of dy with the
// flipped, channel-swapped weights; backward weights computes dw^T = col * dy^T with the threads
// splitting the rows of dw^T. All three results are then independent of the thread count.
// Otherwise (scalar, pointwise, strided backward data) per-image im2col + SGEMM: with at least as
// many images as threads, images are split over ctx.pool and each thread runs single-threaded
// GEMMs on its own column buffer; with fewer, images run in turn and each GEMM uses the pool.
// There backward weights keeps one partial dw per chunk of images and adds them in chunk order,
// so its result depends on the thread count (deterministic for a given count); forward and
// backward data do not. Thread-safe for non-overlapping outputs.
// Cost: 2*N*K*C*KH*KW*OH*OW flops per pass, plus a padded copy of the input (AVX2) or a
// C*KH*KW x OH*OW column buffer per thread; scratch is thread-local and reused across calls.
#ifndef QTRAIN_WORKER_KERNELS_CPU_CONV_H_
#define QTRAIN_WORKER_KERNELS_CPU_CONV_H_

#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cpu/cpu_context.h"

namespace qtrain::kernels {

struct Conv2dShape {
  int64_t batch = 1;
  int64_t in_channels = 1;
  int64_t in_height = 1;
  int64_t in_width = 1;
  int64_t out_channels = 1;
  int64_t kernel_h = 3;
  int64_t kernel_w = 3;
  int64_t stride_h = 1;
  int64_t stride_w = 1;
  int64_t pad_h = 0;
  int64_t pad_w = 0;

  int64_t out_height() const { return (in_height + 2 * pad_h - kernel_h) / stride_h + 1; }
  int64_t out_width() const { return (in_width + 2 * pad_w - kernel_w) / stride_w + 1; }
  // Rows of the column matrix: C * KH * KW (also the row length of the weights).
  int64_t col_rows() const { return in_channels * kernel_h * kernel_w; }
  // Columns of the column matrix: OH * OW.
  int64_t col_cols() const { return out_height() * out_width(); }
};

// OK when every extent is positive, padding non-negative and the output at least 1 x 1;
// INVALID_ARGUMENT naming the problem otherwise. The functions below require a valid shape
// (checked: a bad one aborts), so layers validate once when they are built.
absl::Status ValidateConv2dShape(const Conv2dShape& shape);

// Unfolds one image (C x H x W) into col (col_rows() x col_cols()), zeros where the window
// overhangs the padding. Single-threaded. Cost: one write per col element.
void Im2Col(const Conv2dShape& shape, const float* image, float* col);

// The adjoint of Im2Col: image (C x H x W) is overwritten with the sum of every col element over
// the input position it was copied from. Single-threaded.
void Col2Im(const Conv2dShape& shape, const float* col, float* image);

// y (N x K x OH x OW) = conv(x (N x C x H x W), w (K x C x KH x KW)) + bias (K, or nullptr).
void Conv2dForward(const CpuContext& ctx, const Conv2dShape& shape, const float* x, const float* w,
                   const float* bias, float* y);

// dx (N x C x H x W) = gradient of sum(y * dy) with respect to x; overwritten.
void Conv2dBackwardData(const CpuContext& ctx, const Conv2dShape& shape, const float* dy,
                        const float* w, float* dx);

// dw (K x C x KH x KW) and dbias (K, or nullptr to skip) = gradients of sum(y * dy); overwritten.
void Conv2dBackwardWeights(const CpuContext& ctx, const Conv2dShape& shape, const float* x,
                           const float* dy, float* dw, float* dbias);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_CONV_H_
