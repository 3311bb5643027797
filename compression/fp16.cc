#include "compression/fp16.h"

#include <immintrin.h>

#include <bit>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace qtrain::compression {
namespace {

constexpr float kMaxHalf = 65504.0f;

// Saturation that lets NaN through: comparisons with NaN are false.
inline float Saturate(float x) {
  if (x > kMaxHalf) return kMaxHalf;
  if (x < -kMaxHalf) return -kMaxHalf;
  return x;
}

inline void StoreHalf(uint8_t* dst, uint16_t h) {
  dst[0] = static_cast<uint8_t>(h);
  dst[1] = static_cast<uint8_t>(h >> 8);
}
inline uint16_t LoadHalf(const uint8_t* src) {
  return static_cast<uint16_t>(src[0] | (src[1] << 8));
}

// Encodes v[i] (+ residual[i] when residual != nullptr, which then receives the rounding error).
void EncodeScalar(const float* input, float* residual, uint8_t* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float v = residual ? input[i] + residual[i] : input[i];
    uint16_t h = FloatToHalf(v);
    StoreHalf(dst + 2 * i, h);
    if (residual) residual[i] = v - HalfToFloat(h);
  }
}

__attribute__((target("avx2,f16c"))) void EncodeAvx2(const float* input, float* residual,
                                                      uint8_t* dst, size_t n) {
  const __m256 hi = _mm256_set1_ps(kMaxHalf);
  const __m256 lo = _mm256_set1_ps(-kMaxHalf);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(input + i);
    if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual + i));
    // min/max return the second operand when either is NaN: put v second to keep NaN.
    __m256 s = _mm256_max_ps(lo, _mm256_min_ps(hi, v));
    __m128i h = _mm256_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), h);
    if (residual) _mm256_storeu_ps(residual + i, _mm256_sub_ps(v, _mm256_cvtph_ps(h)));
  }
  EncodeScalar(input + i, residual ? residual + i : nullptr, dst + 2 * i, n - i);
}

void DecodeAddScalar(const uint8_t* src, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] += HalfToFloat(LoadHalf(src + 2 * i));
}

__attribute__((target("avx2,f16c"))) void DecodeAddAvx2(const uint8_t* src, float* out,
                                                         size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_cvtph_ps(h)));
  }
  DecodeAddScalar(src + 2 * i, out + i, n - i);
}

}  // namespace

uint16_t FloatToHalf(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(Saturate(value));
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) {  // NaN: quiet it, keep the top mantissa bits
    return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  }
  if (ax < 0x38800000u) {
    // Below the smallest normal half (2^-14): add 0.5f, whose ulp is 2^-24 (the half
    // subnormal step), so the FPU rounds to nearest even; the low bits are the half.
    float r = std::bit_cast<float>(ax) + 0.5f;
    return static_cast<uint16_t>(sign | (std::bit_cast<uint32_t>(r) - 0x3f000000u));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
  // Saturation above keeps the result finite (65504 = 0x7bff).
  const uint32_t odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + odd;
  return static_cast<uint16_t>(sign | (ax >> 13));
}

float HalfToFloat(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0) {
    float r = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -r : r;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

Fp16Codec::Fp16Codec(const CodecOptions& options)
    : fast_(options.path == KernelPath::kAuto && CpuHasAvx2()) {}

pb::CodecConfig Fp16Codec::Config() const {
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_FP16);
  config.mutable_fp16();
  return config;
}

absl::Status Fp16Codec::Encode(std::span<const float> input, std::span<const int64_t> shape,
                               Rng& rng, EncodedTensor* out) const {
  RETURN_IF_ERROR(ValidateInput(input, shape));
  StartEnvelope(kFormatVersion, input, shape, out);
  out->payload.resize(2 * input.size());
  (fast_ ? EncodeAvx2 : EncodeScalar)(input.data(), nullptr, out->payload.data(), input.size());
  return absl::OkStatus();
}

absl::Status Fp16Codec::EncodeWithFeedback(std::span<const float> input,
                                           std::span<float> residual,
                                           std::span<const int64_t> shape, Rng& rng,
                                           EncodedTensor* out) const {
  if (residual.size() != input.size()) {
    return absl::InvalidArgumentError(absl::StrCat("fp16: residual has ", residual.size(),
                                                   " elements, input has ", input.size()));
  }
  RETURN_IF_ERROR(ValidateInput(input, shape));
  StartEnvelope(kFormatVersion, input, shape, out);
  out->payload.resize(2 * input.size());
  (fast_ ? EncodeAvx2 : EncodeScalar)(input.data(), residual.data(), out->payload.data(),
                                      input.size());
  return absl::OkStatus();
}

absl::Status Fp16Codec::DecodeAdd(const EncodedTensor& in, std::span<float> out) const {
  RETURN_IF_ERROR(ValidateEnvelope(in, kFormatVersion, out.size()));
  if (in.payload.size() != 2 * in.num_elements || !in.scales.empty() || !in.params.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fp16 payload is ", in.payload.size(), " bytes with ", in.scales.size(), " scales and ",
        in.params.size(), " params, expected ", 2 * in.num_elements, " bytes and none"));
  }
  (fast_ ? DecodeAddAvx2 : DecodeAddScalar)(in.payload.data(), out.data(), out.size());
  return absl::OkStatus();
}

CodecRegistration Fp16Registration() {
  CodecRegistration r;
  r.name = "fp16";
  r.id = CodecId::kFp16;
  r.parse = [](const SpecArgs&, pb::CodecConfig* config) {
    config->mutable_fp16();
    return absl::OkStatus();
  };
  r.create = [](const pb::CodecConfig&, const CodecOptions& options)
      -> absl::StatusOr<std::unique_ptr<Codec>> { return std::make_unique<Fp16Codec>(options); };
  return r;
}

}  // namespace qtrain::compression
