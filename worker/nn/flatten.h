// Flattens every dimension after the batch: x [N, d1, d2, ...] -> y [N, d1*d2*...].
//
// Tensors own their storage, so this is a copy (memcpy-speed, negligible next to the layers
// around it) rather than a view. No parameters; Backward copies dy back into x's shape.
#ifndef QTRAIN_WORKER_NN_FLATTEN_H_
#define QTRAIN_WORKER_NN_FLATTEN_H_

#include <string>

#include "worker/nn/layer.h"

namespace qtrain::nn {

class Flatten : public Layer {
 public:
  explicit Flatten(std::string name) : Layer(std::move(name)) {}

  std::string Describe() const override { return "flatten"; }
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;

 private:
  Shape input_shape_;  // of the last Forward; empty before
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_FLATTEN_H_
