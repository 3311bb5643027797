// 2-D pooling over NCHW float tensors: max pooling (recording the arg-max so backward is a
// scatter), average pooling, and global average pooling (N x C x H x W -> N x C).
//
// Windows: output (oh, ow) covers input rows oh*stride_h - pad_h .. + kernel_h - 1 (likewise
// columns); padded positions are never the max and, for average pooling, count toward the divisor
// only with AvgPoolDivisor::kWindowSize. Output size is floor((in + 2*pad - kernel) / stride) + 1.
//
// Planes (n, c) are split over ctx.pool; each output is computed by one thread in a fixed order,
// so results do not depend on the thread count. Thread-safe for non-overlapping outputs.
// Cost: one pass over the input (forward) and output (backward) per window element.
#ifndef QTRAIN_WORKER_KERNELS_CPU_POOLING_H_
#define QTRAIN_WORKER_KERNELS_CPU_POOLING_H_

#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cpu/cpu_context.h"

namespace qtrain::kernels {

struct Pool2dShape {
  int64_t batch = 1;
  int64_t channels = 1;
  int64_t in_height = 1;
  int64_t in_width = 1;
  int64_t kernel_h = 2;
  int64_t kernel_w = 2;
  int64_t stride_h = 2;
  int64_t stride_w = 2;
  int64_t pad_h = 0;
  int64_t pad_w = 0;

  int64_t out_height() const { return (in_height + 2 * pad_h - kernel_h) / stride_h + 1; }
  int64_t out_width() const { return (in_width + 2 * pad_w - kernel_w) / stride_w + 1; }
  int64_t in_plane() const { return in_height * in_width; }
  int64_t out_plane() const { return out_height() * out_width(); }
};

// OK when every extent is positive, pad < kernel (so every window holds at least one input) and the
// output is at least 1 x 1; INVALID_ARGUMENT naming the bad field otherwise. The kernels below
// require a valid shape (checked: a bad one aborts).
absl::Status ValidatePool2dShape(const Pool2dShape& shape);

// y: N x C x OH x OW. argmax: N x C x OH x OW indices into the input plane (ih * W + iw) of the
// first maximum in the window (NaN counts as the maximum, so it propagates).
void MaxPool2dForward(const CpuContext& ctx, const Pool2dShape& shape, const float* x, float* y,
                      int32_t* argmax);
// dx (N x C x H x W) is overwritten: zero except dx[argmax] += dy.
void MaxPool2dBackward(const CpuContext& ctx, const Pool2dShape& shape, const float* dy,
                       const int32_t* argmax, float* dx);

enum class AvgPoolDivisor {
  kWindowSize,  // divide by kernel_h * kernel_w, padding counts as zeros (PyTorch's default)
  kValidCount,  // divide by the number of in-bounds inputs in the window
};

void AvgPool2dForward(const CpuContext& ctx, const Pool2dShape& shape, AvgPoolDivisor divisor,
                      const float* x, float* y);
// dx (N x C x H x W) is overwritten.
void AvgPool2dBackward(const CpuContext& ctx, const Pool2dShape& shape, AvgPoolDivisor divisor,
                       const float* dy, float* dx);

// x: N x C x spatial (spatial = H * W) -> y: N x C, the mean over each plane (summed in double).
void GlobalAvgPoolForward(const CpuContext& ctx, int64_t batch, int64_t channels, int64_t spatial,
                          const float* x, float* y);
// dx[n, c, :] = dy[n, c] / spatial (overwritten).
void GlobalAvgPoolBackward(const CpuContext& ctx, int64_t batch, int64_t channels, int64_t spatial,
                           const float* dy, float* dx);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_POOLING_H_
