#include "worker/quant/quant_factory.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "worker/nn/relu.h"
#include "worker/nn/sequential.h"
#include "worker/quant/quantized_layers.h"

namespace qtrain::quant {
namespace {

bool IsNone(absl::string_view flag) { return flag.empty() || flag == "none" || flag == "fp32"; }

// The factory validated the specs at Create, so building cannot fail here.
template <class T>
T Must(absl::StatusOr<T> value) {
  QTRAIN_CHECK(value.ok()) << value.status();
  return *std::move(value);
}

}  // namespace

std::string QuantConfig::ToString() const {
  if (!quantizes()) return "fp32";
  return absl::StrCat("w=", weight.ToString(), ";a=", activation.ToString(),
                      ";first_last=", keep_first_last_fp ? "fp" : "quantized",
                      ";fpsc=", full_precision_shortcut ? "on" : "off");
}

absl::StatusOr<QuantConfig> MakeQuantConfig(absl::string_view quant, absl::string_view wq,
                                            absl::string_view aq, bool keep_first_last_fp,
                                            bool full_precision_shortcut) {
  QuantConfig config;
  config.keep_first_last_fp = keep_first_last_fp;
  config.full_precision_shortcut = full_precision_shortcut;
  if (!IsNone(quant)) {
    if (!IsNone(wq) || !IsNone(aq)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--quant='", quant, "' sets both weights and activations; do not combine it with --wq='",
          wq, "' / --aq='", aq, "'"));
    }
    ASSIGN_OR_RETURN(LayerQuantSpecs specs, ParseQuantSpec(quant));
    config.weight = specs.weight;
    config.activation = specs.activation;
    return config;
  }
  ASSIGN_OR_RETURN(config.weight, ParseWeightQuantSpec(IsNone(wq) ? "none" : wq));
  ASSIGN_OR_RETURN(config.activation, ParseActivationQuantSpec(IsNone(aq) ? "none" : aq));
  return config;
}

absl::StatusOr<std::unique_ptr<QuantLayerFactory>> QuantLayerFactory::Create(
    const QuantConfig& config) {
  RETURN_IF_ERROR(MakeWeightQuantizer(config.weight).status());
  RETURN_IF_ERROR(MakeActivationQuantizer("probe", config.activation).status());
  return std::unique_ptr<QuantLayerFactory>(new QuantLayerFactory(config));
}

bool QuantLayerFactory::KeepsFullPrecision(nn::WeightLayerRole role) const {
  return config_.keep_first_last_fp && (role.first || role.last);
}

std::unique_ptr<nn::Conv2d> QuantLayerFactory::MakeConv2d(std::string name,
                                                          const nn::Conv2dOptions& options,
                                                          std::mt19937_64& rng,
                                                          nn::WeightLayerRole role) const {
  std::unique_ptr<WeightQuantizer> q;
  if (!KeepsFullPrecision(role)) q = Must(MakeWeightQuantizer(config_.weight));
  if (!q) return nn::LayerFactory::MakeConv2d(std::move(name), options, rng, role);
  return std::make_unique<QuantizedConv2d>(std::move(name), options, rng, std::move(q));
}

std::unique_ptr<nn::Linear> QuantLayerFactory::MakeLinear(std::string name,
                                                          const nn::LinearOptions& options,
                                                          std::mt19937_64& rng,
                                                          nn::WeightLayerRole role) const {
  std::unique_ptr<WeightQuantizer> q;
  if (!KeepsFullPrecision(role)) q = Must(MakeWeightQuantizer(config_.weight));
  if (!q) return nn::LayerFactory::MakeLinear(std::move(name), options, rng, role);
  return std::make_unique<QuantizedLinear>(std::move(name), options, rng, std::move(q));
}

std::unique_ptr<nn::Layer> QuantLayerFactory::MakeActivation(std::string name,
                                                             nn::WeightLayerRole consumer) const {
  if (KeepsFullPrecision(consumer) || config_.activation.method == Method::kNone) return nullptr;
  if (config_.activation.method != Method::kQil) {
    return Must(MakeActivationQuantizer(std::move(name), config_.activation));
  }
  auto seq = std::make_unique<nn::Sequential>(std::move(name));
  seq->Emplace<nn::Relu>("relu");
  seq->Add(Must(MakeActivationQuantizer("aq", config_.activation)));
  return seq;
}

std::unique_ptr<nn::Layer> QuantLayerFactory::MakeInputQuantizer(
    std::string name, nn::WeightLayerRole consumer) const {
  if (KeepsFullPrecision(consumer) || config_.activation.method == Method::kNone) return nullptr;
  return Must(MakeActivationQuantizer(std::move(name), config_.activation));
}

}  // namespace qtrain::quant
