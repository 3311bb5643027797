#include "worker/train/guided.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "worker/quant/activation_quantizer.h"

namespace qtrain::train {

std::vector<std::string> DefaultGuideLayers(const std::string& model) {
  if (model == "resnet20") return {"layer2.2", "layer3.2"};
  if (model == "cnn") return {"relu4", "relu5"};
  if (model == "mlp-wide") return {"relu2", "relu3"};
  return {"relu1", "relu2"};  // mlp
}

double GuidanceLoss(nn::RunContext& ctx, nn::Layer* q, const nn::Tensor& mu, const nn::Tensor& nu,
                    nn::Tensor* dmu, nn::Tensor* dnu) {
  QTRAIN_CHECK(mu.shape() == nu.shape())
      << "guidance maps differ: " << nn::ShapeToString(mu.shape()) << " vs "
      << nn::ShapeToString(nu.shape());
  const int64_t n = mu.size();
  const double inv_batch = 1.0 / static_cast<double>(std::max<int64_t>(1, mu.dim(0)));
  nn::Tensor qmu_storage;
  const nn::Tensor* qmu = &mu;
  if (q != nullptr) {
    q->Forward(ctx, mu, &qmu_storage);
    qmu = &qmu_storage;
  }
  nn::Tensor diff(mu.shape());  // (Q(mu) - nu) / N
  double sum = 0;
  const float* a = qmu->data();
  const float* b = nu.data();
  float* d = diff.data();
  for (int64_t i = 0; i < n; ++i) {
    const double e = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    sum += e * e;
    d[i] = static_cast<float>(e * inv_batch);
  }
  if (dnu != nullptr) {
    dnu->Resize(nu.shape());
    float* g = dnu->data();
    for (int64_t i = 0; i < n; ++i) g[i] = -d[i];
  }
  if (dmu != nullptr) {
    if (q != nullptr) {
      q->Backward(ctx, diff, dmu);
    } else {
      dmu->Resize(mu.shape());
      std::copy(d, d + n, dmu->data());
    }
  }
  return 0.5 * sum * inv_batch;
}

absl::StatusOr<std::unique_ptr<TapRunner>> TapRunner::Create(nn::Sequential* net,
                                                             const std::vector<std::string>& taps) {
  std::unique_ptr<TapRunner> r(new TapRunner());
  r->net_ = net;
  const int n = net->num_children();
  r->tap_of_child_.assign(static_cast<size_t>(n), -1);
  for (size_t k = 0; k < taps.size(); ++k) {
    int found = -1;
    for (int i = 0; i < n; ++i) {
      if (net->child(i).name() == taps[k]) found = i;
    }
    if (found < 0 || found == n - 1) {
      std::vector<std::string> names;
      for (int i = 0; i + 1 < n; ++i) names.push_back(net->child(i).name());
      return absl::InvalidArgumentError(absl::StrCat(
          "--guide_layers: '", taps[k], "' is not a layer before the output; layers: ",
          absl::StrJoin(names, ",")));
    }
    if (r->tap_of_child_[static_cast<size_t>(found)] >= 0) {
      return absl::InvalidArgumentError(absl::StrCat("--guide_layers names '", taps[k], "' twice"));
    }
    r->tap_of_child_[static_cast<size_t>(found)] = static_cast<int>(k);
  }
  r->tap_out_.assign(taps.size(), nullptr);
  r->tap_grad_.resize(taps.size());
  r->acts_.resize(static_cast<size_t>(n));
  r->child_params_.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) net->child(i).CollectParameters(&r->child_params_[static_cast<size_t>(i)]);
  return r;
}

void TapRunner::Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) {
  const size_t n = acts_.size();
  const nn::Tensor* in = &x;
  for (size_t i = 0; i < n; ++i) {
    nn::Tensor* out = i + 1 == n ? y : &acts_[i];
    net_->child(static_cast<int>(i)).Forward(ctx, *in, out);
    if (tap_of_child_[i] >= 0) tap_out_[static_cast<size_t>(tap_of_child_[i])] = out;
    in = out;
  }
}

void TapRunner::Backward(nn::RunContext& ctx, const nn::Tensor& dy) {
  auto on_ready = std::move(ctx.on_grads_ready);
  ctx.on_grads_ready = nullptr;
  const nn::Tensor* grad_out = &dy;
  for (size_t i = acts_.size(); i-- > 0;) {
    if (const int k = tap_of_child_[i]; k >= 0) {
      const nn::Tensor& extra = tap_grad_[static_cast<size_t>(k)];
      QTRAIN_CHECK(extra.shape() == grad_out->shape()) << "tap gradient shape";
      grads_[2].Resize(grad_out->shape());
      const float* a = grad_out->data();
      const float* b = extra.data();
      float* c = grads_[2].data();
      for (int64_t j = 0; j < extra.size(); ++j) c[j] = a[j] + b[j];
      grad_out = &grads_[2];
    }
    nn::Tensor* grad_in = i == 0 ? nullptr : &grads_[i % 2];
    net_->child(static_cast<int>(i)).Backward(ctx, *grad_out, grad_in);
    if (on_ready && !child_params_[i].empty()) on_ready(child_params_[i]);
    grad_out = grad_in;
  }
  ctx.on_grads_ready = std::move(on_ready);
}

absl::StatusOr<std::unique_ptr<Guide>> Guide::Create(const GuideOptions& options,
                                                     std::unique_ptr<nn::Layer> fp_model) {
  if (!(options.lambda >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("--lambda must be >= 0, got ", options.lambda));
  }
  if (options.layers.empty()) return absl::InvalidArgumentError("--guide_layers is empty");
  RETURN_IF_ERROR(ValidateSgdOptions(options.sgd));
  auto* seq = dynamic_cast<nn::Sequential*>(fp_model.get());
  if (seq == nullptr) return absl::InvalidArgumentError("guided training needs a Sequential model");
  std::unique_ptr<Guide> g(new Guide());
  g->options_ = options;
  ASSIGN_OR_RETURN(g->fp_runner_, TapRunner::Create(seq, options.layers));
  g->fp_model_ = std::move(fp_model);
  g->fp_model_->CollectParameters(&g->fp_params_);
  g->fp_model_->CollectBuffers(&g->fp_buffers_);
  g->sgd_ = std::make_unique<Sgd>(g->fp_params_, options.sgd);
  return g;
}

absl::Status Guide::Bind(nn::Layer* lowbit, const quant::QuantSpec& activation) {
  auto* seq = dynamic_cast<nn::Sequential*>(lowbit);
  if (seq == nullptr) return absl::InvalidArgumentError("guided training needs a Sequential model");
  ASSIGN_OR_RETURN(lowbit_runner_, TapRunner::Create(seq, options_.layers));
  lowbit_ = lowbit;
  std::vector<nn::Parameter*> lowbit_params;
  lowbit->CollectParameters(&lowbit_params);
  q_.clear();
  q_sync_.clear();
  for (const std::string& name : options_.layers) {
    // Q only where the low-bit network quantizes that map (an activation quantizer's output);
    // elsewhere (e.g. the ReLU kept in front of a full-precision classifier) the identity.
    bool quantized_here = false;
    for (int i = 0; i < seq->num_children(); ++i) {
      if (seq->child(i).name() == name) {
        quantized_here = dynamic_cast<quant::ActivationQuantizer*>(&seq->child(i)) != nullptr;
      }
    }
    std::unique_ptr<quant::ActivationQuantizer> q;
    if (quantized_here) {
      ASSIGN_OR_RETURN(q, quant::MakeActivationQuantizer(name, activation));
    }
    std::vector<std::pair<nn::Parameter*, nn::Parameter*>> sync;
    if (q != nullptr) {
      std::vector<nn::Parameter*> own;
      q->CollectParameters(&own);
      for (nn::Parameter* p : own) {
        for (nn::Parameter* src : lowbit_params) {
          if (src->name == name + "." + p->name && src->value.shape() == p->value.shape()) {
            sync.emplace_back(src, p);
          }
        }
      }
    }
    q_.push_back(std::move(q));
    q_sync_.push_back(std::move(sync));
  }
  return absl::OkStatus();
}

absl::StatusOr<GuidedStepResult> Guide::ForwardBackward(nn::RunContext& ctx, const nn::Tensor& x,
                                                        std::span<const int32_t> labels) {
  if (lowbit_runner_ == nullptr) return absl::FailedPreconditionError("Guide::Bind not called");
  const int64_t m = x.dim(0);
  nn::RunContext fp_ctx;
  fp_ctx.cpu = ctx.cpu;
  fp_ctx.mode = ctx.mode;
  lowbit_runner_->Forward(ctx, x, &logits_);
  fp_runner_->Forward(fp_ctx, x, &fp_logits_);
  GuidedStepResult r;
  dlogits_.Resize(logits_.shape());
  fp_dlogits_.Resize(fp_logits_.shape());
  ASSIGN_OR_RETURN(r.lowbit, kernels::SoftmaxCrossEntropy(ctx.cpu, m, logits_.dim(1),
                                                          logits_.data(), labels.data(),
                                                          dlogits_.data()));
  ASSIGN_OR_RETURN(r.fp, kernels::SoftmaxCrossEntropy(ctx.cpu, m, fp_logits_.dim(1),
                                                      fp_logits_.data(), labels.data(),
                                                      fp_dlogits_.data()));
  const float lambda = options_.lambda;
  for (size_t k = 0; k < q_.size(); ++k) {
    for (auto& [src, dst] : q_sync_[k]) {
      std::copy(src->value.data(), src->value.data() + src->value.size(), dst->value.data());
    }
    const nn::Tensor& mu = fp_runner_->tap(static_cast<int>(k));
    const nn::Tensor& nu = lowbit_runner_->tap(static_cast<int>(k));
    if (mu.shape() != nu.shape()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "guidance point ", options_.layers[k], ": the twin's map is ",
          nn::ShapeToString(mu.shape()), ", the low-bit network's ", nn::ShapeToString(nu.shape())));
    }
    r.guidance += GuidanceLoss(fp_ctx, q_[k].get(), mu, nu, &dmu_, &dnu_);
    nn::Tensor& gfp = fp_runner_->tap_grad(static_cast<int>(k));
    nn::Tensor& glow = lowbit_runner_->tap_grad(static_cast<int>(k));
    gfp.Resize(mu.shape());
    glow.Resize(nu.shape());
    for (int64_t i = 0; i < mu.size(); ++i) {
      gfp.data()[i] = lambda * dmu_.data()[i];
      glow.data()[i] = lambda * dnu_.data()[i];
    }
  }
  lowbit_runner_->Backward(ctx, dlogits_);
  fp_runner_->Backward(fp_ctx, fp_dlogits_);
  return r;
}

}  // namespace qtrain::train
