#include "compression/onebit.h"

#include <immintrin.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace qtrain::compression {
namespace {

// Canonical-order sums of one column's two classes and the size of the non-negative class.
struct ColumnStats {
  float sum_pos = 0.0f;  // elements with v >= 0
  float sum_neg = 0.0f;  // elements with v < 0 (and NaN)
  uint64_t count_pos = 0;
};

// The fixed combination of the eight partial sums.
inline float Combine8(const float* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// Mean of a class; 0 for an empty class.
inline float ClassMean(float sum, uint64_t count) {
  if (count == 0) return 0.0f;
  return static_cast<float>(static_cast<double>(sum) / static_cast<double>(count));
}

// ---- Scalar reference ------------------------------------------------------------------------

// One column: v_j = in[j] (+ res[j], stored back into res[j] when res != nullptr). Sets the bits
// of the non-negative elements in `bits` (zeroed by the caller); `first` is the column's first
// element index in the tensor.
ColumnStats EncodeColumnScalar(const float* in, float* res, size_t len, uint64_t first,
                               uint8_t* bits) {
  float pos[8] = {};
  float neg[8] = {};
  uint64_t count = 0;
  for (size_t j = 0; j < len; ++j) {
    float v = in[j];
    if (res != nullptr) {
      v = v + res[j];
      res[j] = v;
    }
    if (v >= 0.0f) {
      pos[j % 8] += v;
      ++count;
      const uint64_t i = first + j;
      bits[i / 8] = static_cast<uint8_t>(bits[i / 8] | (1u << (i % 8)));
    } else {
      neg[j % 8] += v;
    }
  }
  return {Combine8(pos), Combine8(neg), count};
}

// res[j] = v_j - decode_j, where res holds v on entry.
void ApplyMeansScalar(float* res, size_t len, float mean_neg, float mean_pos) {
  for (size_t j = 0; j < len; ++j) res[j] = res[j] - (res[j] >= 0.0f ? mean_pos : mean_neg);
}

void DecodeColumnScalar(const uint8_t* bits, uint64_t begin, uint64_t end, float mean_neg,
                        float mean_pos, float* out) {
  for (uint64_t i = begin; i < end; ++i) {
    out[i] += ((bits[i / 8] >> (i % 8)) & 1u) ? mean_pos : mean_neg;
  }
}

// ---- AVX2 path -------------------------------------------------------------------------------

// Appends bits LSB first to a byte stream that it fills completely: Flush writes the last
// partial byte with its unused high bits 0.
class BitWriter {
 public:
  explicit BitWriter(uint8_t* dst) : dst_(dst) {}

  // Appends the low `count` (<= 32) bits of `bits`; its higher bits must be 0.
  void Put(uint32_t bits, unsigned count) {
    acc_ |= static_cast<uint64_t>(bits) << pending_;
    pending_ += count;
    while (pending_ >= 8) {
      *dst_++ = static_cast<uint8_t>(acc_);
      acc_ >>= 8;
      pending_ -= 8;
    }
  }
  // Appends 32 bits. Between calls fewer than 8 bits are pending, so 4 whole bytes are ready.
  void Put32(uint32_t bits) {
    acc_ |= static_cast<uint64_t>(bits) << pending_;
    std::memcpy(dst_, &acc_, 4);  // x86-64 is little-endian, as the format is
    dst_ += 4;
    acc_ >>= 32;
  }
  void Flush() {
    if (pending_ > 0) *dst_++ = static_cast<uint8_t>(acc_);
    acc_ = 0;
    pending_ = 0;
  }

 private:
  uint8_t* dst_;
  uint64_t acc_ = 0;
  unsigned pending_ = 0;
};

#define QTRAIN_ONEBIT_AVX2 __attribute__((target("avx2,fma,f16c")))

// Loads 8 values of v (adding and storing back the residual with feedback).
template <bool kFeedback>
QTRAIN_ONEBIT_AVX2 inline __m256 LoadV(const float* in, float* res) {
  __m256 v = _mm256_loadu_ps(in);
  if constexpr (kFeedback) {
    v = _mm256_add_ps(v, _mm256_loadu_ps(res));
    _mm256_storeu_ps(res, v);
  }
  return v;
}

// Adds 8 values to the class accumulators (lane l holds offsets = l mod 8); returns the bits of
// the non-negative ones.
QTRAIN_ONEBIT_AVX2 inline uint32_t Accumulate(__m256 v, __m256* pos, __m256* neg) {
  const __m256 m = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ);
  *pos = _mm256_add_ps(*pos, _mm256_and_ps(m, v));
  *neg = _mm256_add_ps(*neg, _mm256_andnot_ps(m, v));
  return static_cast<uint32_t>(_mm256_movemask_ps(m));
}

// The residual update of a column whose means are known, deferred so that it runs inside the
// next column's first pass (which is bound by the latency of its sum chains, leaving room).
struct PendingColumn {
  float* res = nullptr;
  size_t len = 0;
  float mean_neg = 0.0f;
  float mean_pos = 0.0f;
};

// res[j] -= the reconstruction, for 8 elements (the AVX2 twin of ApplyMeansScalar).
QTRAIN_ONEBIT_AVX2 inline void ApplyEight(float* res, __m256 vneg, __m256 vpos) {
  const __m256 v = _mm256_loadu_ps(res);
  const __m256 m = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ);
  _mm256_storeu_ps(res, _mm256_sub_ps(v, _mm256_blendv_ps(vneg, vpos, m)));
}

QTRAIN_ONEBIT_AVX2 void ApplyMeansAvx2(float* res, size_t len, float mean_neg, float mean_pos) {
  const __m256 vneg = _mm256_set1_ps(mean_neg);
  const __m256 vpos = _mm256_set1_ps(mean_pos);
  size_t j = 0;
  for (; j + 8 <= len; j += 8) ApplyEight(res + j, vneg, vpos);
  ApplyMeansScalar(res + j, len - j, mean_neg, mean_pos);
}

// The AVX2 twin of EncodeColumnScalar; bits go through `bit_writer`. With feedback it also
// completes `pending` (another column's residual update), interleaved with its own first pass.
template <bool kFeedback>
QTRAIN_ONEBIT_AVX2 ColumnStats EncodeColumnAvx2(const float* in, float* res, size_t len,
                                                BitWriter* bit_writer, PendingColumn* pending) {
  // A local copy whose address does not escape: the byte stores cannot alias its state, so it
  // stays in registers.
  BitWriter local_writer = *bit_writer;
  BitWriter* writer = &local_writer;
  __m256 pos = _mm256_setzero_ps();
  __m256 neg = _mm256_setzero_ps();
  uint64_t count = 0;  // non-negative elements
  // Locals: the bit writer's byte stores could alias *pending.
  float* const pending_res = kFeedback ? pending->res : nullptr;
  const size_t pending_len = kFeedback ? pending->len : 0;
  size_t pending_done = 0;
  __m256 pending_neg = _mm256_setzero_ps();
  __m256 pending_pos = _mm256_setzero_ps();
  if constexpr (kFeedback) {
    pending_neg = _mm256_set1_ps(pending->mean_neg);
    pending_pos = _mm256_set1_ps(pending->mean_pos);
  }
  size_t j = 0;
  for (; j + 32 <= len; j += 32) {
    if constexpr (kFeedback) {
      if (pending_done + 32 <= pending_len) {
        float* p = pending_res + pending_done;
        ApplyEight(p, pending_neg, pending_pos);
        ApplyEight(p + 8, pending_neg, pending_pos);
        ApplyEight(p + 16, pending_neg, pending_pos);
        ApplyEight(p + 24, pending_neg, pending_pos);
        pending_done += 32;
      }
    }
    // Separate statements: the accumulators must take the four vectors in order.
    const float* x = in + j;
    float* r = kFeedback ? res + j : nullptr;
    uint32_t m = Accumulate(LoadV<kFeedback>(x, r), &pos, &neg);
    m |= Accumulate(LoadV<kFeedback>(x + 8, kFeedback ? r + 8 : nullptr), &pos, &neg) << 8;
    m |= Accumulate(LoadV<kFeedback>(x + 16, kFeedback ? r + 16 : nullptr), &pos, &neg) << 16;
    m |= Accumulate(LoadV<kFeedback>(x + 24, kFeedback ? r + 24 : nullptr), &pos, &neg) << 24;
    count += static_cast<unsigned>(std::popcount(m));
    writer->Put32(m);
  }
  for (; j + 8 <= len; j += 8) {
    const uint32_t m =
        Accumulate(LoadV<kFeedback>(in + j, kFeedback ? res + j : nullptr), &pos, &neg);
    count += static_cast<unsigned>(std::popcount(m));
    writer->Put(m, 8);
  }
  alignas(32) float pos_lanes[8];
  alignas(32) float neg_lanes[8];
  _mm256_store_ps(pos_lanes, pos);
  _mm256_store_ps(neg_lanes, neg);
  for (; j < len; ++j) {  // the tail continues the same lanes in scalar code
    float v = in[j];
    if constexpr (kFeedback) {
      v = v + res[j];
      res[j] = v;
    }
    if (v >= 0.0f) {
      pos_lanes[j % 8] += v;
      ++count;
      writer->Put(1, 1);
    } else {
      neg_lanes[j % 8] += v;
      writer->Put(0, 1);
    }
  }
  *bit_writer = local_writer;
  if constexpr (kFeedback) {
    if (pending_len > pending_done) {
      ApplyMeansAvx2(pending_res + pending_done, pending_len - pending_done, pending->mean_neg,
                     pending->mean_pos);
    }
    *pending = PendingColumn{};
  }
  return {Combine8(pos_lanes), Combine8(neg_lanes), count};
}

// out[i..i+8) += the reconstruction of the 8 bits selected by `select` within `bits`.
QTRAIN_ONEBIT_AVX2 inline void AddEight(__m256i bits, __m256i select, __m256 vneg, __m256 vpos,
                                        float* out) {
  const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(bits, select), select);
  const __m256 rec = _mm256_blendv_ps(vneg, vpos, _mm256_castsi256_ps(m));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), rec));
}

QTRAIN_ONEBIT_AVX2 void DecodeColumnAvx2(const uint8_t* bits, uint64_t begin, uint64_t end,
                                         float mean_neg, float mean_pos, float* out) {
  uint64_t i = begin;
  const uint64_t head_end = std::min(end, (begin + 7) & ~uint64_t{7});
  DecodeColumnScalar(bits, i, head_end, mean_neg, mean_pos, out);
  i = head_end;
  const __m256 vneg = _mm256_set1_ps(mean_neg);
  const __m256 vpos = _mm256_set1_ps(mean_pos);
  const __m256i sel0 =
      _mm256_setr_epi32(1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7);
  const __m256i sel1 = _mm256_slli_epi32(sel0, 8);
  const __m256i sel2 = _mm256_slli_epi32(sel0, 16);
  const __m256i sel3 = _mm256_slli_epi32(sel0, 24);
  for (; i + 32 <= end; i += 32) {  // i is a multiple of 8 here
    uint32_t word;
    std::memcpy(&word, bits + i / 8, 4);
    const __m256i w = _mm256_set1_epi32(static_cast<int>(word));
    AddEight(w, sel0, vneg, vpos, out + i);
    AddEight(w, sel1, vneg, vpos, out + i + 8);
    AddEight(w, sel2, vneg, vpos, out + i + 16);
    AddEight(w, sel3, vneg, vpos, out + i + 24);
  }
  for (; i + 8 <= end; i += 8) {
    AddEight(_mm256_set1_epi32(bits[i / 8]), sel0, vneg, vpos, out + i);
  }
  DecodeColumnScalar(bits, i, end, mean_neg, mean_pos, out);
}

#undef QTRAIN_ONEBIT_AVX2

absl::Status BadSetting(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("onebit: ", what));
}

}  // namespace

OneBitCodec::OneBitCodec(pb::CodecConfig config, bool fast)
    : config_(std::move(config)), bucket_(config_.onebit().bucket()), fast_(fast) {}

absl::StatusOr<std::unique_ptr<OneBitCodec>> OneBitCodec::Create(const pb::CodecConfig& config,
                                                                 const CodecOptions& options) {
  if (config.codec() != pb::CODEC_ONEBIT) {
    return BadSetting(absl::StrCat("config names codec id ", static_cast<int>(config.codec()),
                                   ", expected ", static_cast<int>(pb::CODEC_ONEBIT)));
  }
  pb::CodecConfig normalized = config;
  switch (config.settings_case()) {
    case pb::CodecConfig::kOnebit:
      break;
    case pb::CodecConfig::SETTINGS_NOT_SET:
      normalized.mutable_onebit();
      break;
    default:
      return BadSetting(absl::StrCat("config carries settings of another codec (field ",
                                     static_cast<int>(config.settings_case()), ")"));
  }
  const uint32_t bucket = normalized.onebit().bucket();
  if (bucket > kMaxBucket) {
    return BadSetting(absl::StrCat("bucket=", bucket, " is out of range: expected 0 (per-column ",
                                   "rule) or 1..", kMaxBucket));
  }
  const bool fast = options.path == KernelPath::kAuto && CpuHasAvx2();
  return std::unique_ptr<OneBitCodec>(new OneBitCodec(std::move(normalized), fast));
}

std::string OneBitCodec::Spec() const {
  std::vector<std::string> args;
  if (bucket_ > 0) args.push_back(absl::StrCat("bucket=", bucket_));
  if (config_.has_error_feedback()) args.push_back(config_.error_feedback() ? "ef=1" : "ef=0");
  if (args.empty()) return "onebit";
  return absl::StrCat("onebit:", absl::StrJoin(args, ","));
}

uint32_t OneBitCodec::ColumnLength(std::span<const int64_t> shape) const {
  if (bucket_ > 0) return bucket_;
  if (shape.size() >= 2) {
    absl::StatusOr<uint64_t> column = ShapeElements(shape.subspan(1));
    // ShapeElements bounds the product by kMaxElements < 2^32.
    if (column.ok() && *column >= kMinColumnLength) return static_cast<uint32_t>(*column);
  }
  return kDefaultBucket;
}

absl::Status OneBitCodec::Encode(std::span<const float> input, std::span<const int64_t> shape,
                                 Rng& rng, EncodedTensor* out) const {
  return EncodeImpl(input, {}, shape, out);
}

absl::Status OneBitCodec::EncodeWithFeedback(std::span<const float> input,
                                             std::span<float> residual,
                                             std::span<const int64_t> shape, Rng& rng,
                                             EncodedTensor* out) const {
  if (residual.size() != input.size()) {
    return absl::InvalidArgumentError(absl::StrCat("onebit: residual has ", residual.size(),
                                                   " elements, input has ", input.size()));
  }
  if (input.empty()) return EncodeImpl(input, {}, shape, out);
  return EncodeImpl(input, residual, shape, out);
}

absl::Status OneBitCodec::EncodeImpl(std::span<const float> input, std::span<float> residual,
                                     std::span<const int64_t> shape, EncodedTensor* out) const {
  RETURN_IF_ERROR(ValidateInput(input, shape));
  StartEnvelope(kFormatVersion, input, shape, out);
  const bool feedback = !residual.empty();
  const uint64_t n = input.size();
  // A column never extends past the tensor, so each partition has exactly one encoding.
  const uint64_t len = std::min<uint64_t>(ColumnLength(shape), std::max<uint64_t>(n, 1));
  const uint64_t columns = (n + len - 1) / len;
  out->params.push_back(static_cast<uint32_t>(len));
  out->scales.resize(2 * columns);
  out->payload.resize((n + 7) / 8);
  uint8_t* bits = out->payload.data();
  if (!fast_) std::fill(out->payload.begin(), out->payload.end(), uint8_t{0});
  BitWriter writer(bits);
  PendingColumn pending;  // fast path with feedback: the last column's residual update
  for (uint64_t c = 0; c < columns; ++c) {
    const uint64_t begin = c * len;
    const uint64_t size = std::min(len, n - begin);
    const float* in = input.data() + begin;
    float* res = feedback ? residual.data() + begin : nullptr;
    ColumnStats stats;
    if (!fast_) {
      stats = EncodeColumnScalar(in, res, size, begin, bits);
    } else if (feedback) {
      stats = EncodeColumnAvx2<true>(in, res, size, &writer, &pending);
    } else {
      stats = EncodeColumnAvx2<false>(in, nullptr, size, &writer, nullptr);
    }
    const float mean_neg = ClassMean(stats.sum_neg, size - stats.count_pos);
    const float mean_pos = ClassMean(stats.sum_pos, stats.count_pos);
    if (!std::isfinite(mean_neg) || !std::isfinite(mean_pos)) {
      return absl::InvalidArgumentError(
          absl::StrCat("onebit: column ", c, " (elements ", begin, "..", begin + size - 1,
                       ") has a non-finite mean: the input", feedback ? " plus residual" : "",
                       " holds NaN or Inf, or a class sum overflows float"));
    }
    out->scales[2 * c] = mean_neg;
    out->scales[2 * c + 1] = mean_pos;
    if (feedback && fast_) {
      pending = PendingColumn{res, size, mean_neg, mean_pos};
    } else if (feedback) {
      ApplyMeansScalar(res, size, mean_neg, mean_pos);
    }
  }
  if (pending.len > 0) {
    ApplyMeansAvx2(pending.res, pending.len, pending.mean_neg, pending.mean_pos);
  }
  if (fast_) writer.Flush();
  return absl::OkStatus();
}

absl::Status OneBitCodec::DecodeAdd(const EncodedTensor& in, std::span<float> out) const {
  RETURN_IF_ERROR(ValidateEnvelope(in, kFormatVersion, out.size()));
  const uint64_t n = in.num_elements;
  if (in.params.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("onebit payload has ", in.params.size(),
                                                   " params, expected 1 (the column length)"));
  }
  const uint64_t len = in.params[0];
  if (len == 0 || len > std::max<uint64_t>(n, 1)) {
    return absl::InvalidArgumentError(absl::StrCat("onebit payload declares column length ", len,
                                                   " for ", n, " elements, expected 1..",
                                                   std::max<uint64_t>(n, 1)));
  }
  const uint64_t columns = (n + len - 1) / len;
  if (in.scales.size() != 2 * columns) {
    return absl::InvalidArgumentError(
        absl::StrCat("onebit payload has ", in.scales.size(), " scales, expected ", 2 * columns,
                     " (2 per column) for ", n, " elements in columns of ", len));
  }
  const uint64_t bytes = (n + 7) / 8;
  if (in.payload.size() != bytes) {
    return absl::InvalidArgumentError(absl::StrCat("onebit payload is ", in.payload.size(),
                                                   " bytes, expected ", bytes, " for ", n,
                                                   " elements"));
  }
  if (n % 8 != 0 && (in.payload.back() >> (n % 8)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("onebit payload's last byte 0x",
                                                   absl::Hex(in.payload.back()),
                                                   " sets padding bits past element ", n - 1));
  }
  for (size_t k = 0; k < in.scales.size(); ++k) {
    if (!std::isfinite(in.scales[k])) {
      return absl::InvalidArgumentError(
          absl::StrCat("onebit scale ", k, " (column ", k / 2, ") is not finite: ", in.scales[k]));
    }
  }
  const uint8_t* bits = in.payload.data();
  for (uint64_t c = 0; c < columns; ++c) {
    const uint64_t begin = c * len;
    const uint64_t end = std::min(begin + len, n);
    (fast_ ? DecodeColumnAvx2 : DecodeColumnScalar)(bits, begin, end, in.scales[2 * c],
                                                    in.scales[2 * c + 1], out.data());
  }
  return absl::OkStatus();
}

CodecRegistration OneBitRegistration() {
  CodecRegistration r;
  r.name = "onebit";
  r.id = CodecId::kOneBit;
  r.keys = {"bucket"};
  r.parse = [](const SpecArgs& args, pb::CodecConfig* config) -> absl::Status {
    ASSIGN_OR_RETURN(uint32_t bucket, args.GetUint("bucket", 0, 1, OneBitCodec::kMaxBucket));
    config->mutable_onebit()->set_bucket(bucket);
    return absl::OkStatus();
  };
  r.create = [](const pb::CodecConfig& config,
                const CodecOptions& options) -> absl::StatusOr<std::unique_ptr<Codec>> {
    ASSIGN_OR_RETURN(std::unique_ptr<OneBitCodec> codec, OneBitCodec::Create(config, options));
    return std::unique_ptr<Codec>(std::move(codec));
  };
  return r;
}

}  // namespace qtrain::compression
