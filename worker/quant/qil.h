// QIL quantizers: quantization-interval learning (Jung et al. 2019, "Learning to Quantize Deep
// Networks by Optimizing Quantization Intervals with Task Loss").
//
// A transformer maps the learnable interval [c - d, c + d] (centre c, half-width d) onto [0, 1]
// and a uniform discretizer rounds the result:
//   weights (k >= 2 bits, q = 2^(k-1) - 1):
//     u = (|w| - c) / (2d) + 1/2;  what = 0 if |w| < c - d (pruned), sign(w) if |w| > c + d
//     (clipped), sign(w) * u^gamma otherwise;  wq = sign(what) * round(|what| * q) / q,
//     codebook {j/q : j = -q..q}. gamma (> 0, trainable) is the non-linear exponent.
//   activations (k >= 1 bits, q = 2^k - 1): xhat = clip((x - c) / (2d) + 1/2, 0, 1) (gamma = 1),
//     xq = round(xhat * q) / q, codebook {j/q : j = 0..q}.
// Gradients: the rounding is straight-through; the transformer is differentiated exactly.
// Inside the interval, with s = sign(w) and a = |w|:
//   dL/dw = g gamma u^(gamma-1) / (2d),   dL/dc = sum g s gamma u^(gamma-1) (-1 / (2d)),
//   dL/dd = sum g s gamma u^(gamma-1) (-(a - c) / (2d^2)),   dL/dgamma = sum g s u^gamma ln u;
// outside it every derivative is 0 (the transformer is constant there and continuous at the
// ends). For activations the same with gamma = 1 and x in place of |w|, s = 1.
//
// Parameters (kQuantizer, shape [1]): weights "wq.c", "wq.d", "wq.gamma"; activations "c", "d".
// The paper trains them at 1/100 of the weight learning rate: their Parameter::lr_scale is
// kQilLrScale (0.01), which the optimizer applies.
// Initialisation from the layer's statistics on the first Forward (d == 0 marks "not yet
// initialised", so values restored from a checkpoint are kept): weights c - d = 0,
// c + d = min(max|w|, 3 sqrt(E[w^2])); activations c - d = 0, c + d = min(max x,
// mean(x) + 3 std(x)) of the first batch (1 if that is not positive). In use d and gamma are
// clamped to >= kMinHalfWidth and >= kMinGamma.
//
// Cost: one pass forward (a log and, when gamma != 1, an exp per weight element inside the
// interval, both kept with two weight-sized tensors), one pass plus three reductions backward.
#ifndef QTRAIN_WORKER_QUANT_QIL_H_
#define QTRAIN_WORKER_QUANT_QIL_H_

#include <string>
#include <vector>

#include "worker/quant/activation_quantizer.h"
#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant {

inline constexpr float kQilLrScale = 0.01f;

struct QilOptions {
  int bits = 3;
  float gamma_init = 1.0f;  // weights only
  Discretize discretize = Discretize::kOn;
};

class QilWeightQuantizer : public WeightQuantizer {
 public:
  static constexpr float kMinHalfWidth = 1e-8f;
  static constexpr float kMinGamma = 1e-3f;

  // Preconditions (checked): 2 <= bits <= 8, gamma_init > 0.
  explicit QilWeightQuantizer(const QilOptions& options);

  std::string Describe() const override;
  int bits() const override { return options_.bits; }
  bool unit_range() const override { return true; }
  void Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) override;
  void Backward(const nn::RunContext& ctx, const nn::Tensor& w, const nn::Tensor& dwq,
                nn::Tensor* dw) override;
  void CollectParameters(std::vector<nn::Parameter*>* out) override;
  std::vector<float> Levels() const override;

  // Sets c and d from w's statistics (see the header comment).
  void InitializeFrom(const kernels::CpuContext& ctx, const nn::Tensor& w);
  nn::Parameter& c() { return c_; }
  nn::Parameter& d() { return d_; }
  nn::Parameter& gamma() { return gamma_; }

 private:
  QilOptions options_;
  nn::Parameter c_;
  nn::Parameter d_;
  nn::Parameter gamma_;
  // Of the last Forward, per element inside the interval (0 < u < 1; 0 elsewhere): ln u and
  // u^gamma, so Backward needs no transcendental function.
  nn::Tensor log_u_;
  nn::Tensor u_gamma_;
};

class QilActivationQuantizer : public ActivationQuantizer {
 public:
  static constexpr float kMinHalfWidth = 1e-8f;

  // Precondition (checked): 1 <= bits <= 8.
  QilActivationQuantizer(std::string name, const QilOptions& options);

  std::string Describe() const override;
  int bits() const override { return options_.bits; }
  std::vector<float> Levels() const override;
  void Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) override;
  void Backward(nn::RunContext& ctx, const nn::Tensor& dy, nn::Tensor* dx) override;
  void CollectParameters(std::vector<nn::Parameter*>* out) override;

  void InitializeFrom(const kernels::CpuContext& ctx, const nn::Tensor& x);
  nn::Parameter& c() { return c_; }
  nn::Parameter& d() { return d_; }

 private:
  QilOptions options_;
  nn::Parameter c_;
  nn::Parameter d_;
  const nn::Tensor* input_ = nullptr;  // saved by Forward
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_QIL_H_
