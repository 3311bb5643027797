// Batch normalisation over the channel axis (Ioffe & Szegedy 2015): x [N, C, H, W] (or [N, C],
// treated as H = W = 1) -> y of the same shape,
//   y = (x - mean_c) / sqrt(var_c + eps) * gamma_c + beta_c.
// ctx.mode picks the statistics: kTrain uses the batch's (biased variance) and moves the running
// ones toward them by `momentum` (running variance takes the unbiased batch variance, PyTorch's
// convention); kEval uses the running statistics and changes nothing.
//
// Parameters: "gamma" (kNormScale, ones) and "beta" (kNormShift, zeros). Buffers: "running_mean"
// (zeros) and "running_var" (ones). Backward differentiates the forward that actually ran: through
// the batch statistics after a kTrain Forward, with the running statistics as constants after a
// kEval one. A kTrain Forward keeps a pointer to x for Backward (x must stay alive and unchanged
// until then). Cost: a few memory-bound passes over x (kernels::BatchNorm*).
#ifndef QTRAIN_WORKER_NN_BATCH_NORM_H_
#define QTRAIN_WORKER_NN_BATCH_NORM_H_

#include <cstdint>
#include <string>
#include <vector>

#include "worker/kernels/cpu/batch_norm.h"
#include "worker/nn/layer.h"

namespace qtrain::nn {

struct BatchNormOptions {
  int64_t channels = 1;
  float momentum = 0.1f;  // running = (1 - momentum) * running + momentum * batch statistic
  float epsilon = 1e-5f;  // added to the variance before the square root
};

class BatchNorm2d : public Layer {
 public:
  // Precondition (checked): channels >= 1, momentum in [0, 1], epsilon > 0.
  BatchNorm2d(std::string name, const BatchNormOptions& options);

  std::string Describe() const override;  // "batchnorm 32"
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;
  void CollectParameters(std::vector<Parameter*>* out) override;
  void CollectBuffers(std::vector<Buffer*>* out) override;

  const BatchNormOptions& options() const { return options_; }
  Parameter& gamma() { return gamma_; }
  Parameter& beta() { return beta_; }
  Buffer& running_mean() { return running_mean_; }
  Buffer& running_var() { return running_var_; }

 private:
  absl::Status ValidateInput(const Shape& input) const;
  kernels::BatchNormShape KernelShape(const Shape& input) const;
  void EvalBackward(RunContext& ctx, const Tensor& dy, Tensor* dx);

  BatchNormOptions options_;
  Parameter gamma_;
  Parameter beta_;
  Buffer running_mean_;
  Buffer running_var_;
  Tensor saved_mean_;              // [C], batch statistics of the last kTrain Forward
  Tensor saved_inv_std_;           // [C]
  Tensor scratch_dx_;              // dx when the caller wants none (the kernel always writes it)
  const Tensor* input_ = nullptr;  // saved by Forward
  Mode forward_mode_ = Mode::kTrain;
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_BATCH_NORM_H_
