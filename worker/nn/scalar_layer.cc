#include "worker/nn/scalar_layer.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/elementwise.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {

ScalarLayer::ScalarLayer(std::string name, float init) : Layer(std::move(name)) {
  scale_.name = this->name() + ".scale";
  scale_.kind = ParamKind::kNormScale;
  scale_.value = Tensor({1}, {init});
  scale_.grad = Tensor({1});
}

std::string ScalarLayer::Describe() const { return absl::StrCat("scalar x", scale_.value[0]); }

absl::StatusOr<Shape> ScalarLayer::OutputShape(const Shape& input) const {
  if (input.empty() || input[0] < 1) return internal::BadInput(name(), "[N>=1,...]", input);
  return input;
}

void ScalarLayer::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  QTRAIN_CHECK(y != &x) << "scalar layer '" << name() << "' does not run in place";
  internal::EnsureShape(y, x.shape());
  kernels::Scale(ctx.cpu, x.size(), scale_.value[0], x.data(), y->data());
  input_ = &x;
}

void ScalarLayer::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(input_ != nullptr) << "scalar layer '" << name() << "': Backward before Forward";
  QTRAIN_CHECK(dy.shape() == input_->shape())
      << "scalar layer '" << name() << "': dy " << ShapeToString(dy.shape()) << " for input "
      << ShapeToString(input_->shape());
  scale_.grad[0] = static_cast<float>(kernels::Dot(ctx.cpu, dy.size(), input_->data(), dy.data()));
  if (dx == nullptr) return;
  if (dx != &dy) internal::EnsureShape(dx, dy.shape());
  kernels::Scale(ctx.cpu, dy.size(), scale_.value[0], dy.data(), dx->data());
}

}  // namespace qtrain::nn
