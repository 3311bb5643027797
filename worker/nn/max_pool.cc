#include "worker/nn/max_pool.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {

MaxPool2d::MaxPool2d(std::string name, const MaxPoolOptions& options)
    : Layer(std::move(name)), options_(options) {
  QTRAIN_CHECK(options.kernel >= 1 && options.stride >= 1)
      << "maxpool '" << this->name() << "': " << Describe();
}

std::string MaxPool2d::Describe() const {
  return absl::StrCat("maxpool k", options_.kernel, " s", options_.stride);
}

kernels::Pool2dShape MaxPool2d::KernelShape(const Shape& input) const {
  kernels::Pool2dShape s;
  s.batch = input[0];
  s.channels = input[1];
  s.in_height = input[2];
  s.in_width = input[3];
  s.kernel_h = s.kernel_w = options_.kernel;
  s.stride_h = s.stride_w = options_.stride;
  s.pad_h = s.pad_w = 0;
  return s;
}

absl::Status MaxPool2d::ValidateInput(const Shape& input) const {
  if (input.size() != 4) return internal::BadInput(name(), "[N,C,H,W]", input);
  if (absl::Status s = kernels::ValidatePool2dShape(KernelShape(input)); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("layer '", name(), "' (", Describe(),
                                                   ") on input ", ShapeToString(input), ": ",
                                                   s.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<Shape> MaxPool2d::OutputShape(const Shape& input) const {
  if (absl::Status s = ValidateInput(input); !s.ok()) return s;
  const kernels::Pool2dShape k = KernelShape(input);
  return Shape{input[0], input[1], k.out_height(), k.out_width()};
}

void MaxPool2d::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  internal::CheckOk(ValidateInput(x.shape()));
  shape_ = KernelShape(x.shape());
  internal::EnsureShape(y,
                        {shape_.batch, shape_.channels, shape_.out_height(), shape_.out_width()});
  if (argmax_.size() < static_cast<size_t>(y->size())) argmax_.resize(y->size());
  kernels::MaxPool2dForward(ctx.cpu, shape_, x.data(), y->data(), argmax_.data());
  if (input_shape_ != x.shape()) input_shape_ = x.shape();
  has_forward_ = true;
}

void MaxPool2d::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(has_forward_) << "maxpool '" << name() << "': Backward before Forward";
  QTRAIN_CHECK(dy.rank() == 4 && dy.dim(0) == shape_.batch && dy.dim(1) == shape_.channels &&
               dy.dim(2) == shape_.out_height() && dy.dim(3) == shape_.out_width())
      << "maxpool '" << name() << "': dy " << ShapeToString(dy.shape());
  if (dx == nullptr) return;
  internal::EnsureShape(dx, input_shape_);
  kernels::MaxPool2dBackward(ctx.cpu, shape_, dy.data(), argmax_.data(), dx->data());
}

}  // namespace qtrain::nn
