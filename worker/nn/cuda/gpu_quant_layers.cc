#include "worker/nn/cuda/gpu_quant_layers.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/cuda/cuda_util.h"
#include "common/status_macros.h"
#include "worker/kernels/cuda/elementwise.h"
#include "worker/kernels/cuda/launch_util.h"
#include "worker/kernels/cuda/quantize.h"
#include "worker/quant/activation_quantizer.h"
#include "worker/quant/binary.h"
#include "worker/quant/dorefa.h"
#include "worker/quant/pact.h"
#include "worker/quant/qil.h"
#include "worker/quant/quantized_layers.h"
#include "worker/quant/sawb.h"
#include "worker/quant/ternary.h"

namespace qtrain::nn::cuda {
namespace {

namespace kc = ::qtrain::kernels::cuda;
using qtrain::cuda::DeviceArray;

absl::Status Unimplemented(Layer* layer, const std::string& why) {
  return absl::UnimplementedError(absl::StrCat("layer '", layer->name(), "' (", layer->Describe(),
                                               ") has no CUDA implementation: ", why));
}

// A device array of at least n elements (kept when large enough).
template <typename T>
absl::Status Reserve(DeviceArray<T>* a, int64_t n) {
  if (static_cast<int64_t>(a->size()) >= n) return absl::OkStatus();
  ASSIGN_OR_RETURN(*a, DeviceArray<T>::Create(static_cast<size_t>(n)));
  return absl::OkStatus();
}

// The quantizer kernels read the shared workspace without knowing its size: check it here.
absl::Status CheckWorkspace(const GpuLayer& layer, const GpuPass& pass, uint64_t need) {
  if (need == 0 || (pass.workspace != nullptr && pass.workspace_bytes >= need)) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(absl::StrCat("GPU layer '", layer.name(), "' needs ", need,
                                                    " bytes of workspace, the pass has ",
                                                    pass.workspace_bytes, " (not planned?)"));
}

// ---- Quantized conv / linear --------------------------------------------------------------------

enum class WeightMethod { kDorefa, kSawb, kQil, kBinary, kTernary };

struct WeightQuantSpec {
  WeightMethod method = WeightMethod::kDorefa;
  int bits = 0;
  kc::BinaryScaling binary_scaling = kc::BinaryScaling::kPerChannelMeanAbs;
  quant::QilWeightQuantizer* qil = nullptr;  // its c, d, gamma live in DeviceState
};

absl::StatusOr<WeightQuantSpec> WeightSpecOf(Layer* layer, quant::WeightQuantizer& q) {
  WeightQuantSpec spec;
  spec.bits = q.bits();
  if (dynamic_cast<quant::DorefaWeightQuantizer*>(&q) != nullptr) {
    spec.method = WeightMethod::kDorefa;
  } else if (dynamic_cast<quant::SawbWeightQuantizer*>(&q) != nullptr) {
    spec.method = WeightMethod::kSawb;
  } else if (auto* qil = dynamic_cast<quant::QilWeightQuantizer*>(&q)) {
    spec.method = WeightMethod::kQil;
    spec.qil = qil;
  } else if (dynamic_cast<quant::BinaryWeightQuantizer*>(&q) != nullptr) {
    spec.method = WeightMethod::kBinary;
    // binary.h exposes its scaling only through Describe().
    const bool none =
        q.Describe() == quant::BinaryWeightQuantizer(quant::BinaryScale::kNone).Describe();
    spec.binary_scaling = none ? kc::BinaryScaling::kNone : kc::BinaryScaling::kPerChannelMeanAbs;
  } else if (dynamic_cast<quant::TernaryWeightQuantizer*>(&q) != nullptr) {
    spec.method = WeightMethod::kTernary;
  } else {
    return Unimplemented(layer, absl::StrCat("weight quantizer '", q.Describe(), "'"));
  }
  return spec;
}

// QuantizedConv2d / QuantizedLinear: the weight quantizer around a plain conv / linear twin that
// reads wq_. The body is built in Plan, once wq_ exists.
class GpuQuantizedWeightLayer : public GpuLayer {
 public:
  using BodyFactory = std::unique_ptr<GpuLayer> (*)(Layer* layer, DeviceState* state,
                                                    const float* weight);

  GpuQuantizedWeightLayer(Layer* layer, Parameter* weight, float weight_scale,
                          const WeightQuantSpec& spec, DeviceState* state, BodyFactory body)
      : GpuLayer(layer->name()),
        layer_(layer),
        weight_(weight),
        weight_scale_(weight_scale),
        spec_(spec),
        state_(state),
        make_body_(body),
        n_(weight->value.size()),
        channels_(weight->value.dim(0)),
        per_channel_(n_ / channels_) {}

  const float* quantized_weight() const { return body_ != nullptr ? wq_.data() : nullptr; }

  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner* planner) override {
    RETURN_IF_ERROR(Reserve(&wq_, n_));
    switch (spec_.method) {
      case WeightMethod::kDorefa:
        RETURN_IF_ERROR(Reserve(&saved_a_, n_));  // tanh w
        RETURN_IF_ERROR(Reserve(&dorefa_, 1));
        workspace_ = kc::kReductionWorkspaceBytes;
        break;
      case WeightMethod::kSawb:
        RETURN_IF_ERROR(Reserve(&scales_, 1));  // alpha
        workspace_ = kc::kReductionWorkspaceBytes;
        break;
      case WeightMethod::kQil:
        RETURN_IF_ERROR(Reserve(&saved_a_, n_));  // ln u
        RETURN_IF_ERROR(Reserve(&saved_b_, n_));  // u^gamma
        workspace_ = kc::kReductionWorkspaceBytes;
        break;
      case WeightMethod::kBinary:
        RETURN_IF_ERROR(Reserve(&scales_, channels_));
        workspace_ = kc::BinaryWeightWorkspaceBytes(spec_.binary_scaling, channels_, per_channel_);
        break;
      case WeightMethod::kTernary:
        RETURN_IF_ERROR(Reserve(&ternary_, 1));
        workspace_ = kc::kReductionWorkspaceBytes;
        break;
    }
    planner->workspace_bytes = std::max<uint64_t>(planner->workspace_bytes, workspace_);
    if (body_ == nullptr) body_ = make_body_(layer_, state_, wq_.data());
    return body_->Plan(max_input, planner);
  }

  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    RETURN_IF_ERROR(CheckPlanned(pass));
    const kc::CudaContext& ctx = pass.ctx;
    const float* w = state_->value(weight_);
    float* wq = wq_.data();
    switch (spec_.method) {
      case WeightMethod::kDorefa:
        RETURN_IF_ERROR(kc::DorefaWeightForward(ctx, spec_.bits, n_, w, wq, saved_a_.data(),
                                                dorefa_.data(), pass.workspace));
        break;
      case WeightMethod::kSawb:
        RETURN_IF_ERROR(
            kc::SawbWeightForward(ctx, spec_.bits, n_, w, wq, scales_.data(), pass.workspace));
        break;
      case WeightMethod::kQil: {
        // As QilWeightQuantizer::Forward: c and d from w's statistics while d == 0.
        float* c = state_->value(&spec_.qil->c());
        float* d = state_->value(&spec_.qil->d());
        RETURN_IF_ERROR(kc::QilWeightInitialize(ctx, n_, w, c, d, pass.workspace));
        RETURN_IF_ERROR(kc::QilWeightForward(ctx, spec_.bits, n_, w, c, d,
                                             state_->value(&spec_.qil->gamma()), wq,
                                             saved_a_.data(), saved_b_.data()));
        break;
      }
      case WeightMethod::kBinary:
        RETURN_IF_ERROR(kc::BinaryWeightForward(ctx, spec_.binary_scaling, channels_, per_channel_,
                                                w, wq, scales_.data(), pass.workspace));
        break;
      case WeightMethod::kTernary:
        RETURN_IF_ERROR(kc::TernaryWeightForward(ctx, n_, w, wq, ternary_.data(), pass.workspace));
        break;
    }
    // quant::WeightQuantization::Forward: Q(w) first, then the constant factor (skipped at 1).
    if (weight_scale_ != 1.0f) RETURN_IF_ERROR(kc::Scale(ctx, n_, weight_scale_, wq, wq));
    return body_->Forward(pass, x, y);
  }

  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    RETURN_IF_ERROR(CheckPlanned(pass));
    // The body leaves dL/dwq in the weight's gradient slot (and writes dx through wq).
    RETURN_IF_ERROR(body_->Backward(pass, dy, dx));
    const kc::CudaContext& ctx = pass.ctx;
    const float* w = state_->value(weight_);
    float* g = state_->grad(weight_);
    // quant::WeightQuantization::Backward: scale dL/d(s Q(w)) by s, then the quantizer's
    // backward, in place (dw aliases dwq, as on the CPU).
    if (weight_scale_ != 1.0f) RETURN_IF_ERROR(kc::Scale(ctx, n_, weight_scale_, g, g));
    switch (spec_.method) {
      case WeightMethod::kDorefa:
        return kc::DorefaWeightBackward(ctx, n_, w, saved_a_.data(), dorefa_.data(), g, g,
                                        pass.workspace);
      case WeightMethod::kSawb:
        return kc::SawbWeightBackward(ctx, n_, w, scales_.data(), g, g);
      case WeightMethod::kQil:
        return kc::QilWeightBackward(
            ctx, n_, w, state_->value(&spec_.qil->c()), state_->value(&spec_.qil->d()),
            state_->value(&spec_.qil->gamma()), saved_a_.data(), saved_b_.data(), g, g,
            state_->grad(&spec_.qil->c()), state_->grad(&spec_.qil->d()),
            state_->grad(&spec_.qil->gamma()), pass.workspace);
      case WeightMethod::kBinary:
        return kc::BinaryWeightBackward(ctx, spec_.binary_scaling, channels_, per_channel_, w,
                                        scales_.data(), g, g);
      case WeightMethod::kTernary:
        return kc::TernaryWeightBackward(ctx, n_, g, g);  // straight-through: nothing to do
    }
    return absl::OkStatus();
  }

 private:
  absl::Status CheckPlanned(const GpuPass& pass) const {
    if (body_ == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("GPU layer '", name(), "' used before Plan"));
    }
    return CheckWorkspace(*this, pass, workspace_);
  }

  Layer* layer_;
  Parameter* weight_;
  float weight_scale_;
  WeightQuantSpec spec_;
  DeviceState* state_;
  BodyFactory make_body_;
  int64_t n_, channels_, per_channel_;
  uint64_t workspace_ = 0;
  DeviceArray<float> wq_;
  DeviceArray<float> saved_a_, saved_b_;  // DoReFa tanh w; QIL ln u and u^gamma
  DeviceArray<float> scales_;             // SAWB alpha; binary per-channel scales
  DeviceArray<kc::DorefaWeightState> dorefa_;
  DeviceArray<kc::TernaryWeightState> ternary_;
  std::unique_ptr<GpuLayer> body_;  // after wq_: destroyed first
};

std::unique_ptr<GpuLayer> MakeConvBody(Layer* layer, DeviceState* state, const float* weight) {
  return MakeGpuConv2d(static_cast<Conv2d*>(layer), state, weight);
}

std::unique_ptr<GpuLayer> MakeLinearBody(Layer* layer, DeviceState* state, const float* weight) {
  return MakeGpuLinear(static_cast<Linear*>(layer), state, weight);
}

// ---- Activation quantizers ----------------------------------------------------------------------

enum class ActivationMethod { kDorefa, kPact, kQil };

// pact.h has no accessor for l2: LossPenalty() = (l2 / 2) alpha^2 is read at alpha = 1, where
// every step of it is exact, and alpha is put back.
float PactL2(quant::PactActivationQuantizer* pact) {
  float& alpha = pact->alpha().value[0];
  const float saved = alpha;
  alpha = 1.0f;
  const double l2 = 2.0 * pact->LossPenalty();
  alpha = saved;
  return static_cast<float>(l2);
}

class GpuActivationQuantizer : public GpuLayer {
 public:
  GpuActivationQuantizer(quant::ActivationQuantizer* layer, ActivationMethod method,
                         DeviceState* state)
      : GpuLayer(layer->name()),
        layer_(layer),
        method_(method),
        state_(state),
        bits_(layer->bits()) {
    if (auto* pact = dynamic_cast<quant::PactActivationQuantizer*>(layer)) {
      param_a_ = &pact->alpha();
      l2_ = PactL2(pact);
    } else if (auto* qil = dynamic_cast<quant::QilActivationQuantizer*>(layer)) {
      param_a_ = &qil->c();
      param_b_ = &qil->d();
    }
  }

  absl::StatusOr<Shape> Plan(const Shape& max_input, Planner* planner) override {
    ASSIGN_OR_RETURN(Shape out, layer_->OutputShape(max_input));
    RETURN_IF_ERROR(Reserve(&y_, NumElements(out)));
    RETURN_IF_ERROR(Reserve(&dx_, NumElements(max_input)));
    workspace_ = method_ == ActivationMethod::kDorefa ? 0 : kc::kReductionWorkspaceBytes;
    planner->workspace_bytes = std::max<uint64_t>(planner->workspace_bytes, workspace_);
    planned_ = true;
    return out;
  }

  absl::Status Forward(const GpuPass& pass, const DeviceTensor& x, DeviceTensor* y) override {
    RETURN_IF_ERROR(CheckPlanned(pass, x.size()));
    x_ = x;
    const kc::CudaContext& ctx = pass.ctx;
    const int64_t n = x.size();
    switch (method_) {
      case ActivationMethod::kDorefa:
        RETURN_IF_ERROR(kc::DorefaActivationForward(ctx, bits_, n, x.data, y_.data()));
        break;
      case ActivationMethod::kPact:
        RETURN_IF_ERROR(kc::PactForward(ctx, bits_, n, x.data, state_->value(param_a_), y_.data()));
        break;
      case ActivationMethod::kQil: {
        // As QilActivationQuantizer::Forward: c and d from this input while d == 0 (any mode).
        float* c = state_->value(param_a_);
        float* d = state_->value(param_b_);
        RETURN_IF_ERROR(kc::QilActivationInitialize(ctx, n, x.data, c, d, pass.workspace));
        RETURN_IF_ERROR(kc::QilActivationForward(ctx, bits_, n, x.data, c, d, y_.data()));
        break;
      }
    }
    *y = DeviceTensor{y_.data(), x.shape};
    return absl::OkStatus();
  }

  // As the CPU objects: the parameter gradients are written even when dx is not wanted.
  absl::Status Backward(const GpuPass& pass, const DeviceTensor& dy, DeviceTensor* dx) override {
    if (x_.data == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("GPU layer '", name(), "': Backward before Forward"));
    }
    RETURN_IF_ERROR(CheckPlanned(pass, x_.size()));
    if (dy.size() != x_.size()) {
      return absl::InvalidArgumentError(absl::StrCat("GPU layer '", name(), "': dy ",
                                                     ShapeToString(dy.shape), " for input ",
                                                     ShapeToString(x_.shape)));
    }
    const kc::CudaContext& ctx = pass.ctx;
    const int64_t n = x_.size();
    float* out = dx != nullptr ? dx_.data() : nullptr;
    switch (method_) {
      case ActivationMethod::kDorefa:
        if (out != nullptr) {
          RETURN_IF_ERROR(kc::DorefaActivationBackward(ctx, n, x_.data, dy.data, out));
        }
        break;
      case ActivationMethod::kPact:
        RETURN_IF_ERROR(kc::PactBackward(ctx, n, x_.data, state_->value(param_a_), l2_, dy.data,
                                         out, state_->grad(param_a_), pass.workspace));
        break;
      case ActivationMethod::kQil:
        RETURN_IF_ERROR(kc::QilActivationBackward(
            ctx, n, x_.data, state_->value(param_a_), state_->value(param_b_), dy.data, out,
            state_->grad(param_a_), state_->grad(param_b_), pass.workspace));
        break;
    }
    if (dx != nullptr) *dx = DeviceTensor{dx_.data(), x_.shape};
    return absl::OkStatus();
  }

 private:
  absl::Status CheckPlanned(const GpuPass& pass, int64_t n) const {
    if (!planned_ || n > static_cast<int64_t>(y_.size())) {
      return absl::FailedPreconditionError(
          absl::StrCat("GPU layer '", name(), "': ", n, " elements, planned for ", y_.size()));
    }
    return CheckWorkspace(*this, pass, workspace_);
  }

  quant::ActivationQuantizer* layer_;
  ActivationMethod method_;
  DeviceState* state_;
  int bits_;
  Parameter* param_a_ = nullptr;  // PACT alpha; QIL c
  Parameter* param_b_ = nullptr;  // QIL d
  float l2_ = 0.0f;               // PACT
  bool planned_ = false;
  uint64_t workspace_ = 0;
  DeviceTensor x_;
  DeviceArray<float> y_, dx_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<GpuLayer>> CompileQuantLayer(Layer* layer, DeviceState* state) {
  if (auto* conv = dynamic_cast<quant::QuantizedConv2d*>(layer)) {
    ASSIGN_OR_RETURN(WeightQuantSpec spec, WeightSpecOf(layer, conv->quantizer()));
    return std::make_unique<GpuQuantizedWeightLayer>(layer, &conv->weight(), conv->weight_scale(),
                                                     spec, state, &MakeConvBody);
  }
  if (auto* linear = dynamic_cast<quant::QuantizedLinear*>(layer)) {
    ASSIGN_OR_RETURN(WeightQuantSpec spec, WeightSpecOf(layer, linear->quantizer()));
    return std::make_unique<GpuQuantizedWeightLayer>(
        layer, &linear->weight(), linear->weight_scale(), spec, state, &MakeLinearBody);
  }
  if (auto* act = dynamic_cast<quant::ActivationQuantizer*>(layer)) {
    ActivationMethod method;
    if (dynamic_cast<quant::DorefaActivationQuantizer*>(act) != nullptr) {
      method = ActivationMethod::kDorefa;
    } else if (dynamic_cast<quant::PactActivationQuantizer*>(act) != nullptr) {
      method = ActivationMethod::kPact;
    } else if (dynamic_cast<quant::QilActivationQuantizer*>(act) != nullptr) {
      method = ActivationMethod::kQil;
    } else {
      return Unimplemented(layer, "activation quantizer kind");
    }
    return std::make_unique<GpuActivationQuantizer>(act, method, state);
  }
  return std::unique_ptr<GpuLayer>();
}

const float* QuantizedWeight(const GpuLayer& twin) {
  const auto* q = dynamic_cast<const GpuQuantizedWeightLayer*>(&twin);
  return q != nullptr ? q->quantized_weight() : nullptr;
}

}  // namespace qtrain::nn::cuda
