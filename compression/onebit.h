// onebit: 1-bit SGD with error feedback (F. Seide, H. Fu, J. Droppo, G. Li, D. Yu, "1-Bit
// Stochastic Gradient Descent and its Application to Data-Parallel Distributed Training of
// Speech DNNs", Interspeech 2014).
//
// Math. The tensor is split into columns (the partition rule is below). Within a column C each
// element v_i is sent as one bit, its sign with threshold 0: b_i = 1 if v_i >= 0 (-0.0 included),
// b_i = 0 if v_i < 0. The column carries two reconstruction values,
//   mean_pos = sum{v_i : b_i = 1} / #{b_i = 1},   mean_neg = sum{v_i : b_i = 0} / #{b_i = 0},
// with the mean of an empty class defined as 0, and decodes element i to mean_pos or mean_neg.
// This is the least-squares fit of v by a function of b, so it preserves each column's sum
// (to rounding) and never increases the norm: |v - decode|^2 = |v|^2 - |decode|^2 and
// |decode|^2 >= |v|^2 / len. Error feedback is part of the method (on by default): the
// quantization error v - decode is kept and added to the next step's gradient.
//
// Column partition (the decoder reads the length from params, so any valid length decodes):
//   - spec key bucket=N (1 <= N <= 2^24): fixed buckets of N elements;
//   - otherwise, for a shape of rank >= 2 whose column length prod(shape[1:]) is >= 256: columns
//     of that length (one output unit's weights in row-major [out, ...] layout);
//   - otherwise (1-D or empty shape, or columns shorter than 256): fixed buckets of 2048.
// The last bucket may be shorter. A column of length L covers elements [c*L, min((c+1)*L, n)).
//
// Sums are taken in the canonical order shared by the scalar reference and the AVX2 path: the
// element at offset j of its column goes to accumulator j % 8 (one for the non-negative class,
// one for the negative class), each accumulator adds in increasing j, and the eight combine as
// ((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7)). A mean is float(double(sum) / double(count)).
//
// EncodedTensor, format_version 1 (little-endian):
//   payload: ceil(n/8) bytes; element i is bit (i % 8) of byte i / 8 (LSB first); the unused high
//            bits of the last byte are 0 (a decoder rejects anything else).
//   scales:  2 floats per column, in column order: [mean_neg_0, mean_pos_0, mean_neg_1, ...];
//            all finite.
//   params:  [L], the column length used, clamped to the tensor: L = min(rule length, max(n, 1)),
//            so each partition has one encoding. A decoder requires 1 <= L <= max(n, 1) and
//            scales.size() == 2 * ceil(n / L).
// Size: n/8 bytes + 8 bytes per column: 1 + 64/2048 = 1.03 bits per element for 1-D tensors.
//
// Spec: "onebit" or "onebit:bucket=N" (N in [1, 16777216]; absent means the rule above), plus the
// registry's "ef" key. Config: OneBitConfig{bucket} (0 = the rule above).
//
// Non-finite values: a NaN counts as negative and an Inf in its own class, so its column's mean
// is not finite; Encode and EncodeWithFeedback then return INVALID_ARGUMENT naming the column
// (as they do when a column's sum overflows float). On that error `out` is unspecified and the
// residual is partially updated (earlier columns hold their new residual, the failing column holds
// input + old residual, later columns are untouched); the caller should reset it.
//
// Cost: Encode reads the input once. EncodeWithFeedback reads gradient and residual once and
// writes the residual once, plus a second pass over each column while it is cache resident
// (L1 for 2048-element buckets; the AVX2 path runs it inside the next column's first pass).
// DecodeAdd is one streaming read-add-write of `out`.
// Thread-safety: immutable after construction (see Codec).
#ifndef QTRAIN_COMPRESSION_ONEBIT_H_
#define QTRAIN_COMPRESSION_ONEBIT_H_

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

class OneBitCodec final : public Codec {
 public:
  static constexpr uint32_t kFormatVersion = 1;
  // Bucket length for 1-D tensors and for tensors whose columns are short.
  static constexpr uint32_t kDefaultBucket = 2048;
  // Columns shorter than this use kDefaultBucket instead.
  static constexpr uint64_t kMinColumnLength = 256;
  static constexpr uint32_t kMaxBucket = uint32_t{1} << 24;

  // Validates `config` (codec id, settings kind, bucket range); INVALID_ARGUMENT names the bad
  // setting. Unset settings mean the defaults.
  static absl::StatusOr<std::unique_ptr<OneBitCodec>> Create(const pb::CodecConfig& config,
                                                             const CodecOptions& options);

  CodecId id() const override { return CodecId::kOneBit; }
  std::string Spec() const override;
  pb::CodecConfig Config() const override { return config_; }
  bool DefaultErrorFeedback() const override { return true; }

  absl::Status Encode(std::span<const float> input, std::span<const int64_t> shape, Rng& rng,
                      EncodedTensor* out) const override;
  absl::Status EncodeWithFeedback(std::span<const float> input, std::span<float> residual,
                                  std::span<const int64_t> shape, Rng& rng,
                                  EncodedTensor* out) const override;
  absl::Status DecodeAdd(const EncodedTensor& in, std::span<float> out) const override;
  int64_t PayloadBytes(std::span<const int64_t> shape, uint64_t n) const override {
    return static_cast<int64_t>((n + 7) / 8);
  }

  // The column length the partition rule above gives for `shape` (before clamping to n).
  uint32_t ColumnLength(std::span<const int64_t> shape) const;

 private:
  OneBitCodec(pb::CodecConfig config, bool fast);

  // Shared by Encode (residual empty) and EncodeWithFeedback.
  absl::Status EncodeImpl(std::span<const float> input, std::span<float> residual,
                          std::span<const int64_t> shape, EncodedTensor* out) const;

  pb::CodecConfig config_;  // normalized: settings always set
  uint32_t bucket_;         // 0: the column rule
  bool fast_;               // AVX2 path
};

CodecRegistration OneBitRegistration();

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_ONEBIT_H_
