#include "worker/quant/quantized_layers.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/elementwise.h"

namespace qtrain::quant {
namespace {

std::vector<nn::Parameter*> QuantizerParams(const std::string& layer, WeightQuantizer* q) {
  QTRAIN_CHECK(q != nullptr) << "quantized layer '" << layer << "' needs a quantizer";
  std::vector<nn::Parameter*> params;
  q->CollectParameters(&params);
  return params;
}

float WeightScale(const WeightQuantizer& q, const nn::Tensor& w) {
  if (!q.unit_range()) return 1.0f;
  const int64_t fan_in = w.size() / w.dim(0);
  return std::sqrt(2.0f / static_cast<float>(fan_in));
}

void Scale(nn::RunContext& ctx, float s, nn::Tensor* t) {
  if (s == 1.0f) return;
  kernels::Scale(ctx.cpu, t->size(), s, t->data(), t->data());
}

}  // namespace

QuantizedConv2d::QuantizedConv2d(std::string name, const nn::Conv2dOptions& options,
                                 std::mt19937_64& rng, std::unique_ptr<WeightQuantizer> quantizer)
    : nn::Conv2d(std::move(name), options, rng),
      quantizer_(std::move(quantizer)),
      quantizer_params_(QuantizerParams(this->name(), quantizer_.get())),
      weight_scale_(WeightScale(*quantizer_, weight().value)) {}

std::string QuantizedConv2d::Describe() const {
  return absl::StrCat(nn::Conv2d::Describe(), ", wq=", quantizer_->Describe());
}

void QuantizedConv2d::CollectParameters(std::vector<nn::Parameter*>* out) {
  nn::Conv2d::CollectParameters(out);
  out->insert(out->end(), quantizer_params_.begin(), quantizer_params_.end());
}

const nn::Tensor& QuantizedConv2d::EffectiveWeight(nn::RunContext& ctx) {
  quantizer_->Forward(ctx, weight().value, &wq_);
  Scale(ctx, weight_scale_, &wq_);
  return wq_;
}

void QuantizedConv2d::EffectiveWeightBackward(nn::RunContext& ctx) {
  nn::Parameter& w = weight();
  Scale(ctx, weight_scale_, &w.grad);
  quantizer_->Backward(ctx, w.value, w.grad, &w.grad);
}

QuantizedLinear::QuantizedLinear(std::string name, const nn::LinearOptions& options,
                                 std::mt19937_64& rng, std::unique_ptr<WeightQuantizer> quantizer)
    : nn::Linear(std::move(name), options, rng),
      quantizer_(std::move(quantizer)),
      quantizer_params_(QuantizerParams(this->name(), quantizer_.get())),
      weight_scale_(WeightScale(*quantizer_, weight().value)) {}

std::string QuantizedLinear::Describe() const {
  return absl::StrCat(nn::Linear::Describe(), ", wq=", quantizer_->Describe());
}

void QuantizedLinear::CollectParameters(std::vector<nn::Parameter*>* out) {
  nn::Linear::CollectParameters(out);
  out->insert(out->end(), quantizer_params_.begin(), quantizer_params_.end());
}

const nn::Tensor& QuantizedLinear::EffectiveWeight(nn::RunContext& ctx) {
  quantizer_->Forward(ctx, weight().value, &wq_);
  Scale(ctx, weight_scale_, &wq_);
  return wq_;
}

void QuantizedLinear::EffectiveWeightBackward(nn::RunContext& ctx) {
  nn::Parameter& w = weight();
  Scale(ctx, weight_scale_, &w.grad);
  quantizer_->Backward(ctx, w.value, w.grad, &w.grad);
}

}  // namespace qtrain::quant
