// Builds quantized models: the nn::LayerFactory that BuildModel asks for its weight layers and
// activations (see worker/nn/layer_factory.h), configured from the --wq / --aq / --quant flags.
//
//   weights:     every Conv2d / Linear becomes a QuantizedConv2d / QuantizedLinear with its own
//                weight quantizer (QuantConfig::weight), except the first and the last weight
//                layer when keep_first_last_fp (the papers' default).
//   activations: the ReLU in front of every quantized weight layer becomes the activation
//                quantizer (QuantConfig::activation): PACT's clip(x, 0, alpha) and DoReFa's
//                clip(x, 0, 1) include the rectification; QIL's interval may reach below zero,
//                so it follows a ReLU. The activation feeding the last layer stays a ReLU when
//                keep_first_last_fp. In residual networks with full_precision_shortcut (PACT's
//                fpsc) the shortcut reads the full-precision block input and conv1 its quantized
//                copy; without it the block outputs are quantized once for both paths.
//
// Thread-safety: const after creation.
#ifndef QTRAIN_WORKER_QUANT_QUANT_FACTORY_H_
#define QTRAIN_WORKER_QUANT_QUANT_FACTORY_H_

#include <memory>
#include <random>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/nn/layer_factory.h"
#include "worker/quant/quant_spec.h"

namespace qtrain::quant {

struct QuantConfig {
  QuantSpec weight;      // Method::kNone: full-precision weights
  QuantSpec activation;  // Method::kNone: full-precision activations
  bool keep_first_last_fp = true;
  bool full_precision_shortcut = true;

  bool quantizes() const {
    return weight.method != Method::kNone || activation.method != Method::kNone;
  }
  // "w=sawb:bits=2;a=pact:bits=2,alpha=10,l2=0;first_last=fp;fpsc=on" (no spaces, so it can
  // sit in the key=value summary line), or "fp32".
  std::string ToString() const;
};

// Combines the flags: --quant (one method for both, e.g. "qil:w=3,a=3") or --wq and --aq
// (each "none" or a spec of quant_spec.h). INVALID_ARGUMENT when --quant is combined with --wq or
// --aq, or for a spec the parsers reject (their message names the spec and the valid methods).
absl::StatusOr<QuantConfig> MakeQuantConfig(absl::string_view quant, absl::string_view wq,
                                            absl::string_view aq, bool keep_first_last_fp,
                                            bool full_precision_shortcut);

class QuantLayerFactory : public nn::LayerFactory {
 public:
  // INVALID_ARGUMENT for a spec no quantizer can be built from (e.g. pact for weights).
  static absl::StatusOr<std::unique_ptr<QuantLayerFactory>> Create(const QuantConfig& config);

  std::unique_ptr<nn::Conv2d> MakeConv2d(std::string name, const nn::Conv2dOptions& options,
                                         std::mt19937_64& rng,
                                         nn::WeightLayerRole role) const override;
  std::unique_ptr<nn::Linear> MakeLinear(std::string name, const nn::LinearOptions& options,
                                         std::mt19937_64& rng,
                                         nn::WeightLayerRole role) const override;
  std::unique_ptr<nn::Layer> MakeActivation(std::string name,
                                            nn::WeightLayerRole consumer) const override;
  std::unique_ptr<nn::Layer> MakeInputQuantizer(std::string name,
                                                nn::WeightLayerRole consumer) const override;
  bool full_precision_shortcut() const override { return config_.full_precision_shortcut; }

  const QuantConfig& config() const { return config_; }

 private:
  explicit QuantLayerFactory(const QuantConfig& config) : config_(config) {}
  bool KeepsFullPrecision(nn::WeightLayerRole role) const;

  QuantConfig config_;
};

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_QUANT_FACTORY_H_
