#include "worker/quant/quant_spec.h"

#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "worker/quant/binary.h"
#include "worker/quant/dorefa.h"
#include "worker/quant/pact.h"
#include "worker/quant/pow2.h"
#include "worker/quant/qil.h"
#include "worker/quant/sawb.h"
#include "worker/quant/ternary.h"

namespace qtrain::quant {
namespace {

enum class Target { kWeight, kActivation };

struct MethodInfo {
  const char* name;
  Method method;
  std::vector<std::string> keys;  // allowed keys
  int min_bits;
  int max_bits;
};

const std::vector<MethodInfo>& Methods(Target target) {
  static const std::vector<MethodInfo>* weight = new std::vector<MethodInfo>{
      {"none", Method::kNone, {}, 32, 32},
      {"fp32", Method::kNone, {}, 32, 32},
      {"dorefa", Method::kDorefa, {"bits"}, 1, 8},
      {"sawb", Method::kSawb, {"bits"}, 1, 8},
      {"qil", Method::kQil, {"bits", "gamma"}, 2, 8},
      {"binary", Method::kBinary, {"bits"}, 1, 1},
      {"ternary", Method::kTernary, {"bits"}, 2, 2},
      // bits follow from levels (Pow2WeightQuantizer::StorageBits); 0..0 marks "no bits key".
      {"pow2", Method::kPow2, {"levels"}, 0, 0},
  };
  static const std::vector<MethodInfo>* activation = new std::vector<MethodInfo>{
      {"none", Method::kNone, {}, 32, 32},
      {"fp32", Method::kNone, {}, 32, 32},
      {"dorefa", Method::kDorefa, {"bits"}, 1, 8},
      {"pact", Method::kPact, {"bits", "alpha", "l2"}, 1, 8},
      {"qil", Method::kQil, {"bits"}, 1, 8},
  };
  return target == Target::kWeight ? *weight : *activation;
}

std::string MethodList(Target target) {
  std::vector<std::string> parts;
  for (const MethodInfo& m : Methods(target)) {
    parts.push_back(
        m.keys.empty()
            ? std::string(m.name)
            : absl::StrCat(m.name, ":",
                           absl::StrJoin(m.keys, ",", [](std::string* out, const std::string& k) {
                             absl::StrAppend(out, k, "=");
                           })));
  }
  return absl::StrJoin(parts, " | ");
}

absl::Status SpecError(Target target, absl::string_view spec, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat(target == Target::kWeight ? "weight" : "activation", " quantizer spec '", spec,
                   "': ", why, "; valid: ", MethodList(target)));
}

// Splits "a=1,b=2" into a map; rejects empty, malformed and repeated keys.
absl::StatusOr<std::map<std::string, std::string>> ParseKeys(absl::string_view body) {
  std::map<std::string, std::string> keys;
  if (body.empty()) return keys;
  for (absl::string_view item : absl::StrSplit(body, ',')) {
    std::pair<std::string, std::string> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    if (kv.first.empty() || kv.second.empty() || item.find('=') == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("expected key=value, got '", item, "'"));
    }
    if (!keys.emplace(kv.first, kv.second).second) {
      return absl::InvalidArgumentError(absl::StrCat("key '", kv.first, "' given twice"));
    }
  }
  return keys;
}

absl::StatusOr<QuantSpec> Parse(Target target, absl::string_view spec) {
  const size_t colon = spec.find(':');
  const absl::string_view name = spec.substr(0, colon);
  const absl::string_view body =
      colon == absl::string_view::npos ? absl::string_view() : spec.substr(colon + 1);
  const MethodInfo* info = nullptr;
  for (const MethodInfo& m : Methods(target)) {
    if (name == m.name) info = &m;
  }
  if (info == nullptr) return SpecError(target, spec, absl::StrCat("unknown method '", name, "'"));
  if (colon != absl::string_view::npos && body.empty()) {
    return SpecError(target, spec, "empty key list after ':'");
  }
  absl::StatusOr<std::map<std::string, std::string>> keys = ParseKeys(body);
  if (!keys.ok()) return SpecError(target, spec, keys.status().message());
  QuantSpec out;
  out.method = info->method;
  out.bits = info->min_bits == info->max_bits ? info->min_bits : 0;
  for (const auto& [key, value] : *keys) {
    bool allowed = false;
    for (const std::string& k : info->keys) allowed |= (k == key);
    if (!allowed) {
      return SpecError(
          target, spec,
          absl::StrCat("unknown key '", key, "' for ", info->name, " (valid keys: ",
                       info->keys.empty() ? "none" : absl::StrJoin(info->keys, ", "), ")"));
    }
    if (key == "bits") {
      int bits = 0;
      if (!absl::SimpleAtoi(value, &bits) || bits < info->min_bits || bits > info->max_bits) {
        return SpecError(target, spec,
                         absl::StrCat("bits must be an integer in [", info->min_bits, ", ",
                                      info->max_bits, "] for ", info->name, ", got '", value, "'"));
      }
      out.bits = bits;
    } else if (key == "levels") {
      int levels = 0;
      if (!absl::SimpleAtoi(value, &levels) ||
          (levels != 3 && levels != 5 && levels != 7 && levels != 9)) {
        return SpecError(
            target, spec,
            absl::StrCat("levels must be 3, 5, 7 or 9 for ", info->name, ", got '", value, "'"));
      }
      out.pow2_levels = levels;
      out.bits = Pow2WeightQuantizer::StorageBits(levels);
    } else {
      float v = 0.0f;
      if (!absl::SimpleAtof(value, &v) || !std::isfinite(v)) {
        return SpecError(target, spec, absl::StrCat(key, " must be a number, got '", value, "'"));
      }
      if (key == "alpha") {
        if (v <= 0.0f) return SpecError(target, spec, "alpha must be > 0");
        out.pact_alpha = v;
      } else if (key == "l2") {
        if (v < 0.0f) return SpecError(target, spec, "l2 must be >= 0");
        out.pact_l2 = v;
      } else if (key == "gamma") {
        if (v <= 0.0f) return SpecError(target, spec, "gamma must be > 0");
        out.qil_gamma = v;
      }
    }
  }
  if (out.method == Method::kPow2 && out.pow2_levels == 0) {
    return SpecError(target, spec, "pow2 needs levels=L (L in 3, 5, 7, 9)");
  }
  if (out.bits == 0) {
    return SpecError(target, spec,
                     absl::StrCat(info->name, " needs bits=K (K in [", info->min_bits, ", ",
                                  info->max_bits, "])"));
  }
  return out;
}

}  // namespace

const char* MethodName(Method method) {
  switch (method) {
    case Method::kNone:
      return "none";
    case Method::kDorefa:
      return "dorefa";
    case Method::kPact:
      return "pact";
    case Method::kSawb:
      return "sawb";
    case Method::kQil:
      return "qil";
    case Method::kBinary:
      return "binary";
    case Method::kTernary:
      return "ternary";
    case Method::kPow2:
      return "pow2";
  }
  return "unknown";
}

std::string QuantSpec::ToString() const {
  switch (method) {
    case Method::kNone:
      return "none";
    case Method::kBinary:
      return "binary";
    case Method::kTernary:
      return "ternary";
    case Method::kPow2:
      return absl::StrCat("pow2:levels=", pow2_levels);
    case Method::kPact:
      return absl::StrCat("pact:bits=", bits, ",alpha=", pact_alpha, ",l2=", pact_l2);
    case Method::kQil:
      return qil_gamma == 1.0f ? absl::StrCat("qil:bits=", bits)
                               : absl::StrCat("qil:bits=", bits, ",gamma=", qil_gamma);
    default:
      return absl::StrCat(MethodName(method), ":bits=", bits);
  }
}

absl::StatusOr<QuantSpec> ParseWeightQuantSpec(absl::string_view spec) {
  return Parse(Target::kWeight, spec);
}

absl::StatusOr<QuantSpec> ParseActivationQuantSpec(absl::string_view spec) {
  return Parse(Target::kActivation, spec);
}

absl::StatusOr<LayerQuantSpecs> ParseQuantSpec(absl::string_view spec) {
  auto error = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("quant spec '", spec, "': ", why,
                                                   "; valid: none | dorefa:w=K,a=K | qil:w=K,a=K"));
  };
  if (spec == "none" || spec == "fp32") return LayerQuantSpecs{};
  const size_t colon = spec.find(':');
  if (colon == absl::string_view::npos) return error("expected method:w=K,a=K");
  const absl::string_view name = spec.substr(0, colon);
  if (name != "dorefa" && name != "qil") {
    return error(absl::StrCat("unknown method '", name, "'"));
  }
  absl::StatusOr<std::map<std::string, std::string>> keys = ParseKeys(spec.substr(colon + 1));
  if (!keys.ok()) return error(keys.status().message());
  for (const auto& [key, value] : *keys) {
    if (key != "w" && key != "a")
      return error(absl::StrCat("unknown key '", key, "' (valid keys: w, a)"));
  }
  if (keys->count("w") == 0 || keys->count("a") == 0) return error("needs both w=K and a=K");
  LayerQuantSpecs out;
  absl::StatusOr<QuantSpec> w = ParseWeightQuantSpec(absl::StrCat(name, ":bits=", keys->at("w")));
  if (!w.ok()) return error(w.status().message());
  absl::StatusOr<QuantSpec> a =
      ParseActivationQuantSpec(absl::StrCat(name, ":bits=", keys->at("a")));
  if (!a.ok()) return error(a.status().message());
  out.weight = *w;
  out.activation = *a;
  return out;
}

absl::StatusOr<std::unique_ptr<WeightQuantizer>> MakeWeightQuantizer(const QuantSpec& spec) {
  auto bad_bits = [&](int lo, int hi) -> absl::Status {
    if (spec.bits >= lo && spec.bits <= hi) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        MethodName(spec.method), " weights need bits in [", lo, ", ", hi, "], got ", spec.bits));
  };
  switch (spec.method) {
    case Method::kNone:
      return std::unique_ptr<WeightQuantizer>();
    case Method::kDorefa:
      if (absl::Status s = bad_bits(1, 8); !s.ok()) return s;
      return std::unique_ptr<WeightQuantizer>(new DorefaWeightQuantizer(spec.bits));
    case Method::kSawb:
      if (absl::Status s = bad_bits(1, 8); !s.ok()) return s;
      return std::unique_ptr<WeightQuantizer>(new SawbWeightQuantizer(spec.bits));
    case Method::kQil:
      if (absl::Status s = bad_bits(2, 8); !s.ok()) return s;
      if (!(spec.qil_gamma > 0.0f)) return absl::InvalidArgumentError("qil gamma must be > 0");
      return std::unique_ptr<WeightQuantizer>(
          new QilWeightQuantizer(QilOptions{.bits = spec.bits, .gamma_init = spec.qil_gamma}));
    case Method::kBinary:
      return std::unique_ptr<WeightQuantizer>(new BinaryWeightQuantizer());
    case Method::kTernary:
      return std::unique_ptr<WeightQuantizer>(new TernaryWeightQuantizer());
    case Method::kPow2:
      if (spec.pow2_levels != 3 && spec.pow2_levels != 5 && spec.pow2_levels != 7 &&
          spec.pow2_levels != 9) {
        return absl::InvalidArgumentError(
            absl::StrCat("pow2 weights need levels 3, 5, 7 or 9, got ", spec.pow2_levels));
      }
      return std::unique_ptr<WeightQuantizer>(new Pow2WeightQuantizer(spec.pow2_levels));
    case Method::kPact:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("'", MethodName(spec.method), "' does not quantize weights"));
}

absl::StatusOr<std::unique_ptr<ActivationQuantizer>> MakeActivationQuantizer(
    std::string name, const QuantSpec& spec) {
  const bool bits_ok = spec.bits >= 1 && spec.bits <= 8;
  switch (spec.method) {
    case Method::kNone:
      return std::unique_ptr<ActivationQuantizer>();
    case Method::kDorefa:
      if (!bits_ok) break;
      return std::unique_ptr<ActivationQuantizer>(
          new DorefaActivationQuantizer(std::move(name), spec.bits));
    case Method::kPact:
      if (!bits_ok) break;
      if (!(spec.pact_alpha > 0.0f) || !(spec.pact_l2 >= 0.0f)) {
        return absl::InvalidArgumentError("pact needs alpha > 0 and l2 >= 0");
      }
      return std::unique_ptr<ActivationQuantizer>(new PactActivationQuantizer(
          std::move(name),
          PactOptions{.bits = spec.bits, .alpha_init = spec.pact_alpha, .l2 = spec.pact_l2}));
    case Method::kQil:
      if (!bits_ok) break;
      return std::unique_ptr<ActivationQuantizer>(
          new QilActivationQuantizer(std::move(name), QilOptions{.bits = spec.bits}));
    case Method::kSawb:
    case Method::kBinary:
    case Method::kTernary:
    case Method::kPow2:
      return absl::InvalidArgumentError(
          absl::StrCat("'", MethodName(spec.method), "' does not quantize activations"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(MethodName(spec.method), " activations need bits in [1, 8], got ", spec.bits));
}

}  // namespace qtrain::quant
