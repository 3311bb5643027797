// Global average pooling: x [N, C, H, W] -> y [N, C], the mean of each plane (ResNet's head).
// No parameters; Backward spreads dy / (H*W) over each plane and needs only the input shape.
// Cost: one pass over x (kernels::GlobalAvgPool*).
#ifndef QTRAIN_WORKER_NN_GLOBAL_AVG_POOL_H_
#define QTRAIN_WORKER_NN_GLOBAL_AVG_POOL_H_

#include <string>

#include "worker/nn/layer.h"

namespace qtrain::nn {

class GlobalAvgPool : public Layer {
 public:
  explicit GlobalAvgPool(std::string name) : Layer(std::move(name)) {}

  std::string Describe() const override { return "global-avg-pool"; }
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;

 private:
  absl::Status ValidateInput(const Shape& input) const;

  Shape input_shape_;  // of the last Forward; empty before
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_GLOBAL_AVG_POOL_H_
