// Per-element arithmetic, bit packing and small plans of the CUDA codecs, as host-and-device
// functions: the kernels in compression/cuda/*.cu call them, and the host tests
// (tests/unit/compression/cuda/codec_math_test.cc) check them against the CPU codecs without a
// GPU. The float arithmetic is written with round-to-nearest intrinsics on the device
// (__fmul_rn, ...: never contracted into FMAs) and plain operators on the host (the project
// builds with -ffp-contract=off), so both sides compute the CPU codecs' exact bits.
//
// Plain C++ (no absl, no protobuf) so that .cu files can include it. Thread-safe (pure functions).
#ifndef QTRAIN_COMPRESSION_CUDA_CODEC_MATH_H_
#define QTRAIN_COMPRESSION_CUDA_CODEC_MATH_H_

#include <cmath>
#include <cstdint>

#include "compression/cuda/blob_check.h"
#include "compression/rng.h"

namespace qtrain::compression::cuda {

// ---- IEEE round-to-nearest arithmetic, identical on host and device ---------------------------

QTRAIN_HOST_DEVICE inline float AddRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
QTRAIN_HOST_DEVICE inline float SubRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
QTRAIN_HOST_DEVICE inline float MulRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
QTRAIN_HOST_DEVICE inline float DivRn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
QTRAIN_HOST_DEVICE inline float SqrtRn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
QTRAIN_HOST_DEVICE inline double DAddRn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
QTRAIN_HOST_DEVICE inline double DMulRn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
QTRAIN_HOST_DEVICE inline double DDivRn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
QTRAIN_HOST_DEVICE inline double DSqrtRn(double a) {
#ifdef __CUDA_ARCH__
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
QTRAIN_HOST_DEVICE inline float FloorF(float a) {
#ifdef __CUDA_ARCH__
  return floorf(a);
#else
  return std::floor(a);
#endif
}
QTRAIN_HOST_DEVICE inline float AbsF(float a) { return BitsFloat(FloatBits(a) & 0x7fffffffu); }

QTRAIN_HOST_DEVICE inline int PopCount(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}
// Index of the lowest / highest set bit; x != 0.
QTRAIN_HOST_DEVICE inline int LowBit(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __ffs(x) - 1;
#else
  return __builtin_ctz(x);
#endif
}
QTRAIN_HOST_DEVICE inline int HighBit(uint32_t x) {
#ifdef __CUDA_ARCH__
  return 31 - __clz(x);
#else
  return 31 - __builtin_clz(x);
#endif
}
// 1 + floor(log2(x)) for x >= 1 (std::bit_width).
QTRAIN_HOST_DEVICE inline uint32_t BitWidth(uint32_t x) { return x == 0 ? 0 : HighBit(x) + 1; }

// ---- Launch plans ------------------------------------------------------------------------------

// How one block encodes one segment (a onebit column, a qsgd bucket) of `len` elements: up to
// kMaxRegisterSegment elements are held in registers, `items` per thread, in a block of `threads`
// (a multiple of 32, at most 256); longer segments run a 1024-thread block that reads the segment
// twice (loop = true). Element j of the segment goes to thread j % threads, item j / threads, so
// each warp's item k covers 32 consecutive elements.
inline constexpr uint64_t kMaxRegisterSegment = 8192;
inline constexpr uint32_t kLoopThreads = 1024;
struct SegmentPlan {
  uint32_t items;
  uint32_t threads;
  bool loop;
};
QTRAIN_HOST_DEVICE inline SegmentPlan PlanSegment(uint64_t len) {
  if (len > kMaxRegisterSegment) return {1, kLoopThreads, true};
  for (uint32_t items = 4; items <= 32; items *= 2) {
    const uint64_t threads = ((len + items - 1) / items + 31) / 32 * 32;
    if (threads <= 256) return {items, threads < 32 ? 32u : static_cast<uint32_t>(threads), false};
  }
  return {32, 256, false};  // not reached: 32 * 256 == kMaxRegisterSegment
}

// ---- Bit packing of b-bit codes -----------------------------------------------------------------

// Where code `e` (b <= 16 bits, 0 <= e < 32) of a group lands in a bit string in which code e
// occupies bits [s + e*b, s + e*b + b) (LSB first, 0 <= s < 32): word `word` gets `low`, and
// word + 1 gets `high` (0 unless the code crosses into it). OR over the 32 codes gives the words.
struct CodePlace {
  uint32_t word;
  uint32_t low;
  uint32_t high;
};
QTRAIN_HOST_DEVICE inline CodePlace PlaceCode(uint32_t code, uint32_t e, uint32_t b, uint32_t s) {
  const uint32_t bit = s + e * b;
  const uint32_t off = bit & 31u;
  return {bit >> 5, code << off, off + b > 32 ? code >> (32 - off) : 0u};
}
// Words a group may span: WordsSpanned(16, 31).
inline constexpr uint32_t kMaxGroupWords = 17;
// Words spanned by 32 codes of b bits at offset s.
QTRAIN_HOST_DEVICE inline uint32_t WordsSpanned(uint32_t b, uint32_t s) {
  return (s + 32 * b + 31) / 32;
}

// x's 16 low bits spread to the even bit positions (bit k -> bit 2k).
QTRAIN_HOST_DEVICE inline uint32_t Spread16(uint32_t x) {
  x &= 0xffffu;
  x = (x | (x << 8)) & 0x00ff00ffu;
  x = (x | (x << 4)) & 0x0f0f0f0fu;
  x = (x | (x << 2)) & 0x33333333u;
  x = (x | (x << 1)) & 0x55555555u;
  return x;
}
// The two payload words of 32 two-bit codes, given the bit masks of their low and high bits
// (bit l = bit 0 / bit 1 of lane l's code): word 0 holds lanes 0..15, word 1 lanes 16..31.
QTRAIN_HOST_DEVICE inline uint32_t TwoBitWord(uint32_t low_bits, uint32_t high_bits, int half) {
  const uint32_t lo = half == 0 ? low_bits : low_bits >> 16;
  const uint32_t hi = half == 0 ? high_bits : high_bits >> 16;
  return Spread16(lo) | (Spread16(hi) << 1);
}

// ---- onebit (compression/onebit.h) --------------------------------------------------------------

// float(double(sum) / double(count)); 0 for an empty class.
QTRAIN_HOST_DEVICE inline float ClassMean(float sum, uint64_t count) {
  if (count == 0) return 0.0f;
  return static_cast<float>(DDivRn(static_cast<double>(sum), static_cast<double>(count)));
}

// ---- qsgd (compression/qsgd.h) ------------------------------------------------------------------

struct QsgdBucketParams {
  float scale;  // s / norm, 0 for a zero norm
  float unit;   // norm / s
};
QTRAIN_HOST_DEVICE inline QsgdBucketParams QsgdParamsFor(float norm, uint32_t levels) {
  const float levels_f = static_cast<float>(levels);
  return {norm > 0.0f ? DivRn(levels_f, norm) : 0.0f, DivRn(norm, levels_f)};
}
// l = min(floorf(|v| * scale + U_i), s).
QTRAIN_HOST_DEVICE inline uint32_t QsgdLevel(float v, uint32_t i, uint32_t key, float scale,
                                             float levels_f) {
  const float r = MulRn(AbsF(v), scale);
  float t = FloorF(AddRn(r, StreamUniform(key, i)));
  if (t > levels_f) t = levels_f;
  if (!(t >= 0.0f)) t = 0.0f;  // NaN (a non-finite norm; the blob is marked invalid anyway)
  return static_cast<uint32_t>(t);
}
// (negative ? -1 : 1) * (float(level) * unit), the sign as a bit flip.
QTRAIN_HOST_DEVICE inline float QsgdDecodedValue(uint32_t level, bool negative, float unit) {
  const float value = MulRn(static_cast<float>(level), unit);
  return BitsFloat(FloatBits(value) ^ (uint32_t{negative} << 31));
}
// The checks CheckDenseCode (qsgd.cc) makes on one code.
QTRAIN_HOST_DEVICE inline int32_t QsgdCodeError(uint32_t code, uint32_t levels, uint32_t bits,
                                                bool zero_norm) {
  const uint32_t level = code & ((1u << (bits - 1)) - 1);
  const bool negative = (code >> (bits - 1)) != 0;
  if (level > levels) return kErrLevelTooLarge;
  if (negative && level == 0) return kErrNegativeZero;
  if (zero_norm && code != 0) return kErrCodeInZeroBucket;
  return kDecodeOk;
}
// A bucket norm is valid when finite with its sign bit clear.
QTRAIN_HOST_DEVICE inline bool QsgdNormValid(float norm) {
  return IsFiniteF(norm) && (FloatBits(norm) >> 31) == 0;
}
// The b-bit code of element i from a payload of 32-bit little-endian words (the code's bits lie
// inside the payload, so the second word is read only when the code crosses into it).
QTRAIN_HOST_DEVICE inline uint32_t ReadCode(const uint32_t* words, uint64_t i, uint32_t bits) {
  const uint64_t bit = i * bits;
  const uint64_t w = bit >> 5;
  const uint32_t shift = static_cast<uint32_t>(bit & 31);
  uint32_t v = words[w] >> shift;
  if (shift + bits > 32) v |= words[w + 1] << (32 - shift);
  return v & ((1u << bits) - 1);
}

// ---- terngrad (compression/terngrad.h) ----------------------------------------------------------

inline constexpr uint32_t kInfBits = 0x7f800000u;

// TernGradCodec::ScaleFromStats: the local scale from sum, sum of squares (double) and max |v|
// (as bits). A non-finite max|v| gives +Inf (the CPU codec returns INVALID_ARGUMENT; the GPU
// marks the blob and lets a max-allreduce carry the Inf to every rank).
QTRAIN_HOST_DEVICE inline float TernScaleFromStats(double sum, double sum_squares,
                                                   uint32_t max_abs_bits, uint64_t n,
                                                   float clip_sigma) {
  if (max_abs_bits >= kInfBits) return BitsFloat(kInfBits);
  const float max_abs = BitsFloat(max_abs_bits);
  if (clip_sigma == 0.0f || n == 0) return max_abs;
  const double count = static_cast<double>(n);
  const double mean = DDivRn(sum, count);
  double var = DAddRn(DDivRn(sum_squares, count), -DMulRn(mean, mean));
  if (!(var > 0.0)) var = 0.0;  // std::max(x, 0.0) for the finite x here
  const double clip_at = DMulRn(static_cast<double>(clip_sigma), DSqrtRn(var));
  return clip_at < static_cast<double>(max_abs) ? static_cast<float>(clip_at) : max_abs;
}
// 1 / scale, 0 for scale 0.
QTRAIN_HOST_DEVICE inline float TernInverse(float scale) {
  return scale == 0.0f ? 0.0f : DivRn(1.0f, scale);
}
// The 2-bit code of element i (0, 1 = +1, 2 = -1): b_i = U_i < min(|v|, clip_at) * inv.
QTRAIN_HOST_DEVICE inline uint32_t TernCode(float v, uint32_t i, uint32_t key, float clip_at,
                                            float inv) {
  const float mag = AbsF(v);
  const float a = mag < clip_at ? mag : clip_at;
  const float p = MulRn(a, inv);
  const bool send = StreamUniform(key, i) < p;
  return send ? 1u + (FloatBits(v) >> 31) : 0u;
}
// Decoded value of a valid code: +scale, -scale or +0.
QTRAIN_HOST_DEVICE inline float TernValue(uint32_t code, float scale) {
  return code == 1u ? scale : (code == 2u ? BitsFloat(FloatBits(scale) | 0x80000000u) : 0.0f);
}
// Whether a 32-bit payload word holds the invalid code 11 in any of its 16 fields.
QTRAIN_HOST_DEVICE inline bool TernWordInvalid(uint32_t w) {
  return (w & (w >> 1) & 0x55555555u) != 0;
}

// ---- fp16 (compression/fp16.cc, FloatToHalf and HalfToFloat, bit for bit) -----------------------

QTRAIN_HOST_DEVICE inline uint16_t FloatToHalfBits(float value) {
  constexpr float kMaxHalf = 65504.0f;
  if (value > kMaxHalf) value = kMaxHalf;  // NaN passes (comparisons are false)
  if (value < -kMaxHalf) value = -kMaxHalf;
  const uint32_t x = FloatBits(value);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax < 0x38800000u) {
    const float r = AddRn(BitsFloat(ax), 0.5f);
    return static_cast<uint16_t>(sign | (FloatBits(r) - 0x3f000000u));
  }
  const uint32_t odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + odd;
  return static_cast<uint16_t>(sign | (ax >> 13));
}

QTRAIN_HOST_DEVICE inline float HalfBitsToFloat(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1fu;
  const uint32_t mantissa = half & 0x3ffu;
  if (exponent == 0) {
    const float r = MulRn(static_cast<float>(mantissa), 0x1p-24f);
    return sign ? -r : r;
  }
  if (exponent == 31) return BitsFloat(sign | 0x7f800000u | (mantissa << 13));
  return BitsFloat(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// ---- threshold (compression/threshold.h: LEB128 varints of (gap << 1) | sign)
// ---------------------

// Bytes of the varint of code (gap << 1) | sign, which depend on the gap only.
QTRAIN_HOST_DEVICE inline uint32_t VarintBytesForGap(uint64_t gap) {
  return gap < (uint64_t{1} << 6)    ? 1
         : gap < (uint64_t{1} << 13) ? 2
         : gap < (uint64_t{1} << 20) ? 3
         : gap < (uint64_t{1} << 27) ? 4
                                     : 5;
}
// Note: an entry of gap g covers g + 1 elements and takes VarintBytesForGap(g) <= g + 1 bytes, so
// a valid payload of n elements has at most n bytes.

// Writes the varint of `value` at dst; returns its length (compression/varint.h PutVarint32).
QTRAIN_HOST_DEVICE inline uint32_t PutVarint(uint8_t* dst, uint32_t value) {
  uint32_t k = 0;
  while (value >= 0x80) {
    dst[k++] = static_cast<uint8_t>(value | 0x80);
    value >>= 7;
  }
  dst[k++] = static_cast<uint8_t>(value);
  return k;
}

// The entries of a run of elements, summarized so that runs combine in order (an associative
// operation, so a parallel scan can assign every entry its byte offset): `inner` counts the bytes
// of every entry but the run's first, whose gap depends on what precedes the run.
struct EntryRun {
  uint32_t count;  // entries (0: an empty run; the other fields are then 0)
  uint32_t first;  // index of the first entry
  uint32_t last;   // index of the last entry
  uint32_t unused;
  uint64_t inner;
};
QTRAIN_HOST_DEVICE inline EntryRun EmptyRun() { return {0, 0, 0, 0, 0}; }
QTRAIN_HOST_DEVICE inline EntryRun CombineRuns(const EntryRun& a, const EntryRun& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  return {a.count + b.count, a.first, b.last, 0,
          a.inner + VarintBytesForGap(b.first - a.last - 1) + b.inner};
}
// Bytes of a stream that starts with this run (its first gap counted from index 0).
QTRAIN_HOST_DEVICE inline uint64_t RunStreamBytes(const EntryRun& r) {
  return r.count == 0 ? 0 : VarintBytesForGap(r.first) + r.inner;
}
// The run of the set bits of `selected`, bit b standing for element base + b. Two set bits of one
// word are less than 32 apart, so every entry after the word's first takes one byte.
QTRAIN_HOST_DEVICE inline EntryRun WordRun(uint32_t selected, uint64_t base) {
  if (selected == 0) return EmptyRun();
  EntryRun r;
  r.count = static_cast<uint32_t>(PopCount(selected));
  r.first = static_cast<uint32_t>(base + LowBit(selected));
  r.last = static_cast<uint32_t>(base + HighBit(selected));
  r.unused = 0;
  r.inner = r.count - 1;
  return r;
}
// Bytes the entries of `selected` take when the previous entry ended before index `next`
// (next = previous index + 1, or 0 when there is none): the first entry's varint, then one byte
// per further entry (as in WordRun).
QTRAIN_HOST_DEVICE inline uint64_t WordBytes(uint32_t selected, uint64_t base, uint64_t next) {
  if (selected == 0) return 0;
  return VarintBytesForGap(base + LowBit(selected) - next) + PopCount(selected) - 1;
}
// Writes the entries of `selected` (signs: bit set = -tau) at dst; returns the bytes written.
QTRAIN_HOST_DEVICE inline uint64_t PutWordEntries(uint32_t selected, uint32_t signs, uint64_t base,
                                                  uint64_t next, uint8_t* dst) {
  uint64_t pos = 0;
  for (uint32_t m = selected; m != 0; m &= m - 1) {
    const int bit = LowBit(m);
    const uint64_t index = base + bit;
    const uint32_t code = static_cast<uint32_t>(((index - next) << 1) | ((signs >> bit) & 1u));
    pos += PutVarint(dst + pos, code);
    next = index + 1;
  }
  return pos;
}

// The varint that ends at byte p of the payload (payload[p] < 0x80), read backwards through the
// continuation bytes before it; the payload is split into varints at its terminator bytes, so
// this parses every varint independently. Returns kDecodeOk and *value, or the varint error that
// compression/varint.h's parser gives for the same bytes.
QTRAIN_HOST_DEVICE inline int32_t ParseVarintEndingAt(const uint8_t* payload, uint64_t p,
                                                      uint32_t* value) {
  uint32_t k = 0;  // continuation bytes before p (at most 5 looked at)
  while (k < 5 && p > k && payload[p - k - 1] >= 0x80) ++k;
  if (k == 5) return kErrVarintTooLong;
  const uint32_t last = payload[p];
  if (k == 4 && last > 0x0f) return kErrVarintOverflow;
  if (k > 0 && last == 0) return kErrVarintNonCanonical;
  uint32_t v = 0;
  for (uint32_t j = 0; j < k; ++j) v |= uint32_t{payload[p - k + j] & 0x7fu} << (7 * j);
  v |= last << (7 * k);
  *value = v;
  return kDecodeOk;
}

}  // namespace qtrain::compression::cuda

#endif  // QTRAIN_COMPRESSION_CUDA_CODEC_MATH_H_
