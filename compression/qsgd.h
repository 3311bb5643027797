// QSGD: stochastic quantization of gradient buckets to s levels of the bucket's 2-norm.
//
// Paper: D. Alistarh, D. Grubic, J. Li, R. Tomioka, M. Vojnovic, "QSGD: Communication-Efficient
// SGD via Gradient Quantization and Encoding", NeurIPS 2017.
//
// Math. The tensor v of n elements is split into buckets of d consecutive elements (the last may
// be shorter; there are ceil(n / d) of them). For a bucket B:
//   norm = sqrtf(sum_{i in B} v_i^2)   (float; the sum in the canonical order: the element at
//          offset j of the bucket goes to accumulator j % 8, each accumulator adds in increasing j,
//          the eight are combined as ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)))
//   scale = float(s) / norm            (0 when norm == 0: the bucket encodes all zeros)
//   r_i = |v_i| * scale,  l_i = min(floorf(r_i + U_i), s),  U_i = StreamUniform(key, i)
//   sign_i = 1 if v_i < 0 and l_i > 0, else 0
//   unit = norm / float(s),  decoded_i = (sign_i ? -1 : 1) * (float(l_i) * unit)
// where i is the element's index in the tensor and key = rng.NextStream() (one per Encode call).
// Without the clamp to s, E[l_i] = r_i, so E[decoded_i] = v_i (unbiased), and per element
// Var = unit^2 p(1-p) <= unit^2 / 4, p = frac(r_i); E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s)
// ||v||^2 per bucket (Lemma 3.1 of the paper).
//
// EncodedTensor (format_version 1):
//   scales = the ceil(n / d) bucket norms, in bucket order (finite, >= 0, sign bit clear).
//   params = [s, d]; the decoder requires both to equal its own settings.
// Payload, little-endian bit stream: bit k is bit (k % 8) of byte k / 8; fields LSB first.
//
//   coding=dense: element i is the b-bit code at bits [i*b, i*b + b), b = 1 + ceil(log2(s + 1)):
//     the level l_i in the low b - 1 bits, then the sign bit (1 = negative). Exactly
//     ceil(n * b / 8) bytes; the padding bits of the last byte are zero. Invalid (rejected by the
//     decoder): l > s, sign 1 with l == 0 ("negative zero"), a nonzero code in a bucket whose norm
//     is 0, nonzero padding. s=16 gives b = 6: 6 + 32/d bits per element (6.0625 at d = 512).
//
//   coding=elias (the paper's sparse encoding, Section 3.2): for each bucket in order,
//     gamma(m + 1)                      m = the bucket's count of nonzero levels (0 <= m <= len)
//     then for each nonzero level in index order:
//       gamma(gap + 1)                  gap = zero levels since the previous nonzero of the same
//                                       bucket (or since the bucket's start)
//       sign bit                        1 = negative
//       gamma(l)                        1 <= l <= s
//   gamma() is the Elias gamma code of compression/bit_stream.h (N zeros, a one, the N low bits of
//   the value LSB first). After the last bucket the stream is padded with zero bits to a whole
//   byte and ends: the payload is exactly ceil(bits / 8) bytes. Invalid (rejected): a gamma code
//   with more than 32 leading zeros or running past the payload, m > bucket length, m > 0 in a
//   bucket whose norm is 0, a position at or past the bucket's end, l > s, bytes or nonzero bits
//   after the padding. Size depends on the data (PayloadBytes returns -1).
//
// Spec keys ("qsgd:levels=16,bucket=512,coding=dense" is the default):
//   levels = s, integer in [1, 32767], default 16.
//   bucket = d, integer in [1, 2^24], default 512.
//   coding = dense | elias, default dense.
//   ef     = 0 | 1: error feedback (off by default for this codec).
//
// Non-finite input: a bucket holding NaN or +-Inf, or values so large that the sum of squares
// overflows float (|v| around 1.8e19 and up), has a non-finite norm; Encode then returns
// INVALID_ARGUMENT naming the bucket, and `out` is unspecified. EncodeWithFeedback likewise; its
// residual then holds the new residual for the buckets before the failing one and is unchanged
// from that bucket on. Tiny values whose squares underflow quantize with the norm that float
// computes (a bucket whose squares all underflow encodes all zeros); the clamp to s keeps the
// level valid, and error feedback keeps what was lost.
//
// Decoding adds decoded_i into out[i] only where l_i != 0 (elements with level 0 are untouched,
// so a -0.0 in `out` stays -0.0), identically for both codings.
//
// Cost: encoders read each bucket twice, for its norm and then to quantize and pack (the fast path
// accumulates bucket k + 1's norm while it quantizes bucket k, so with d up to a few thousand the
// second read hits L1). The Elias encoder quantizes a bucket of up to 2048 elements once into a
// 10 KB stack buffer to count its nonzeros before writing them (longer buckets are quantized
// twice). DecodeAdd validates the whole payload in one pass, then decodes in another (Elias: two
// parses of the bit stream). No allocation beyond out's buffers. The fast path (AVX2) and the
// scalar reference produce bit-identical payloads, residuals and decoded sums.
// Thread-safety: immutable after Create; every method is const.
#ifndef QTRAIN_COMPRESSION_QSGD_H_
#define QTRAIN_COMPRESSION_QSGD_H_

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

class QsgdCodec final : public Codec {
 public:
  static constexpr uint32_t kFormatVersion = 1;
  static constexpr uint32_t kDefaultLevels = 16;
  static constexpr uint32_t kMaxLevels = 32767;
  static constexpr uint32_t kDefaultBucket = 512;
  static constexpr uint32_t kMaxBucket = uint32_t{1} << 24;

  enum class Coding { kDense, kElias };

  // Validates `config` (levels in [1, kMaxLevels], bucket in [1, kMaxBucket], a known coding):
  // INVALID_ARGUMENT naming the bad setting. Unset settings mean the defaults. The config's
  // error-feedback override, if any, is kept for Spec() and Config().
  static absl::StatusOr<std::unique_ptr<QsgdCodec>> Create(const pb::CodecConfig& config,
                                                           const CodecOptions& options = {});

  CodecId id() const override { return CodecId::kQsgd; }
  std::string Spec() const override;
  pb::CodecConfig Config() const override;
  bool DefaultErrorFeedback() const override { return false; }

  absl::Status Encode(std::span<const float> input, std::span<const int64_t> shape, Rng& rng,
                      EncodedTensor* out) const override;
  // Fused: per bucket, one pass for the norm of input + residual (nothing written), then one that
  // quantizes, packs and writes residual = (input + residual) - decoded.
  absl::Status EncodeWithFeedback(std::span<const float> input, std::span<float> residual,
                                  std::span<const int64_t> shape, Rng& rng,
                                  EncodedTensor* out) const override;
  absl::Status DecodeAdd(const EncodedTensor& in, std::span<float> out) const override;
  // Dense: ceil(n * b / 8). Elias: -1.
  int64_t PayloadBytes(std::span<const int64_t> shape, uint64_t n) const override;

  uint32_t levels() const { return levels_; }
  uint32_t bucket() const { return bucket_; }
  Coding coding() const { return coding_; }
  // b = 1 + ceil(log2(s + 1)): bits per element of the dense coding.
  int code_bits() const { return bits_; }
  bool uses_fast_path() const { return fast_; }

 private:
  QsgdCodec(uint32_t levels, uint32_t bucket, Coding coding, std::optional<bool> error_feedback,
            bool fast);

  template <bool kFeedback>
  absl::Status EncodeImpl(std::span<const float> input, std::span<float> residual, uint32_t key,
                          EncodedTensor* out) const;
  // Checks params, scales and (dense) the payload length; on success the payload may be scanned.
  absl::Status ValidateHeader(const EncodedTensor& in) const;

  // For the AVX2 unpacker: for each start bit offset (0..7) within a 16-byte window, the byte
  // shuffle that brings lane j's code into 32-bit lane j, and the right shift that aligns it.
  alignas(32) uint8_t unpack_shuffle_[8][32];
  alignas(32) uint32_t unpack_shift_[8][8];
  uint32_t levels_;
  uint32_t bucket_;
  Coding coding_;
  std::optional<bool> error_feedback_;
  bool fast_;
  int bits_;
};

// Registry entry for "qsgd" (keys: levels, bucket, coding).
CodecRegistration QsgdRegistration();

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_QSGD_H_
