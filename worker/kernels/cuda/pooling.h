// 2-D pooling over NCHW device float tensors: the CUDA counterparts of kernels/cpu/pooling.h,
// with the same shapes (kernels::Pool2dShape), window rules and tie rules.
//
//   MaxPool2dForward:   y and argmax (index ih * W + iw into the input plane of the FIRST maximum
//                       of the window in row-major order; a NaN wins once, so it propagates).
//   MaxPool2dBackward:  dx[argmax] += dy, dx overwritten.
//   AvgPool2d:          sum of the in-bounds window (float, row-major) / divisor.
//   GlobalAvgPool:      mean over each plane (summed in double), and dx = dy / spatial.
//
// Exactness: max and average pooling forward compute each output with the CPU's operations in
// the CPU's order, so they match bit for bit. The backward passes gather instead of scatter: each
// dx element is one thread that adds the contributions of the outputs whose window holds it in
// increasing output index, which is exactly the order of the CPU's scatter loop, so they match
// bit for bit too (and need no atomics). Global average pooling sums each plane with one warp in
// double (order differs from the CPU's by ~1e-16 relative before the float rounding).
//
// Asynchronous on ctx.stream, no synchronization, no allocation. The Status reports
// INVALID_ARGUMENT for a shape ValidatePool2dShape rejects (or bad extents) and null pointers,
// and launch errors. Cost: forward one pass over the input per window element; backward one
// thread per input element visiting the ceil(kernel / stride)^2 outputs that can cover it.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_POOLING_H_
#define QTRAIN_WORKER_KERNELS_CUDA_POOLING_H_

#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cpu/pooling.h"
#include "worker/kernels/cuda/cuda_context.h"

namespace qtrain::kernels::cuda {

// y, argmax: N x C x OH x OW.
absl::Status MaxPool2dForward(const CudaContext& ctx, const Pool2dShape& shape, const float* x,
                              float* y, int32_t* argmax);
// dx: N x C x H x W, overwritten.
absl::Status MaxPool2dBackward(const CudaContext& ctx, const Pool2dShape& shape, const float* dy,
                               const int32_t* argmax, float* dx);

absl::Status AvgPool2dForward(const CudaContext& ctx, const Pool2dShape& shape,
                              AvgPoolDivisor divisor, const float* x, float* y);
// dx: N x C x H x W, overwritten.
absl::Status AvgPool2dBackward(const CudaContext& ctx, const Pool2dShape& shape,
                               AvgPoolDivisor divisor, const float* dy, float* dx);

// x: N x C x spatial -> y: N x C. batch, channels >= 0, spatial >= 1.
absl::Status GlobalAvgPoolForward(const CudaContext& ctx, int64_t batch, int64_t channels,
                                  int64_t spatial, const float* x, float* y);
// dx[n, c, :] = dy[n, c] / spatial (overwritten).
absl::Status GlobalAvgPoolBackward(const CudaContext& ctx, int64_t batch, int64_t channels,
                                   int64_t spatial, const float* dy, float* dx);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_POOLING_H_
