// SAWB weight quantizer: statistics-aware weight binning (Choi et al. 2018, "Bridging the
// Accuracy Gap for 2-bit Quantized Neural Networks (QNN)", the PACT-SAWB paper).
//
// Scale from two statistics of the layer's weight, no search at run time:
//   alpha* = c1 * sqrt(E[w^2]) - c2 * E[|w|],   (c1, c2) per bit-width from sawb_table.h,
// then k-bit symmetric uniform bins on [-alpha, alpha] with 2^k levels and no zero level:
//   levels alpha * (2j - (2^k - 1)) / (2^k - 1), j = 0..2^k-1   (1 bit: {-alpha, +alpha}),
//   wq = nearest level to clip(w, -alpha, alpha).
// Gradient: straight-through inside the clip range, dL/dw = dL/dwq where |w| <= alpha, 0
// outside; alpha is treated as a constant (the paper's rule). State: alpha of the last Forward.
// No trainable parameters.
//
// Also here: SymmetricUniformMse, the exact mean squared error of that quantizer on a sample for
// any alpha, and its exhaustive minimisation; the fitting tool (tools/sawb_fit.cc) and the tests
// use them. Cost: two reductions and one quantize pass per Forward.
#ifndef QTRAIN_WORKER_QUANT_SAWB_H_
#define QTRAIN_WORKER_QUANT_SAWB_H_

#include <span>
#include <string>
#include <vector>

#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant {

class SawbWeightQuantizer : public WeightQuantizer {
 public:
  // Precondition (checked): 1 <= bits <= 8.
  explicit SawbWeightQuantizer(int bits);

  std::string Describe() const override;
  int bits() const override { return bits_; }
  void Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) override;
  void Backward(const nn::RunContext& ctx, const nn::Tensor& w, const nn::Tensor& dwq,
                nn::Tensor* dw) override;
  std::vector<float> Levels() const override;

  float alpha() const { return alpha_; }
  // The SAWB scale for statistics rms = sqrt(E[w^2]) and mean_abs = E[|w|]; falls back to
  // max(mean_abs, tiny) if the fitted formula is not positive (degenerate weights).
  static double Scale(int bits, double rms, double mean_abs);

 private:
  int bits_;
  float alpha_ = 0.0f;  // of the last Forward
};

// Mean squared error of the k-bit symmetric uniform quantizer above, for any scale, on a fixed
// sample. Sorts |w| once (O(N log N)); each Mse() costs O(2^k log N).
class SymmetricUniformMse {
 public:
  explicit SymmetricUniformMse(std::span<const float> w);

  double Mse(int bits, double alpha) const;
  double max_abs() const { return sorted_abs_.empty() ? 0.0 : sorted_abs_.back(); }
  double rms() const;
  double mean_abs() const;

  struct Optimum {
    double alpha = 0.0;
    double mse = 0.0;
  };
  // The MSE-optimal alpha by exhaustive search: a 4000-point grid over (0, max|w|], then three
  // rounds of 200-point grids around the best point. Deterministic.
  Optimum Optimal(int bits) const;

 private:
  std::vector<double> sorted_abs_;
  std::vector<double> prefix_;     // prefix_[i] = sum of the first i sorted |w|
  std::vector<double> prefix_sq_;  // likewise of |w|^2
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_SAWB_H_
