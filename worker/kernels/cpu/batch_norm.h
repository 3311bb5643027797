// Batch normalisation over the channel axis of an N x C x spatial float tensor (spatial = H * W
// for convolutions, 1 after a fully-connected layer).
//
//   training:  mean_c, var_c over the N * spatial values of channel c (biased variance);
//              y = (x - mean_c) * gamma_c / sqrt(var_c + eps) + beta_c;
//              running stats move toward the batch ones by `momentum`, the running variance
//              taking the unbiased batch variance (PyTorch's convention).
//   eval:      the same with the running mean and variance.
//   backward:  dbeta_c = sum dy; dgamma_c = sum dy * xhat;
//              dx = gamma_c * inv_std_c / M * (M * dy - dbeta_c - xhat * dgamma_c), M = N *
//              spatial.
//
// Statistics and parameter gradients are accumulated in double (two-pass variance). Channels are
// split over ctx.pool and each channel is reduced by one thread in a fixed order, so results do not
// depend on the thread count (they do differ slightly between SIMD levels: summation order).
// Thread-safe for non-overlapping outputs. Cost: 3 passes over x (training forward), 1 (eval),
// 2 over x and dy (backward).
#ifndef QTRAIN_WORKER_KERNELS_CPU_BATCH_NORM_H_
#define QTRAIN_WORKER_KERNELS_CPU_BATCH_NORM_H_

#include <cstdint>

#include "worker/kernels/cpu/cpu_context.h"

namespace qtrain::kernels {

struct BatchNormShape {
  int64_t batch = 1;
  int64_t channels = 1;
  int64_t spatial = 1;  // H * W
};

struct BatchNormOptions {
  // running = (1 - momentum) * running + momentum * batch statistic (PyTorch's default 0.1).
  float momentum = 0.1f;
  // Added to the variance before the square root (PyTorch's default).
  float epsilon = 1e-5f;
};

// x, y: N x C x spatial. gamma, beta, saved_mean, saved_inv_std, running_mean, running_var: C.
// Writes y and the saved batch statistics (for backward); updates the running statistics in place.
// Requires batch * spatial >= 1 (checked). With a single value per channel the running variance
// takes the biased variance (0) instead of dividing by zero.
void BatchNormTrainForward(const CpuContext& ctx, const BatchNormShape& shape,
                           const BatchNormOptions& options, const float* x, const float* gamma,
                           const float* beta, float* y, float* saved_mean, float* saved_inv_std,
                           float* running_mean, float* running_var);

// y = (x - running_mean) * gamma / sqrt(running_var + epsilon) + beta. Momentum is unused.
void BatchNormEvalForward(const CpuContext& ctx, const BatchNormShape& shape,
                          const BatchNormOptions& options, const float* x, const float* gamma,
                          const float* beta, const float* running_mean, const float* running_var,
                          float* y);

// Backward of the training forward. saved_mean / saved_inv_std are what it wrote. dx (N x C x
// spatial), dgamma and dbeta (C) are overwritten.
void BatchNormBackward(const CpuContext& ctx, const BatchNormShape& shape, const float* x,
                       const float* dy, const float* gamma, const float* saved_mean,
                       const float* saved_inv_std, float* dx, float* dgamma, float* dbeta);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_BATCH_NORM_H_
