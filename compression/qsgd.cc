#include "compression/qsgd.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "compression/bit_stream.h"

// Every function compiled for AVX2 carries this attribute (no global -mavx2: the binary must run
// on any x86-64; the paths are chosen at run time).
#define QTRAIN_QSGD_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace qtrain::compression {
namespace {

constexpr char kCodingNames[2][6] = {"dense", "elias"};

// What the kernels need from the codec, plus the stream key of this Encode call.
struct Settings {
  uint32_t levels;
  uint32_t bucket;
  int bits;  // dense code width b
  uint32_t key;
};

size_t NumBuckets(size_t n, uint32_t bucket) { return n == 0 ? 0 : (n - 1) / bucket + 1; }

uint64_t DenseBytes(uint64_t n, int bits) { return (n * bits + 7) / 8; }

// An upper bound on the Elias stream of n elements in nb buckets, in bytes. Per bucket the count
// takes gamma(m + 1) <= 2 floor(log2(len + 1)) + 1 bits. A nonzero after `gap` zeros takes
// gamma(gap + 1) <= 2 (gap + 1) - 1 bits (floor(log2 x) <= x - 1), one sign bit and
// gamma(l) <= 2 floor(log2 s) + 1 bits; summed over the gap + 1 elements it covers that is at most
// 2 + (1 + 2 floor(log2 s)) per element.
uint64_t EliasBoundBytes(uint64_t n, uint64_t nb, uint32_t levels, uint32_t bucket) {
  const uint64_t max_len = std::min<uint64_t>(bucket, n);
  const uint64_t per_element = 3 + 2 * (std::bit_width(levels) - 1);
  const uint64_t per_bucket = 2 * (std::bit_width(max_len + 1) - 1) + 1;
  return (n * per_element + nb * per_bucket + 7) / 8 + 8;
}

float Combine8(const float a[8]) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// The value being encoded: the input, or with feedback input + residual.
template <bool kFeedback>
inline float Source(const float* in, const float* res, size_t j) {
  if constexpr (kFeedback) {
    return in[j] + res[j];
  } else {
    return in[j];
  }
}

absl::Status NonFiniteNormError(size_t k, size_t lo, size_t len) {
  return absl::InvalidArgumentError(absl::StrCat(
      "qsgd: bucket ", k, " (elements ", lo, "..", lo + len - 1,
      ") has a non-finite norm: it holds NaN or Inf, or its sum of squares overflows float"));
}

// ---- Scalar reference ---------------------------------------------------------------------------

template <bool kFeedback>
float NormRef(const float* in, const float* res, size_t len) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (size_t j = 0; j < len; ++j) {
    const float v = Source<kFeedback>(in, res, j);
    acc[j % 8] += v * v;
  }
  return std::sqrt(Combine8(acc));
}

// l = min(floorf(|v| * scale + U_i), s), computed in float so that r + U never overflows uint32.
inline uint32_t LevelRef(float v, uint32_t i, uint32_t key, float scale, float levels_f) {
  const float r = std::fabs(v) * scale;
  float t = std::floor(r + StreamUniform(key, i));
  if (t > levels_f) t = levels_f;
  return static_cast<uint32_t>(t);
}

inline float DecodedValue(uint32_t level, bool negative, float unit) {
  const float value = static_cast<float>(level) * unit;
  // -value as a sign-bit flip, without a branch on the (random) sign.
  return std::bit_cast<float>(std::bit_cast<uint32_t>(value) ^ (uint32_t{negative} << 31));
}

struct BucketParams {
  float scale;  // s / norm, 0 for a zero norm
  float unit;   // norm / s
};

inline BucketParams ParamsFor(float norm, uint32_t levels) {
  const float levels_f = static_cast<float>(levels);
  return {norm > 0.0f ? levels_f / norm : 0.0f, norm / levels_f};
}

// Payload layout a kernel writes (QsgdCodec::Coding, for the templates in this file).
enum class Layout { kDense, kElias };

// Encodes with the scalar reference. With kFeedback, res is updated to v - decoded. Returns the
// stream length in bytes through *bytes.
template <bool kFeedback, Layout kLayout>
absl::Status EncodeRef(const Settings& st, const float* in, float* res, size_t n, float* norms,
                       uint8_t* payload, size_t capacity, size_t* bytes) {
  BitWriter writer(payload, capacity);
  const float levels_f = static_cast<float>(st.levels);
  const size_t nb = NumBuckets(n, st.bucket);
  const uint32_t sign_shift = st.bits - 1;
  for (size_t k = 0; k < nb; ++k) {
    const size_t lo = k * st.bucket;
    const size_t len = std::min<size_t>(st.bucket, n - lo);
    const float* bin = in + lo;
    float* bres = kFeedback ? res + lo : nullptr;
    const float norm = NormRef<kFeedback>(bin, bres, len);
    if (!std::isfinite(norm)) return NonFiniteNormError(k, lo, len);
    norms[k] = norm;
    const BucketParams p = ParamsFor(norm, st.levels);
    if constexpr (kLayout == Layout::kElias) {
      uint32_t nonzeros = 0;
      for (size_t j = 0; j < len; ++j) {
        const float v = Source<kFeedback>(bin, bres, j);
        nonzeros += LevelRef(v, static_cast<uint32_t>(lo + j), st.key, p.scale, levels_f) != 0;
      }
      writer.WriteGamma(nonzeros + 1);
    }
    size_t next = 0;  // Elias: bucket offset just after the previous nonzero
    for (size_t j = 0; j < len; ++j) {
      const float v = Source<kFeedback>(bin, bres, j);
      const uint32_t level = LevelRef(v, static_cast<uint32_t>(lo + j), st.key, p.scale, levels_f);
      const bool negative = level != 0 && std::signbit(v);
      if constexpr (kLayout == Layout::kDense) {
        writer.Write(level | (uint32_t{negative} << sign_shift), st.bits);
      } else if (level != 0) {
        writer.WriteGamma(static_cast<uint32_t>(j - next + 1));
        writer.Write(negative, 1);
        writer.WriteGamma(level);
        next = j + 1;
      }
      if constexpr (kFeedback) bres[j] = v - DecodedValue(level, negative, p.unit);
    }
  }
  *bytes = writer.Finish();
  if (writer.overflowed()) {
    return absl::InternalError(
        absl::StrCat("qsgd: encoder overran its ", capacity, "-byte payload bound (a bug)"));
  }
  return absl::OkStatus();
}

// Checks one dense code of element i (bucket norm zero or not).
absl::Status CheckDenseCode(uint32_t code, size_t i, bool zero_norm, const Settings& st) {
  const uint32_t level = code & ((uint32_t{1} << (st.bits - 1)) - 1);
  const bool negative = (code >> (st.bits - 1)) != 0;
  if (level > st.levels) {
    return absl::InvalidArgumentError(absl::StrCat("qsgd payload element ", i, " has level ", level,
                                                   ", over levels=", st.levels));
  }
  if (negative && level == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "qsgd payload element ", i, " has the sign bit set with level 0 (negative zero)"));
  }
  if (zero_norm && code != 0) {
    return absl::InvalidArgumentError(absl::StrCat("qsgd payload element ", i, " has level ", level,
                                                   " in bucket ", i / st.bucket,
                                                   " whose norm is 0"));
  }
  return absl::OkStatus();
}

absl::Status PaddingError() {
  return absl::InvalidArgumentError("qsgd payload has nonzero padding bits after the last element");
}

// Validates every dense code of buckets [k_begin, k_end) and the padding. The payload length was
// checked.
absl::Status ValidateDenseRef(const Settings& st, const uint8_t* payload, size_t size, size_t n,
                              const float* norms, size_t k_begin, size_t k_end,
                              bool check_padding) {
  BitReader reader(payload, size);
  const size_t lo_begin = k_begin * st.bucket;
  reader.Skip(uint64_t{lo_begin} * st.bits);
  for (size_t k = k_begin; k < k_end; ++k) {
    const size_t lo = k * st.bucket;
    const size_t len = std::min<size_t>(st.bucket, n - lo);
    const bool zero_norm = norms[k] == 0.0f;
    for (size_t j = 0; j < len; ++j) {
      uint32_t code = 0;
      if (!reader.Read(st.bits, &code)) {
        return absl::InternalError("qsgd: dense payload shorter than checked (a bug)");
      }
      RETURN_IF_ERROR(CheckDenseCode(code, lo + j, zero_norm, st));
    }
  }
  if (check_padding && !reader.RestIsZero()) return PaddingError();
  return absl::OkStatus();
}

void DecodeDenseRef(const Settings& st, const uint8_t* payload, size_t size, size_t n,
                    const float* norms, float* out) {
  BitReader reader(payload, size);
  const size_t nb = NumBuckets(n, st.bucket);
  const uint32_t level_mask = (uint32_t{1} << (st.bits - 1)) - 1;
  for (size_t k = 0; k < nb; ++k) {
    const size_t lo = k * st.bucket;
    const size_t len = std::min<size_t>(st.bucket, n - lo);
    const float unit = ParamsFor(norms[k], st.levels).unit;
    for (size_t j = 0; j < len; ++j) {
      uint32_t code = 0;
      reader.Read(st.bits, &code);  // validated: never short
      const uint32_t level = code & level_mask;
      if (level != 0) out[lo + j] += DecodedValue(level, (code >> (st.bits - 1)) != 0, unit);
    }
  }
}

absl::Status GammaError(BitReader::GammaResult result, const char* what, size_t k) {
  if (result == BitReader::GammaResult::kOverrun) {
    return absl::InvalidArgumentError(
        absl::StrCat("qsgd elias payload ends inside the gamma code of ", what, " in bucket ", k));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("qsgd elias payload has a gamma code with more than ", kMaxGammaLeadingZeros,
                   " leading zeros (", what, " in bucket ", k, ")"));
}

// ---- Shared by the fast encoder and decoder (scalar, bit-identical to the field-wise code) ------

// Gamma codes of 1..255 (stream order, LSB first) and their lengths, for the fast Elias writer.
struct GammaCode {
  uint16_t bits;
  uint8_t length;
};
constexpr std::array<GammaCode, 256> MakeGammaTable() {
  std::array<GammaCode, 256> table{};
  for (uint32_t x = 1; x < 256; ++x) {
    const int n = 31 - std::countl_zero(x);
    table[x] = {static_cast<uint16_t>(((x ^ (1u << n)) << (n + 1)) | (1u << n)),
                static_cast<uint8_t>(2 * n + 1)};
  }
  return table;
}
constexpr std::array<GammaCode, 256> kGammaTable = MakeGammaTable();

// Appends gamma(gap_plus_one), the sign bit and gamma(level): one write from the table when both
// values are below 256 (at most 31 bits), else field by field. The bits are the reference's.
inline void WriteTriple(BitWriter* writer, uint32_t gap_plus_one, uint32_t negative,
                        uint32_t level) {
  if (gap_plus_one < 256 && level < 256) {
    const GammaCode g = kGammaTable[gap_plus_one];
    const GammaCode l = kGammaTable[level];
    writer->Write(
        uint64_t{g.bits} | (uint64_t{negative} << g.length) | (uint64_t{l.bits} << (g.length + 1)),
        g.length + 1 + l.length);
  } else {
    writer->WriteGamma(gap_plus_one);
    writer->Write(negative, 1);
    writer->WriteGamma(level);
  }
}

// Reads gamma(gap + 1), the sign bit and gamma(level) from one 57-bit window when all three are
// there and short (each value below 2^13). Returns false, consuming nothing, otherwise.
inline bool ReadTriple(BitReader* reader, uint64_t* gap_plus_one, uint32_t* negative,
                       uint64_t* level) {
  const uint64_t w = reader->Peek();
  if (w == 0) return false;
  const int ng = std::countr_zero(w);
  if (ng > 12) return false;
  const int gap_bits = 2 * ng + 1;
  const uint64_t w2 = w >> (gap_bits + 1);
  if (w2 == 0) return false;
  const int nl = std::countr_zero(w2);
  if (nl > 12) return false;
  const uint64_t total = gap_bits + 2 + 2 * nl;  // <= 51 < 57: all inside the window
  if (total > reader->remaining()) return false;
  *gap_plus_one = ((w >> (ng + 1)) & ((uint64_t{1} << ng) - 1)) | (uint64_t{1} << ng);
  *negative = static_cast<uint32_t>((w >> gap_bits) & 1);
  *level = ((w2 >> (nl + 1)) & ((uint64_t{1} << nl) - 1)) | (uint64_t{1} << nl);
  reader->Advance(total);
  return true;
}

// Parses the whole Elias stream, checking everything; with kApply also adds the decoded values
// into out. Bounded: every loop consumes at least one bit per iteration or ends. kFast reads each
// (gap, sign, level) triple from one 57-bit window when it can (ReadTriple).
template <bool kApply, bool kFast>
absl::Status ScanElias(const Settings& st, const uint8_t* payload, size_t size, size_t n,
                       const float* norms, float* out) {
  BitReader reader(payload, size);
  const size_t nb = NumBuckets(n, st.bucket);
  for (size_t k = 0; k < nb; ++k) {
    const size_t lo = k * st.bucket;
    const size_t len = std::min<size_t>(st.bucket, n - lo);
    const float unit = ParamsFor(norms[k], st.levels).unit;
    uint64_t count_plus_one = 0;
    if (auto r = reader.ReadGamma(&count_plus_one); r != BitReader::GammaResult::kOk) {
      return GammaError(r, "the nonzero count", k);
    }
    const uint64_t count = count_plus_one - 1;
    if (count > len) {
      return absl::InvalidArgumentError(absl::StrCat("qsgd elias bucket ", k, " declares ", count,
                                                     " nonzero levels, more than its ", len,
                                                     " elements"));
    }
    if (count > 0 && norms[k] == 0.0f) {
      return absl::InvalidArgumentError(absl::StrCat("qsgd elias bucket ", k, " declares ", count,
                                                     " nonzero levels but its norm is 0"));
    }
    uint64_t next = 0;
    for (uint64_t t = 0; t < count; ++t) {
      uint64_t gap_plus_one = 0;
      uint32_t negative = 0;
      uint64_t level = 0;
      uint64_t pos = 0;
      if (kFast && ReadTriple(&reader, &gap_plus_one, &negative, &level)) {
        pos = next + gap_plus_one - 1;
      } else {  // field by field, naming exactly what is wrong
        if (auto r = reader.ReadGamma(&gap_plus_one); r != BitReader::GammaResult::kOk) {
          return GammaError(r, "a gap", k);
        }
        pos = next + gap_plus_one - 1;
        if (pos < len && !reader.Read(1, &negative)) {
          return absl::InvalidArgumentError(
              absl::StrCat("qsgd elias payload ends inside a sign bit in bucket ", k));
        }
        if (pos < len) {
          if (auto r = reader.ReadGamma(&level); r != BitReader::GammaResult::kOk) {
            return GammaError(r, "a level", k);
          }
        }
      }
      if (pos >= len) {
        return absl::InvalidArgumentError(absl::StrCat("qsgd elias bucket ", k, ": nonzero ", t,
                                                       " of ", count, " is at position ", pos,
                                                       ", past the bucket's ", len, " elements"));
      }
      if (level > st.levels) {
        return absl::InvalidArgumentError(absl::StrCat(
            "qsgd elias element ", lo + pos, " has level ", level, ", over levels=", st.levels));
      }
      if constexpr (kApply) {
        out[lo + pos] += DecodedValue(static_cast<uint32_t>(level), negative != 0, unit);
      }
      next = pos + 1;
    }
  }
  const uint64_t used_bytes = (reader.position() + 7) / 8;
  if (used_bytes != size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "qsgd elias payload is ", size, " bytes but its stream ends after ", used_bytes));
  }
  if (!reader.RestIsZero()) return PaddingError();
  return absl::OkStatus();
}

// ---- AVX2 fast path -----------------------------------------------------------------------------

QTRAIN_QSGD_AVX2 inline __m256i LaneIndex() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

QTRAIN_QSGD_AVX2 inline __m256i TailMask(size_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), LaneIndex());
}

// Loads 8 source values at j (count < 8: the first count, zeros after).
template <bool kFeedback>
QTRAIN_QSGD_AVX2 inline __m256 LoadSource(const float* in, const float* res, size_t j,
                                          size_t count) {
  if (count == 8) {
    __m256 v = _mm256_loadu_ps(in + j);
    if constexpr (kFeedback) v = _mm256_add_ps(v, _mm256_loadu_ps(res + j));
    return v;
  }
  const __m256i mask = TailMask(count);
  __m256 v = _mm256_maskload_ps(in + j, mask);
  if constexpr (kFeedback) v = _mm256_add_ps(v, _mm256_maskload_ps(res + j, mask));
  return v;
}

// The canonical-order norm of one bucket, accumulated 8 elements at a time so that the dense
// encoder can interleave it with the quantization of the previous bucket (the single accumulator
// chain is latency-bound; interleaved it costs little).
template <bool kFeedback>
struct NormStream {
  const float* in = nullptr;
  const float* res = nullptr;
  size_t len = 0;
  size_t done = 0;
  __m256 acc;

  QTRAIN_QSGD_AVX2 void Start(const float* bucket_in, const float* bucket_res, size_t length) {
    in = bucket_in;
    res = bucket_res;
    len = length;
    done = 0;
    acc = _mm256_setzero_ps();
  }
  // Adds the next full group of 8, if any remains.
  QTRAIN_QSGD_AVX2 void Step() {
    if (done + 8 <= len) {
      const __m256 v = LoadSource<kFeedback>(in, res, done, 8);
      acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
      done += 8;
    }
  }
  // Adds the next 4 full groups (fewer if fewer remain).
  QTRAIN_QSGD_AVX2 void Step4() {
    if (done + 32 <= len) {
      for (int m = 0; m < 4; ++m) {
        const __m256 v = LoadSource<kFeedback>(in, res, done + 8 * m, 8);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
      }
      done += 32;
    } else {
      for (int m = 0; m < 4; ++m) Step();
    }
  }
  QTRAIN_QSGD_AVX2 float Finish() {
    while (done + 8 <= len) Step();
    if (done < len) {
      const __m256 v = LoadSource<kFeedback>(in, res, done, len - done);  // zeros add nothing
      acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
      done = len;
    }
    alignas(32) float a[8];
    _mm256_store_ps(a, acc);
    return std::sqrt(Combine8(a));
  }
};

// i * kRngGolden + key for lanes i = index..index+7 (the input of Mix32). The next 8 lanes are
// this plus HashStep().
QTRAIN_QSGD_AVX2 inline __m256i PreHash(size_t index, uint32_t key) {
  const __m256i lanes =
      _mm256_mullo_epi32(LaneIndex(), _mm256_set1_epi32(static_cast<int>(kRngGolden)));
  return _mm256_add_epi32(
      _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(index) * kRngGolden + key)), lanes);
}
QTRAIN_QSGD_AVX2 inline __m256i HashStep() {
  return _mm256_set1_epi32(static_cast<int>(8 * kRngGolden));
}

// Quantizes 8 values whose pre-hashes are `pre`: the levels, and `negative` = the sign bit (bit
// 31) of lanes with sign 1 (v < 0 and level > 0), 0 elsewhere.
QTRAIN_QSGD_AVX2 inline void Quantize8(__m256 v, __m256i pre, __m256 scale, __m256 levels_f,
                                       __m256i* level, __m256i* negative) {
  __m256i h = pre;  // Mix32, lane-wise
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7feb352d));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x846ca68bU)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  const __m256 u =
      _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0x1p-24f));
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 r = _mm256_mul_ps(_mm256_andnot_ps(sign_bit, v), scale);
  // r + u >= 0, so truncation is floorf; clamping before truncating gives the same min(l, s).
  *level = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_add_ps(r, u), levels_f));
  // sign_epi32 keeps v's sign bit where level > 0 and zeroes it where level == 0.
  *negative = _mm256_sign_epi32(_mm256_castps_si256(_mm256_and_ps(v, sign_bit)), *level);
}

// ±(level * unit), as DecodedValue.
QTRAIN_QSGD_AVX2 inline __m256 Decoded8(__m256i level, __m256i negative, __m256 unit) {
  const __m256 value = _mm256_mul_ps(_mm256_cvtepi32_ps(level), unit);
  return _mm256_xor_ps(value, _mm256_castsi256_ps(negative));
}

// The dense code: the level, and the sign bit at bit b - 1.
QTRAIN_QSGD_AVX2 inline __m256i DenseCode8(__m256i level, __m256i negative, __m128i sign_shift) {
  return _mm256_or_si256(level, _mm256_srl_epi32(negative, sign_shift));
}

// Quantizes 8 source values at bucket offset j; with feedback stores res = v - decoded. Returns
// the level and negative masks.
template <bool kFeedback>
QTRAIN_QSGD_AVX2 inline void QuantizeSource8(const float* in, float* res, size_t j, size_t count,
                                             __m256i pre, __m256 scale, __m256 unit,
                                             __m256 levels_f, __m256i* level, __m256i* negative) {
  const __m256 v = LoadSource<kFeedback>(in, res, j, count);
  Quantize8(v, pre, scale, levels_f, level, negative);
  if constexpr (kFeedback) {
    const __m256 r = _mm256_sub_ps(v, Decoded8(*level, *negative, unit));
    if (count == 8) {
      _mm256_storeu_ps(res + j, r);
    } else {
      _mm256_maskstore_ps(res + j, TailMask(count), r);
    }
  }
}

// Writes 8 codes of `bits` bits (lanes >= count are zero) at bit offset bitpos. Bits of the first
// byte below bitpos are kept; bytes past the codes may be overwritten with zeros (they are written
// later, in order).
QTRAIN_QSGD_AVX2 inline void Pack8(__m256i codes, int bits, uint64_t bitpos, size_t count,
                                   uint8_t* payload, size_t size) {
  // Pairs: 64-bit lane k holds c[2k] | c[2k+1] << bits (b <= 16, so c[2k] >> (32 - b) is 0).
  const __m256i pairs = _mm256_or_si256(_mm256_and_si256(codes, _mm256_set1_epi64x(0xFFFFFFFF)),
                                        _mm256_srl_epi64(codes, _mm_cvtsi32_si128(32 - bits)));
  // Quads: 64-bit lanes 0 and 2 hold p[0] | p[1] << 2b and p[2] | p[3] << 2b.
  const __m256i shifted = _mm256_sllv_epi64(pairs, _mm256_setr_epi64x(0, 2 * bits, 0, 2 * bits));
  const __m256i quads =
      _mm256_or_si256(shifted, _mm256_shuffle_epi32(shifted, _MM_SHUFFLE(1, 0, 3, 2)));
  const uint64_t q0 = static_cast<uint64_t>(_mm_cvtsi128_si64(_mm256_castsi256_si128(quads)));
  const uint64_t q1 = static_cast<uint64_t>(_mm_cvtsi128_si64(_mm256_extracti128_si256(quads, 1)));
  const int quad_bits = 4 * bits;
  uint64_t lo = q0;
  uint64_t hi = q1;
  if (quad_bits < 64) {
    lo = q0 | (q1 << quad_bits);
    hi = q1 >> (64 - quad_bits);
  }
  const size_t byte = bitpos >> 3;
  const int shift = static_cast<int>(bitpos & 7);
  if (shift != 0) {  // shift + 8b <= 127 (b <= 15 whenever bitpos is not byte aligned)
    hi = (hi << shift) | (lo >> (64 - shift));
    lo = (lo << shift) | (payload[byte] & ((1u << shift) - 1));
  }
  if (byte + 16 <= size) {
    std::memcpy(payload + byte, &lo, 8);
    std::memcpy(payload + byte + 8, &hi, 8);
  } else {
    uint8_t buf[16];
    std::memcpy(buf, &lo, 8);
    std::memcpy(buf + 8, &hi, 8);
    std::memcpy(payload + byte, buf, (shift + count * bits + 7) / 8);
  }
}

// The unpacker's tables (QsgdCodec::unpack_shuffle_ and unpack_shift_).
struct UnpackTable {
  const uint8_t (&shuffle)[8][32];
  const uint32_t (&shift)[8][8];
};

// Reads the 8 codes at bit offset bitpos (codes past the payload read as zero).
QTRAIN_QSGD_AVX2 inline __m256i Unpack8(const uint8_t* payload, size_t size, uint64_t bitpos,
                                        const UnpackTable& table, __m256i code_mask) {
  const size_t byte = bitpos >> 3;
  const int shift = static_cast<int>(bitpos & 7);
  __m128i raw;
  if (byte + 16 <= size) {
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(payload + byte));
  } else {
    alignas(16) uint8_t buf[16] = {};
    std::memcpy(buf, payload + byte, size - byte);
    raw = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  const __m256i both = _mm256_broadcastsi128_si256(raw);
  __m256i g = _mm256_shuffle_epi8(
      both, _mm256_load_si256(reinterpret_cast<const __m256i*>(table.shuffle[shift])));
  g = _mm256_srlv_epi32(g, _mm256_load_si256(reinterpret_cast<const __m256i*>(table.shift[shift])));
  return _mm256_and_si256(g, code_mask);
}

// b = 6 (s in [16, 31]): packs 32 codes (c[0] holds elements 0..7, ...) into 24 bytes at dst.
// With `room` (28 bytes writable at dst) it stores 28, the last 4 zero.
QTRAIN_QSGD_AVX2 inline void Pack32x6(const __m256i c[4], uint8_t* dst, bool room) {
  // Bytes [c0 0-3, c1 0-3, c2 0-3, c3 0-3 | c0 4-7, c1 4-7, c2 4-7, c3 4-7], then in element order.
  const __m256i bytes = _mm256_permutevar8x32_epi32(
      _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // Pairs c0 | c1 << 6 (16-bit), then quads c0 | c1 << 6 | c2 << 12 | c3 << 18 (32-bit).
  const __m256i pairs = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x4001));
  const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi32(0x10000001));
  // The low 3 bytes of each quad: 12 bytes per 128-bit lane.
  const __m256i packed = _mm256_shuffle_epi8(
      quads, _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1, 0, 1, 2, 4, 5,
                              6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1));
  if (room) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 12), _mm256_extracti128_si256(packed, 1));
  } else {
    alignas(16) uint8_t buf[28];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf), _mm256_castsi256_si128(packed));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf + 12), _mm256_extracti128_si256(packed, 1));
    std::memcpy(dst, buf, 24);
  }
}

// b = 6: the 32 codes in the 24 bytes at src (c[0] = elements 0..7, ...). With `room` (28 bytes
// readable at src) it loads directly.
QTRAIN_QSGD_AVX2 inline void Unpack32x6(const uint8_t* src, bool room, __m256i c[4]) {
  __m128i lo, hi;
  if (room) {
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 12));
  } else {
    alignas(16) uint8_t buf[28] = {};
    std::memcpy(buf, src, 24);
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 12));
  }
  // 32-bit lane k = the 24 bits of elements 4k..4k+3.
  const __m256i quads =
      _mm256_shuffle_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1),
                          _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1, 0,
                                           1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
  const __m256i shifts = _mm256_setr_epi32(0, 6, 12, 18, 0, 6, 12, 18);
  const __m256i mask = _mm256_set1_epi32(63);
  for (int m = 0; m < 4; ++m) {
    const __m256i spread = _mm256_permutevar8x32_epi32(
        quads,
        _mm256_setr_epi32(2 * m, 2 * m, 2 * m, 2 * m, 2 * m + 1, 2 * m + 1, 2 * m + 1, 2 * m + 1));
    c[m] = _mm256_and_si256(_mm256_srlv_epi32(spread, shifts), mask);
  }
}

template <bool kFeedback>
QTRAIN_QSGD_AVX2 absl::Status EncodeDenseAvx2(const Settings& st, const float* in, float* res,
                                              size_t n, float* norms, uint8_t* payload,
                                              size_t size) {
  const size_t nb = NumBuckets(n, st.bucket);
  const __m256 levels_f = _mm256_set1_ps(static_cast<float>(st.levels));
  const __m128i sign_shift = _mm_cvtsi32_si128(32 - st.bits);  // bit 31 to bit b - 1
  const __m256i step = HashStep();
  // The norm of bucket k + 1 is accumulated while bucket k is quantized.
  NormStream<kFeedback> next;
  next.Start(in, res, std::min<size_t>(st.bucket, n));
  float norm = nb > 0 ? next.Finish() : 0.0f;
  for (size_t k = 0; k < nb; ++k) {
    const size_t lo = k * st.bucket;
    const size_t len = std::min<size_t>(st.bucket, n - lo);
    if (!std::isfinite(norm)) return NonFiniteNormError(k, lo, len);
    norms[k] = norm;
    const float* bin = in + lo;
    float* bres = kFeedback ? res + lo : nullptr;
    const size_t next_lo = lo + len;
    if (k + 1 < nb) {
      next.Start(in + next_lo, kFeedback ? res + next_lo : nullptr,
                 std::min<size_t>(st.bucket, n - next_lo));
    } else {
      next.Start(nullptr, nullptr, 0);
    }
    const BucketParams p = ParamsFor(norm, st.levels);
    const __m256 scale = _mm256_set1_ps(p.scale);
    const __m256 unit = _mm256_set1_ps(p.unit);
    __m256i pre = PreHash(lo, st.key);
    size_t j = 0;
    if (st.bits == 6 && lo % 4 == 0) {  // 32 codes = 24 whole bytes
      for (; j + 32 <= len; j += 32) {
        __m256i codes[4];
        for (int m = 0; m < 4; ++m) {
          __m256i level, negative;
          QuantizeSource8<kFeedback>(bin, bres, j + 8 * m, 8, pre, scale, unit, levels_f, &level,
                                     &negative);
          pre = _mm256_add_epi32(pre, step);
          codes[m] = DenseCode8(level, negative, sign_shift);
        }
        next.Step4();
        const size_t byte = (lo + j) * 6 / 8;
        Pack32x6(codes, payload + byte, byte + 28 <= size);
      }
    }
    for (; j < len; j += 8) {
      const size_t count = std::min<size_t>(8, len - j);
      __m256i level, negative;
      QuantizeSource8<kFeedback>(bin, bres, j, count, pre, scale, unit, levels_f, &level,
                                 &negative);
      pre = _mm256_add_epi32(pre, step);
      const __m256i codes = DenseCode8(level, negative, sign_shift);
      Pack8(codes, st.bits, uint64_t{lo + j} * st.bits, count, payload, size);
      next.Step();
    }
    norm = next.Finish();  // 0 past the last bucket
  }
  return absl::OkStatus();
}

// Buckets up to this length are quantized once into a stack buffer (to count the nonzeros before
// writing them); longer ones are quantized twice.
constexpr size_t kEliasBufferElements = 2048;

template <bool kFeedback>
QTRAIN_QSGD_AVX2 absl::Status EncodeEliasAvx2(const Settings& st, const float* in, float* res,
                                              size_t n, float* norms, uint8_t* payload,
                                              size_t capacity, size_t* bytes) {
  const size_t nb = NumBuckets(n, st.bucket);
  const __m256 levels_f = _mm256_set1_ps(static_cast<float>(st.levels));
  const __m256i step = HashStep();
  BitWriter writer(payload, capacity);
  alignas(32) uint32_t levels[kEliasBufferElements];
  uint8_t nonzero_lanes[kEliasBufferElements / 8];
  uint8_t negative_lanes[kEliasBufferElements / 8];
  // As in the dense encoder, the norm of bucket k + 1 is accumulated during bucket k's pass 1.
  NormStream<kFeedback> next;
  next.Start(in, res, std::min<size_t>(st.bucket, n));
  float norm = nb > 0 ? next.Finish() : 0.0f;
  for (size_t k = 0; k < nb; ++k) {
    const size_t lo = k * st.bucket;
    const size_t len = std::min<size_t>(st.bucket, n - lo);
    if (!std::isfinite(norm)) return NonFiniteNormError(k, lo, len);
    norms[k] = norm;
    const float* bin = in + lo;
    float* bres = kFeedback ? res + lo : nullptr;
    const size_t next_lo = lo + len;
    if (k + 1 < nb) {
      next.Start(in + next_lo, kFeedback ? res + next_lo : nullptr,
                 std::min<size_t>(st.bucket, n - next_lo));
    } else {
      next.Start(nullptr, nullptr, 0);
    }
    const BucketParams p = ParamsFor(norm, st.levels);
    const __m256 scale = _mm256_set1_ps(p.scale);
    const __m256 unit = _mm256_set1_ps(p.unit);
    const bool buffered = len <= kEliasBufferElements;
    // Pass 1: the nonzero count (buffered: also the levels, signs and residual).
    uint32_t nonzeros = 0;
    __m256i pre = PreHash(lo, st.key);
    for (size_t j = 0; j < len; j += 8) {
      const size_t count = std::min<size_t>(8, len - j);
      __m256i level, negative;
      if (buffered) {
        QuantizeSource8<kFeedback>(bin, bres, j, count, pre, scale, unit, levels_f, &level,
                                   &negative);
        _mm256_store_si256(reinterpret_cast<__m256i*>(levels + j), level);
        negative_lanes[j / 8] =
            static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(negative)));
      } else {
        Quantize8(LoadSource<kFeedback>(bin, bres, j, count), pre, scale, levels_f, &level,
                  &negative);
      }
      pre = _mm256_add_epi32(pre, step);
      const uint32_t nz = ~static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(
                              _mm256_cmpeq_epi32(level, _mm256_setzero_si256())))) &
                          ((1u << count) - 1);
      if (buffered) nonzero_lanes[j / 8] = static_cast<uint8_t>(nz);
      nonzeros += std::popcount(nz);
      next.Step();
    }
    norm = next.Finish();  // 0 past the last bucket
    writer.WriteGamma(nonzeros + 1);
    // Pass 2: the nonzeros (unbuffered: quantized again, and the residual).
    size_t next = 0;
    pre = PreHash(lo, st.key);
    for (size_t j = 0; j < len; j += 8) {
      uint32_t nz, neg;
      const uint32_t* lane_levels;
      alignas(32) uint32_t group[8];
      if (buffered) {
        nz = nonzero_lanes[j / 8];
        neg = negative_lanes[j / 8];
        lane_levels = levels + j;
      } else {
        const size_t count = std::min<size_t>(8, len - j);
        __m256i level, negative;
        QuantizeSource8<kFeedback>(bin, bres, j, count, pre, scale, unit, levels_f, &level,
                                   &negative);
        pre = _mm256_add_epi32(pre, step);
        nz = ~static_cast<uint32_t>(_mm256_movemask_ps(
                 _mm256_castsi256_ps(_mm256_cmpeq_epi32(level, _mm256_setzero_si256())))) &
             ((1u << count) - 1);
        neg = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(negative)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(group), level);
        lane_levels = group;
      }
      while (nz != 0) {
        const int lane = std::countr_zero(nz);
        nz &= nz - 1;
        const size_t pos = j + lane;
        WriteTriple(&writer, static_cast<uint32_t>(pos - next + 1), (neg >> lane) & 1,
                    lane_levels[lane]);
        next = pos + 1;
      }
    }
  }
  *bytes = writer.Finish();
  if (writer.overflowed()) {
    return absl::InternalError(
        absl::StrCat("qsgd: encoder overran its ", capacity, "-byte payload bound (a bug)"));
  }
  return absl::OkStatus();
}

// Validates every dense code and the padding; on a bad bucket the scalar check names the element.
QTRAIN_QSGD_AVX2 absl::Status ValidateDenseAvx2(const Settings& st, const uint8_t* payload,
                                                size_t size, size_t n, const float* norms,
                                                const UnpackTable& table) {
  const size_t nb = NumBuckets(n, st.bucket);
  const __m256i code_mask = _mm256_set1_epi32(static_cast<int>((1u << st.bits) - 1));
  const __m256i level_mask = _mm256_set1_epi32(static_cast<int>((1u << (st.bits - 1)) - 1));
  const __m256i sign_only = _mm256_set1_epi32(1 << (st.bits - 1));
  const __m256i max_level = _mm256_set1_epi32(static_cast<int>(st.levels));
  for (size_t k = 0; k < nb; ++k) {
    const size_t lo = k * st.bucket;
    const size_t len = std::min<size_t>(st.bucket, n - lo);
    // A zero-norm bucket must hold zero codes: compare its levels against 0 and reject any sign.
    const bool zero_norm = norms[k] == 0.0f;
    const __m256i limit = zero_norm ? _mm256_setzero_si256() : max_level;
    __m256i bad = _mm256_setzero_si256();
    auto check = [&](__m256i codes) QTRAIN_QSGD_AVX2 {
      const __m256i level = _mm256_and_si256(codes, level_mask);
      bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(level, limit));
      bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(codes, sign_only));
    };
    size_t j = 0;
    if (st.bits == 6 && lo % 4 == 0) {
      for (; j + 32 <= len; j += 32) {
        const size_t byte = (lo + j) * 6 / 8;
        __m256i codes[4];
        Unpack32x6(payload + byte, byte + 28 <= size, codes);
        for (int m = 0; m < 4; ++m) check(codes[m]);
      }
    }
    for (; j < len; j += 8) {
      const size_t count = std::min<size_t>(8, len - j);
      __m256i codes = Unpack8(payload, size, uint64_t{lo + j} * st.bits, table, code_mask);
      if (count < 8) codes = _mm256_and_si256(codes, TailMask(count));
      check(codes);
    }
    if (!_mm256_testz_si256(bad, bad)) {
      RETURN_IF_ERROR(
          ValidateDenseRef(st, payload, size, n, norms, k, k + 1, /*check_padding=*/false));
      return absl::InternalError("qsgd: fast and reference validation disagree (a bug)");
    }
  }
  const uint64_t used_bits = uint64_t{n} * st.bits;
  if ((used_bits & 7) != 0 && (payload[size - 1] >> (used_bits & 7)) != 0) return PaddingError();
  return absl::OkStatus();
}

// out[0..count) += decoded codes, leaving level-0 elements untouched.
QTRAIN_QSGD_AVX2 inline void AddCodes8(__m256i codes, __m256i level_mask, __m128i sign_shift,
                                       __m256 unit, float* dst, size_t count) {
  const __m256i level = _mm256_and_si256(codes, level_mask);
  const __m256 sign = _mm256_and_ps(_mm256_castsi256_ps(_mm256_sll_epi32(codes, sign_shift)),
                                    _mm256_set1_ps(-0.0f));
  const __m256 value = _mm256_xor_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(level), unit), sign);
  const __m256 is_zero = _mm256_castsi256_ps(_mm256_cmpeq_epi32(level, _mm256_setzero_si256()));
  if (count == 8) {
    const __m256 o = _mm256_loadu_ps(dst);
    _mm256_storeu_ps(dst, _mm256_blendv_ps(_mm256_add_ps(o, value), o, is_zero));
  } else {
    const __m256i mask = TailMask(count);
    const __m256 o = _mm256_maskload_ps(dst, mask);
    _mm256_maskstore_ps(dst, mask, _mm256_blendv_ps(_mm256_add_ps(o, value), o, is_zero));
  }
}

QTRAIN_QSGD_AVX2 void DecodeDenseAvx2(const Settings& st, const uint8_t* payload, size_t size,
                                      size_t n, const float* norms, float* out,
                                      const UnpackTable& table) {
  const size_t nb = NumBuckets(n, st.bucket);
  const __m256i code_mask = _mm256_set1_epi32(static_cast<int>((1u << st.bits) - 1));
  const __m256i level_mask = _mm256_set1_epi32(static_cast<int>((1u << (st.bits - 1)) - 1));
  const __m128i sign_shift = _mm_cvtsi32_si128(32 - st.bits);  // the sign bit to bit 31
  for (size_t k = 0; k < nb; ++k) {
    if (norms[k] == 0.0f) continue;  // validated: every level is 0
    const size_t lo = k * st.bucket;
    const size_t len = std::min<size_t>(st.bucket, n - lo);
    const __m256 unit = _mm256_set1_ps(ParamsFor(norms[k], st.levels).unit);
    size_t j = 0;
    if (st.bits == 6 && lo % 4 == 0) {
      for (; j + 32 <= len; j += 32) {
        const size_t byte = (lo + j) * 6 / 8;
        __m256i codes[4];
        Unpack32x6(payload + byte, byte + 28 <= size, codes);
        for (int m = 0; m < 4; ++m) {
          AddCodes8(codes[m], level_mask, sign_shift, unit, out + lo + j + 8 * m, 8);
        }
      }
    }
    for (; j < len; j += 8) {
      const size_t count = std::min<size_t>(8, len - j);
      const __m256i codes = Unpack8(payload, size, uint64_t{lo + j} * st.bits, table, code_mask);
      AddCodes8(codes, level_mask, sign_shift, unit, out + lo + j, count);
    }
  }
}

}  // namespace

QsgdCodec::QsgdCodec(uint32_t levels, uint32_t bucket, Coding coding,
                     std::optional<bool> error_feedback, bool fast)
    : levels_(levels),
      bucket_(bucket),
      coding_(coding),
      error_feedback_(error_feedback),
      fast_(fast),
      bits_(1 + std::bit_width(levels)) {
  for (int start = 0; start < 8; ++start) {
    for (int lane = 0; lane < 8; ++lane) {
      const int offset = start + lane * bits_;
      unpack_shift_[start][lane] = static_cast<uint32_t>(offset & 7);
      for (int b = 0; b < 4; ++b) {
        const int index = (offset >> 3) + b;
        // Index > 15 only for start offsets that cannot occur with this width (b = 16).
        unpack_shuffle_[start][4 * lane + b] = index <= 15 ? static_cast<uint8_t>(index) : 0x80;
      }
    }
  }
}

absl::StatusOr<std::unique_ptr<QsgdCodec>> QsgdCodec::Create(const pb::CodecConfig& config,
                                                             const CodecOptions& options) {
  if (config.codec() != pb::CODEC_QSGD) {
    return absl::InvalidArgumentError(
        absl::StrCat("qsgd: config is for codec id ", static_cast<int>(config.codec())));
  }
  uint32_t levels = kDefaultLevels;
  uint32_t bucket = kDefaultBucket;
  Coding coding = Coding::kDense;
  if (config.settings_case() == pb::CodecConfig::kQsgd) {
    const pb::QsgdConfig& q = config.qsgd();
    levels = q.levels();
    bucket = q.bucket();
    switch (q.coding()) {
      case pb::QsgdConfig::CODING_DENSE:
        coding = Coding::kDense;
        break;
      case pb::QsgdConfig::CODING_ELIAS:
        coding = Coding::kElias;
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(
            "qsgd: coding=", static_cast<int>(q.coding()), " is not one of: dense, elias"));
    }
  } else if (config.settings_case() != pb::CodecConfig::SETTINGS_NOT_SET) {
    return absl::InvalidArgumentError(
        absl::StrCat("qsgd: config carries settings for another codec (field ",
                     static_cast<int>(config.settings_case()), ")"));
  }
  if (levels < 1 || levels > kMaxLevels) {
    return absl::InvalidArgumentError(
        absl::StrCat("qsgd: levels=", levels, " is not an integer in [1, ", kMaxLevels, "]"));
  }
  if (bucket < 1 || bucket > kMaxBucket) {
    return absl::InvalidArgumentError(
        absl::StrCat("qsgd: bucket=", bucket, " is not an integer in [1, ", kMaxBucket, "]"));
  }
  std::optional<bool> error_feedback;
  if (config.has_error_feedback()) error_feedback = config.error_feedback();
  const bool fast = options.path == KernelPath::kAuto && CpuHasAvx2();
  return std::unique_ptr<QsgdCodec>(new QsgdCodec(levels, bucket, coding, error_feedback, fast));
}

std::string QsgdCodec::Spec() const {
  std::string spec = absl::StrCat("qsgd:levels=", levels_, ",bucket=", bucket_,
                                  ",coding=", kCodingNames[coding_ == Coding::kDense ? 0 : 1]);
  if (error_feedback_.has_value()) absl::StrAppend(&spec, ",ef=", *error_feedback_ ? 1 : 0);
  return spec;
}

pb::CodecConfig QsgdCodec::Config() const {
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_QSGD);
  if (error_feedback_.has_value()) config.set_error_feedback(*error_feedback_);
  pb::QsgdConfig* q = config.mutable_qsgd();
  q->set_levels(levels_);
  q->set_bucket(bucket_);
  q->set_coding(coding_ == Coding::kDense ? pb::QsgdConfig::CODING_DENSE
                                          : pb::QsgdConfig::CODING_ELIAS);
  return config;
}

int64_t QsgdCodec::PayloadBytes(std::span<const int64_t> shape, uint64_t n) const {
  if (coding_ == Coding::kElias) return -1;
  return static_cast<int64_t>(DenseBytes(n, bits_));
}

template <bool kFeedback>
absl::Status QsgdCodec::EncodeImpl(std::span<const float> input, std::span<float> residual,
                                   uint32_t key, EncodedTensor* out) const {
  const size_t n = input.size();
  const size_t nb = NumBuckets(n, bucket_);
  out->scales.resize(nb);
  out->params.assign({levels_, bucket_});
  const Settings st{levels_, bucket_, bits_, key};
  const float* in = input.data();
  float* res = kFeedback ? residual.data() : nullptr;
  float* norms = out->scales.data();
  size_t bytes = 0;
  if (coding_ == Coding::kDense) {
    out->payload.resize(DenseBytes(n, bits_));
    uint8_t* payload = out->payload.data();
    const size_t capacity = out->payload.size();
    if (fast_) return EncodeDenseAvx2<kFeedback>(st, in, res, n, norms, payload, capacity);
    return EncodeRef<kFeedback, Layout::kDense>(st, in, res, n, norms, payload, capacity, &bytes);
  }
  out->payload.resize(EliasBoundBytes(n, nb, levels_, bucket_));
  uint8_t* payload = out->payload.data();
  const size_t capacity = out->payload.size();
  const absl::Status status =
      fast_
          ? EncodeEliasAvx2<kFeedback>(st, in, res, n, norms, payload, capacity, &bytes)
          : EncodeRef<kFeedback, Layout::kElias>(st, in, res, n, norms, payload, capacity, &bytes);
  if (!status.ok()) return status;
  out->payload.resize(bytes);
  return absl::OkStatus();
}

absl::Status QsgdCodec::Encode(std::span<const float> input, std::span<const int64_t> shape,
                               Rng& rng, EncodedTensor* out) const {
  RETURN_IF_ERROR(ValidateInput(input, shape));
  StartEnvelope(kFormatVersion, input, shape, out);
  const uint32_t key = rng.NextStream();
  return EncodeImpl<false>(input, {}, key, out);
}

absl::Status QsgdCodec::EncodeWithFeedback(std::span<const float> input, std::span<float> residual,
                                           std::span<const int64_t> shape, Rng& rng,
                                           EncodedTensor* out) const {
  if (residual.size() != input.size()) {
    return absl::InvalidArgumentError(absl::StrCat("qsgd: residual has ", residual.size(),
                                                   " elements, input has ", input.size()));
  }
  RETURN_IF_ERROR(ValidateInput(input, shape));
  StartEnvelope(kFormatVersion, input, shape, out);
  const uint32_t key = rng.NextStream();
  return EncodeImpl<true>(input, residual, key, out);
}

absl::Status QsgdCodec::ValidateHeader(const EncodedTensor& in) const {
  if (in.params.size() != 2 || in.params[0] != levels_ || in.params[1] != bucket_) {
    std::string got;
    for (uint32_t p : in.params) absl::StrAppend(&got, got.empty() ? "" : ",", p);
    return absl::InvalidArgumentError(absl::StrCat("qsgd payload params are [", got,
                                                   "], this decoder expects [levels, bucket] = [",
                                                   levels_, ",", bucket_, "]"));
  }
  const size_t nb = NumBuckets(in.num_elements, bucket_);
  if (in.scales.size() != nb) {
    return absl::InvalidArgumentError(
        absl::StrCat("qsgd payload has ", in.scales.size(), " bucket norms, expected ", nb, " for ",
                     in.num_elements, " elements in buckets of ", bucket_));
  }
  for (size_t k = 0; k < nb; ++k) {
    const float norm = in.scales[k];
    if (!std::isfinite(norm) || std::signbit(norm)) {
      return absl::InvalidArgumentError(absl::StrCat("qsgd payload: norm of bucket ", k, " is ",
                                                     norm, ", not finite and non-negative"));
    }
  }
  if (coding_ == Coding::kDense) {
    const uint64_t expected = DenseBytes(in.num_elements, bits_);
    if (in.payload.size() != expected) {
      return absl::InvalidArgumentError(absl::StrCat("qsgd payload is ", in.payload.size(),
                                                     " bytes, expected ", expected, " for ",
                                                     in.num_elements, " elements"));
    }
  }
  return absl::OkStatus();
}

absl::Status QsgdCodec::DecodeAdd(const EncodedTensor& in, std::span<float> out) const {
  RETURN_IF_ERROR(ValidateEnvelope(in, kFormatVersion, out.size()));
  RETURN_IF_ERROR(ValidateHeader(in));
  const Settings st{levels_, bucket_, bits_, 0};
  const size_t n = out.size();
  const uint8_t* payload = in.payload.data();
  const size_t size = in.payload.size();
  const float* norms = in.scales.data();
  if (coding_ == Coding::kElias) {
    // Two scans: validate everything, then add (so `out` is untouched on any error).
    if (fast_) {
      RETURN_IF_ERROR((ScanElias<false, true>(st, payload, size, n, norms, nullptr)));
      return ScanElias<true, true>(st, payload, size, n, norms, out.data());
    }
    RETURN_IF_ERROR((ScanElias<false, false>(st, payload, size, n, norms, nullptr)));
    return ScanElias<true, false>(st, payload, size, n, norms, out.data());
  }
  if (fast_) {
    const UnpackTable table{unpack_shuffle_, unpack_shift_};
    RETURN_IF_ERROR(ValidateDenseAvx2(st, payload, size, n, norms, table));
    DecodeDenseAvx2(st, payload, size, n, norms, out.data(), table);
  } else {
    RETURN_IF_ERROR(ValidateDenseRef(st, payload, size, n, norms, 0, NumBuckets(n, bucket_),
                                     /*check_padding=*/true));
    DecodeDenseRef(st, payload, size, n, norms, out.data());
  }
  return absl::OkStatus();
}

CodecRegistration QsgdRegistration() {
  CodecRegistration r;
  r.name = "qsgd";
  r.id = CodecId::kQsgd;
  r.keys = {"levels", "bucket", "coding"};
  r.parse = [](const SpecArgs& args, pb::CodecConfig* config) -> absl::Status {
    ASSIGN_OR_RETURN(uint32_t levels,
                     args.GetUint("levels", QsgdCodec::kDefaultLevels, 1, QsgdCodec::kMaxLevels));
    ASSIGN_OR_RETURN(uint32_t bucket,
                     args.GetUint("bucket", QsgdCodec::kDefaultBucket, 1, QsgdCodec::kMaxBucket));
    ASSIGN_OR_RETURN(int coding, args.GetChoice("coding", 0, {kCodingNames[0], kCodingNames[1]}));
    pb::QsgdConfig* q = config->mutable_qsgd();
    q->set_levels(levels);
    q->set_bucket(bucket);
    q->set_coding(coding == 0 ? pb::QsgdConfig::CODING_DENSE : pb::QsgdConfig::CODING_ELIAS);
    return absl::OkStatus();
  };
  r.create = [](const pb::CodecConfig& config,
                const CodecOptions& options) -> absl::StatusOr<std::unique_ptr<Codec>> {
    ASSIGN_OR_RETURN(std::unique_ptr<QsgdCodec> codec, QsgdCodec::Create(config, options));
    return std::unique_ptr<Codec>(std::move(codec));
  };
  return r;
}

}  // namespace qtrain::compression

#undef QTRAIN_QSGD_AVX2
