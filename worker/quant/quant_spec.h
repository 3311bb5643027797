// Quantizer specs: parsing of the flag strings and the factories that build quantizers.
//
//   --wq: "none" | "fp32" | "dorefa:bits=K" | "sawb:bits=K" | "qil:bits=K[,gamma=G]" |
//         "binary" | "ternary" | "pow2:levels=L"     (K in 1..8; qil weights K in 2..8; L in
//                                                    3, 5, 7, 9: alpha*{0, +-2^0..+-2^b}, pow2.h)
//   --aq: "none" | "fp32" | "dorefa:bits=K" | "pact:bits=K[,alpha=A][,l2=L]" | "qil:bits=K"
//   --quant: "none" | "dorefa:w=K,a=K" | "qil:w=K,a=K"   (one method for weights and activations)
//
// Errors are INVALID_ARGUMENT and name the spec, the valid methods and the valid keys.
// Thread-safety: pure functions.
#ifndef QTRAIN_WORKER_QUANT_QUANT_SPEC_H_
#define QTRAIN_WORKER_QUANT_QUANT_SPEC_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/quant/activation_quantizer.h"
#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant {

// Values are only ever appended (they may reach config.proto).
enum class Method {
  kNone = 0,
  kDorefa = 1,
  kPact = 2,
  kSawb = 3,
  kQil = 4,
  kBinary = 5,
  kTernary = 6,
  kPow2 = 7
};

const char* MethodName(Method method);

struct QuantSpec {
  Method method = Method::kNone;
  int bits = 32;             // 32 for kNone; 1 for binary, 2 for ternary; pow2: index bits
  float pact_alpha = 10.0f;  // PACT initial alpha
  float pact_l2 = 0.0f;      // PACT L2 penalty on alpha
  float qil_gamma = 1.0f;    // QIL weight exponent initial value
  int pow2_levels = 0;       // kPow2: 3, 5, 7 or 9

  // Canonical spec string, parseable back: "pact:bits=2,alpha=10,l2=0".
  std::string ToString() const;
};

absl::StatusOr<QuantSpec> ParseWeightQuantSpec(absl::string_view spec);
absl::StatusOr<QuantSpec> ParseActivationQuantSpec(absl::string_view spec);

struct LayerQuantSpecs {
  QuantSpec weight;
  QuantSpec activation;
};
absl::StatusOr<LayerQuantSpecs> ParseQuantSpec(absl::string_view spec);

// A weight quantizer for `spec`; nullptr (ok) for kNone. INVALID_ARGUMENT for a method that does
// not quantize weights (pact) or bits out of range.
absl::StatusOr<std::unique_ptr<WeightQuantizer>> MakeWeightQuantizer(const QuantSpec& spec);

// An activation quantizer layer named `name`; nullptr (ok) for kNone. INVALID_ARGUMENT for a
// weight-only method (sawb, binary, ternary, pow2) or bits out of range.
absl::StatusOr<std::unique_ptr<ActivationQuantizer>> MakeActivationQuantizer(std::string name,
                                                                             const QuantSpec& spec);

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_QUANT_SPEC_H_
