// fp16: IEEE-754 binary16 baseline codec.
//
// Encoding rounds each float to the nearest binary16 (ties to even). Magnitudes beyond the
// largest finite half (65504), infinities included, saturate to +-65504 so a large gradient
// stays finite; NaN stays NaN (quiet, with the top mantissa bits kept); values below 2^-24 / 2
// round to signed zero; subnormal halves are used.
//
// Payload layout, format_version 1: num_elements binary16 values, little-endian, 2 * n bytes.
// No scales, no params. Spec: "fp16" (no keys); error feedback optional (ef=1).
//
// Cost: one pass each way (F16C on the fast path; the scalar reference gives identical bits).
#ifndef QTRAIN_COMPRESSION_FP16_H_
#define QTRAIN_COMPRESSION_FP16_H_

#include <cstdint>

#include "compression/codec.h"
#include "compression/codec_registry.h"

namespace qtrain::compression {

// Scalar reference conversions (the fast path matches them bit for bit).
uint16_t FloatToHalf(float value);  // round to nearest even, saturating as described above
float HalfToFloat(uint16_t half);   // exact

class Fp16Codec final : public Codec {
 public:
  static constexpr uint32_t kFormatVersion = 1;
  explicit Fp16Codec(const CodecOptions& options);

  CodecId id() const override { return CodecId::kFp16; }
  std::string Spec() const override { return "fp16"; }
  pb::CodecConfig Config() const override;
  absl::Status Encode(std::span<const float> input, std::span<const int64_t> shape, Rng& rng,
                      EncodedTensor* out) const override;
  absl::Status EncodeWithFeedback(std::span<const float> input, std::span<float> residual,
                                  std::span<const int64_t> shape, Rng& rng,
                                  EncodedTensor* out) const override;
  absl::Status DecodeAdd(const EncodedTensor& in, std::span<float> out) const override;
  int64_t PayloadBytes(std::span<const int64_t> shape, uint64_t n) const override {
    return static_cast<int64_t>(2 * n);
  }

 private:
  bool fast_;
};

CodecRegistration Fp16Registration();

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_FP16_H_
