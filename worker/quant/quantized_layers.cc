#include "worker/quant/quantized_layers.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/elementwise.h"

namespace qtrain::quant {
namespace {

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

WeightQuantization::WeightQuantization(const std::string& layer, const nn::Tensor& w,
                                       std::unique_ptr<WeightQuantizer> quantizer)
    : quantizer_(std::move(quantizer)) {
  QTRAIN_CHECK(quantizer_ != nullptr) << "quantized layer '" << layer << "' needs a quantizer";
  quantizer_->CollectParameters(&params_);
  weight_scale_ = WeightScale(*quantizer_, w);
}

const nn::Tensor& WeightQuantization::Forward(nn::RunContext& ctx, const nn::Tensor& w) {
  quantizer_->Forward(ctx, w, &wq_);
  Scale(ctx, weight_scale_, &wq_);
  return wq_;
}

void WeightQuantization::Backward(nn::RunContext& ctx, nn::Parameter& w) {
  Scale(ctx, weight_scale_, &w.grad);
  quantizer_->Backward(ctx, w.value, w.grad, &w.grad);
}

void WeightQuantization::AppendParameters(std::vector<nn::Parameter*>* out) const {
  out->insert(out->end(), params_.begin(), params_.end());
}

QuantizedConv2d::QuantizedConv2d(std::string name, const nn::Conv2dOptions& options,
                                 std::mt19937_64& rng, std::unique_ptr<WeightQuantizer> quantizer)
    : nn::Conv2d(std::move(name), options, rng),
      q_(this->name(), weight().value, std::move(quantizer)) {}

std::string QuantizedConv2d::Describe() const {
  return absl::StrCat(nn::Conv2d::Describe(), ", wq=", quantizer().Describe());
}

void QuantizedConv2d::CollectParameters(std::vector<nn::Parameter*>* out) {
  nn::Conv2d::CollectParameters(out);
  q_.AppendParameters(out);
}

const nn::Tensor& QuantizedConv2d::EffectiveWeight(nn::RunContext& ctx) {
  return q_.Forward(ctx, weight().value);
}

void QuantizedConv2d::EffectiveWeightBackward(nn::RunContext& ctx) { q_.Backward(ctx, weight()); }

QuantizedLinear::QuantizedLinear(std::string name, const nn::LinearOptions& options,
                                 std::mt19937_64& rng, std::unique_ptr<WeightQuantizer> quantizer)
    : nn::Linear(std::move(name), options, rng),
      q_(this->name(), weight().value, std::move(quantizer)) {}

std::string QuantizedLinear::Describe() const {
  return absl::StrCat(nn::Linear::Describe(), ", wq=", quantizer().Describe());
}

void QuantizedLinear::CollectParameters(std::vector<nn::Parameter*>* out) {
  nn::Linear::CollectParameters(out);
  q_.AppendParameters(out);
}

const nn::Tensor& QuantizedLinear::EffectiveWeight(nn::RunContext& ctx) {
  return q_.Forward(ctx, weight().value);
}

void QuantizedLinear::EffectiveWeightBackward(nn::RunContext& ctx) { q_.Backward(ctx, weight()); }

}  // namespace qtrain::quant
