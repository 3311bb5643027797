#include "worker/nn/relu.h"

#include "common/logging.h"
#include "worker/kernels/cpu/activation.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {

absl::StatusOr<Shape> Relu::OutputShape(const Shape& input) const {
  if (input.empty() || input[0] < 1) return internal::BadInput(name(), "[N>=1,...]", input);
  return input;
}

void Relu::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  if (y != &x) internal::EnsureShape(y, x.shape());
  kernels::ReluForward(ctx.cpu, x.size(), x.data(), y->data());
  output_ = y;
}

void Relu::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(output_ != nullptr) << "relu '" << name() << "': Backward before Forward";
  QTRAIN_CHECK(dy.shape() == output_->shape())
      << "relu '" << name() << "': dy " << ShapeToString(dy.shape()) << " for output "
      << ShapeToString(output_->shape());
  if (dx == nullptr) return;
  if (dx != &dy) internal::EnsureShape(dx, dy.shape());
  kernels::ReluBackward(ctx.cpu, dy.size(), output_->data(), dy.data(), dx->data());
}

}  // namespace qtrain::nn
