// TernGrad: ternary gradients with a per-tensor scale.
//
// Paper: W. Wen, C. Xu, F. Yan, C. Wu, Y. Wang, Y. Chen, H. Li, "TernGrad: Ternary Gradients to
// Reduce Communication in Distributed Deep Learning", NeurIPS 2017.
//
// Math, per tensor v of n elements:
//   S1 = sum v_i, S2 = sum v_i^2 (in double, in the canonical 8-accumulator order: element i goes
//   to accumulator i % 8, each accumulator adds in increasing i, combined as
//   ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)); v_i^2 is exact in double);
//   mean = S1/n, var = max(S2/n - mean^2, 0), sigma = sqrt(var)   (population stddev);
//   if c > 0: v_c = clamp(v, -c*sigma, c*sigma), else v_c = v     (c*sigma: double -> float);
//   s = max|v_c| = min(max|v|, c*sigma)                              (s = max|v| when c = 0);
//   inv = 1.0f / s (0 when s == 0);  p_i = |v_c_i| * inv;
//   b_i = StreamUniform(key, i) < p_i   (key = rng.NextStream(), one per encode call);
//   decoded_i = sign(v_i) * s * b_i, so E[decoded_i] = v_c_i (unbiased for the clipped value).
// Because |v_c_i| = min(|v_i|, s), the local scale alone fixes the clipping.
// With clipping on, a constant tensor has sigma = 0 and so s = 0: it encodes as all zeros (error
// feedback carries it in the residual).
//
// Payload (format_version 1), little-endian: ceil(n/4) bytes; element i is the 2-bit code at
// bits [2*(i%4), 2*(i%4)+1] of byte i/4:
//   00 = 0, 01 = +1, 10 = -1, 11 = invalid (the decoder rejects it).
// The unused high bits of the last byte (n % 4 != 0) are zero; the decoder rejects anything else.
// EncodedTensor::scales = [s] (finite, >= 0, sign bit clear); EncodedTensor::params is empty.
// Size: 2 + 32/n bits per element (2.0000013 at n = 25.6M).
// Decoded value of element i: +s, -s or 0.
//
// Shared-scale mode (shared=1): the workers of one allreduce agree on one scale (the maximum of
// their LocalScale()s), so their ternary payloads sum as integers (AccumulateTernary) and the
// mean is scale * counts / N. Each worker still clips with its own sigma;
// p_i = min(|v_c_i| / scale, 1) (computed as |v_c_i| * (1.0f / scale)). Plain Encode and
// EncodeWithFeedback then return FAILED_PRECONDITION: use EncodeWithScale, or PrepareFeedback
// followed by EncodePreparedWithScale for error feedback.
//
// Spec keys ("terngrad:clip=2.5,shared=0" is the default):
//   clip   = c, float: 0 disables clipping, else finite and > 0. Default 2.5.
//   shared = 0|1: shared-scale mode. Default 0.
//   ef     = 0|1: error feedback (off by default for this codec).
//
// Non-finite input: every encoder returns INVALID_ARGUMENT (max|v| is not finite) and leaves
// `out` and the residual unchanged, except PrepareFeedback, which has already added input into
// the residual when it finds the non-finite sum. A denormal scale whose reciprocal overflows
// sends every non-zero element at full scale.
//
// Cost: encoders make two passes over the input (statistics, then ternarize); DecodeAdd makes one
// pass over out after validating the payload. The AVX2 path (chosen unless KernelPath::kReference
// or no AVX2) and the scalar reference give bit-identical payloads, scales, residuals and sums.
// Thread-safety: immutable; every method is const.
#ifndef QTRAIN_COMPRESSION_TERNGRAD_H_
#define QTRAIN_COMPRESSION_TERNGRAD_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/codec.h"
#include "compression/codec_registry.h"
#include "compression/rng.h"
#include "proto/config.pb.h"

namespace qtrain::compression {

class TernGradCodec final : public Codec {
 public:
  static constexpr uint32_t kFormatVersion = 1;
  static constexpr float kDefaultClipSigma = 2.5f;

  // Validates `config` (clip_sigma finite and >= 0). A TernGradConfig left unset means the
  // defaults. The config's error-feedback override, if any, is kept for Spec() and Config().
  static absl::StatusOr<std::unique_ptr<TernGradCodec>> Create(const pb::CodecConfig& config,
                                                               const CodecOptions& options = {});

  CodecId id() const override { return CodecId::kTernGrad; }
  std::string Spec() const override;
  pb::CodecConfig Config() const override;
  bool DefaultErrorFeedback() const override { return false; }

  // FAILED_PRECONDITION in shared-scale mode.
  absl::Status Encode(std::span<const float> input, std::span<const int64_t> shape, Rng& rng,
                      EncodedTensor* out) const override;
  // Two fused passes: statistics of input + residual (nothing written, so a non-finite sum
  // leaves the residual usable), then ternarize while writing the payload and
  // residual = (input + residual) - decoded. FAILED_PRECONDITION in shared-scale mode.
  absl::Status EncodeWithFeedback(std::span<const float> input, std::span<float> residual,
                                  std::span<const int64_t> shape, Rng& rng,
                                  EncodedTensor* out) const override;
  absl::Status DecodeAdd(const EncodedTensor& in, std::span<float> out) const override;
  // ceil(n / 4).
  int64_t PayloadBytes(std::span<const int64_t> shape, uint64_t n) const override;

  // The local scale s of `v` (0 for an empty v; non-finite if v holds a non-finite value).
  float LocalScale(std::span<const float> v) const;
  // Encodes with a caller-supplied scale (finite, >= 0; INVALID_ARGUMENT otherwise). Clipping
  // uses v's own sigma. Works in either mode.
  absl::Status EncodeWithScale(std::span<const float> v, std::span<const int64_t> shape,
                               float scale, Rng& rng, EncodedTensor* out) const;
  // Error feedback with a shared scale, step 1: residual += input (one pass); returns the local
  // scale of the sum, to be max-reduced across workers. INVALID_ARGUMENT for a size mismatch or a
  // non-finite sum (the residual then already holds the sum).
  absl::StatusOr<float> PrepareFeedback(std::span<const float> input,
                                        std::span<float> residual) const;
  // Step 2: encodes v = residual with `scale` and leaves residual = v - decoded. Two passes (the
  // local sigma for clipping, then ternarize). On error the residual is unchanged.
  absl::Status EncodePreparedWithScale(std::span<float> residual, std::span<const int64_t> shape,
                                       float scale, Rng& rng, EncodedTensor* out) const;
  // Validates `in` as DecodeAdd does and adds each element's ternary value (-1, 0, +1) into
  // counts (counts.size() must equal in.num_elements; fewer than 2^31 payloads per count). On
  // error counts are unchanged.
  absl::Status AccumulateTernary(const EncodedTensor& in, std::span<int32_t> counts) const;

  float clip_sigma() const { return clip_sigma_; }
  bool shared_scale() const { return shared_scale_; }
  bool uses_fast_path() const { return fast_; }

 private:
  TernGradCodec(float clip_sigma, bool shared_scale, std::optional<bool> error_feedback, bool fast)
      : clip_sigma_(clip_sigma),
        shared_scale_(shared_scale),
        error_feedback_(error_feedback),
        fast_(fast) {}

  // Validates `in` against a destination of out_size elements; on success *scale is the scale.
  absl::Status ValidatePayload(const EncodedTensor& in, size_t out_size, float* scale) const;
  // The local scale from the statistics of a pass; INVALID_ARGUMENT if it is not finite.
  absl::StatusOr<float> ScaleFromStats(double sum, double sum_squares, uint32_t max_abs_bits,
                                       size_t n) const;

  float clip_sigma_;
  bool shared_scale_;
  std::optional<bool> error_feedback_;
  bool fast_;
};

// Registry entry for "terngrad" (keys: clip, shared).
CodecRegistration TernGradRegistration();

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_TERNGRAD_H_
