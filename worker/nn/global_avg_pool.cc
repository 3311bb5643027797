#include "worker/nn/global_avg_pool.h"

#include "common/logging.h"
#include "worker/kernels/cpu/pooling.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {

absl::Status GlobalAvgPool::ValidateInput(const Shape& input) const {
  if (input.size() != 4 || NumElements(input) < 1) {
    return internal::BadInput(name(), "[N,C,H,W] with every extent >= 1", input);
  }
  return absl::OkStatus();
}

absl::StatusOr<Shape> GlobalAvgPool::OutputShape(const Shape& input) const {
  if (absl::Status s = ValidateInput(input); !s.ok()) return s;
  return Shape{input[0], input[1]};
}

void GlobalAvgPool::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  internal::CheckOk(ValidateInput(x.shape()));
  internal::EnsureShape(y, {x.dim(0), x.dim(1)});
  kernels::GlobalAvgPoolForward(ctx.cpu, x.dim(0), x.dim(1), x.dim(2) * x.dim(3), x.data(),
                                y->data());
  if (input_shape_ != x.shape()) input_shape_ = x.shape();
}

void GlobalAvgPool::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(!input_shape_.empty())
      << "global-avg-pool '" << name() << "': Backward before Forward";
  QTRAIN_CHECK(dy.rank() == 2 && dy.dim(0) == input_shape_[0] && dy.dim(1) == input_shape_[1])
      << "global-avg-pool '" << name() << "': dy " << ShapeToString(dy.shape());
  if (dx == nullptr) return;
  internal::EnsureShape(dx, input_shape_);
  kernels::GlobalAvgPoolBackward(ctx.cpu, input_shape_[0], input_shape_[1],
                                 input_shape_[2] * input_shape_[3], dy.data(), dx->data());
}

}  // namespace qtrain::nn
