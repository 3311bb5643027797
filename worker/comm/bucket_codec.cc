#include "worker/comm/bucket_codec.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"

namespace qtrain::comm {

namespace {

uint64_t SplitMix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

uint64_t RankSeed(uint64_t seed, int rank) {
  return SplitMix64(seed ^ SplitMix64(static_cast<uint64_t>(rank) + 1));
}

BucketCodec::BucketCodec(std::unique_ptr<compression::Codec> codec, compression::FeedbackMode mode)
    : feedback_(std::move(codec), mode) {
  if (feedback_.codec().id() == compression::CodecId::kTernGrad) {
    terngrad_ = dynamic_cast<const compression::TernGradCodec*>(&feedback_.codec());
  }
}

absl::StatusOr<std::unique_ptr<BucketCodec>> BucketCodec::Create(
    std::string_view spec, FeedbackChoice feedback, const compression::CodecOptions& options) {
  compression::CodecRegistry registry;
  RETURN_IF_ERROR(compression::RegisterBuiltinCodecs(&registry));
  ASSIGN_OR_RETURN(pb::CodecConfig config, registry.ParseSpec(spec));
  ASSIGN_OR_RETURN(std::unique_ptr<compression::Codec> codec, registry.Create(config, options));
  bool on = compression::ErrorFeedbackEnabled(config, *codec);
  if (feedback == FeedbackChoice::kOn) on = true;
  if (feedback == FeedbackChoice::kOff) on = false;
  auto bucket_codec = std::unique_ptr<BucketCodec>(new BucketCodec(
      std::move(codec), on ? compression::FeedbackMode::kOn : compression::FeedbackMode::kOff));
  if (bucket_codec->codec().id() == compression::CodecId::kTernGrad &&
      bucket_codec->terngrad_ == nullptr) {
    return absl::InternalError("codec id terngrad is not a TernGradCodec");
  }
  return bucket_codec;
}

bool BucketCodec::fixed_size() const {
  const int64_t probe_shape[] = {4096};
  return codec().PayloadBytes(probe_shape, 4096) >= 0;
}

std::string BucketCodec::Describe() const {
  return absl::StrCat(codec().Spec(), " (error feedback ", feedback_on() ? "on" : "off", ")");
}

absl::StatusOr<std::span<float>> BucketCodec::MutableResidual(std::string_view key, size_t n) {
  std::span<const float> residual = feedback_.Residual(key);
  if (residual.empty() && n > 0) {
    feedback_.SetResidual(key, std::vector<float>(n, 0.0f));
    residual = feedback_.Residual(key);
  }
  if (residual.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", std::string(key), "' has ", n,
                                                   " elements but its residual has ",
                                                   residual.size()));
  }
  // ErrorFeedback offers only const access; the vector behind the span is its own non-const
  // member, and this object is its sole user (TernGrad's shared-scale steps need to write it).
  return std::span<float>(const_cast<float*>(residual.data()), residual.size());
}

absl::StatusOr<float> BucketCodec::Prepare(std::string_view key, std::span<const float> grad) {
  if (key.empty()) return absl::InvalidArgumentError("empty bucket key");
  if (terngrad_ == nullptr) return 0.0f;
  if (!feedback_on()) {
    const float scale = terngrad_->LocalScale(grad);
    if (!std::isfinite(scale)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", std::string(key), "' holds a non-finite value"));
    }
    return scale;
  }
  ASSIGN_OR_RETURN(std::span<float> residual, MutableResidual(key, grad.size()));
  return terngrad_->PrepareFeedback(grad, residual);
}

absl::Status BucketCodec::Encode(std::string_view key, std::span<const float> grad, float scale,
                                 compression::Rng& rng, compression::EncodedTensor* out) {
  if (key.empty()) return absl::InvalidArgumentError("empty bucket key");
  if (terngrad_ == nullptr) return feedback_.Encode(key, grad, {}, rng, out);
  if (!feedback_on()) return terngrad_->EncodeWithScale(grad, {}, scale, rng, out);
  ASSIGN_OR_RETURN(std::span<float> residual, MutableResidual(key, grad.size()));
  return terngrad_->EncodePreparedWithScale(residual, {}, scale, rng, out);
}

absl::Status BucketCodec::SetResidual(std::string_view key, std::span<const float> values) {
  if (!feedback_on()) {
    return absl::FailedPreconditionError(absl::StrCat("cannot set residual '", std::string(key),
                                                      "': error feedback is off for ",
                                                      codec().Spec()));
  }
  feedback_.SetResidual(key, values);
  return absl::OkStatus();
}

}  // namespace qtrain::comm
