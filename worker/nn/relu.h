// The rectifier y = max(x, 0), element-wise over a tensor of any shape.
//
// Backward masks dy by y > 0, using the output of the last Forward (a pointer to *y is kept: it
// must stay alive and unchanged until Backward). Because only the output is needed, the layer
// also works in place (Forward(ctx, t, &t)). Cost: one memory-bound pass (kernels::Relu*).
#ifndef QTRAIN_WORKER_NN_RELU_H_
#define QTRAIN_WORKER_NN_RELU_H_

#include <string>

#include "worker/nn/layer.h"

namespace qtrain::nn {

class Relu : public Layer {
 public:
  explicit Relu(std::string name) : Layer(std::move(name)) {}

  std::string Describe() const override { return "relu"; }
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;

 private:
  const Tensor* output_ = nullptr;  // saved by Forward
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_RELU_H_
