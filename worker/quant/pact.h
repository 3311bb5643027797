// PACT activation quantizer (Choi et al. 2018, "PACT: Parameterized Clipping Activation for
// Quantized Neural Networks").
//
//   y = round(clip(x, 0, alpha) * n / alpha) * alpha / n,   n = 2^k - 1,
// codebook {j * alpha / n : j = 0..n}. alpha is learned ("alpha", kQuantizer, shape [1]).
// Gradients (the paper's straight-through rule, rounding treated as identity):
//   dL/dx     = dL/dy where 0 <= x < alpha, else 0;
//   dL/dalpha = sum_{x >= alpha} dL/dy  +  l2 * alpha.
// The L2 penalty (l2/2) * alpha^2 of the paper is folded into alpha's gradient here (the caller
// does not add it to the loss; LossPenalty() reports its value for logging). The rule equals the
// exact derivative of the un-rounded clip(x, 0, alpha), which is what the finite-difference test
// checks (Discretize::kOff). alpha is used as max(alpha, kMinAlpha) so training cannot divide
// by zero.
//
// Cost: one clip-and-round pass forward; one pass plus one reduction backward.
#ifndef QTRAIN_WORKER_QUANT_PACT_H_
#define QTRAIN_WORKER_QUANT_PACT_H_

#include <string>
#include <vector>

#include "worker/quant/activation_quantizer.h"

namespace qtrain::quant {

struct PactOptions {
  int bits = 4;              // 1..8
  float alpha_init = 10.0f;  // the paper's initial clipping level
  float l2 = 0.0f;           // lambda of the L2 penalty on alpha (the paper uses ~2e-4..1e-2)
  Discretize discretize = Discretize::kOn;
};

class PactActivationQuantizer : public ActivationQuantizer {
 public:
  static constexpr float kMinAlpha = 1e-4f;

  // Preconditions (checked): 1 <= bits <= 8, alpha_init > 0, l2 >= 0.
  PactActivationQuantizer(std::string name, const PactOptions& options);

  std::string Describe() const override;
  int bits() const override { return options_.bits; }
  std::vector<float> Levels() const override;
  void Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) override;
  void Backward(nn::RunContext& ctx, const nn::Tensor& dy, nn::Tensor* dx) override;
  void CollectParameters(std::vector<nn::Parameter*>* out) override;

  nn::Parameter& alpha() { return alpha_; }
  // max(alpha, kMinAlpha): the clipping level Forward uses; its code step is this / (2^k - 1).
  float effective_alpha() const { return EffectiveAlpha(); }
  // (l2 / 2) * alpha^2, the penalty whose gradient Backward adds to alpha's.
  double LossPenalty() const;

 private:
  float EffectiveAlpha() const;

  PactOptions options_;
  nn::Parameter alpha_;
  const nn::Tensor* input_ = nullptr;  // saved by Forward
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_PACT_H_
