// The codec side of a compressing communicator: a codec built from a spec string
// (compression/codec_registry.h), its error feedback (one residual per key), and TernGrad's
// shared-scale steps. Shared by LocalCommunicator and MpiCommunicator so that a one-process run
// sees exactly the compression a multi-process run sees.
//
// Encoding one tensor is two steps so that adapters can agree on a TernGrad scale in between:
//   scale = Prepare(key, grad)   TernGrad: the local scale of v = grad (+ residual). With error
//                                feedback on, the residual already holds v afterwards.
//                                Other codecs: returns 0 and does nothing.
//   Encode(key, grad, scale)     TernGrad: ternarize v with `scale` (the maximum of all ranks'
//                                Prepare results, or the local one); residual = v - decoded.
//                                Other codecs: ErrorFeedback::Encode (scale ignored).
// TernGrad is always encoded with an explicit scale here (EncodeWithScale /
// EncodePreparedWithScale), so both "terngrad" and "terngrad:shared=1" work.
//
// Thread-safety: not thread-safe (residuals mutate). Memory: one float per residual element.
#ifndef QTRAIN_WORKER_COMM_BUCKET_CODEC_H_
#define QTRAIN_WORKER_COMM_BUCKET_CODEC_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/codec.h"
#include "compression/error_feedback.h"
#include "compression/rng.h"
#include "compression/terngrad.h"

namespace qtrain::comm {

// Error feedback: as the spec says (its `ef` key, else the codec's default), or forced.
enum class FeedbackChoice { kFromSpec, kOn, kOff };

// The seed of rank `rank`'s Rng for a run seed (splitmix64 of both): ranks draw independent
// streams. Tests use it to reproduce a rank's payloads.
uint64_t RankSeed(uint64_t seed, int rank);

class BucketCodec {
 public:
  // INVALID_ARGUMENT for a bad spec (the registry's message lists the valid names and keys).
  static absl::StatusOr<std::unique_ptr<BucketCodec>> Create(
      std::string_view spec, FeedbackChoice feedback,
      const compression::CodecOptions& options = {});

  // fp32: nothing to encode; adapters sum raw floats (residuals stay empty).
  bool passthrough() const { return codec().id() == compression::CodecId::kFp32; }
  // TernGrad: ranks must agree on the scale returned by Prepare (maximum across ranks).
  bool shares_scale() const { return terngrad_ != nullptr; }
  bool feedback_on() const { return feedback_.mode() == compression::FeedbackMode::kOn; }
  const compression::Codec& codec() const { return feedback_.codec(); }
  // Non-null for TernGrad.
  const compression::TernGradCodec* terngrad() const { return terngrad_; }
  // Payload sizes are the same on every rank for a given element count (not threshold, not
  // qsgd with Elias coding).
  bool fixed_size() const;
  // "onebit:bucket=0 (error feedback on)".
  std::string Describe() const;

  // See the file comment. INVALID_ARGUMENT for an empty key, a size that differs from the
  // key's residual, or non-finite values.
  absl::StatusOr<float> Prepare(std::string_view key, std::span<const float> grad);
  absl::Status Encode(std::string_view key, std::span<const float> grad, float scale,
                      compression::Rng& rng, compression::EncodedTensor* out);

  std::vector<std::string> ResidualKeys() const { return feedback_.Keys(); }
  std::span<const float> Residual(std::string_view key) const { return feedback_.Residual(key); }
  // FAILED_PRECONDITION when feedback is off.
  absl::Status SetResidual(std::string_view key, std::span<const float> values);

 private:
  BucketCodec(std::unique_ptr<compression::Codec> codec, compression::FeedbackMode mode);
  // The residual of `key` with n elements (created as zeros); INVALID_ARGUMENT on a size change.
  absl::StatusOr<std::span<float>> MutableResidual(std::string_view key, size_t n);

  compression::ErrorFeedback feedback_;
  const compression::TernGradCodec* terngrad_ = nullptr;  // points into feedback_'s codec
};

}  // namespace qtrain::comm

#endif  // QTRAIN_WORKER_COMM_BUCKET_CODEC_H_
