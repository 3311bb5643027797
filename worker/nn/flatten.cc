#include "worker/nn/flatten.h"

#include "common/logging.h"
#include "worker/kernels/cpu/elementwise.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {

absl::StatusOr<Shape> Flatten::OutputShape(const Shape& input) const {
  if (input.size() < 2 || input[0] < 1) return internal::BadInput(name(), "[N>=1,...]", input);
  return Shape{input[0], NumElements(input) / input[0]};
}

void Flatten::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  QTRAIN_CHECK(x.rank() >= 2 && x.dim(0) >= 1)
      << "flatten '" << name() << "': input " << ShapeToString(x.shape());
  internal::EnsureShape(y, {x.dim(0), x.size() / x.dim(0)});
  kernels::Copy(ctx.cpu, x.size(), x.data(), y->data());
  if (input_shape_ != x.shape()) input_shape_ = x.shape();
}

void Flatten::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(!input_shape_.empty()) << "flatten '" << name() << "': Backward before Forward";
  QTRAIN_CHECK(dy.size() == NumElements(input_shape_))
      << "flatten '" << name() << "': dy " << ShapeToString(dy.shape());
  if (dx == nullptr) return;
  internal::EnsureShape(dx, input_shape_);
  kernels::Copy(ctx.cpu, dy.size(), dy.data(), dx->data());
}

}  // namespace qtrain::nn
