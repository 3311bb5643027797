// fp32: the uncompressed baseline codec (identity).
//
// Payload layout, format_version 1: num_elements IEEE-754 binary32 values, little-endian,
// 4 * n bytes. No scales, no params. Spec: "fp32" (no keys). Error feedback is pointless
// (the residual stays zero) and off by default.
//
// Cost: Encode is a memcpy; DecodeAdd is one streaming add.
#ifndef QTRAIN_COMPRESSION_FP32_H_
#define QTRAIN_COMPRESSION_FP32_H_

#include "compression/codec.h"
#include "compression/codec_registry.h"

namespace qtrain::compression {

class Fp32Codec final : public Codec {
 public:
  static constexpr uint32_t kFormatVersion = 1;
  explicit Fp32Codec(const CodecOptions& options);

  CodecId id() const override { return CodecId::kFp32; }
  std::string Spec() const override { return "fp32"; }
  pb::CodecConfig Config() const override;
  absl::Status Encode(std::span<const float> input, std::span<const int64_t> shape, Rng& rng,
                      EncodedTensor* out) const override;
  absl::Status EncodeWithFeedback(std::span<const float> input, std::span<float> residual,
                                  std::span<const int64_t> shape, Rng& rng,
                                  EncodedTensor* out) const override;
  absl::Status DecodeAdd(const EncodedTensor& in, std::span<float> out) const override;
  int64_t PayloadBytes(std::span<const int64_t> shape, uint64_t n) const override {
    return static_cast<int64_t>(4 * n);
  }

 private:
  bool fast_;
};

CodecRegistration Fp32Registration();

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_FP32_H_
