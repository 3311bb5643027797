#include "worker/comm/local_communicator.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/timer.h"

namespace qtrain::comm {

absl::StatusOr<std::unique_ptr<LocalCommunicator>> LocalCommunicator::Create(
    const LocalOptions& options) {
  if (options.fp32_warmup_steps < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("fp32_warmup_steps must be >= 0; got ", options.fp32_warmup_steps));
  }
  std::unique_ptr<BucketCodec> codec;
  if (!options.codec_spec.empty()) {
    ASSIGN_OR_RETURN(codec, BucketCodec::Create(options.codec_spec, options.error_feedback));
    if (codec->passthrough()) codec.reset();
  }
  return std::unique_ptr<LocalCommunicator>(new LocalCommunicator(std::move(codec), options));
}

std::string LocalCommunicator::Describe() const {
  return absl::StrCat(
      "local: 1 process, codec ",
      codec_ == nullptr ? std::string("none (fp32)") : codec_->Describe(),
      codec_ != nullptr && fp32_warmup_steps_ > 0
          ? absl::StrCat(" after ", fp32_warmup_steps_, " uncompressed warm-up steps")
          : std::string());
}

absl::Status LocalCommunicator::AllReduceMean(std::string_view key, std::span<float> data,
                                              StepStats* stats) {
  if (key.empty()) return absl::InvalidArgumentError("AllReduceMean: empty bucket key");
  StepStats local;
  local.calls = 1;
  if (codec_ != nullptr && !data.empty() && step_ >= fp32_warmup_steps_) {
    Timer timer;
    ASSIGN_OR_RETURN(float scale, codec_->Prepare(key, data));
    RETURN_IF_ERROR(codec_->Encode(key, data, scale, rng_, &encoded_));
    local.encode_seconds = timer.Seconds();
    timer.Reset();
    std::fill(data.begin(), data.end(), 0.0f);
    absl::Status decoded = codec_->codec().DecodeAdd(encoded_, data);
    if (!decoded.ok()) {
      return absl::InternalError(
          absl::StrCat("bucket '", std::string(key), "' (step ", step_,
                       "): own payload does not decode: ", std::string(decoded.message())));
    }
    local.decode_seconds = timer.Seconds();
  }
  if (stats != nullptr) *stats += local;
  return absl::OkStatus();
}

absl::Status LocalCommunicator::Broadcast(std::span<float> data, int root) {
  if (root != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Broadcast: root ", root, " is not a rank of a world of size 1"));
  }
  return absl::OkStatus();
}

std::vector<std::string> LocalCommunicator::ResidualKeys() const {
  if (codec_ == nullptr) return {};
  return codec_->ResidualKeys();
}

std::span<const float> LocalCommunicator::Residual(std::string_view key) const {
  if (codec_ == nullptr) return {};
  return codec_->Residual(key);
}

absl::Status LocalCommunicator::SetResidual(std::string_view key, std::span<const float> values) {
  if (codec_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("cannot set residual '", std::string(key),
                                                      "': no codec (error feedback is off)"));
  }
  return codec_->SetResidual(key, values);
}

}  // namespace qtrain::comm
