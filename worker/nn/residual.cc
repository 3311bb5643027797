#include "worker/nn/residual.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/activation.h"
#include "worker/kernels/cpu/elementwise.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {
namespace {

// Planes per parallel chunk so that each chunk touches at least ~32K floats.
int64_t PlaneGrain(int64_t plane) { return std::max<int64_t>(1, (int64_t{1} << 15) / plane); }

void PrefixNames(const std::string& prefix, Layer* layer, std::vector<Parameter*>* params) {
  layer->CollectParameters(params);
  for (Parameter* p : *params) p->name = prefix + "." + p->name;
  std::vector<Buffer*> buffers;
  layer->CollectBuffers(&buffers);
  for (Buffer* b : buffers) b->name = prefix + "." + b->name;
}

}  // namespace

Residual::Residual(std::string name, const ResidualOptions& options, std::mt19937_64& rng)
    : Layer(std::move(name)), options_(options) {
  QTRAIN_CHECK(options.in_channels >= 1 && options.out_channels >= 1 && options.stride >= 1)
      << "residual '" << this->name() << "': " << Describe();
  QTRAIN_CHECK(has_identity_shortcut() || options.shortcut != ShortcutKind::kZeroPad ||
               options.out_channels >= options.in_channels)
      << "residual '" << this->name() << "': a zero-pad shortcut cannot drop channels";
  const int64_t in = options.in_channels;
  const int64_t out = options.out_channels;
  const LayerFactory& factory =
      options.factory != nullptr ? *options.factory : DefaultLayerFactory();
  const bool fpsc = factory.full_precision_shortcut();
  constexpr WeightLayerRole kMiddle{};
  conv1_ = factory.MakeConv2d("conv1",
                              Conv2dOptions{.in_channels = in,
                                            .out_channels = out,
                                            .kernel = 3,
                                            .stride = options.stride,
                                            .padding = 1,
                                            .bias = false},
                              rng, kMiddle);
  bn1_ = std::make_unique<BatchNorm2d>("bn1", BatchNormOptions{.channels = out});
  conv2_ = factory.MakeConv2d("conv2",
                              Conv2dOptions{.in_channels = out,
                                            .out_channels = out,
                                            .kernel = 3,
                                            .stride = 1,
                                            .padding = 1,
                                            .bias = false},
                              rng, kMiddle);
  bn2_ = std::make_unique<BatchNorm2d>("bn2", BatchNormOptions{.channels = out});
  act1_ = factory.MakeActivation("relu1", kMiddle);
  if (fpsc) in_quant_ = factory.MakeInputQuantizer("aq_in", kMiddle);
  if (!has_identity_shortcut() && options.shortcut == ShortcutKind::kProjection) {
    const LayerFactory& shortcut_factory = fpsc ? DefaultLayerFactory() : factory;
    shortcut_conv_ = shortcut_factory.MakeConv2d("shortcut_conv",
                                                 Conv2dOptions{.in_channels = in,
                                                               .out_channels = out,
                                                               .kernel = 1,
                                                               .stride = options.stride,
                                                               .padding = 0,
                                                               .bias = false},
                                                 rng, kMiddle);
    shortcut_bn_ = std::make_unique<BatchNorm2d>("shortcut_bn", BatchNormOptions{.channels = out});
  }
  const Layer* children[] = {conv1_.get(),    bn1_.get(),           conv2_.get(),
                             bn2_.get(),      act1_.get(),          in_quant_.get(),
                             shortcut_conv_.get(), shortcut_bn_.get()};
  child_params_.resize(std::size(children));
  for (size_t i = 0; i < std::size(children); ++i) {
    if (children[i] != nullptr) {
      PrefixNames(children[i]->name(), const_cast<Layer*>(children[i]), &child_params_[i]);
    }
  }
}

bool Residual::has_identity_shortcut() const {
  return options_.stride == 1 && options_.in_channels == options_.out_channels;
}

std::string Residual::Describe() const {
  const char* shortcut = has_identity_shortcut()                          ? "identity"
                         : options_.shortcut == ShortcutKind::kProjection ? "projection"
                                                                          : "zero-pad";
  return absl::StrCat("residual ", options_.in_channels, "->", options_.out_channels, " s",
                      options_.stride, " shortcut=", shortcut);
}

absl::StatusOr<Shape> Residual::OutputShape(const Shape& input) const {
  // conv1 checks the input; conv2 and the shortcut keep its output shape.
  absl::StatusOr<Shape> shape = conv1_->OutputShape(input);
  if (!shape.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer '", name(), "': ", shape.status().message()));
  }
  return shape;
}

void Residual::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  QTRAIN_CHECK(y != &x) << "residual '" << name() << "' cannot run in place";
  if (in_quant_) {
    in_quant_->Forward(ctx, x, &x_quant_);
    conv1_->Forward(ctx, x_quant_, &conv1_out_);
  } else {
    conv1_->Forward(ctx, x, &conv1_out_);
  }
  if (act1_) {
    bn1_->Forward(ctx, conv1_out_, &bn1_out_);
    act1_->Forward(ctx, bn1_out_, &relu1_out_);
  } else {
    bn1_->Forward(ctx, conv1_out_, &relu1_out_);
    kernels::ReluForward(ctx.cpu, relu1_out_.size(), relu1_out_.data(), relu1_out_.data());
  }
  conv2_->Forward(ctx, relu1_out_, &conv2_out_);
  bn2_->Forward(ctx, conv2_out_, y);  // bn2 does not need its output: the add + ReLU reuse *y
  if (shortcut_conv_) {
    shortcut_conv_->Forward(ctx, x, &shortcut_conv_out_);
    shortcut_bn_->Forward(ctx, shortcut_conv_out_, &shortcut_out_);
  }
  AddShortcutAndRelu(ctx, x, shortcut_conv_ ? &shortcut_out_ : nullptr, y);
  input_ = &x;
  output_ = y;
}

// y = relu(y + shortcut(x)), one pass over y.
void Residual::AddShortcutAndRelu(RunContext& ctx, const Tensor& x, const Tensor* projected,
                                  Tensor* y) const {
  float* out = y->data();
  if (has_identity_shortcut() || projected != nullptr) {
    const float* sc = projected != nullptr ? projected->data() : x.data();
    kernels::ParallelFor(ctx.cpu.pool, y->size(), kernels::kElementwiseGrain,
                         [&](int64_t begin, int64_t end) {
                           for (int64_t i = begin; i < end; ++i) {
                             const float v = out[i] + sc[i];
                             out[i] = v > 0.0f ? v : 0.0f;
                           }
                         });
    return;
  }
  // Zero-pad (option A): input channel c feeds output channel c + pad_front, subsampled.
  const int64_t batch = y->dim(0);
  const int64_t out_c = y->dim(1);
  const int64_t oh = y->dim(2);
  const int64_t ow = y->dim(3);
  const int64_t in_c = x.dim(1);
  const int64_t ih = x.dim(2);
  const int64_t iw = x.dim(3);
  const int64_t s = options_.stride;
  const int64_t pad_front = (out_c - in_c) / 2;
  const float* in = x.data();
  kernels::ParallelFor(ctx.cpu.pool, batch * out_c, PlaneGrain(oh * ow),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t plane = begin; plane < end; ++plane) {
                           const int64_t n = plane / out_c;
                           const int64_t c = plane % out_c - pad_front;
                           float* o = out + plane * oh * ow;
                           if (c < 0 || c >= in_c) {
                             for (int64_t i = 0; i < oh * ow; ++i) {
                               o[i] = o[i] > 0.0f ? o[i] : 0.0f;
                             }
                             continue;
                           }
                           const float* src = in + (n * in_c + c) * ih * iw;
                           for (int64_t h = 0; h < oh; ++h) {
                             const float* row = src + h * s * iw;
                             float* orow = o + h * ow;
                             for (int64_t w = 0; w < ow; ++w) {
                               const float v = orow[w] + row[w * s];
                               orow[w] = v > 0.0f ? v : 0.0f;
                             }
                           }
                         }
                       });
}

// dx += shortcut^T(dz) for the parameter-free shortcuts.
void Residual::AddShortcutBackward(RunContext& ctx, const Tensor& dz, Tensor* dx) {
  if (has_identity_shortcut()) {
    kernels::Add(ctx.cpu, dx->size(), dx->data(), dz.data(), dx->data());
    return;
  }
  const int64_t batch = dz.dim(0);
  const int64_t out_c = dz.dim(1);
  const int64_t oh = dz.dim(2);
  const int64_t ow = dz.dim(3);
  const int64_t in_c = dx->dim(1);
  const int64_t ih = dx->dim(2);
  const int64_t iw = dx->dim(3);
  const int64_t s = options_.stride;
  const int64_t pad_front = (out_c - in_c) / 2;
  const float* g = dz.data();
  float* d = dx->data();
  kernels::ParallelFor(ctx.cpu.pool, batch * in_c, PlaneGrain(oh * ow),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t plane = begin; plane < end; ++plane) {
                           const int64_t n = plane / in_c;
                           const int64_t c = plane % in_c;
                           const float* src = g + (n * out_c + c + pad_front) * oh * ow;
                           float* dst = d + plane * ih * iw;
                           for (int64_t h = 0; h < oh; ++h) {
                             float* row = dst + h * s * iw;
                             for (int64_t w = 0; w < ow; ++w) row[w * s] += src[h * ow + w];
                           }
                         }
                       });
}

void Residual::Report(RunContext& ctx, const std::vector<Parameter*>& params) {
  if (ctx.on_grads_ready && !params.empty()) ctx.on_grads_ready(params);
}

void Residual::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(output_ != nullptr) << "residual '" << name() << "': Backward before Forward";
  QTRAIN_CHECK(dy.shape() == output_->shape())
      << "residual '" << name() << "': dy " << ShapeToString(dy.shape()) << " for output "
      << ShapeToString(output_->shape());
  internal::EnsureShape(&dz_, dy.shape());
  kernels::ReluBackward(ctx.cpu, dy.size(), output_->data(), dy.data(), dz_.data());

  bn2_->Backward(ctx, dz_, &grad_a_);
  Report(ctx, child_params_[3]);
  conv2_->Backward(ctx, grad_a_, &grad_b_);
  Report(ctx, child_params_[2]);
  const Tensor* grad_bn1_out = &grad_b_;
  if (act1_) {
    act1_->Backward(ctx, grad_b_, &grad_act_);
    Report(ctx, child_params_[4]);
    grad_bn1_out = &grad_act_;
  } else {
    kernels::ReluBackward(ctx.cpu, grad_b_.size(), relu1_out_.data(), grad_b_.data(),
                          grad_b_.data());
  }
  bn1_->Backward(ctx, *grad_bn1_out, &grad_a_);
  Report(ctx, child_params_[1]);
  if (in_quant_) {
    // conv1's data gradient is d/d(quantized x); the quantizer maps it to d/dx (and its own
    // parameters need it even when dx is not wanted).
    conv1_->Backward(ctx, grad_a_, &grad_b_);
    Report(ctx, child_params_[0]);
    in_quant_->Backward(ctx, grad_b_, dx);
    Report(ctx, child_params_[5]);
  } else {
    conv1_->Backward(ctx, grad_a_, dx);
    Report(ctx, child_params_[0]);
  }

  if (shortcut_conv_) {
    shortcut_bn_->Backward(ctx, dz_, &grad_shortcut_a_);
    Report(ctx, child_params_[7]);
    shortcut_conv_->Backward(ctx, grad_shortcut_a_, dx != nullptr ? &grad_shortcut_x_ : nullptr);
    Report(ctx, child_params_[6]);
    if (dx != nullptr) {
      kernels::Add(ctx.cpu, dx->size(), dx->data(), grad_shortcut_x_.data(), dx->data());
    }
  } else if (dx != nullptr) {
    AddShortcutBackward(ctx, dz_, dx);
  }
}

void Residual::CollectParameters(std::vector<Parameter*>* out) {
  for (const auto& params : child_params_) out->insert(out->end(), params.begin(), params.end());
}

void Residual::CollectBuffers(std::vector<Buffer*>* out) {
  bn1_->CollectBuffers(out);
  bn2_->CollectBuffers(out);
  if (shortcut_bn_) shortcut_bn_->CollectBuffers(out);
}

}  // namespace qtrain::nn
