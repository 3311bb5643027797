#include "compression/terngrad.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace qtrain::compression {
namespace {

constexpr char kName[] = "terngrad";
constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kSignMask = 0x80000000u;
// Bit pattern of +infinity: |v| bits at or above it mean inf or NaN.
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr uint64_t kEvenBits = 0x5555555555555555ull;

// ---- Shared scalar helpers (both paths use them, so they agree bit for bit) ------------------

inline uint32_t AbsBits(float v) { return std::bit_cast<uint32_t>(v) & kAbsMask; }

// The canonical combination of 8 partial sums.
inline double Combine8(const double a[8]) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

inline uint64_t PayloadSize(uint64_t n) { return (n + 3) / 4; }

// 1/scale, or 0 for scale 0 (then every p is 0 and every code is 00).
inline float InverseScale(float scale) { return scale == 0.0f ? 0.0f : 1.0f / scale; }

std::string FloatToString(float v) {
  char buf[32];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);  // shortest round-trip form
  return std::string(buf, ec == std::errc() ? end : buf);
}

// Sums of one statistics pass.
struct Stats {
  double sum = 0.0;
  double sum_squares = 0.0;
  uint32_t max_abs_bits = 0;  // max |v| as bits; >= kInfBits when some v is inf or NaN
};

// Where a pass reads v from.
//   kOne:      v = x[i].
//   kSum:      v = x[i] + y[i].
//   kSumWrite: v = x[i] + y[i], stored into y[i] (statistics pass only).
enum class Source { kOne, kSum, kSumWrite };

// What the ternarize pass does besides writing the payload.
struct TernarizeArgs {
  float clip_at;  // |v_c| = min(|v|, clip_at): the local scale s
  float inv;      // 1 / (scale sent), or 0
  float scale;    // the scale sent (sign bit clear)
  uint32_t key;   // RNG stream key
};

// ---- Reference (scalar) kernels --------------------------------------------------------------

template <Source kSource, bool kSums>
Stats StatsReference(const float* x, float* y, size_t n) {
  double s1[8] = {};
  double s2[8] = {};
  uint32_t max_bits = 0;
  for (size_t i = 0; i < n; ++i) {
    float v = x[i];
    if constexpr (kSource != Source::kOne) v = x[i] + y[i];
    if constexpr (kSource == Source::kSumWrite) y[i] = v;
    max_bits = std::max(max_bits, AbsBits(v));
    if constexpr (kSums) {
      const double d = v;
      s1[i % 8] += d;
      s2[i % 8] += d * d;
    }
  }
  return Stats{Combine8(s1), Combine8(s2), max_bits};
}

// Ternarizes elements [begin, end), begin % 4 == 0, writing payload bytes begin/4 .. and, when
// residual != nullptr, residual[i] = v - decoded. With kSum, v = x[i] + y[i] (y may alias
// residual); else v = x[i] (x may alias residual).
template <bool kSum>
void TernarizeReference(const float* x, const float* y, float* residual, size_t begin, size_t end,
                        const TernarizeArgs& args, uint8_t* payload) {
  const uint32_t scale_bits = std::bit_cast<uint32_t>(args.scale);
  uint32_t byte = 0;
  for (size_t i = begin; i < end; ++i) {
    float v = x[i];
    if constexpr (kSum) v = x[i] + y[i];
    const uint32_t bits = std::bit_cast<uint32_t>(v);
    const float mag = std::bit_cast<float>(bits & kAbsMask);
    const float a = mag < args.clip_at ? mag : args.clip_at;
    const float p = a * args.inv;
    const bool send = StreamUniform(args.key, static_cast<uint32_t>(i)) < p;
    const uint32_t negative = bits >> 31;
    const uint32_t code = send ? 1u + negative : 0u;
    byte |= code << (2 * (i % 4));
    if (residual != nullptr) {
      const float decoded = send ? std::bit_cast<float>(scale_bits | (negative << 31)) : 0.0f;
      residual[i] = v - decoded;
    }
    if (i % 4 == 3 || i + 1 == end) {
      payload[i / 4] = static_cast<uint8_t>(byte);
      byte = 0;
    }
  }
}

// Index of the first payload byte holding code 11, or -1. Word-wide test: a 2-bit field is 11
// iff its low bit and the bit above are set; (w >> 1) moves each high bit onto its low bit.
int64_t FindInvalidCodeReference(const uint8_t* payload, size_t bytes) {
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t w;
    std::memcpy(&w, payload + i, 8);
    if ((w & (w >> 1) & kEvenBits) != 0) break;
  }
  for (; i < bytes; ++i) {
    const uint32_t b = payload[i];
    if ((b & (b >> 1) & 0x55u) != 0) return static_cast<int64_t>(i);
  }
  return -1;
}

// Decoded value of element i (codes already validated: never 11). Code 00 adds +0.0f, as the
// AVX2 path does.
inline float DecodeOne(const uint8_t* payload, size_t i, float scale) {
  const uint32_t code = (payload[i / 4] >> (2 * (i % 4))) & 3u;
  return code == 1u ? scale : (code == 2u ? -scale : 0.0f);
}

void DecodeAddReference(const uint8_t* payload, size_t begin, size_t end, float scale, float* out) {
  for (size_t i = begin; i < end; ++i) out[i] += DecodeOne(payload, i, scale);
}

void AccumulateReference(const uint8_t* payload, size_t begin, size_t end, int32_t* counts) {
  for (size_t i = begin; i < end; ++i) {
    const uint32_t code = (payload[i / 4] >> (2 * (i % 4))) & 3u;
    counts[i] += code == 1u ? 1 : (code == 2u ? -1 : 0);
  }
}

// ---- AVX2 kernels ----------------------------------------------------------------------------
// Same per-element arithmetic as the reference; the sums use the canonical 8-lane order (the
// low and high halves of a ymm of floats are accumulator lanes 0-3 and 4-7).

#define QTRAIN_AVX2 __attribute__((target("avx2,fma,f16c")))

template <Source kSource, bool kSums>
QTRAIN_AVX2 Stats StatsAvx2(const float* x, float* y, size_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(kAbsMask));
  __m256d s1_lo = _mm256_setzero_pd(), s1_hi = _mm256_setzero_pd();
  __m256d s2_lo = _mm256_setzero_pd(), s2_hi = _mm256_setzero_pd();
  __m256i max_bits = _mm256_setzero_si256();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if constexpr (kSource != Source::kOne) v = _mm256_add_ps(v, _mm256_loadu_ps(y + i));
    if constexpr (kSource == Source::kSumWrite) _mm256_storeu_ps(y + i, v);
    max_bits = _mm256_max_epi32(max_bits, _mm256_and_si256(_mm256_castps_si256(v), abs_mask));
    if constexpr (kSums) {
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      s1_lo = _mm256_add_pd(s1_lo, lo);
      s1_hi = _mm256_add_pd(s1_hi, hi);
      s2_lo = _mm256_add_pd(s2_lo, _mm256_mul_pd(lo, lo));
      s2_hi = _mm256_add_pd(s2_hi, _mm256_mul_pd(hi, hi));
    }
  }
  alignas(32) double s1[8];
  alignas(32) double s2[8];
  alignas(32) uint32_t lanes[8];
  _mm256_store_pd(s1, s1_lo);
  _mm256_store_pd(s1 + 4, s1_hi);
  _mm256_store_pd(s2, s2_lo);
  _mm256_store_pd(s2 + 4, s2_hi);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), max_bits);
  uint32_t max_abs = *std::max_element(lanes, lanes + 8);
  for (; i < n; ++i) {  // i % 8 continues the lane assignment
    float v = x[i];
    if constexpr (kSource != Source::kOne) v = x[i] + y[i];
    if constexpr (kSource == Source::kSumWrite) y[i] = v;
    max_abs = std::max(max_abs, AbsBits(v));
    if constexpr (kSums) {
      const double d = v;
      s1[i % 8] += d;
      s2[i % 8] += d * d;
    }
  }
  return Stats{Combine8(s1), Combine8(s2), max_abs};
}

// lowbias32 on 8 lanes (rng.h's Mix32).
QTRAIN_AVX2 inline __m256i Mix32Avx2(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  return x;
}

// kSpread[b]: bit j of b moved to bit 2j (the low bit of element j's 2-bit code).
constexpr auto kSpread = [] {
  std::array<uint16_t, 256> table{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t w = 0;
    for (uint32_t j = 0; j < 8; ++j) w |= ((b >> j) & 1u) << (2 * j);
    table[b] = static_cast<uint16_t>(w);
  }
  return table;
}();

template <bool kSum, bool kResidual>
QTRAIN_AVX2 void TernarizeAvx2(const float* x, const float* y, float* residual, size_t n,
                               const TernarizeArgs& args, uint8_t* payload) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kAbsMask)));
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kSignMask)));
  const __m256 clip_at = _mm256_set1_ps(args.clip_at);
  const __m256 inv = _mm256_set1_ps(args.inv);
  const __m256 scale = _mm256_set1_ps(args.scale);
  const __m256 two_m24 = _mm256_set1_ps(0x1p-24f);
  // Element i hashes i * kRngGolden + key; lane l of a vector starting at i adds l * kRngGolden.
  const __m256i lane_offsets = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                  _mm256_set1_epi32(static_cast<int>(kRngGolden)));
  const __m256i step8 = _mm256_set1_epi32(static_cast<int>(8u * kRngGolden));

  __m256i hash_in = _mm256_add_epi32(lane_offsets, _mm256_set1_epi32(static_cast<int>(args.key)));
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if constexpr (kSum) v = _mm256_add_ps(v, _mm256_loadu_ps(y + i));
    const __m256 a = _mm256_min_ps(_mm256_and_ps(v, abs_mask), clip_at);
    const __m256 p = _mm256_mul_ps(a, inv);
    const __m256i h = Mix32Avx2(hash_in);
    hash_in = _mm256_add_epi32(hash_in, step8);
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), two_m24);
    const __m256 send = _mm256_cmp_ps(u, p, _CMP_LT_OQ);
    // 8 codes = 16 bits: low bit of code j set for a sent positive, high bit for a sent negative.
    const uint32_t sent = static_cast<uint32_t>(_mm256_movemask_ps(send));
    const uint32_t negative = static_cast<uint32_t>(_mm256_movemask_ps(v));
    const uint32_t codes = kSpread[sent & ~negative] | (kSpread[sent & negative] << 1);
    const uint16_t codes16 = static_cast<uint16_t>(codes);
    std::memcpy(payload + i / 4, &codes16, 2);
    if constexpr (kResidual) {
      const __m256 decoded = _mm256_and_ps(send, _mm256_or_ps(scale, _mm256_and_ps(v, sign_mask)));
      _mm256_storeu_ps(residual + i, _mm256_sub_ps(v, decoded));
    }
  }
  TernarizeReference<kSum>(x, y, residual, i, n, args, payload);
}

// Same answer as FindInvalidCodeReference; the scan is vectorized and the reference locates the
// byte once something is found.
QTRAIN_AVX2 int64_t FindInvalidCodeAvx2(const uint8_t* payload, size_t bytes) {
  const __m256i even = _mm256_set1_epi8(0x55);
  __m256i bad = _mm256_setzero_si256();
  size_t i = 0;
  for (; i + 32 <= bytes; i += 32) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(payload + i));
    bad =
        _mm256_or_si256(bad, _mm256_and_si256(_mm256_and_si256(w, _mm256_srli_epi16(w, 1)), even));
  }
  if (!_mm256_testz_si256(bad, bad)) return FindInvalidCodeReference(payload, bytes);
  const int64_t tail = FindInvalidCodeReference(payload + i, bytes - i);
  return tail < 0 ? -1 : static_cast<int64_t>(i) + tail;
}

// Codes of 8 elements from 16 payload bits: lane l gets bits [2l, 2l+1].
QTRAIN_AVX2 inline __m256i CodesOf16(uint32_t bits16, __m256i shifts, __m256i three) {
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(bits16)), shifts),
                          three);
}

QTRAIN_AVX2 void DecodeAddAvx2(const uint8_t* payload, size_t n, float scale, float* out) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i three = _mm256_set1_epi32(3);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i two = _mm256_set1_epi32(2);
  const __m256 pos = _mm256_set1_ps(scale);
  const __m256 neg = _mm256_set1_ps(-scale);
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint64_t w;
    std::memcpy(&w, payload + i / 4, 8);
    for (int j = 0; j < 4; ++j) {
      const __m256i c = CodesOf16(static_cast<uint32_t>(w >> (16 * j)) & 0xffffu, shifts, three);
      const __m256 value =
          _mm256_or_ps(_mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(c, one)), pos),
                       _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(c, two)), neg));
      float* o = out + i + 8 * j;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), value));
    }
  }
  DecodeAddReference(payload, i, n, scale, out);
}

QTRAIN_AVX2 void AccumulateAvx2(const uint8_t* payload, size_t n, int32_t* counts) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i three = _mm256_set1_epi32(3);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i two = _mm256_set1_epi32(2);
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint64_t w;
    std::memcpy(&w, payload + i / 4, 8);
    for (int j = 0; j < 4; ++j) {
      const __m256i c = CodesOf16(static_cast<uint32_t>(w >> (16 * j)) & 0xffffu, shifts, three);
      // cmpeq gives -1: (c == 2) - (c == 1) is +1 for code 01, -1 for code 10.
      const __m256i value =
          _mm256_sub_epi32(_mm256_cmpeq_epi32(c, two), _mm256_cmpeq_epi32(c, one));
      __m256i* o = reinterpret_cast<__m256i*>(counts + i + 8 * j);
      _mm256_storeu_si256(o, _mm256_add_epi32(_mm256_loadu_si256(o), value));
    }
  }
  AccumulateReference(payload, i, n, counts);
}

#undef QTRAIN_AVX2

// ---- Dispatch ----------------------------------------------------------------------------------

template <Source kSource>
Stats RunStats(bool fast, bool sums, const float* x, float* y, size_t n) {
  if (fast) {
    return sums ? StatsAvx2<kSource, true>(x, y, n) : StatsAvx2<kSource, false>(x, y, n);
  }
  return sums ? StatsReference<kSource, true>(x, y, n) : StatsReference<kSource, false>(x, y, n);
}

template <bool kSum>
void RunTernarize(bool fast, const float* x, const float* y, float* residual, size_t n,
                  const TernarizeArgs& args, uint8_t* payload) {
  if (fast && residual != nullptr) {
    TernarizeAvx2<kSum, true>(x, y, residual, n, args, payload);
  } else if (fast) {
    TernarizeAvx2<kSum, false>(x, y, nullptr, n, args, payload);
  } else {
    TernarizeReference<kSum>(x, y, residual, 0, n, args, payload);
  }
}

absl::Status CheckScale(float scale) {
  if (!std::isfinite(scale) || scale < 0.0f) {
    return absl::InvalidArgumentError(absl::StrCat(
        kName, ": shared scale ", scale, " must be finite and >= 0 (the max of the local scales)"));
  }
  return absl::OkStatus();
}

absl::Status SharedModeError(const char* method) {
  return absl::FailedPreconditionError(absl::StrCat(
      kName, " is in shared-scale mode (shared=1): ", method,
      " needs a scale agreed across workers; use EncodeWithScale (or PrepareFeedback and "
      "EncodePreparedWithScale for error feedback)"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<TernGradCodec>> TernGradCodec::Create(const pb::CodecConfig& config,
                                                                     const CodecOptions& options) {
  if (config.codec() != pb::CODEC_TERNGRAD) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": config names codec id ",
                                                   static_cast<int>(config.codec()), ", expected ",
                                                   pb::CODEC_TERNGRAD));
  }
  float clip = kDefaultClipSigma;
  bool shared = false;
  if (config.settings_case() == pb::CodecConfig::kTerngrad) {
    clip = config.terngrad().clip_sigma();
    shared = config.terngrad().shared_scale();
  } else if (config.settings_case() != pb::CodecConfig::SETTINGS_NOT_SET) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": config carries settings for another codec (settings field ",
                     static_cast<int>(config.settings_case()), ")"));
  }
  if (!std::isfinite(clip) || clip < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": clip_sigma=", clip, " must be 0 (no clipping) or finite and > 0"));
  }
  if (clip == 0.0f) clip = 0.0f;  // -0 -> +0, so Spec() round-trips
  std::optional<bool> error_feedback;
  if (config.has_error_feedback()) error_feedback = config.error_feedback();
  const bool fast = options.path != KernelPath::kReference && CpuHasAvx2();
  return std::unique_ptr<TernGradCodec>(new TernGradCodec(clip, shared, error_feedback, fast));
}

std::string TernGradCodec::Spec() const {
  std::string spec =
      absl::StrCat(kName, ":clip=", FloatToString(clip_sigma_), ",shared=", shared_scale_ ? 1 : 0);
  if (error_feedback_.has_value()) absl::StrAppend(&spec, ",ef=", *error_feedback_ ? 1 : 0);
  return spec;
}

pb::CodecConfig TernGradCodec::Config() const {
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_TERNGRAD);
  if (error_feedback_.has_value()) config.set_error_feedback(*error_feedback_);
  config.mutable_terngrad()->set_clip_sigma(clip_sigma_);
  config.mutable_terngrad()->set_shared_scale(shared_scale_);
  return config;
}

int64_t TernGradCodec::PayloadBytes(std::span<const int64_t> shape, uint64_t n) const {
  return static_cast<int64_t>(PayloadSize(n));
}

absl::StatusOr<float> TernGradCodec::ScaleFromStats(double sum, double sum_squares,
                                                    uint32_t max_abs_bits, size_t n) const {
  if (max_abs_bits >= kInfBits) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, ": input holds a non-finite value (max |v| is inf or NaN)"));
  }
  const float max_abs = std::bit_cast<float>(max_abs_bits);
  if (clip_sigma_ == 0.0f || n == 0) return max_abs;
  const double count = static_cast<double>(n);
  const double mean = sum / count;
  const double var = std::max(sum_squares / count - mean * mean, 0.0);
  const double clip_at = static_cast<double>(clip_sigma_) * std::sqrt(var);
  // min(max|v|, float(c * sigma)) without converting an out-of-range double to float.
  return clip_at < static_cast<double>(max_abs) ? static_cast<float>(clip_at) : max_abs;
}

float TernGradCodec::LocalScale(std::span<const float> v) const {
  const Stats st = RunStats<Source::kOne>(fast_, clip_sigma_ > 0.0f, v.data(), nullptr, v.size());
  if (st.max_abs_bits >= kInfBits) return std::bit_cast<float>(st.max_abs_bits);
  return *ScaleFromStats(st.sum, st.sum_squares, st.max_abs_bits, v.size());
}

absl::Status TernGradCodec::Encode(std::span<const float> input, std::span<const int64_t> shape,
                                   Rng& rng, EncodedTensor* out) const {
  if (shared_scale_) return SharedModeError("Encode");
  RETURN_IF_ERROR(ValidateInput(input, shape));
  const size_t n = input.size();
  const Stats st = RunStats<Source::kOne>(fast_, clip_sigma_ > 0.0f, input.data(), nullptr, n);
  ASSIGN_OR_RETURN(const float s, ScaleFromStats(st.sum, st.sum_squares, st.max_abs_bits, n));
  const TernarizeArgs args{s, InverseScale(s), s, rng.NextStream()};
  StartEnvelope(kFormatVersion, input, shape, out);
  out->scales.push_back(s);
  out->payload.resize(PayloadSize(n));
  RunTernarize<false>(fast_, input.data(), nullptr, nullptr, n, args, out->payload.data());
  return absl::OkStatus();
}

absl::Status TernGradCodec::EncodeWithFeedback(std::span<const float> input,
                                               std::span<float> residual,
                                               std::span<const int64_t> shape, Rng& rng,
                                               EncodedTensor* out) const {
  if (shared_scale_) return SharedModeError("EncodeWithFeedback");
  if (residual.size() != input.size()) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": residual has ", residual.size(),
                                                   " elements, input has ", input.size()));
  }
  RETURN_IF_ERROR(ValidateInput(input, shape));
  const size_t n = input.size();
  // Pass 1 reads input + residual and writes nothing, so a non-finite sum leaves the residual
  // as it was; pass 2 recomputes the same sum. Memory traffic equals writing the sum in pass 1
  // and re-reading it (4 array reads + 1 array write either way).
  const Stats st =
      RunStats<Source::kSum>(fast_, clip_sigma_ > 0.0f, input.data(), residual.data(), n);
  ASSIGN_OR_RETURN(const float s, ScaleFromStats(st.sum, st.sum_squares, st.max_abs_bits, n));
  const TernarizeArgs args{s, InverseScale(s), s, rng.NextStream()};
  StartEnvelope(kFormatVersion, input, shape, out);
  out->scales.push_back(s);
  out->payload.resize(PayloadSize(n));
  RunTernarize<true>(fast_, input.data(), residual.data(), residual.data(), n, args,
                     out->payload.data());
  return absl::OkStatus();
}

absl::Status TernGradCodec::EncodeWithScale(std::span<const float> v,
                                            std::span<const int64_t> shape, float scale, Rng& rng,
                                            EncodedTensor* out) const {
  RETURN_IF_ERROR(CheckScale(scale));
  if (scale == 0.0f) scale = 0.0f;  // -0 -> +0: the decoder rejects a set sign bit
  RETURN_IF_ERROR(ValidateInput(v, shape));
  const size_t n = v.size();
  const Stats st = RunStats<Source::kOne>(fast_, clip_sigma_ > 0.0f, v.data(), nullptr, n);
  ASSIGN_OR_RETURN(const float local, ScaleFromStats(st.sum, st.sum_squares, st.max_abs_bits, n));
  const TernarizeArgs args{local, InverseScale(scale), scale, rng.NextStream()};
  StartEnvelope(kFormatVersion, v, shape, out);
  out->scales.push_back(scale);
  out->payload.resize(PayloadSize(n));
  RunTernarize<false>(fast_, v.data(), nullptr, nullptr, n, args, out->payload.data());
  return absl::OkStatus();
}

absl::StatusOr<float> TernGradCodec::PrepareFeedback(std::span<const float> input,
                                                     std::span<float> residual) const {
  if (residual.size() != input.size()) {
    return absl::InvalidArgumentError(absl::StrCat(kName, ": residual has ", residual.size(),
                                                   " elements, input has ", input.size()));
  }
  RETURN_IF_ERROR(ValidateInput(input, {}));
  const Stats st = RunStats<Source::kSumWrite>(fast_, clip_sigma_ > 0.0f, input.data(),
                                               residual.data(), input.size());
  return ScaleFromStats(st.sum, st.sum_squares, st.max_abs_bits, input.size());
}

absl::Status TernGradCodec::EncodePreparedWithScale(std::span<float> residual,
                                                    std::span<const int64_t> shape, float scale,
                                                    Rng& rng, EncodedTensor* out) const {
  RETURN_IF_ERROR(CheckScale(scale));
  if (scale == 0.0f) scale = 0.0f;
  RETURN_IF_ERROR(ValidateInput(residual, shape));
  const size_t n = residual.size();
  const Stats st = RunStats<Source::kOne>(fast_, clip_sigma_ > 0.0f, residual.data(), nullptr, n);
  ASSIGN_OR_RETURN(const float local, ScaleFromStats(st.sum, st.sum_squares, st.max_abs_bits, n));
  const TernarizeArgs args{local, InverseScale(scale), scale, rng.NextStream()};
  StartEnvelope(kFormatVersion, residual, shape, out);
  out->scales.push_back(scale);
  out->payload.resize(PayloadSize(n));
  RunTernarize<false>(fast_, residual.data(), nullptr, residual.data(), n, args,
                      out->payload.data());
  return absl::OkStatus();
}

absl::Status TernGradCodec::ValidatePayload(const EncodedTensor& in, size_t out_size,
                                            float* scale) const {
  RETURN_IF_ERROR(ValidateEnvelope(in, kFormatVersion, out_size));
  if (in.scales.size() != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, " payload has ", in.scales.size(), " scales, expected 1"));
  }
  const float s = in.scales[0];
  if (!std::isfinite(s) || std::signbit(s)) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, " payload scale ", s, " is not finite and >= +0"));
  }
  if (!in.params.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, " payload has ", in.params.size(), " params, expected none"));
  }
  const uint64_t n = in.num_elements;
  const uint64_t expected = PayloadSize(n);
  if (in.payload.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(kName, " payload is ", in.payload.size(),
                                                   " bytes, expected ", expected, " for ", n,
                                                   " elements"));
  }
  if (n % 4 != 0 && (in.payload.back() >> (2 * (n % 4))) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(kName, " payload's last byte 0x", absl::Hex(in.payload.back()),
                     " sets bits past element ", n - 1, " (they must be zero)"));
  }
  const int64_t bad = fast_ ? FindInvalidCodeAvx2(in.payload.data(), in.payload.size())
                            : FindInvalidCodeReference(in.payload.data(), in.payload.size());
  if (bad >= 0) {
    return absl::InvalidArgumentError(absl::StrCat(kName, " payload byte ", bad, " (0x",
                                                   absl::Hex(in.payload[bad]),
                                                   ") holds the invalid code 11"));
  }
  *scale = s;
  return absl::OkStatus();
}

absl::Status TernGradCodec::DecodeAdd(const EncodedTensor& in, std::span<float> out) const {
  float scale = 0.0f;
  RETURN_IF_ERROR(ValidatePayload(in, out.size(), &scale));
  if (fast_) {
    DecodeAddAvx2(in.payload.data(), out.size(), scale, out.data());
  } else {
    DecodeAddReference(in.payload.data(), 0, out.size(), scale, out.data());
  }
  return absl::OkStatus();
}

absl::Status TernGradCodec::AccumulateTernary(const EncodedTensor& in,
                                              std::span<int32_t> counts) const {
  float scale = 0.0f;
  RETURN_IF_ERROR(ValidatePayload(in, counts.size(), &scale));
  if (fast_) {
    AccumulateAvx2(in.payload.data(), counts.size(), counts.data());
  } else {
    AccumulateReference(in.payload.data(), 0, counts.size(), counts.data());
  }
  return absl::OkStatus();
}

CodecRegistration TernGradRegistration() {
  CodecRegistration r;
  r.name = kName;
  r.id = CodecId::kTernGrad;
  r.keys = {"clip", "shared"};
  r.parse = [](const SpecArgs& args, pb::CodecConfig* config) -> absl::Status {
    ASSIGN_OR_RETURN(const float clip, args.GetFloat("clip", TernGradCodec::kDefaultClipSigma, 0.0f,
                                                     std::numeric_limits<float>::max()));
    ASSIGN_OR_RETURN(const bool shared, args.GetBool("shared", false));
    pb::TernGradConfig* settings = config->mutable_terngrad();
    settings->set_clip_sigma(clip == 0.0f ? 0.0f : clip);
    settings->set_shared_scale(shared);
    return absl::OkStatus();
  };
  r.create = [](const pb::CodecConfig& config,
                const CodecOptions& options) -> absl::StatusOr<std::unique_ptr<Codec>> {
    ASSIGN_OR_RETURN(std::unique_ptr<TernGradCodec> codec, TernGradCodec::Create(config, options));
    return std::unique_ptr<Codec>(std::move(codec));
  };
  return r;
}

}  // namespace qtrain::compression
