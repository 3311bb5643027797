// Maps spec strings such as "qsgd:levels=16,bucket=512,coding=elias" to CodecConfig messages and
// CodecConfig messages to Codec objects. Filled by one explicit RegisterBuiltinCodecs() call
// (compression/builtin_codecs.h), never by static initializers.
//
// Spec grammar: NAME[:KEY=VALUE[,KEY=VALUE]...]. Every codec accepts the key `ef` (0 or 1) to
// force error feedback off or on; other keys are the codec's own and listed in its header.
// Unknown names or keys give INVALID_ARGUMENT listing the valid ones.
//
// Thread-safety: Register is not thread-safe; after registration, every const method is.
#ifndef QTRAIN_COMPRESSION_CODEC_REGISTRY_H_
#define QTRAIN_COMPRESSION_CODEC_REGISTRY_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/codec.h"
#include "proto/config.pb.h"

namespace qtrain::compression {

// The KEY=VALUE arguments of one spec, with typed, range-checked getters. Every error names the
// codec, the key and the accepted range.
class SpecArgs {
 public:
  SpecArgs(std::string codec, std::map<std::string, std::string, std::less<>> values)
      : codec_(std::move(codec)), values_(std::move(values)) {}

  bool Has(std::string_view key) const { return values_.find(key) != values_.end(); }
  absl::StatusOr<uint32_t> GetUint(std::string_view key, uint32_t default_value, uint32_t min,
                                   uint32_t max) const;
  absl::StatusOr<float> GetFloat(std::string_view key, float default_value, float min,
                                 float max) const;
  absl::StatusOr<bool> GetBool(std::string_view key, bool default_value) const;
  // Returns the index of the value within `choices`.
  absl::StatusOr<int> GetChoice(std::string_view key, int default_index,
                                const std::vector<std::string>& choices) const;

 private:
  std::string codec_;
  std::map<std::string, std::string, std::less<>> values_;
};

struct CodecRegistration {
  std::string name;                // spec name, e.g. "qsgd"
  CodecId id;
  std::vector<std::string> keys;   // the codec's own spec keys (besides "ef")
  // Fills config->settings from the spec's arguments (config->codec is already set).
  std::function<absl::Status(const SpecArgs& args, pb::CodecConfig* config)> parse;
  // Builds the codec, validating every setting (configs also arrive from the wire).
  std::function<absl::StatusOr<std::unique_ptr<Codec>>(const pb::CodecConfig& config,
                                                       const CodecOptions& options)>
      create;
};

class CodecRegistry {
 public:
  // ALREADY_EXISTS if the name or id is taken; INVALID_ARGUMENT if a function is missing.
  absl::Status Register(CodecRegistration registration);

  absl::StatusOr<pb::CodecConfig> ParseSpec(std::string_view spec) const;
  absl::StatusOr<std::unique_ptr<Codec>> Create(const pb::CodecConfig& config,
                                                const CodecOptions& options = {}) const;
  absl::StatusOr<std::unique_ptr<Codec>> CreateFromSpec(std::string_view spec,
                                                        const CodecOptions& options = {}) const;

  // Registered names in registration order.
  std::vector<std::string> Names() const;

 private:
  const CodecRegistration* FindByName(std::string_view name) const;
  const CodecRegistration* FindById(CodecId id) const;
  std::vector<CodecRegistration> entries_;
};

// Whether error feedback applies: the config's explicit `ef` if set, else the codec's default.
bool ErrorFeedbackEnabled(const pb::CodecConfig& config, const Codec& codec);

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_CODEC_REGISTRY_H_
