// Small CUDA kernels the GPU layers need that are not general kernels: row-bias add and its
// column-sum gradient (Linear), the residual block's shortcut add + ReLU and its backward, and the
// scalar layer's scale.
// Asynchronous on ctx.stream; the Status reports launch errors. Deterministic (no atomics).
#ifndef QTRAIN_WORKER_NN_CUDA_LAYER_KERNELS_H_
#define QTRAIN_WORKER_NN_CUDA_LAYER_KERNELS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cuda/cuda_context.h"

namespace qtrain::nn::cuda {

using kernels::cuda::CudaContext;

// y[r, c] += bias[c] for a rows x cols row-major y.
absl::Status AddRowBias(const CudaContext& ctx, int64_t rows, int64_t cols, const float* bias,
                        float* y);
// out[c] = sum_r dy[r, c] (in row order, float accumulation in double).
absl::Status ColumnSums(const CudaContext& ctx, int64_t rows, int64_t cols, const float* dy,
                        float* out);

// The residual block's shortcut geometry (worker/nn/residual.h): the shortcut of x [N, Cin, H, W]
// at output [N, Cout, OH, OW] is x[n, c - pad_before, oh*stride, ow*stride] for
// pad_before <= c < pad_before + Cin, else 0. Identity: stride 1, Cin == Cout, pad_before 0.
struct ShortcutShape {
  int64_t batch = 1, in_channels = 1, in_height = 1, in_width = 1;
  int64_t out_channels = 1, out_height = 1, out_width = 1;
  int64_t stride = 1, pad_before = 0;
};

// y = relu(z + shortcut(x)) when projected == nullptr, else y = relu(z + projected); y may be z.
absl::Status ShortcutAddRelu(const CudaContext& ctx, const ShortcutShape& s, const float* x,
                             const float* projected, const float* z, float* y);
// dz = dy * (y > 0) (the ReLU's gradient from its output).
absl::Status ReluBackwardFromOutput(const CudaContext& ctx, int64_t n, const float* y,
                                    const float* dy, float* dz);
// dx += the shortcut's gradient: dx[n, c, h, w] += dz[n, c + pad_before, h / s, w / s] where h and
// w are multiples of the stride (and the channel maps), else nothing.
absl::Status ShortcutBackwardAccumulate(const CudaContext& ctx, const ShortcutShape& s,
                                        const float* dz, float* dx);
// a += b, n elements.
absl::Status AddInPlace(const CudaContext& ctx, int64_t n, const float* b, float* a);
// y = s[0] * x, n elements, with the scalar read on the device (nn::ScalarLayer).
absl::Status ScaleByDeviceScalar(const CudaContext& ctx, int64_t n, const float* s, const float* x,
                                 float* y);

}  // namespace qtrain::nn::cuda

#endif  // QTRAIN_WORKER_NN_CUDA_LAYER_KERNELS_H_
