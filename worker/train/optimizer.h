// SGD with momentum, weight decay and an optional Nesterov step, over a model's parameters.
//
//   g' = g + weight_decay * w        (ParamKind::kWeight only)
//   v  = momentum * v + g'
//   w -= lr * (nesterov ? g' + momentum * v : v)
//
// Each parameter steps with lr * p.lr_scale (QIL's interval parameters set 0.01), and quantizer
// parameters (ParamKind::kQuantizer) additionally with quantizer_lr_scale.
//
// Thread-safety: not thread-safe; one per model. Memory: one momentum tensor per parameter.
#ifndef QTRAIN_WORKER_TRAIN_OPTIMIZER_H_
#define QTRAIN_WORKER_TRAIN_OPTIMIZER_H_

#include <vector>

#include "absl/status/status.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/nn/layer.h"

namespace qtrain::train {

struct SgdOptions {
  float momentum = 0.9f;          // 0 disables momentum
  float weight_decay = 5e-4f;     // L2 on kWeight parameters
  bool nesterov = false;
  float quantizer_lr_scale = 1.0f;
};

absl::Status ValidateSgdOptions(const SgdOptions& options);

class Sgd {
 public:
  Sgd(std::vector<nn::Parameter*> params, const SgdOptions& options);

  // One update with learning rate `lr` from each parameter's grad.
  void Step(const kernels::CpuContext& ctx, float lr);

  const std::vector<nn::Parameter*>& params() const { return params_; }
  // Momentum buffers, one per parameter in params() order (for checkpoints).
  std::vector<nn::Tensor>& momentum() { return momentum_; }

 private:
  std::vector<nn::Parameter*> params_;
  SgdOptions options_;
  std::vector<nn::Tensor> momentum_;
};

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_OPTIMIZER_H_
