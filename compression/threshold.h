// threshold: threshold quantization with error feedback (N. Strom, "Scalable distributed DNN
// training using commodity GPU cloud computing", Interspeech 2015).
//
// Math. With v = gradient + residual (v = gradient when error feedback is off), every element
// with |v_i| > tau (strictly) is sent as +tau or -tau (the sign of v_i); all others are sent as 0.
// Error feedback is part of the method (on by default): the residual keeps v - sent, so an
// element accumulates until it crosses the threshold. For a constant gradient g with |g_i| <= tau
// the residual stays within [-tau, tau] and the mean of the decoded steps converges to g.
//
// EncodedTensor, format_version 1 (little-endian):
//   scales:  [tau] (finite, > 0; the decoder uses this value, not its own setting).
//   params:  [E], the number of entries sent (E <= num_elements).
//   payload: E unsigned LEB128 varints (compression/varint.h), one per entry in increasing
//            index order: code = (gap << 1) | sign, where gap = index - previous_index - 1
//            (previous_index starts at -1) and sign = 1 for -tau, 0 for +tau. Nothing follows.
//            A code takes 1 byte for gaps < 64, 2 for < 8192, 3 for < 2^20, 4 for < 2^27 and
//            5 bytes above (possible only in tensors over 2^27 elements): the worst case is
//            5 bytes per entry for tensors of up to 2^31 - 1 elements. Varints are canonical
//            (no redundant zero groups) and at most 5 bytes.
// PayloadBytes is -1 (the size depends on the data).
//
// Spec: "threshold:tau=T" (T a finite float > 0, default 0.001), plus the registry's "ef" key.
// Config: ThresholdConfig{tau}; settings left unset mean the default, tau <= 0 or not finite is
// INVALID_ARGUMENT.
//
// Non-finite values: Encode and EncodeWithFeedback return INVALID_ARGUMENT naming the first
// element whose v is NaN or Inf (it could be neither sent nor kept meaningfully). On that error
// `out` is unspecified and the residual partially updated; the caller should reset it.
//
// Decoding validates the whole payload first (varint form, indices < num_elements, entry count
// equal to params[0], no trailing bytes) and then adds +-tau at each index, so `out` is untouched
// on any error.
//
// Cost: the encoder reads gradient and residual once and writes the residual once; the payload
// buffer grows geometrically (and is reused across calls). DecodeAdd parses the payload twice
// and touches only the entries' elements of `out`.
// Thread-safety: immutable after construction (see Codec).
#ifndef QTRAIN_COMPRESSION_THRESHOLD_H_
#define QTRAIN_COMPRESSION_THRESHOLD_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/codec.h"
#include "compression/codec_registry.h"
#include "proto/config.pb.h"

namespace qtrain::compression {

class ThresholdCodec final : public Codec {
 public:
  static constexpr uint32_t kFormatVersion = 1;
  static constexpr float kDefaultTau = 0.001f;

  // Validates `config` (codec id, settings kind, tau finite and > 0); INVALID_ARGUMENT names
  // the bad setting. Unset settings mean the defaults.
  static absl::StatusOr<std::unique_ptr<ThresholdCodec>> Create(const pb::CodecConfig& config,
                                                                const CodecOptions& options);

  CodecId id() const override { return CodecId::kThreshold; }
  std::string Spec() const override;
  pb::CodecConfig Config() const override { return config_; }
  bool DefaultErrorFeedback() const override { return true; }

  absl::Status Encode(std::span<const float> input, std::span<const int64_t> shape, Rng& rng,
                      EncodedTensor* out) const override;
  absl::Status EncodeWithFeedback(std::span<const float> input, std::span<float> residual,
                                  std::span<const int64_t> shape, Rng& rng,
                                  EncodedTensor* out) const override;
  absl::Status DecodeAdd(const EncodedTensor& in, std::span<float> out) const override;
  int64_t PayloadBytes(std::span<const int64_t> shape, uint64_t n) const override { return -1; }

  float tau() const { return tau_; }

 private:
  ThresholdCodec(pb::CodecConfig config, bool fast);

  // Shared by Encode (residual empty) and EncodeWithFeedback.
  absl::Status EncodeImpl(std::span<const float> input, std::span<float> residual,
                          std::span<const int64_t> shape, EncodedTensor* out) const;

  pb::CodecConfig config_;  // normalized: settings always set
  float tau_;
  bool fast_;  // AVX2 path
};

CodecRegistration ThresholdRegistration();

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_THRESHOLD_H_
