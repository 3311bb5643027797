// Guided training (Zhuang et al. 2018, Sec. 3.3): a full-precision twin of the low-bit network,
// trained jointly with it. With mu and nu the twin's and the low-bit network's feature maps at the
// guidance points and Q the low-bit network's activation quantizer,
//   R = 1/2 * sum_points ||Q(mu) - nu||^2 / N          (N = batch size: the mean over the batch)
// The twin minimises CE + lambda R and the low-bit network CE + lambda R, each with its own SGD,
// every step. dR/dnu = -(Q(mu) - nu) / N; dR/dmu = Q'(mu) (Q(mu) - nu) / N with Q' the quantizer's
// straight-through rule (DoReFa: 1 on [0, 1]; PACT: 1 on [0, alpha], alpha the low-bit network's
// own, copied before every step). Q is the identity where the low-bit network does not quantize
// the map (the guidance point is not an activation quantizer, e.g. the ReLU kept in front of a
// full-precision classifier, or a phase with full-precision activations).
//
// Guidance points are direct children of the (Sequential) models, by name: the feature map is the
// child's output. Defaults (DefaultGuideLayers): resnet20 the outputs of the last two residual
// groups ("layer2.2", "layer3.2"); cnn the two activations before the classifier ("relu4": the
// last conv block, "relu5": fc1's); mlp "relu1", "relu2".
//
// TapRunner runs a Sequential child by child (as Sequential::Forward/Backward do, including the
// on_grads_ready protocol) so the guidance points' outputs can be read after Forward and an extra
// gradient added there during Backward.
//
// Thread-safety: one thread, like layers. Cost of a guided step: about twice a plain step (two
// forward/backward passes, the twin's in full precision) plus two passes over the guided maps.
#ifndef QTRAIN_WORKER_TRAIN_GUIDED_H_
#define QTRAIN_WORKER_TRAIN_GUIDED_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/kernels/cpu/softmax_xent.h"
#include "worker/nn/layer.h"
#include "worker/nn/sequential.h"
#include "worker/quant/quant_spec.h"
#include "worker/train/optimizer.h"

namespace qtrain::train {

// The guidance points the issue prescribes for `model` ("resnet20", "cnn", "mlp", "mlp-wide").
std::vector<std::string> DefaultGuideLayers(const std::string& model);

// R for one guidance point, and its gradients (either pointer may be null). `q` may be null (the
// identity); it is run in training mode (Forward then Backward, its parameter grads are ignored).
// Precondition: mu and nu have the same shape, dim 0 the batch.
double GuidanceLoss(nn::RunContext& ctx, nn::Layer* q, const nn::Tensor& mu, const nn::Tensor& nu,
                    nn::Tensor* dmu, nn::Tensor* dnu);

class TapRunner {
 public:
  // INVALID_ARGUMENT if a name is not a direct child of `net` (the message lists them).
  static absl::StatusOr<std::unique_ptr<TapRunner>> Create(nn::Sequential* net,
                                                           const std::vector<std::string>& taps);
  void Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y);
  // The output of tap k after Forward.
  const nn::Tensor& tap(int k) const { return *tap_out_[static_cast<size_t>(k)]; }
  // Added to tap k's output gradient during Backward; set it (same shape as tap(k)) before.
  nn::Tensor& tap_grad(int k) { return tap_grad_[static_cast<size_t>(k)]; }
  // Backward from dy; the first child's dx is not computed.
  void Backward(nn::RunContext& ctx, const nn::Tensor& dy);

 private:
  TapRunner() = default;
  nn::Sequential* net_ = nullptr;
  std::vector<int> tap_of_child_;  // per child: tap index or -1
  std::vector<const nn::Tensor*> tap_out_;
  std::vector<nn::Tensor> tap_grad_;
  std::vector<std::vector<nn::Parameter*>> child_params_;
  std::vector<nn::Tensor> acts_;
  nn::Tensor grads_[3];
  nn::Tensor* last_output_ = nullptr;
};

struct GuideOptions {
  float lambda = 1.0f;
  std::vector<std::string> layers;  // guidance points
  SgdOptions sgd;                   // the twin's optimizer
};

struct GuidedStepResult {
  kernels::SoftmaxXentResult lowbit;  // CE of the low-bit network
  kernels::SoftmaxXentResult fp;      // CE of the twin
  double guidance = 0;                // R (without lambda)
};

class Guide {
 public:
  // `fp_model` is the twin (a Sequential, full precision); the guide owns it.
  static absl::StatusOr<std::unique_ptr<Guide>> Create(const GuideOptions& options,
                                                       std::unique_ptr<nn::Layer> fp_model);
  // Attaches the guide to the current low-bit network (after every rebuild), whose activation
  // quantizer spec is `activation` (Method::kNone: Q is the identity). INVALID_ARGUMENT if a
  // guidance point is missing or its shapes differ between the nets.
  absl::Status Bind(nn::Layer* lowbit, const quant::QuantSpec& activation);

  // Forward and backward of both networks on one batch. The low-bit network's gradients are
  // reported through ctx.on_grads_ready; the twin's are not (they stay local).
  absl::StatusOr<GuidedStepResult> ForwardBackward(nn::RunContext& ctx, const nn::Tensor& x,
                                                   std::span<const int32_t> labels);
  void StepFp(const kernels::CpuContext& cpu, float lr) { sgd_->Step(cpu, lr); }

  nn::Layer* fp_model() { return fp_model_.get(); }
  Sgd& fp_sgd() { return *sgd_; }
  std::vector<nn::Parameter*> fp_params() const { return fp_params_; }
  std::vector<nn::Buffer*> fp_buffers() const { return fp_buffers_; }
  const GuideOptions& options() const { return options_; }

 private:
  Guide() = default;
  GuideOptions options_;
  std::unique_ptr<nn::Layer> fp_model_;
  std::vector<nn::Parameter*> fp_params_;
  std::vector<nn::Buffer*> fp_buffers_;
  std::unique_ptr<Sgd> sgd_;
  std::unique_ptr<TapRunner> fp_runner_, lowbit_runner_;
  nn::Layer* lowbit_ = nullptr;
  // Per guidance point: Q (null: identity) and the low-bit parameters its own mirror.
  std::vector<std::unique_ptr<nn::Layer>> q_;
  std::vector<std::vector<std::pair<nn::Parameter*, nn::Parameter*>>> q_sync_;  // (src, dst)
  nn::Tensor logits_, fp_logits_, dlogits_, fp_dlogits_, dmu_, dnu_;
};

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_GUIDED_H_
