#include "worker/nn/cuda/gpu_layers.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "worker/kernels/cuda/activation.h"
#include "worker/kernels/cuda/batch_norm.h"
#include "worker/kernels/cuda/conv.h"
#include "worker/kernels/cuda/elementwise.h"
#include "worker/kernels/cuda/pooling.h"
#include "worker/kernels/cuda/sgemm.h"
#include "worker/nn/batch_norm.h"
#include "worker/nn/conv2d.h"
#include "worker/nn/cuda/gpu_quant_layers.h"
#include "worker/nn/cuda/layer_kernels.h"
#include "worker/nn/flatten.h"
#include "worker/nn/global_avg_pool.h"
#include "worker/nn/linear.h"
#include "worker/nn/max_pool.h"
#include "worker/nn/relu.h"
#include "worker/nn/residual.h"
#include "worker/nn/scalar_layer.h"
#include "worker/nn/sequential.h"

namespace qtrain::nn::cuda {
namespace {

namespace kc = ::qtrain::kernels::cuda;
using qtrain::cuda::DeviceArray;
using kernels::Transpose;

// A device buffer of at least n floats (kept when large enough).
absl::Status Reserve(DeviceArray<float>* a, int64_t n) {
  if (static_cast<int64_t>(a->size()) >= n) return absl::OkStatus();
  ASSIGN_OR_RETURN(*a, DeviceArray<float>::Create(static_cast<size_t>(n)));
  return absl::OkStatus();
}

absl::Status Unimplemented(Layer* layer, std::string_view why) {
  return absl::UnimplementedError(absl::StrCat("layer '", layer->name(), "' (", layer->Describe(),
                                               ") has no CUDA implementation",
                                               std::string(why)));
}

// ---- Sequential ---------------------------------------------------------------------------------

}  // namespace

absl::Status GpuSequential::SetTaps(const std::vector<std::string>& names) {
  const size_t n = children_.size();
  tap_of_child_.assign(n, -1);
  for (size_t k = 0; k < names.size(); ++k) {
    size_t found = n;
    for (size_t i = 0; i + 1 < n; ++i) {
      if (children_[i]->name() == names[k]) found = i;
    }
    if (found == n) {
      std::vector<std::string> all;
      for (size_t i = 0; i + 1 < n; ++i) all.push_back(children_[i]->name());
      return absl::InvalidArgumentError(absl::StrCat(
          "--guide_layers: '", names[k], "' is not a layer before the output; layers: ",
          absl::StrJoin(all, ",")));
    }
    if (tap_of_child_[found] >= 0) {
      return absl::InvalidArgumentError(absl::StrCat("--guide_layers names '", names[k], "' twice"));
    }
    tap_of_child_[found] = static_cast<int>(k);
  }
  tap_out_.assign(names.size(), DeviceTensor{});
  tap_plan_.assign(names.size(), Shape{});
  tap_grad_.clear();
  tap_grad_.resize(names.size());
  return absl::OkStatus();
}

absl::StatusOr<Shape> GpuSequential::Plan(const Shape& max_input, Planner* planner) {
  Shape s = max_input;
  int64_t most = 0;
  for (size_t i = 0; i < children_.size(); ++i) {
    ASSIGN_OR_RETURN(s, children_[i]->Plan(s, planner));
    most = std::max(most, NumElements(s));
    if (!tap_of_child_.empty() && tap_of_child_[i] >= 0) {
      const auto k = static_cast<size_t>(tap_of_child_[i]);
      tap_plan_[k] = s;
      RETURN_IF_ERROR(Reserve(&tap_grad_[k], NumElements(s)));
    }
  }
  most = std::max(most, NumElements(max_input));
  RETURN_IF_ERROR(Reserve(&grad_[0], most));
  RETURN_IF_ERROR(Reserve(&grad_[1], most));
  if (!tap_of_child_.empty()) RETURN_IF_ERROR(Reserve(&grad_[2], most));
  return s;
}

absl::Status GpuSequential::Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) {
  DeviceTensor in = x;
  for (size_t i = 0; i < children_.size(); ++i) {
    DeviceTensor out;
    RETURN_IF_ERROR(children_[i]->Forward(pass, in, &out));
    if (!tap_of_child_.empty() && tap_of_child_[i] >= 0) {
      tap_out_[static_cast<size_t>(tap_of_child_[i])] = out;
    }
    in = out;
  }
  *y = in;
  return absl::OkStatus();
}

absl::Status GpuSequential::Backward(const GpuPass& pass, const DeviceTensor& dy,
                                     DeviceTensor* dx) {
  DeviceTensor g = dy;
  for (size_t i = children_.size(); i-- > 0;) {
    if (!tap_of_child_.empty() && tap_of_child_[i] >= 0) {
      const float* extra = tap_grad_[static_cast<size_t>(tap_of_child_[i])].data();
      const int64_t n = tap_out_[static_cast<size_t>(tap_of_child_[i])].size();
      RETURN_IF_ERROR(kc::Add(pass.ctx, n, g.data, extra, grad_[2].data()));
      g = DeviceTensor{grad_[2].data(), g.shape};
    }
    if (i == 0) return children_[0]->Backward(pass, g, dx);
    DeviceTensor next{grad_[i % 2].data(), {}};
    RETURN_IF_ERROR(children_[i]->Backward(pass, g, &next));
    g = next;
  }
  return absl::OkStatus();
}

namespace {

// ---- Conv2d / Linear ----------------------------------------------------------------------------

class GpuConv2d : public GpuLayer {
 public:
  // weight: a device array read instead of the master weight (a quantized layer's wq), or null.
  GpuConv2d(Conv2d* conv, DeviceState* state, const float* weight = nullptr)
      : GpuLayer(conv->name()), conv_(conv), state_(state), weight_(weight) {}

  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner* planner) override {
    ASSIGN_OR_RETURN(Shape out, conv_->OutputShape(max_input));
    RETURN_IF_ERROR(Reserve(&y_, NumElements(out)));
    RETURN_IF_ERROR(Reserve(&dx_, NumElements(max_input)));
    planner->workspace_bytes = std::max(planner->workspace_bytes,
                                        kc::Conv2dWorkspaceBytes(KernelShape(max_input)));
    return out;
  }

  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    shape_ = KernelShape(x.shape);
    x_ = x.data;
    const float* bias = conv_->options().bias ? state_->value(&conv_->bias()) : nullptr;
    RETURN_IF_ERROR(kc::Conv2dForward(pass.ctx, shape_, x.data, Weight(), bias, y_.data(),
                                      pass.workspace, pass.workspace_bytes));
    *y = DeviceTensor{y_.data(), {shape_.batch, shape_.out_channels, shape_.out_height(),
                                  shape_.out_width()}};
    return absl::OkStatus();
  }

  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    float* dbias = conv_->options().bias ? state_->grad(&conv_->bias()) : nullptr;
    RETURN_IF_ERROR(kc::Conv2dBackwardWeights(pass.ctx, shape_, x_, dy.data,
                                              state_->grad(&conv_->weight()), dbias,
                                              pass.workspace, pass.workspace_bytes));
    if (dx != nullptr) {
      RETURN_IF_ERROR(kc::Conv2dBackwardData(pass.ctx, shape_, dy.data, Weight(), dx_.data(),
                                             pass.workspace, pass.workspace_bytes));
      *dx = DeviceTensor{dx_.data(), {shape_.batch, shape_.in_channels, shape_.in_height,
                                      shape_.in_width}};
    }
    return absl::OkStatus();
  }

 private:
  kernels::Conv2dShape KernelShape(const Shape& input) const {
    kernels::Conv2dShape s;
    s.batch = input[0];
    s.in_channels = input[1];
    s.in_height = input[2];
    s.in_width = input[3];
    s.out_channels = conv_->options().out_channels;
    s.kernel_h = s.kernel_w = conv_->options().kernel;
    s.stride_h = s.stride_w = conv_->options().stride;
    s.pad_h = s.pad_w = conv_->options().padding;
    return s;
  }

  const float* Weight() const {
    return weight_ != nullptr ? weight_ : state_->value(&conv_->weight());
  }

  Conv2d* conv_;
  DeviceState* state_;
  const float* weight_;
  kernels::Conv2dShape shape_;
  const float* x_ = nullptr;
  DeviceArray<float> y_, dx_;
};

class GpuLinear : public GpuLayer {
 public:
  // weight: as GpuConv2d's.
  GpuLinear(Linear* linear, DeviceState* state, const float* weight = nullptr)
      : GpuLayer(linear->name()), linear_(linear), state_(state), weight_(weight) {}

  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner* planner) override {
    ASSIGN_OR_RETURN(Shape out, linear_->OutputShape(max_input));
    RETURN_IF_ERROR(Reserve(&y_, NumElements(out)));
    RETURN_IF_ERROR(Reserve(&dx_, NumElements(max_input)));
    return out;
  }

  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    n_ = x.shape[0];
    x_ = x.data;
    x_shape_ = x.shape;
    const int64_t in = linear_->options().in_features, out = linear_->options().out_features;
    RETURN_IF_ERROR(kc::Sgemm(pass.ctx, Transpose::kNo, Transpose::kYes, n_, out, in, 1.0f, x.data,
                              in, Weight(), in, 0.0f, y_.data(), out));
    if (linear_->options().bias) {
      RETURN_IF_ERROR(AddRowBias(pass.ctx, n_, out, state_->value(&linear_->bias()), y_.data()));
    }
    *y = DeviceTensor{y_.data(), {n_, out}};
    return absl::OkStatus();
  }

  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    const int64_t in = linear_->options().in_features, out = linear_->options().out_features;
    RETURN_IF_ERROR(kc::Sgemm(pass.ctx, Transpose::kYes, Transpose::kNo, out, in, n_, 1.0f,
                              dy.data, out, x_, in, 0.0f, state_->grad(&linear_->weight()), in));
    if (linear_->options().bias) {
      RETURN_IF_ERROR(ColumnSums(pass.ctx, n_, out, dy.data, state_->grad(&linear_->bias())));
    }
    if (dx != nullptr) {
      RETURN_IF_ERROR(kc::Sgemm(pass.ctx, Transpose::kNo, Transpose::kNo, n_, in, out, 1.0f,
                                dy.data, out, Weight(), in, 0.0f, dx_.data(), in));
      *dx = DeviceTensor{dx_.data(), x_shape_};
    }
    return absl::OkStatus();
  }

 private:
  const float* Weight() const {
    return weight_ != nullptr ? weight_ : state_->value(&linear_->weight());
  }

  Linear* linear_;
  DeviceState* state_;
  const float* weight_;
  int64_t n_ = 0;
  const float* x_ = nullptr;
  Shape x_shape_;
  DeviceArray<float> y_, dx_;
};

// ---- BatchNorm2d --------------------------------------------------------------------------------

class GpuBatchNorm : public GpuLayer {
 public:
  GpuBatchNorm(BatchNorm2d* bn, DeviceState* state) : GpuLayer(bn->name()), bn_(bn), state_(state) {}

  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner* planner) override {
    ASSIGN_OR_RETURN(Shape out, bn_->OutputShape(max_input));
    RETURN_IF_ERROR(Reserve(&y_, NumElements(out)));
    RETURN_IF_ERROR(Reserve(&dx_, NumElements(max_input)));
    RETURN_IF_ERROR(Reserve(&saved_mean_, bn_->options().channels));
    RETURN_IF_ERROR(Reserve(&saved_inv_std_, bn_->options().channels));
    kernels::BatchNormShape most{max_input[0], max_input[1], NumElements(max_input) /
                                                             (max_input[0] * max_input[1])};
    planner->workspace_bytes = std::max<uint64_t>(planner->workspace_bytes,
                                                  kc::BatchNormWorkspaceBytes(most));
    return out;
  }

  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    shape_.batch = x.shape[0];
    shape_.channels = x.shape[1];
    shape_.spatial = x.size() / (x.shape[0] * x.shape[1]);
    x_ = x.data;
    x_shape_ = x.shape;
    kernels::BatchNormOptions o{bn_->options().momentum, bn_->options().epsilon};
    const float* gamma = state_->value(&bn_->gamma());
    const float* beta = state_->value(&bn_->beta());
    float* rm = state_->buffer(&bn_->running_mean());
    float* rv = state_->buffer(&bn_->running_var());
    if (pass.mode == Mode::kTrain) {
      RETURN_IF_ERROR(kc::BatchNormTrainForward(pass.ctx, shape_, o, x.data, gamma, beta,
                                                y_.data(), saved_mean_.data(),
                                                saved_inv_std_.data(), rm, rv, pass.workspace));
    } else {
      RETURN_IF_ERROR(
          kc::BatchNormEvalForward(pass.ctx, shape_, o, x.data, gamma, beta, rm, rv, y_.data()));
    }
    *y = DeviceTensor{y_.data(), x.shape};
    return absl::OkStatus();
  }

  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    RETURN_IF_ERROR(kc::BatchNormBackward(pass.ctx, shape_, x_, dy.data,
                                          state_->value(&bn_->gamma()), saved_mean_.data(),
                                          saved_inv_std_.data(), dx_.data(),
                                          state_->grad(&bn_->gamma()),
                                          state_->grad(&bn_->beta()), pass.workspace));
    if (dx != nullptr) *dx = DeviceTensor{dx_.data(), x_shape_};
    return absl::OkStatus();
  }

 private:
  BatchNorm2d* bn_;
  DeviceState* state_;
  kernels::BatchNormShape shape_;
  const float* x_ = nullptr;
  Shape x_shape_;
  DeviceArray<float> y_, dx_, saved_mean_, saved_inv_std_;
};

// ---- ReLU, pooling, flatten ---------------------------------------------------------------------

class GpuRelu : public GpuLayer {
 public:
  explicit GpuRelu(std::string name) : GpuLayer(std::move(name)) {}
  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner*) override {
    RETURN_IF_ERROR(Reserve(&y_, NumElements(max_input)));
    RETURN_IF_ERROR(Reserve(&dx_, NumElements(max_input)));
    return max_input;
  }
  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    x_ = x;
    RETURN_IF_ERROR(kc::ReluForward(pass.ctx, x.size(), x.data, y_.data()));
    *y = DeviceTensor{y_.data(), x.shape};
    return absl::OkStatus();
  }
  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    if (dx == nullptr) return absl::OkStatus();
    RETURN_IF_ERROR(kc::ReluBackward(pass.ctx, x_.size(), x_.data, dy.data, dx_.data()));
    *dx = DeviceTensor{dx_.data(), x_.shape};
    return absl::OkStatus();
  }

 private:
  DeviceTensor x_;
  DeviceArray<float> y_, dx_;
};

class GpuMaxPool : public GpuLayer {
 public:
  explicit GpuMaxPool(MaxPool2d* pool) : GpuLayer(pool->name()), pool_(pool) {}
  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner*) override {
    ASSIGN_OR_RETURN(Shape out, pool_->OutputShape(max_input));
    RETURN_IF_ERROR(Reserve(&y_, NumElements(out)));
    RETURN_IF_ERROR(Reserve(&dx_, NumElements(max_input)));
    ASSIGN_OR_RETURN(argmax_, DeviceArray<int32_t>::Create(static_cast<size_t>(NumElements(out))));
    return out;
  }
  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    shape_.batch = x.shape[0];
    shape_.channels = x.shape[1];
    shape_.in_height = x.shape[2];
    shape_.in_width = x.shape[3];
    shape_.kernel_h = shape_.kernel_w = pool_->options().kernel;
    shape_.stride_h = shape_.stride_w = pool_->options().stride;
    x_shape_ = x.shape;
    RETURN_IF_ERROR(kc::MaxPool2dForward(pass.ctx, shape_, x.data, y_.data(), argmax_.data()));
    *y = DeviceTensor{y_.data(),
                      {shape_.batch, shape_.channels, shape_.out_height(), shape_.out_width()}};
    return absl::OkStatus();
  }
  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    if (dx == nullptr) return absl::OkStatus();
    RETURN_IF_ERROR(kc::MaxPool2dBackward(pass.ctx, shape_, dy.data, argmax_.data(), dx_.data()));
    *dx = DeviceTensor{dx_.data(), x_shape_};
    return absl::OkStatus();
  }

 private:
  MaxPool2d* pool_;
  kernels::Pool2dShape shape_;
  Shape x_shape_;
  DeviceArray<float> y_, dx_;
  DeviceArray<int32_t> argmax_;
};

class GpuGlobalAvgPool : public GpuLayer {
 public:
  explicit GpuGlobalAvgPool(std::string name) : GpuLayer(std::move(name)) {}
  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner*) override {
    if (max_input.size() != 4) return absl::InvalidArgumentError("global avg pool needs NCHW");
    RETURN_IF_ERROR(Reserve(&y_, max_input[0] * max_input[1]));
    RETURN_IF_ERROR(Reserve(&dx_, NumElements(max_input)));
    return Shape{max_input[0], max_input[1]};
  }
  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    x_shape_ = x.shape;
    RETURN_IF_ERROR(kc::GlobalAvgPoolForward(pass.ctx, x.shape[0], x.shape[1],
                                             x.shape[2] * x.shape[3], x.data, y_.data()));
    *y = DeviceTensor{y_.data(), {x.shape[0], x.shape[1]}};
    return absl::OkStatus();
  }
  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    if (dx == nullptr) return absl::OkStatus();
    RETURN_IF_ERROR(kc::GlobalAvgPoolBackward(pass.ctx, x_shape_[0], x_shape_[1],
                                              x_shape_[2] * x_shape_[3], dy.data, dx_.data()));
    *dx = DeviceTensor{dx_.data(), x_shape_};
    return absl::OkStatus();
  }

 private:
  Shape x_shape_;
  DeviceArray<float> y_, dx_;
};

class GpuFlatten : public GpuLayer {
 public:
  explicit GpuFlatten(std::string name) : GpuLayer(std::move(name)) {}
  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner*) override {
    return Shape{max_input[0], NumElements(max_input) / max_input[0]};
  }
  absl::Status Forward(const GpuPass&, const DeviceTensor& x, DeviceTensor* y) override {
    x_shape_ = x.shape;
    *y = DeviceTensor{x.data, {x.shape[0], x.size() / x.shape[0]}};
    return absl::OkStatus();
  }
  absl::Status Backward(const GpuPass&, const DeviceTensor& dy, DeviceTensor* dx) override {
    if (dx != nullptr) *dx = DeviceTensor{dy.data, x_shape_};
    return absl::OkStatus();
  }

 private:
  Shape x_shape_;
};

// nn::ScalarLayer: y = s x; ds = sum(x dy) (deterministic reduction), dx = s dy.
class GpuScalarLayer : public GpuLayer {
 public:
  GpuScalarLayer(ScalarLayer* layer, DeviceState* state)
      : GpuLayer(layer->name()), param_(&layer->scale()), state_(state) {}
  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner* planner) override {
    RETURN_IF_ERROR(Reserve(&y_, NumElements(max_input)));
    RETURN_IF_ERROR(Reserve(&dx_, NumElements(max_input)));
    planner->workspace_bytes =
        std::max<uint64_t>(planner->workspace_bytes, kc::kReductionWorkspaceBytes);
    return max_input;
  }
  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    x_ = x;
    RETURN_IF_ERROR(ScaleByDeviceScalar(pass.ctx, x.size(), state_->value(param_), x.data, y_.data()));
    *y = DeviceTensor{y_.data(), x.shape};
    return absl::OkStatus();
  }
  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    if (pass.workspace == nullptr || pass.workspace_bytes < kc::kReductionWorkspaceBytes) {
      return absl::FailedPreconditionError(
          absl::StrCat("scalar layer '", name(), "': the pass has no reduction workspace"));
    }
    RETURN_IF_ERROR(kc::Dot(pass.ctx, x_.size(), x_.data, dy.data,
                            kc::DeviceScalarOut{.f32 = state_->grad(param_)}, pass.workspace));
    if (dx == nullptr) return absl::OkStatus();
    RETURN_IF_ERROR(
        ScaleByDeviceScalar(pass.ctx, dy.size(), state_->value(param_), dy.data, dx_.data()));
    *dx = DeviceTensor{dx_.data(), x_.shape};
    return absl::OkStatus();
  }

 private:
  Parameter* param_;
  DeviceState* state_;
  DeviceTensor x_;
  DeviceArray<float> y_, dx_;
};

// ---- Residual -----------------------------------------------------------------------------------

class GpuResidual : public GpuLayer {
 public:
  GpuResidual(Residual* block, std::unique_ptr<GpuLayer> in_quant, std::unique_ptr<GpuLayer> conv1,
              std::unique_ptr<GpuLayer> bn1, std::unique_ptr<GpuLayer> act1,
              std::unique_ptr<GpuLayer> conv2, std::unique_ptr<GpuLayer> bn2,
              std::unique_ptr<GpuLayer> sc_conv, std::unique_ptr<GpuLayer> sc_bn)
      : GpuLayer(block->name()),
        block_(block),
        in_quant_(std::move(in_quant)),
        conv1_(std::move(conv1)),
        bn1_(std::move(bn1)),
        act1_(std::move(act1)),
        conv2_(std::move(conv2)),
        bn2_(std::move(bn2)),
        sc_conv_(std::move(sc_conv)),
        sc_bn_(std::move(sc_bn)) {}

  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner* planner) override {
    Shape s = max_input;
    if (in_quant_ != nullptr) {
      ASSIGN_OR_RETURN(s, in_quant_->Plan(s, planner));
    }
    ASSIGN_OR_RETURN(s, conv1_->Plan(s, planner));
    ASSIGN_OR_RETURN(s, bn1_->Plan(s, planner));
    ASSIGN_OR_RETURN(s, act1_->Plan(s, planner));
    ASSIGN_OR_RETURN(s, conv2_->Plan(s, planner));
    ASSIGN_OR_RETURN(Shape out, bn2_->Plan(s, planner));
    if (sc_conv_ != nullptr) {
      ASSIGN_OR_RETURN(Shape p, sc_conv_->Plan(max_input, planner));
      ASSIGN_OR_RETURN(p, sc_bn_->Plan(p, planner));
      RETURN_IF_ERROR(Reserve(&dx_sc_, NumElements(max_input)));
    }
    RETURN_IF_ERROR(Reserve(&y_, NumElements(out)));
    RETURN_IF_ERROR(Reserve(&dz_, NumElements(out)));
    return out;
  }

  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    x_ = x;
    DeviceTensor a = x, b;
    if (in_quant_ != nullptr) {
      RETURN_IF_ERROR(in_quant_->Forward(pass, a, &b));
      a = b;
    }
    RETURN_IF_ERROR(conv1_->Forward(pass, a, &b));
    RETURN_IF_ERROR(bn1_->Forward(pass, b, &a));
    RETURN_IF_ERROR(act1_->Forward(pass, a, &b));
    RETURN_IF_ERROR(conv2_->Forward(pass, b, &a));
    DeviceTensor z;
    RETURN_IF_ERROR(bn2_->Forward(pass, a, &z));
    ShortcutShape s = Geometry(x.shape, z.shape);
    const float* projected = nullptr;
    if (sc_conv_ != nullptr) {
      DeviceTensor p, q;
      RETURN_IF_ERROR(sc_conv_->Forward(pass, x, &p));
      RETURN_IF_ERROR(sc_bn_->Forward(pass, p, &q));
      projected = q.data;
    }
    RETURN_IF_ERROR(ShortcutAddRelu(pass.ctx, s, x.data, projected, z.data, y_.data()));
    y_shape_ = z.shape;
    *y = DeviceTensor{y_.data(), z.shape};
    return absl::OkStatus();
  }

  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    const int64_t n = NumElements(y_shape_);
    RETURN_IF_ERROR(ReluBackwardFromOutput(pass.ctx, n, y_.data(), dy.data, dz_.data()));
    const DeviceTensor dz{dz_.data(), y_shape_};
    DeviceTensor g, h;
    RETURN_IF_ERROR(bn2_->Backward(pass, dz, &g));
    RETURN_IF_ERROR(conv2_->Backward(pass, g, &h));
    RETURN_IF_ERROR(act1_->Backward(pass, h, &g));
    RETURN_IF_ERROR(bn1_->Backward(pass, g, &h));
    DeviceTensor dmain;
    RETURN_IF_ERROR(conv1_->Backward(pass, h, &dmain));
    if (in_quant_ != nullptr) {
      DeviceTensor t;
      RETURN_IF_ERROR(in_quant_->Backward(pass, dmain, &t));
      dmain = t;
    }
    // dmain lives in a child's own buffer; the shortcut's gradient is added into it.
    if (sc_conv_ != nullptr) {
      DeviceTensor p, q;
      RETURN_IF_ERROR(sc_bn_->Backward(pass, dz, &p));
      RETURN_IF_ERROR(sc_conv_->Backward(pass, p, &q));
      RETURN_IF_ERROR(AddInPlace(pass.ctx, x_.size(), q.data, dmain.data));
    } else {
      RETURN_IF_ERROR(ShortcutBackwardAccumulate(pass.ctx, Geometry(x_.shape, y_shape_), dz.data,
                                                 dmain.data));
    }
    if (dx != nullptr) *dx = DeviceTensor{dmain.data, x_.shape};
    return absl::OkStatus();
  }

 private:
  ShortcutShape Geometry(const Shape& x, const Shape& z) const {
    ShortcutShape s;
    s.batch = x[0];
    s.in_channels = x[1];
    s.in_height = x[2];
    s.in_width = x[3];
    s.out_channels = z[1];
    s.out_height = z[2];
    s.out_width = z[3];
    s.stride = block_->options().stride;
    s.pad_before = (s.out_channels - s.in_channels) / 2;
    return s;
  }

  Residual* block_;
  std::unique_ptr<GpuLayer> in_quant_, conv1_, bn1_, act1_, conv2_, bn2_, sc_conv_, sc_bn_;
  DeviceTensor x_;
  Shape y_shape_;
  DeviceArray<float> y_, dz_, dx_sc_;
};

}  // namespace

std::unique_ptr<GpuLayer> MakeGpuConv2d(Conv2d* conv, DeviceState* state, const float* weight) {
  return std::make_unique<GpuConv2d>(conv, state, weight);
}

std::unique_ptr<GpuLayer> MakeGpuLinear(Linear* linear, DeviceState* state, const float* weight) {
  return std::make_unique<GpuLinear>(linear, state, weight);
}

absl::StatusOr<std::unique_ptr<GpuLayer>> CompileLayer(Layer* layer, DeviceState* state) {
  // The quantized layers of worker/quant (QuantizedConv2d / QuantizedLinear, the activation
  // quantizers) have their own twins.
  ASSIGN_OR_RETURN(std::unique_ptr<GpuLayer> quantized, CompileQuantLayer(layer, state));
  if (quantized != nullptr) return quantized;
  if (auto* seq = dynamic_cast<Sequential*>(layer)) {
    std::vector<std::unique_ptr<GpuLayer>> children;
    for (int i = 0; i < seq->num_children(); ++i) {
      ASSIGN_OR_RETURN(std::unique_ptr<GpuLayer> c, CompileLayer(&seq->child(i), state));
      children.push_back(std::move(c));
    }
    return std::make_unique<GpuSequential>(seq->name(), std::move(children));
  }
  if (auto* block = dynamic_cast<Residual*>(layer)) {
    auto compile = [state](Layer* l) -> absl::StatusOr<std::unique_ptr<GpuLayer>> {
      if (l == nullptr) return std::unique_ptr<GpuLayer>();
      return CompileLayer(l, state);
    };
    ASSIGN_OR_RETURN(auto in_quant, compile(block->in_quant()));
    ASSIGN_OR_RETURN(auto conv1, compile(block->conv1()));
    ASSIGN_OR_RETURN(auto bn1, compile(block->bn1()));
    std::unique_ptr<GpuLayer> act1;
    if (block->act1() != nullptr) {
      ASSIGN_OR_RETURN(act1, compile(block->act1()));
    } else {
      act1 = std::make_unique<GpuRelu>(block->name() + ".relu1");
    }
    ASSIGN_OR_RETURN(auto conv2, compile(block->conv2()));
    ASSIGN_OR_RETURN(auto bn2, compile(block->bn2()));
    ASSIGN_OR_RETURN(auto sc_conv, compile(block->shortcut_conv()));
    ASSIGN_OR_RETURN(auto sc_bn, compile(block->shortcut_bn()));
    return std::make_unique<GpuResidual>(block, std::move(in_quant), std::move(conv1),
                                         std::move(bn1), std::move(act1), std::move(conv2),
                                         std::move(bn2), std::move(sc_conv), std::move(sc_bn));
  }
  // Any other subclass of Conv2d / Linear may change the weight (EffectiveWeight): refuse it
  // rather than silently running the plain math.
  if (auto* conv = dynamic_cast<Conv2d*>(layer)) {
    if (typeid(*conv) != typeid(Conv2d)) return Unimplemented(layer, " (a Conv2d subclass)");
    return std::make_unique<GpuConv2d>(conv, state);
  }
  if (auto* linear = dynamic_cast<Linear*>(layer)) {
    if (typeid(*linear) != typeid(Linear)) return Unimplemented(layer, " (a Linear subclass)");
    return std::make_unique<GpuLinear>(linear, state);
  }
  if (auto* bn = dynamic_cast<BatchNorm2d*>(layer)) return std::make_unique<GpuBatchNorm>(bn, state);
  if (typeid(*layer) == typeid(Relu)) return std::make_unique<GpuRelu>(layer->name());
  if (auto* pool = dynamic_cast<MaxPool2d*>(layer)) return std::make_unique<GpuMaxPool>(pool);
  if (dynamic_cast<GlobalAvgPool*>(layer) != nullptr) {
    return std::make_unique<GpuGlobalAvgPool>(layer->name());
  }
  if (dynamic_cast<Flatten*>(layer) != nullptr) return std::make_unique<GpuFlatten>(layer->name());
  if (auto* scalar = dynamic_cast<ScalarLayer*>(layer)) {
    return std::make_unique<GpuScalarLayer>(scalar, state);
  }
  return Unimplemented(layer, "");
}

}  // namespace qtrain::nn::cuda
