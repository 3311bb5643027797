// The interface of activation quantizers. They are nn::Layer subclasses, so a model inserts one
// in a Sequential in front of the layer whose input it quantizes (or a layer owns one and calls
// its Forward/Backward on its input). y = Q(x) has x's shape; Backward writes dx (the method's
// straight-through rule) and OVERWRITES the grads of the quantizer's parameters (PACT "alpha",
// QIL "c" and "d"; kind kQuantizer; a Sequential prefixes them with the layer name, so a layer
// named "aq" yields "aq.alpha").
//
// Forward keeps a pointer to x for Backward: x must stay alive and unchanged until then, so
// these layers do not run in place. Thread-safety: one thread at a time, like every layer.
#ifndef QTRAIN_WORKER_QUANT_ACTIVATION_QUANTIZER_H_
#define QTRAIN_WORKER_QUANT_ACTIVATION_QUANTIZER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/nn/layer.h"
#include "worker/quant/quant_util.h"

namespace qtrain::quant {

class ActivationQuantizer : public nn::Layer {
 public:
  using nn::Layer::Layer;

  virtual int bits() const = 0;
  // Every value y may take after the last Forward, sorted ascending, no duplicates.
  virtual std::vector<float> Levels() const = 0;

  // Element-wise: the output shape is the input shape (any rank, N >= 1).
  absl::StatusOr<nn::Shape> OutputShape(const nn::Shape& input) const override;

 protected:
  // Checks dy against the saved input's shape and resizes dx; returns false if dx is null.
  bool PrepareBackward(const nn::Tensor* input, const nn::Tensor& dy, nn::Tensor* dx) const;
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_ACTIVATION_QUANTIZER_H_
