#include "compression/codec_registry.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"

namespace qtrain::compression {
namespace {

constexpr char kErrorFeedbackKey[] = "ef";

}  // namespace

absl::StatusOr<uint32_t> SpecArgs::GetUint(std::string_view key, uint32_t default_value,
                                           uint32_t min, uint32_t max) const {
  auto it = values_.find(key);
  if (it == values_.end()) return default_value;
  uint64_t v = 0;
  if (!absl::SimpleAtoi(it->second, &v) || v < min || v > max) {
    return absl::InvalidArgumentError(absl::StrCat(codec_, ": ", std::string(key), "=", it->second,
                                                   " is not an integer in [", min, ", ", max, "]"));
  }
  return static_cast<uint32_t>(v);
}

absl::StatusOr<float> SpecArgs::GetFloat(std::string_view key, float default_value, float min,
                                         float max) const {
  auto it = values_.find(key);
  if (it == values_.end()) return default_value;
  float v = 0;
  if (!absl::SimpleAtof(it->second, &v) || !std::isfinite(v) || v < min || v > max) {
    return absl::InvalidArgumentError(absl::StrCat(codec_, ": ", std::string(key), "=", it->second,
                                                   " is not a finite number in [", min, ", ", max,
                                                   "]"));
  }
  return v;
}

absl::StatusOr<bool> SpecArgs::GetBool(std::string_view key, bool default_value) const {
  auto it = values_.find(key);
  if (it == values_.end()) return default_value;
  bool v = false;
  if (!absl::SimpleAtob(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat(codec_, ": ", std::string(key), "=", it->second, " is not a boolean (0, 1, true, false)"));
  }
  return v;
}

absl::StatusOr<int> SpecArgs::GetChoice(std::string_view key, int default_index,
                                        const std::vector<std::string>& choices) const {
  auto it = values_.find(key);
  if (it == values_.end()) return default_index;
  for (size_t i = 0; i < choices.size(); ++i) {
    if (choices[i] == it->second) return static_cast<int>(i);
  }
  return absl::InvalidArgumentError(absl::StrCat(codec_, ": ", std::string(key), "=", it->second,
                                                 " is not one of: ", absl::StrJoin(choices, ", ")));
}

absl::Status CodecRegistry::Register(CodecRegistration registration) {
  if (!registration.parse || !registration.create) {
    return absl::InvalidArgumentError(
        absl::StrCat("codec '", registration.name, "' registered without parse/create"));
  }
  if (FindByName(registration.name) != nullptr || FindById(registration.id) != nullptr) {
    return absl::AlreadyExistsError(
        absl::StrCat("codec '", registration.name, "' (or its id) is already registered"));
  }
  entries_.push_back(std::move(registration));
  return absl::OkStatus();
}

const CodecRegistration* CodecRegistry::FindByName(std::string_view name) const {
  for (const auto& e : entries_) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

const CodecRegistration* CodecRegistry::FindById(CodecId id) const {
  for (const auto& e : entries_) {
    if (e.id == id) return &e;
  }
  return nullptr;
}

std::vector<std::string> CodecRegistry::Names() const {
  std::vector<std::string> names;
  for (const auto& e : entries_) names.push_back(e.name);
  return names;
}

absl::StatusOr<pb::CodecConfig> CodecRegistry::ParseSpec(std::string_view spec_in) const {
  // Debian's Abseil has its own string_view type; work in it throughout.
  const absl::string_view spec(spec_in.data(), spec_in.size());
  absl::string_view name = spec;
  absl::string_view rest;
  if (size_t colon = spec.find(':'); colon != absl::string_view::npos) {
    name = spec.substr(0, colon);
    rest = spec.substr(colon + 1);
  }
  name = absl::StripAsciiWhitespace(name);
  const CodecRegistration* entry = FindByName(std::string_view(name.data(), name.size()));
  if (entry == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown codec '", name, "' in spec '", spec,
                                                   "'; valid codecs: ",
                                                   absl::StrJoin(Names(), ", ")));
  }
  std::map<std::string, std::string, std::less<>> values;
  if (!rest.empty()) {
    for (absl::string_view item : absl::StrSplit(rest, ',')) {
      std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
      std::string key(absl::StripAsciiWhitespace(kv.first));
      std::string value(absl::StripAsciiWhitespace(kv.second));
      if (key.empty() || value.empty() || item.find('=') == absl::string_view::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("codec spec '", spec, "': expected KEY=VALUE, got '", item, "'"));
      }
      bool known = key == kErrorFeedbackKey;
      for (const auto& k : entry->keys) known = known || k == key;
      if (!known) {
        std::vector<std::string> valid = entry->keys;
        valid.push_back(kErrorFeedbackKey);
        return absl::InvalidArgumentError(absl::StrCat("codec '", entry->name, "' has no key '",
                                                       key, "'; valid keys: ",
                                                       absl::StrJoin(valid, ", ")));
      }
      if (!values.emplace(key, value).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("codec spec '", spec, "' sets '", key, "' twice"));
      }
    }
  }
  SpecArgs args(entry->name, std::move(values));
  pb::CodecConfig config;
  config.set_codec(static_cast<pb::CodecId>(entry->id));
  if (args.Has(kErrorFeedbackKey)) {
    ASSIGN_OR_RETURN(bool ef, args.GetBool(kErrorFeedbackKey, false));
    config.set_error_feedback(ef);
  }
  RETURN_IF_ERROR(entry->parse(args, &config));
  return config;
}

absl::StatusOr<std::unique_ptr<Codec>> CodecRegistry::Create(const pb::CodecConfig& config,
                                                            const CodecOptions& options) const {
  const CodecRegistration* entry = FindById(static_cast<CodecId>(config.codec()));
  if (entry == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("codec config names unknown codec id ",
                                                   static_cast<int>(config.codec()),
                                                   "; valid codecs: ", absl::StrJoin(Names(), ", ")));
  }
  return entry->create(config, options);
}

absl::StatusOr<std::unique_ptr<Codec>> CodecRegistry::CreateFromSpec(
    std::string_view spec, const CodecOptions& options) const {
  ASSIGN_OR_RETURN(pb::CodecConfig config, ParseSpec(spec));
  return Create(config, options);
}

bool ErrorFeedbackEnabled(const pb::CodecConfig& config, const Codec& codec) {
  if (config.has_error_feedback()) return config.error_feedback();
  return codec.DefaultErrorFeedback();
}

}  // namespace qtrain::compression
