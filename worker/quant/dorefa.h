// DoReFa-Net quantizers (Zhou et al. 2016, "DoReFa-Net: Training Low Bitwidth Convolutional
// Neural Networks with Low Bitwidth Gradients").
//
// Weights, k bits, n = 2^k - 1:
//   t = tanh(w), m = max_i |t_i|, u = t / (2m) + 1/2 in [0, 1],
//   wq = 2 * round(u * n) / n - 1            codebook {2j/n - 1 : j = 0..n} in [-1, 1].
// Gradient: the rounding is straight-through; the rest is differentiated exactly, including
// the path through m (as the reference TensorFlow code, which does not stop it):
//   dL/dw_i = g_i (1 - t_i^2) / m  +  [i = argmax] sign(w_i)(1 - t_i^2) * sum_j g_j (-t_j / m^2).
// State: m, the argmax index and tanh(w) of the last Forward (one float per weight element).
//
// Activations, k bits: y = round(clip(x, 0, 1) * n) / n, codebook {j/n}; dL/dx = dL/dy where
// 0 <= x <= 1, else 0 (straight-through inside the clip range). No parameters.
//
// Cost: one pass (a tanh per weight element); the activation path is one clip-and-round pass.
#ifndef QTRAIN_WORKER_QUANT_DOREFA_H_
#define QTRAIN_WORKER_QUANT_DOREFA_H_

#include <cstdint>
#include <string>
#include <vector>

#include "worker/quant/activation_quantizer.h"
#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant {

class DorefaWeightQuantizer : public WeightQuantizer {
 public:
  // Precondition (checked): 1 <= bits <= 8.
  explicit DorefaWeightQuantizer(int bits, Discretize discretize = Discretize::kOn);

  std::string Describe() const override;
  int bits() const override { return bits_; }
  bool unit_range() const override { return true; }
  void Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) override;
  void Backward(const nn::RunContext& ctx, const nn::Tensor& w, const nn::Tensor& dwq,
                nn::Tensor* dw) override;
  std::vector<float> Levels() const override;

 private:
  int bits_;
  Discretize discretize_;
  float max_tanh_ = 1.0f;  // m of the last Forward
  int64_t argmax_ = 0;     // index of the largest |w| of the last Forward
  nn::Tensor tanh_;        // tanh(w) of the last Forward, reused by Backward
};

class DorefaActivationQuantizer : public ActivationQuantizer {
 public:
  // Precondition (checked): 1 <= bits <= 8.
  DorefaActivationQuantizer(std::string name, int bits, Discretize discretize = Discretize::kOn);

  std::string Describe() const override;
  int bits() const override { return bits_; }
  std::vector<float> Levels() const override;
  void Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) override;
  void Backward(nn::RunContext& ctx, const nn::Tensor& dy, nn::Tensor* dx) override;

 private:
  int bits_;
  Discretize discretize_;
  const nn::Tensor* input_ = nullptr;  // saved by Forward
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_DOREFA_H_
