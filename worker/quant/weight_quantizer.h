// The interface every weight quantizer implements. A Conv2d / Linear that quantizes its weight
// owns one WeightQuantizer and calls, once per step:
//
//   quantizer->Forward(ctx, weight.value, &wq);           // in EffectiveWeight(ctx)
//   ... the layer's passes use wq; its Backward leaves dL/dwq in weight.grad ...
//   quantizer->Backward(ctx, weight.value, dwq, &dw);     // in EffectiveWeightBackward(ctx)
//
// and appends the quantizer's own parameters (CollectParameters; ParamKind::kQuantizer, names
// "wq.<x>") after its weight and bias, so the optimizer trains them under its quantizer learning
// rate (each Parameter's lr_scale, set by the method, times SgdOptions::quantizer_lr_scale).
//
// A quantizer keeps what Forward computed (scales, thresholds) for the next Backward and for
// Levels(); it does not keep pointers to w. Thread-safety: one thread at a time, like a layer.
#ifndef QTRAIN_WORKER_QUANT_WEIGHT_QUANTIZER_H_
#define QTRAIN_WORKER_QUANT_WEIGHT_QUANTIZER_H_

#include <string>
#include <vector>

#include "worker/nn/layer.h"
#include "worker/nn/tensor.h"
#include "worker/quant/quant_util.h"

namespace qtrain::quant {

class WeightQuantizer {
 public:
  virtual ~WeightQuantizer();

  // One line for model summaries, e.g. "sawb 2-bit".
  virtual std::string Describe() const = 0;
  virtual int bits() const = 0;
  // True when the codebook is a fixed range independent of w's magnitude ([-1, 1] for DoReFa and
  // QIL). Quantized layers then multiply wq by a constant (see quantized_layers.h).
  virtual bool unit_range() const { return false; }

  // Computes wq = Q(w) from the full-precision master weight (shape [out, ...]; per-channel
  // methods use dim 0). wq is resized to w's shape. Precondition: w non-empty.
  virtual void Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) = 0;

  // Given dL/dwq for the last Forward on this same w, writes dL/dw (the method's
  // straight-through or analytic gradient; dw may alias dwq) and OVERWRITES the grads of the
  // quantizer's own parameters.
  virtual void Backward(const nn::RunContext& ctx, const nn::Tensor& w, const nn::Tensor& dwq,
                        nn::Tensor* dw) = 0;

  // Appends the quantizer's trainable parameters (kind kQuantizer), in a fixed order.
  virtual void CollectParameters(std::vector<nn::Parameter*>* out) {}

  // The codebook: every value wq may take after the last Forward (scales included), sorted
  // ascending without duplicates. For tests and export.
  virtual std::vector<float> Levels() const = 0;
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_WEIGHT_QUANTIZER_H_
