// Binary weights: BinaryConnect (Courbariaux et al. 2015) and XNOR-Net (Rastegari et al. 2016).
//
//   kPerChannelMeanAbs (XNOR-Net, default): wq = alpha_c * sign(w), alpha_c = mean_i |w_ci| over
//     output channel c (dim 0); codebook {-alpha_c, +alpha_c} for every channel.
//   kNone (BinaryConnect): wq = sign(w), codebook {-1, +1}.
// sign(0) = +1 so every value lies on the codebook.
// Gradient: sign is straight-through clipped at 1 (d sign(w)/dw ~ 1{|w| <= 1}); with the XNOR
// scale the paper's rule dL/dw = g (1/n + alpha_c 1{|w| <= 1}) (n = elements per channel);
// BinaryConnect: dL/dw = g 1{|w| <= 1}. State: alpha_c of the last Forward. No parameters.
// Cost: one reduction and one pass per Forward.
#ifndef QTRAIN_WORKER_QUANT_BINARY_H_
#define QTRAIN_WORKER_QUANT_BINARY_H_

#include <string>
#include <vector>

#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant {

enum class BinaryScale { kPerChannelMeanAbs, kNone };

class BinaryWeightQuantizer : public WeightQuantizer {
 public:
  explicit BinaryWeightQuantizer(BinaryScale scale = BinaryScale::kPerChannelMeanAbs);

  std::string Describe() const override;
  int bits() const override { return 1; }
  void Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) override;
  void Backward(const nn::RunContext& ctx, const nn::Tensor& w, const nn::Tensor& dwq,
                nn::Tensor* dw) override;
  std::vector<float> Levels() const override;

  // alpha_c per output channel of the last Forward (all 1 for kNone).
  const std::vector<float>& channel_scales() const { return scales_; }

 private:
  BinaryScale scale_;
  std::vector<float> scales_;
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_BINARY_H_
