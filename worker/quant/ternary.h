// Ternary weights: TWN (Li, Zhang & Liu 2016, "Ternary Weight Networks").
//
// Per layer: threshold delta = 0.7 * E[|w|] (the paper's approximation of the optimal
// threshold), scale alpha = mean of |w_i| over {i : |w_i| > delta} (its optimal scale for that
// threshold), wq = alpha * sign(w) where |w| > delta, else 0; codebook {-alpha, 0, +alpha}.
// Gradient: straight-through, dL/dw = dL/dwq (the paper's rule). State: delta and alpha of the
// last Forward. No parameters. Cost: two reductions and one pass per Forward.
#ifndef QTRAIN_WORKER_QUANT_TERNARY_H_
#define QTRAIN_WORKER_QUANT_TERNARY_H_

#include <string>
#include <vector>

#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant {

class TernaryWeightQuantizer : public WeightQuantizer {
 public:
  static constexpr double kThresholdFactor = 0.7;

  TernaryWeightQuantizer() = default;

  std::string Describe() const override { return "ternary (TWN)"; }
  int bits() const override { return 2; }
  void Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) override;
  void Backward(const nn::RunContext& ctx, const nn::Tensor& w, const nn::Tensor& dwq,
                nn::Tensor* dw) override;
  std::vector<float> Levels() const override;

  float threshold() const { return threshold_; }
  float scale() const { return scale_; }

 private:
  float threshold_ = 0.0f;
  float scale_ = 0.0f;
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_TERNARY_H_
