// Error feedback around any codec: one residual per tensor key.
//
//   v = gradient + residual[key];  payload = encode(v);  residual[key] = v - decode(payload)
//
// so what a codec drops in one step is sent in later steps (Seide et al. 2014; Karimireddy et
// al. 2019). With feedback off, Encode is the codec's plain Encode and no residual is kept.
//
// Thread-safety: not thread-safe (residuals mutate); one ErrorFeedback per communication
// thread. Memory: one float per element of every key seen.
#ifndef QTRAIN_COMPRESSION_ERROR_FEEDBACK_H_
#define QTRAIN_COMPRESSION_ERROR_FEEDBACK_H_

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "compression/codec.h"

namespace qtrain::compression {

enum class FeedbackMode { kOff, kOn };

class ErrorFeedback {
 public:
  ErrorFeedback(std::unique_ptr<Codec> codec, FeedbackMode mode)
      : codec_(std::move(codec)), mode_(mode) {}

  // Encodes gradient `grad` of tensor `key`. The first call for a key creates a zero residual;
  // later calls must pass the same number of elements (INVALID_ARGUMENT otherwise).
  absl::Status Encode(std::string_view key, std::span<const float> grad,
                      std::span<const int64_t> shape, Rng& rng, EncodedTensor* out);

  // The residual of `key`, empty if none (feedback off or key never encoded).
  std::span<const float> Residual(std::string_view key) const;
  // Replaces the residual of `key` (checkpoint restore).
  void SetResidual(std::string_view key, std::span<const float> values);
  // Keys with a residual, sorted (for checkpoints).
  std::vector<std::string> Keys() const;
  void Clear() { residuals_.clear(); }

  const Codec& codec() const { return *codec_; }
  FeedbackMode mode() const { return mode_; }

 private:
  std::unique_ptr<Codec> codec_;
  FeedbackMode mode_;
  absl::flat_hash_map<std::string, std::vector<float>> residuals_;
};

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_ERROR_FEEDBACK_H_
