#include "compression/threshold.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "compression/varint.h"

namespace qtrain::compression {
namespace {

// The encoder reserves payload room once per chunk of elements: at most one varint per element.
constexpr size_t kChunk = 256;
// Worst case for a chunk, plus slack for the 8-byte stores of the fast path.
constexpr size_t kChunkBytes = kMaxVarint32Bytes * kChunk + 8;

// Running state of the entry stream. Every varint has exactly one byte without a continuation
// bit, so entries = pos - continuation_bytes; the one-byte fast path then updates only pos.
struct EntryStream {
  size_t pos = 0;                 // bytes written
  uint64_t next = 0;              // index after the last entry (previous_index + 1)
  size_t continuation_bytes = 0;  // bytes of multi-byte varints beyond their last

  uint64_t count() const { return pos - continuation_bytes; }
};

// Makes room for `need` bytes at `pos`; returns the (possibly moved) data. Within the existing
// capacity it never reallocates (a reused buffer keeps its storage); beyond, it grows
// geometrically. resize zero-fills only the part past the old size.
uint8_t* Reserve(std::vector<uint8_t>* buffer, size_t pos, size_t need) {
  const size_t required = pos + need;
  if (buffer->size() < required) {
    const size_t capacity = buffer->capacity();
    buffer->resize(required <= capacity ? capacity : std::max(required, 2 * capacity));
  }
  return buffer->data();
}

// Appends the entry for element `index` (sign: 1 for -tau).
__attribute__((always_inline)) inline void PutEntry(uint8_t* dst, uint64_t index, uint32_t sign,
                                                    EntryStream* s) {
  const uint32_t code = (static_cast<uint32_t>(index - s->next) << 1) | sign;
  const size_t size = PutVarint32(dst + s->pos, code);
  s->pos += size;
  s->continuation_bytes += size - 1;
  s->next = index + 1;
}

absl::Status NonFinite(uint64_t index, bool feedback) {
  return absl::InvalidArgumentError(absl::StrCat("threshold: element ", index, " of the input",
                                                 feedback ? " plus residual" : "",
                                                 " is not finite (NaN or Inf)"));
}

// ---- Scalar reference ------------------------------------------------------------------------

absl::Status EncodeScalar(const float* in, float* res, uint64_t n, float tau,
                          std::vector<uint8_t>* payload, EntryStream* s) {
  for (uint64_t begin = 0; begin < n; begin += kChunk) {
    const uint64_t end = std::min<uint64_t>(n, begin + kChunk);
    uint8_t* dst = Reserve(payload, s->pos, kChunkBytes);
    for (uint64_t i = begin; i < end; ++i) {
      float v = in[i];
      if (res != nullptr) v = v + res[i];
      if (!std::isfinite(v)) return NonFinite(i, res != nullptr);
      if (std::fabs(v) > tau) {
        const bool negative = v < 0.0f;
        PutEntry(dst, i, negative ? 1 : 0, s);
        if (res != nullptr) res[i] = v - (negative ? -tau : tau);
      } else if (res != nullptr) {
        res[i] = v;
      }
    }
  }
  return absl::OkStatus();
}

// Adds +-tau at each entry of a validated payload, from the entry after index next - 1.
void AddScalarFrom(const uint8_t* p, const uint8_t* end, uint64_t next, float tau, float* out) {
  while (p < end) {
    uint32_t code = 0;
    size_t size = 0;
    ParseVarint32(p, end, &code, &size);
    p += size;
    const uint64_t index = next + (code >> 1);
    out[index] += (code & 1) ? -tau : tau;
    next = index + 1;
  }
}

void AddScalar(const uint8_t* p, const uint8_t* end, float tau, float* out) {
  AddScalarFrom(p, end, 0, tau, out);
}

// Parses and checks one entry at *p (entry number k); advances *p and *next.
inline absl::Status ValidateEntry(const uint8_t* begin, const uint8_t** p, const uint8_t* end,
                                  uint64_t k, uint64_t declared, uint64_t n, uint64_t* next) {
  if (*p == end) {
    return absl::InvalidArgumentError(
        absl::StrCat("threshold payload ends after ", k, " entries, params declare ", declared));
  }
  uint32_t code = 0;
  size_t size = 0;
  const VarintStatus status = ParseVarint32(*p, end, &code, &size);
  if (status != VarintStatus::kOk) {
    return absl::InvalidArgumentError(absl::StrCat("threshold payload: ", VarintStatusName(status),
                                                   " at byte ", *p - begin, " (entry ", k, ")"));
  }
  const uint64_t index = *next + (code >> 1);
  if (index >= n) {
    return absl::InvalidArgumentError(absl::StrCat("threshold payload entry ", k, " has index ",
                                                   index, ", past the tensor's ", n, " elements"));
  }
  *next = index + 1;
  *p += size;
  return absl::OkStatus();
}

absl::Status TrailingBytes(size_t extra, uint64_t declared) {
  return absl::InvalidArgumentError(absl::StrCat("threshold payload has ", extra,
                                                 " trailing bytes after the ", declared,
                                                 " entries that params declare"));
}

// Validates the payload; on success every varint is well-formed and every index is < n.
absl::Status ValidateScalar(const uint8_t* p, const uint8_t* end, uint64_t declared, uint64_t n) {
  const uint8_t* begin = p;
  uint64_t next = 0;
  for (uint64_t k = 0; k < declared; ++k) {
    RETURN_IF_ERROR(ValidateEntry(begin, &p, end, k, declared, n, &next));
  }
  if (p != end) return TrailingBytes(end - p, declared);
  return absl::OkStatus();
}

// ---- AVX2 path -------------------------------------------------------------------------------

// Tables over an 8-bit mask m of selected lanes l_0 < l_1 < ...:
//   kGapCodes[m]:  byte k = (l_k - l_{k-1} - 1) << 1, with l_{-1} = -1 (the in-block gap codes);
//   kCompress[m]:  pshufb indices, byte k = l_k, unused bytes 0x80 (gather the selected lanes);
//   kExpand[s]:    byte l = bit l of s (one 0/1 byte per lane).
//   kTrailing[m]:  lanes after the last selected one (8 for m = 0).
struct EntryTables {
  std::array<uint64_t, 256> gap_codes{};
  std::array<uint64_t, 256> compress{};
  std::array<uint64_t, 256> expand{};
  std::array<uint8_t, 256> trailing{};
};

constexpr EntryTables MakeEntryTables() {
  EntryTables t;
  for (int m = 0; m < 256; ++m) {
    uint64_t gaps = 0;
    uint64_t compress = ~uint64_t{0} / 255 * 0x80;  // all bytes 0x80
    int k = 0;
    int previous = -1;
    for (int lane = 0; lane < 8; ++lane) {
      if (((m >> lane) & 1) == 0) continue;
      gaps |= static_cast<uint64_t>((lane - previous - 1) << 1) << (8 * k);
      compress &= ~(uint64_t{0xff} << (8 * k));
      compress |= static_cast<uint64_t>(lane) << (8 * k);
      previous = lane;
      ++k;
    }
    t.gap_codes[m] = gaps;
    t.compress[m] = compress;
    t.trailing[m] = static_cast<uint8_t>(7 - previous);
    uint64_t expand = 0;
    for (int lane = 0; lane < 8; ++lane) {
      expand |= static_cast<uint64_t>((m >> lane) & 1) << (8 * lane);
    }
    t.expand[m] = expand;
  }
  return t;
}

constexpr EntryTables kTables = MakeEntryTables();

#define QTRAIN_THRESHOLD_AVX2 __attribute__((target("avx2,fma,f16c")))

// Appends the entries of one block of 8 elements starting at `base`: `selected` has a bit per
// sent lane (possibly none), `signs` the sign bits of all lanes. `skip` counts the unsent
// elements since the last entry (base - next); the fast path keeps it instead of s->next.
QTRAIN_THRESHOLD_AVX2 __attribute__((always_inline)) inline void PutBlock(
    uint8_t* dst, uint64_t base, uint32_t selected, uint32_t signs, uint64_t* skip,
    EntryStream* s) {
  if (__builtin_expect(*skip < 64 - 8, 1)) {
    // Every code fits one byte (gaps < 64): the in-block gaps from the table, the first one plus
    // `skip`, and the signs of the selected lanes gathered in order. With nothing selected the
    // store leaves one byte past `pos`, which the next store overwrites or the final resize drops.
    uint64_t codes = kTables.gap_codes[selected] + (*skip << 1);
    const __m128i sign_bytes =
        _mm_shuffle_epi8(_mm_cvtsi64_si128(static_cast<int64_t>(kTables.expand[signs])),
                         _mm_cvtsi64_si128(static_cast<int64_t>(kTables.compress[selected])));
    codes |= static_cast<uint64_t>(_mm_cvtsi128_si64(sign_bytes));
    std::memcpy(dst + s->pos, &codes, 8);  // little-endian; the chunk reserve has slack
    s->pos += static_cast<unsigned>(std::popcount(selected));
    *skip = (selected != 0 ? 0 : *skip) + kTables.trailing[selected];
    return;
  }
  s->next = base - *skip;
  for (uint32_t m = selected; m != 0; m &= m - 1) {
    const unsigned lane = static_cast<unsigned>(__builtin_ctz(m));
    PutEntry(dst, base + lane, (signs >> lane) & 1, s);
  }
  *skip = base + 8 - s->next;
}

struct Lanes {
  uint32_t selected;  // |v| > tau
  uint32_t signs;     // sign bits of v
};

// Thresholds 8 elements: updates the residual with feedback and folds the magnitudes' bit
// patterns into `max_bits` (an unsigned max: NaN > Inf > any finite magnitude).
template <bool kFeedback>
QTRAIN_THRESHOLD_AVX2 __attribute__((always_inline)) inline Lanes Threshold8(const float* in,
                                                                             float* res,
                                                                             __m256 vtau,
                                                                             __m256i* max_bits) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  __m256 v = _mm256_loadu_ps(in);
  if constexpr (kFeedback) v = _mm256_add_ps(v, _mm256_loadu_ps(res));
  const __m256 magnitude = _mm256_andnot_ps(sign_mask, v);
  const __m256 sel = _mm256_cmp_ps(magnitude, vtau, _CMP_GT_OQ);
  *max_bits = _mm256_max_epu32(*max_bits, _mm256_castps_si256(magnitude));
  if constexpr (kFeedback) {
    // sent = copysign(tau, v) where selected, else +0 (v - 0 == v, -0 included).
    const __m256 sent = _mm256_and_ps(sel, _mm256_or_ps(vtau, _mm256_and_ps(sign_mask, v)));
    _mm256_storeu_ps(res, _mm256_sub_ps(v, sent));
  }
  return {static_cast<uint32_t>(_mm256_movemask_ps(sel)),
          static_cast<uint32_t>(_mm256_movemask_ps(v))};
}

template <bool kFeedback>
QTRAIN_THRESHOLD_AVX2 absl::Status EncodeAvx2(const float* in, float* res, uint64_t n, float tau,
                                              std::vector<uint8_t>* payload, EntryStream* stream) {
  // A local copy whose address does not escape: the payload's byte stores cannot alias it, so
  // it stays in registers.
  EntryStream local_stream = *stream;
  EntryStream* s = &local_stream;
  const __m256 vtau = _mm256_set1_ps(tau);
  uint64_t skip = 0;  // s->next == 0 at the start
  for (uint64_t begin = 0; begin < n; begin += kChunk) {
    const uint64_t end = std::min<uint64_t>(n, begin + kChunk);
    uint8_t* dst = Reserve(payload, s->pos, kChunkBytes);
    __m256i max_bits = _mm256_setzero_si256();
    uint64_t i = begin;
    for (; i + 16 <= end; i += 16) {
      const Lanes a = Threshold8<kFeedback>(in + i, kFeedback ? res + i : nullptr, vtau, &max_bits);
      const Lanes b =
          Threshold8<kFeedback>(in + i + 8, kFeedback ? res + i + 8 : nullptr, vtau, &max_bits);
      PutBlock(dst, i, a.selected, a.signs, &skip, s);
      PutBlock(dst, i + 8, b.selected, b.signs, &skip, s);
    }
    for (; i + 8 <= end; i += 8) {
      const Lanes a = Threshold8<kFeedback>(in + i, kFeedback ? res + i : nullptr, vtau, &max_bits);
      PutBlock(dst, i, a.selected, a.signs, &skip, s);
    }
    s->next = i - skip;
    bool tail_finite = true;
    for (; i < end; ++i) {
      float v = in[i];
      if constexpr (kFeedback) v = v + res[i];
      tail_finite = tail_finite && std::isfinite(v);
      if (std::fabs(v) > tau) {
        const bool negative = v < 0.0f;
        PutEntry(dst, i, negative ? 1 : 0, s);
        if constexpr (kFeedback) res[i] = v - (negative ? -tau : tau);
      } else if constexpr (kFeedback) {
        res[i] = v;
      }
    }
    // The tail runs on s->next; the next chunk's blocks on skip.
    skip = end - s->next;
    const __m256i over = _mm256_cmpgt_epi32(max_bits, _mm256_set1_epi32(0x7f7fffff));
    if (!_mm256_testz_si256(over, over) || !tail_finite) {
      // Report the first non-finite element of the chunk, as the reference does. A non-finite
      // v leaves a non-finite residual, and a finite v a finite one.
      for (uint64_t k = begin; k < end; ++k) {
        if (!std::isfinite(kFeedback ? res[k] : in[k])) return NonFinite(k, kFeedback);
      }
    }
  }
  *stream = local_stream;
  return absl::OkStatus();
}

// Sum of (byte >> 1) over 32 bytes that all have their high bit clear.
QTRAIN_THRESHOLD_AVX2 inline uint64_t SumHalfBytes(__m256i bytes) {
  const __m256i halves = _mm256_srli_epi16(bytes, 1);  // no high bits: nothing crosses bytes
  const __m256i sums =
      _mm256_sad_epu8(_mm256_and_si256(halves, _mm256_set1_epi8(0x7f)), _mm256_setzero_si256());
  const __m128i folded =
      _mm_add_epi64(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
  return static_cast<uint64_t>(_mm_cvtsi128_si64(folded)) +
         static_cast<uint64_t>(_mm_extract_epi64(folded, 1));
}

// The reference's checks, skipping 32 one-byte entries at a time when they are all in range.
QTRAIN_THRESHOLD_AVX2 absl::Status ValidateAvx2(const uint8_t* p, const uint8_t* end,
                                                uint64_t declared, uint64_t n) {
  const uint8_t* begin = p;
  uint64_t next = 0;
  uint64_t k = 0;
  while (k < declared) {
    uint64_t scalar_steps = 1;
    if (declared - k >= 32 && end - p >= 32) {
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const uint32_t continuation = static_cast<uint32_t>(_mm256_movemask_epi8(bytes));
      if (continuation == 0) {
        const uint64_t after = next + SumHalfBytes(bytes) + 32;  // index after the 32nd entry
        if (after <= n) {
          next = after;
          k += 32;
          p += 32;
          continue;
        }
        scalar_steps = 32;  // an index is out of range: let the scalar checks name it
      } else {
        // The one-byte entries before the first multi-byte varint, and that varint.
        scalar_steps = static_cast<uint64_t>(__builtin_ctz(continuation)) + 1;
      }
    }
    for (uint64_t step = 0; step < scalar_steps && k < declared; ++step, ++k) {
      RETURN_IF_ERROR(ValidateEntry(begin, &p, end, k, declared, n, &next));
    }
  }
  if (p != end) return TrailingBytes(end - p, declared);
  return absl::OkStatus();
}

// AddScalar with 8 one-byte entries per step where the payload allows. (Its speed is bound by
// the scalar read-add-write per entry; AVX2 index expansion measured no faster.)
QTRAIN_THRESHOLD_AVX2 void AddAvx2(const uint8_t* p, const uint8_t* end, float tau, float* out) {
  const float signed_tau[2] = {tau, -tau};
  uint64_t next = 0;
  while (end - p >= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    if ((word & 0x8080808080808080ull) == 0) {
      for (int b = 0; b < 8; ++b) {
        const uint32_t code = static_cast<uint32_t>(word >> (8 * b)) & 0xff;
        const uint64_t index = next + (code >> 1);
        out[index] += signed_tau[code & 1];
        next = index + 1;
      }
      p += 8;
      continue;
    }
    uint32_t code = 0;
    size_t size = 0;
    ParseVarint32(p, end, &code, &size);
    p += size;
    const uint64_t index = next + (code >> 1);
    out[index] += signed_tau[code & 1];
    next = index + 1;
  }
  AddScalarFrom(p, end, next, tau, out);
}

#undef QTRAIN_THRESHOLD_AVX2

absl::Status BadSetting(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("threshold: ", what));
}

// The shortest %g form that reads back as the same float.
std::string FormatFloat(float value) {
  char text[32];
  for (int digits = 6; digits <= 9; ++digits) {
    std::snprintf(text, sizeof(text), "%.*g", digits, static_cast<double>(value));
    float back = 0;
    if (absl::SimpleAtof(text, &back) && back == value) break;
  }
  return text;
}

}  // namespace

ThresholdCodec::ThresholdCodec(pb::CodecConfig config, bool fast)
    : config_(std::move(config)), tau_(config_.threshold().tau()), fast_(fast) {}

absl::StatusOr<std::unique_ptr<ThresholdCodec>> ThresholdCodec::Create(
    const pb::CodecConfig& config, const CodecOptions& options) {
  if (config.codec() != pb::CODEC_THRESHOLD) {
    return BadSetting(absl::StrCat("config names codec id ", static_cast<int>(config.codec()),
                                   ", expected ", static_cast<int>(pb::CODEC_THRESHOLD)));
  }
  pb::CodecConfig normalized = config;
  switch (config.settings_case()) {
    case pb::CodecConfig::kThreshold:
      break;
    case pb::CodecConfig::SETTINGS_NOT_SET:
      normalized.mutable_threshold()->set_tau(kDefaultTau);
      break;
    default:
      return BadSetting(absl::StrCat("config carries settings of another codec (field ",
                                     static_cast<int>(config.settings_case()), ")"));
  }
  const float tau = normalized.threshold().tau();
  if (!std::isfinite(tau) || !(tau > 0.0f)) {
    return BadSetting(absl::StrCat("tau=", tau, " must be finite and > 0"));
  }
  const bool fast = options.path == KernelPath::kAuto && CpuHasAvx2();
  return std::unique_ptr<ThresholdCodec>(new ThresholdCodec(std::move(normalized), fast));
}

std::string ThresholdCodec::Spec() const {
  std::vector<std::string> args = {absl::StrCat("tau=", FormatFloat(tau_))};
  if (config_.has_error_feedback()) args.push_back(config_.error_feedback() ? "ef=1" : "ef=0");
  return absl::StrCat("threshold:", absl::StrJoin(args, ","));
}

absl::Status ThresholdCodec::Encode(std::span<const float> input, std::span<const int64_t> shape,
                                    Rng& rng, EncodedTensor* out) const {
  return EncodeImpl(input, {}, shape, out);
}

absl::Status ThresholdCodec::EncodeWithFeedback(std::span<const float> input,
                                                std::span<float> residual,
                                                std::span<const int64_t> shape, Rng& rng,
                                                EncodedTensor* out) const {
  if (residual.size() != input.size()) {
    return absl::InvalidArgumentError(absl::StrCat("threshold: residual has ", residual.size(),
                                                   " elements, input has ", input.size()));
  }
  return EncodeImpl(input, residual, shape, out);
}

absl::Status ThresholdCodec::EncodeImpl(std::span<const float> input, std::span<float> residual,
                                        std::span<const int64_t> shape, EncodedTensor* out) const {
  RETURN_IF_ERROR(ValidateInput(input, shape));
  StartEnvelope(kFormatVersion, input, shape, out);
  const bool feedback = !residual.empty();
  const float* in = input.data();
  float* res = feedback ? residual.data() : nullptr;
  EntryStream stream;
  absl::Status status;
  if (!fast_) {
    status = EncodeScalar(in, res, input.size(), tau_, &out->payload, &stream);
  } else if (feedback) {
    status = EncodeAvx2<true>(in, res, input.size(), tau_, &out->payload, &stream);
  } else {
    status = EncodeAvx2<false>(in, nullptr, input.size(), tau_, &out->payload, &stream);
  }
  RETURN_IF_ERROR(status);
  out->payload.resize(stream.pos);
  out->scales.push_back(tau_);
  out->params.push_back(static_cast<uint32_t>(stream.count()));  // count <= n <= kMaxElements
  return absl::OkStatus();
}

absl::Status ThresholdCodec::DecodeAdd(const EncodedTensor& in, std::span<float> out) const {
  RETURN_IF_ERROR(ValidateEnvelope(in, kFormatVersion, out.size()));
  const uint64_t n = in.num_elements;
  if (in.scales.size() != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("threshold payload has ", in.scales.size(), " scales, expected 1 (tau)"));
  }
  const float tau = in.scales[0];
  if (!std::isfinite(tau) || !(tau > 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("threshold payload has tau ", tau, ", expected a finite value > 0"));
  }
  if (in.params.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("threshold payload has ", in.params.size(),
                                                   " params, expected 1 (the entry count)"));
  }
  const uint64_t declared = in.params[0];
  if (declared > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("threshold payload declares ", declared, " entries for ", n, " elements"));
  }
  const uint8_t* begin = in.payload.data();
  const uint8_t* end = begin + in.payload.size();
  RETURN_IF_ERROR(fast_ ? ValidateAvx2(begin, end, declared, n)
                        : ValidateScalar(begin, end, declared, n));
  (fast_ ? AddAvx2 : AddScalar)(begin, end, tau, out.data());
  return absl::OkStatus();
}

CodecRegistration ThresholdRegistration() {
  CodecRegistration r;
  r.name = "threshold";
  r.id = CodecId::kThreshold;
  r.keys = {"tau"};
  r.parse = [](const SpecArgs& args, pb::CodecConfig* config) -> absl::Status {
    ASSIGN_OR_RETURN(float tau, args.GetFloat("tau", ThresholdCodec::kDefaultTau,
                                              std::numeric_limits<float>::denorm_min(),
                                              std::numeric_limits<float>::max()));
    config->mutable_threshold()->set_tau(tau);
    return absl::OkStatus();
  };
  r.create = [](const pb::CodecConfig& config,
                const CodecOptions& options) -> absl::StatusOr<std::unique_ptr<Codec>> {
    ASSIGN_OR_RETURN(std::unique_ptr<ThresholdCodec> codec,
                     ThresholdCodec::Create(config, options));
    return std::unique_ptr<Codec>(std::move(codec));
  };
  return r;
}

}  // namespace qtrain::compression
