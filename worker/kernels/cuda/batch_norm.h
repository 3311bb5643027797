// Batch normalisation over the channel axis of N x C x spatial device float tensors: the CUDA
// counterparts of kernels/cpu/batch_norm.h, with the same shapes, options and math:
//
//   training:  mean_c, var_c over the N * spatial values of channel c (biased variance, two-pass:
//              sum (x - mean)^2 with mean in double); y = (x - mean_c) * scale_c + beta_c with
//              scale_c = float(gamma_c * inv_std_c), inv_std_c = 1 / sqrt(var_c + eps) in double;
//              running = (1 - momentum) * running + momentum * batch statistic (in double), the
//              running variance taking the unbiased variance (biased when N * spatial == 1).
//   eval:      the same with the running statistics.
//   backward:  dbeta_c = sum dy; dgamma_c = inv_std_c (sum dy x - mean_c sum dy) (double);
//              dx = (k_dy dy + k_x (x - mean_c)) + k0 with the CPU's float coefficients.
// The *Relu variants fuse a ReLU: forward y = relu(BN(x)); backward takes the fused forward's
// output y and uses dy' = y > 0 ? dy : 0 in place of dy (the same as kernels::ReluBackward
// followed by the plain backward).
//
// Exactness: statistics and parameter gradients are accumulated in double by a deterministic
// segmented reduction (launch_util.h): identical run to run; they differ from the CPU's summation
// order by ~1e-16 relative, so the float outputs match the CPU's to ~1 ulp (exactly, nearly
// always). The eval forward matches bit for bit.
//
// Workspace: BatchNormWorkspaceBytes(shape) bytes of device memory, 16-byte aligned, for the
// training forward and the backward (the eval forward needs none). It carries per-channel values
// between the kernels of one call only; reuse it freely between calls on the same stream.
//
// Asynchronous on ctx.stream, no synchronization, no allocation. The Status reports
// INVALID_ARGUMENT for a shape with an extent < 1, null pointers or a bad workspace, and launch
// errors. Cost: training forward 3 passes over x, eval 1, backward 2 over x and dy (plus y for
// the ReLU variant); each reduction pass runs SegmentSplit(N * spatial) blocks per channel.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_BATCH_NORM_H_
#define QTRAIN_WORKER_KERNELS_CUDA_BATCH_NORM_H_

#include <cstddef>

#include "absl/status/status.h"
#include "worker/kernels/cpu/batch_norm.h"
#include "worker/kernels/cuda/cuda_context.h"

namespace qtrain::kernels::cuda {

enum class BatchNormActivation {
  kNone,  // y = BN(x)
  kRelu,  // y = max(BN(x), 0), the fused BN + ReLU
};

// Device scratch bytes for BatchNormTrainForward / BatchNormBackward on `shape` (0 for an invalid
// shape).
size_t BatchNormWorkspaceBytes(const BatchNormShape& shape);

// x, y: N x C x spatial. gamma, beta, saved_mean, saved_inv_std, running_mean, running_var: C.
// Writes y and the saved statistics, updates the running statistics in place.
absl::Status BatchNormTrainForward(const CudaContext& ctx, const BatchNormShape& shape,
                                   const BatchNormOptions& options, const float* x,
                                   const float* gamma, const float* beta, float* y,
                                   float* saved_mean, float* saved_inv_std, float* running_mean,
                                   float* running_var, void* workspace,
                                   BatchNormActivation activation = BatchNormActivation::kNone);

absl::Status BatchNormEvalForward(const CudaContext& ctx, const BatchNormShape& shape,
                                  const BatchNormOptions& options, const float* x,
                                  const float* gamma, const float* beta, const float* running_mean,
                                  const float* running_var, float* y,
                                  BatchNormActivation activation = BatchNormActivation::kNone);

// Backward of the plain training forward. dx (may alias dy), dgamma, dbeta are overwritten.
absl::Status BatchNormBackward(const CudaContext& ctx, const BatchNormShape& shape, const float* x,
                               const float* dy, const float* gamma, const float* saved_mean,
                               const float* saved_inv_std, float* dx, float* dgamma, float* dbeta,
                               void* workspace);

// Backward of the fused BN + ReLU training forward; y is that forward's output.
absl::Status BatchNormReluBackward(const CudaContext& ctx, const BatchNormShape& shape,
                                   const float* x, const float* y, const float* dy,
                                   const float* gamma, const float* saved_mean,
                                   const float* saved_inv_std, float* dx, float* dgamma,
                                   float* dbeta, void* workspace);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_BATCH_NORM_H_
