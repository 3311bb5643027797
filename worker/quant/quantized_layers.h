// Conv2d and Linear with a weight quantizer: every pass uses wq = Q(w), computed once per Forward
// from the full-precision master weight, and Backward maps dL/dwq back to dL/dw through the
// quantizer (straight-through or analytic, per method) while filling the quantizer's own
// parameter gradients. The quantizer's parameters follow the layer's weight and bias in
// CollectParameters, named "wq.<x>" (so "conv2.wq.alpha" inside a model).
//
// Methods whose codebook is a fixed range (WeightQuantizer::unit_range(): DoReFa's and QIL's
// [-1, 1]) would give every layer weights of magnitude ~1 whatever its fan-in. The papers' networks
// follow every such layer with batch norm, which cancels any constant factor exactly (forward and
// backward); a layer without it (the cnn's fc1, the mlp) would blow its outputs up by
// ~sqrt(fan_in). So these layers use weight_scale() * Q(w) with the constant
// weight_scale() = sqrt(2 / fan_in) (the std of the He initialisation): a no-op under batch norm,
// a sane scale without it. For other methods weight_scale() is 1.
//
// The quantized layers draw their weights exactly as the plain ones do (they are the same
// constructor), so a quantized model starts from the weights of its FP32 twin with the same seed.
// Cost: the plain layer's plus one quantizer pass over the weight per Forward and per Backward,
// and one weight-sized tensor. Thread-safety: as every layer.
#ifndef QTRAIN_WORKER_QUANT_QUANTIZED_LAYERS_H_
#define QTRAIN_WORKER_QUANT_QUANTIZED_LAYERS_H_

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "worker/nn/conv2d.h"
#include "worker/nn/linear.h"
#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant {

// What a quantized layer adds to its plain self; both layers below hold one.
class WeightQuantization {
 public:
  // Precondition (checked): quantizer non-null. `w` is the layer's master weight (dim 0: outputs).
  WeightQuantization(const std::string& layer, const nn::Tensor& w,
                     std::unique_ptr<WeightQuantizer> quantizer);

  // weight_scale() * Q(w), kept until the next call.
  const nn::Tensor& Forward(nn::RunContext& ctx, const nn::Tensor& w);
  // Turns w.grad from d/d(weight_scale() * Q(w)) into d/dw; fills the quantizer's grads.
  void Backward(nn::RunContext& ctx, nn::Parameter& w);
  void AppendParameters(std::vector<nn::Parameter*>* out) const;

  WeightQuantizer& quantizer() { return *quantizer_; }
  const WeightQuantizer& quantizer() const { return *quantizer_; }
  float weight_scale() const { return weight_scale_; }
  const nn::Tensor& quantized_weight() const { return wq_; }

 private:
  std::unique_ptr<WeightQuantizer> quantizer_;
  std::vector<nn::Parameter*> params_;
  float weight_scale_ = 1.0f;
  nn::Tensor wq_;
};

class QuantizedConv2d : public nn::Conv2d {
 public:
  // Precondition (checked): quantizer non-null.
  QuantizedConv2d(std::string name, const nn::Conv2dOptions& options, std::mt19937_64& rng,
                  std::unique_ptr<WeightQuantizer> quantizer);

  std::string Describe() const override;  // "conv2d 32->32 k3 s1 p1, wq=sawb 2-bit"
  void CollectParameters(std::vector<nn::Parameter*>* out) override;

  WeightQuantizer& quantizer() { return q_.quantizer(); }
  const WeightQuantizer& quantizer() const { return q_.quantizer(); }
  // The constant factor on Q(w) (see the top of this file).
  float weight_scale() const { return q_.weight_scale(); }
  // The weight the last Forward used: weight_scale() * Q(w).
  const nn::Tensor& quantized_weight() const { return q_.quantized_weight(); }

 protected:
  const nn::Tensor& EffectiveWeight(nn::RunContext& ctx) override;
  void EffectiveWeightBackward(nn::RunContext& ctx) override;

 private:
  WeightQuantization q_;
};

class QuantizedLinear : public nn::Linear {
 public:
  // Precondition (checked): quantizer non-null.
  QuantizedLinear(std::string name, const nn::LinearOptions& options, std::mt19937_64& rng,
                  std::unique_ptr<WeightQuantizer> quantizer);

  std::string Describe() const override;
  void CollectParameters(std::vector<nn::Parameter*>* out) override;

  WeightQuantizer& quantizer() { return q_.quantizer(); }
  const WeightQuantizer& quantizer() const { return q_.quantizer(); }
  float weight_scale() const { return q_.weight_scale(); }
  const nn::Tensor& quantized_weight() const { return q_.quantized_weight(); }

 protected:
  const nn::Tensor& EffectiveWeight(nn::RunContext& ctx) override;
  void EffectiveWeightBackward(nn::RunContext& ctx) override;

 private:
  WeightQuantization q_;
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_QUANTIZED_LAYERS_H_
