#include "compression/fp32.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "compression/simd_add.h"

namespace qtrain::compression {

Fp32Codec::Fp32Codec(const CodecOptions& options)
    : fast_(options.path == KernelPath::kAuto && CpuHasAvx2()) {}

pb::CodecConfig Fp32Codec::Config() const {
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_FP32);
  config.mutable_fp32();
  return config;
}

absl::Status Fp32Codec::Encode(std::span<const float> input, std::span<const int64_t> shape,
                               Rng& rng, EncodedTensor* out) const {
  RETURN_IF_ERROR(ValidateInput(input, shape));
  StartEnvelope(kFormatVersion, input, shape, out);
  out->payload.resize(input.size() * sizeof(float));
  if (!input.empty()) std::memcpy(out->payload.data(), input.data(), out->payload.size());
  return absl::OkStatus();
}

absl::Status Fp32Codec::EncodeWithFeedback(std::span<const float> input,
                                           std::span<float> residual,
                                           std::span<const int64_t> shape, Rng& rng,
                                           EncodedTensor* out) const {
  if (residual.size() != input.size()) {
    return absl::InvalidArgumentError(absl::StrCat("fp32: residual has ", residual.size(),
                                                   " elements, input has ", input.size()));
  }
  RETURN_IF_ERROR(ValidateInput(input, shape));
  StartEnvelope(kFormatVersion, input, shape, out);
  out->payload.resize(input.size() * sizeof(float));
  float* dst = reinterpret_cast<float*>(out->payload.data());
  // v = input + residual is sent exactly; the new residual is zero.
  for (size_t i = 0; i < input.size(); ++i) {
    dst[i] = input[i] + residual[i];
    residual[i] = 0.0f;
  }
  return absl::OkStatus();
}

absl::Status Fp32Codec::DecodeAdd(const EncodedTensor& in, std::span<float> out) const {
  RETURN_IF_ERROR(ValidateEnvelope(in, kFormatVersion, out.size()));
  if (in.payload.size() != 4 * in.num_elements || !in.scales.empty() || !in.params.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fp32 payload is ", in.payload.size(), " bytes with ", in.scales.size(), " scales and ",
        in.params.size(), " params, expected ", 4 * in.num_elements, " bytes and none"));
  }
  AddLittleEndianFloats(in.payload.data(), out, fast_);
  return absl::OkStatus();
}

CodecRegistration Fp32Registration() {
  CodecRegistration r;
  r.name = "fp32";
  r.id = CodecId::kFp32;
  r.parse = [](const SpecArgs&, pb::CodecConfig* config) {
    config->mutable_fp32();
    return absl::OkStatus();
  };
  r.create = [](const pb::CodecConfig&, const CodecOptions& options)
      -> absl::StatusOr<std::unique_ptr<Codec>> { return std::make_unique<Fp32Codec>(options); };
  return r;
}

}  // namespace qtrain::compression
