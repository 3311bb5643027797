#include "worker/nn/conv2d.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/nn/init.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {

Conv2d::Conv2d(std::string name, const Conv2dOptions& options, std::mt19937_64& rng)
    : Layer(std::move(name)), options_(options) {
  QTRAIN_CHECK(options.in_channels >= 1 && options.out_channels >= 1 && options.kernel >= 1 &&
               options.stride >= 1 && options.padding >= 0)
      << "conv2d '" << this->name() << "': " << Describe();
  const Shape wshape = {options.out_channels, options.in_channels, options.kernel, options.kernel};
  weight_.name = "weight";
  weight_.kind = ParamKind::kWeight;
  weight_.value = Tensor(wshape);
  weight_.grad = Tensor(wshape);
  KaimingNormal(options.in_channels * options.kernel * options.kernel, rng, &weight_.value);
  if (options.bias) {
    bias_.name = "bias";
    bias_.kind = ParamKind::kBias;
    bias_.value = Tensor({options.out_channels});
    bias_.grad = Tensor({options.out_channels});
  }
}

std::string Conv2d::Describe() const {
  return absl::StrCat("conv2d ", options_.in_channels, "->", options_.out_channels, " k",
                      options_.kernel, " s", options_.stride, " p", options_.padding,
                      options_.bias ? " bias" : "");
}

kernels::Conv2dShape Conv2d::KernelShape(const Shape& input) const {
  kernels::Conv2dShape s;
  s.batch = input[0];
  s.in_channels = input[1];
  s.in_height = input[2];
  s.in_width = input[3];
  s.out_channels = options_.out_channels;
  s.kernel_h = s.kernel_w = options_.kernel;
  s.stride_h = s.stride_w = options_.stride;
  s.pad_h = s.pad_w = options_.padding;
  return s;
}

absl::Status Conv2d::ValidateInput(const Shape& input) const {
  if (input.size() != 4 || input[1] != options_.in_channels) {
    return internal::BadInput(name(), absl::StrCat("[N,", options_.in_channels, ",H,W]"), input);
  }
  if (absl::Status s = kernels::ValidateConv2dShape(KernelShape(input)); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("layer '", name(), "' (", Describe(),
                                                   ") on input ", ShapeToString(input), ": ",
                                                   s.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<Shape> Conv2d::OutputShape(const Shape& input) const {
  if (absl::Status s = ValidateInput(input); !s.ok()) return s;
  const kernels::Conv2dShape k = KernelShape(input);
  return Shape{input[0], options_.out_channels, k.out_height(), k.out_width()};
}

void Conv2d::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  internal::CheckOk(ValidateInput(x.shape()));
  shape_ = KernelShape(x.shape());
  const Tensor& w = EffectiveWeight(ctx);
  internal::EnsureShape(
      y, {shape_.batch, shape_.out_channels, shape_.out_height(), shape_.out_width()});
  kernels::Conv2dForward(ctx.cpu, shape_, x.data(), w.data(),
                         options_.bias ? bias_.value.data() : nullptr, y->data());
  input_ = &x;
  effective_weight_ = &w;
}

void Conv2d::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(input_ != nullptr) << "conv2d '" << name() << "': Backward before Forward";
  QTRAIN_CHECK(dy.rank() == 4 && dy.dim(0) == shape_.batch && dy.dim(1) == shape_.out_channels &&
               dy.dim(2) == shape_.out_height() && dy.dim(3) == shape_.out_width())
      << "conv2d '" << name() << "': dy " << ShapeToString(dy.shape());
  kernels::Conv2dBackwardWeights(ctx.cpu, shape_, input_->data(), dy.data(), weight_.grad.data(),
                                 options_.bias ? bias_.grad.data() : nullptr);
  EffectiveWeightBackward(ctx);
  if (dx != nullptr) {
    internal::EnsureShape(dx, input_->shape());
    kernels::Conv2dBackwardData(ctx.cpu, shape_, dy.data(), effective_weight_->data(), dx->data());
  }
}

void Conv2d::CollectParameters(std::vector<Parameter*>* out) {
  out->push_back(&weight_);
  if (options_.bias) out->push_back(&bias_);
}

}  // namespace qtrain::nn
