// ReLU forward and backward over flat device float arrays, and a fused per-channel bias + ReLU:
// the CUDA counterparts of kernels/cpu/activation.h.
//
//   ReluForward:      y = x > 0 ? x : 0                 (NaN and -0 map to +0)
//   ReluBackward:     dx = x > 0 ? dy : 0               (x: the forward input or output)
//   BiasReluForward:  y[n, c, s] = relu(x[n, c, s] + bias[c])   over N x C x spatial (NCHW with
//                     spatial = H * W; spatial = 1 after a fully-connected layer)
//
// Identical bits to the CPU kernels (the bias add is one IEEE add, as kernels::Add). `y` may
// alias `x`, `dx` may alias `dy`. Asynchronous on ctx.stream, no synchronization, no allocation;
// the Status reports INVALID_ARGUMENT for negative sizes or null pointers, and launch errors.
// Cost: one memory-bound pass.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_ACTIVATION_H_
#define QTRAIN_WORKER_KERNELS_CUDA_ACTIVATION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cuda/cuda_context.h"

namespace qtrain::kernels::cuda {

absl::Status ReluForward(const CudaContext& ctx, int64_t n, const float* x, float* y);
absl::Status ReluBackward(const CudaContext& ctx, int64_t n, const float* x, const float* dy,
                          float* dx);
absl::Status BiasReluForward(const CudaContext& ctx, int64_t batch, int64_t channels,
                             int64_t spatial, const float* x, const float* bias, float* y);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_ACTIVATION_H_
