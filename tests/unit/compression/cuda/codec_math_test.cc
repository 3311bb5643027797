// Host tests of the CUDA codecs' device logic (compression/cuda/codec_math.h, blob_check.h),
// run without a GPU: the kernels are thin loops around these host-and-device functions, so each
// test emulates a kernel's loop on the host exactly as the kernel runs it (warp lanes as a loop,
// the same packing, the same prefix logic) and compares the result with the CPU codec:
//   - packing of b-bit codes (StoreCodeWords' algorithm) against a bit-by-bit reference;
//   - fp16 conversions against compression/fp16.h for all halves and a sweep of floats;
//   - onebit, qsgd, terngrad and threshold encodes emulated with the CPU's reductions give the
//     CPU payloads and residuals exactly (so only the GPU reduction order can differ);
//   - the varint, run and plan helpers;
//   - the device validation (CheckBlobHeader + the body checks) accepts exactly the blobs that
//     UnpackBlob + the CPU DecodeAdd accept, over thousands of random corruptions, and the
//     emulated decode-add equals the CPU decode bit for bit.
#include "compression/cuda/codec_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "compression/bit_stream.h"
#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/cuda/blob_check.h"
#include "compression/cuda/codec_kernels.h"
#include "compression/fp16.h"
#include "compression/onebit.h"
#include "compression/packed_blob.h"
#include "compression/qsgd.h"
#include "compression/terngrad.h"
#include "compression/threshold.h"
#include "compression/varint.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::compression::cuda {
namespace {

using ::qtrain::testing::IsOk;

std::vector<float> Gaussian(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

std::unique_ptr<Codec> CpuCodec(const std::string& spec) {
  CodecRegistry registry;
  EXPECT_THAT(RegisterBuiltinCodecs(&registry), IsOk());
  auto codec = registry.CreateFromSpec(spec);
  EXPECT_THAT(codec, IsOk());
  return std::move(*codec);
}

// ---- Packing ------------------------------------------------------------------------------------

// StoreCodeWords' packing with the lanes as a loop: the words of 32 codes of b bits at bit
// offset s.
std::vector<uint32_t> PackGroup(const uint32_t* codes, uint32_t b, uint32_t s) {
  std::vector<uint32_t> words(WordsSpanned(b, s), 0);
  EXPECT_LE(words.size(), kMaxGroupWords);
  for (uint32_t e = 0; e < 32; ++e) {
    const CodePlace p = PlaceCode(codes[e], e, b, s);
    words[p.word] |= p.low;
    if (p.high != 0) words[p.word + 1] |= p.high;
  }
  return words;
}

// StoreCodeWords on a host word array.
void StoreGroup(std::vector<uint32_t>* payload, uint64_t first_bit, const uint32_t* codes,
                uint32_t b, bool atomic) {
  const uint32_t s = static_cast<uint32_t>(first_bit & 31);
  const std::vector<uint32_t> words = PackGroup(codes, b, s);
  for (uint32_t lane = 0; lane < words.size(); ++lane) {
    const uint64_t index = (first_bit >> 5) + lane;
    if (index >= payload->size()) continue;
    if (atomic) {
      (*payload)[index] |= words[lane];
    } else {
      (*payload)[index] = words[lane];
    }
  }
}

std::vector<uint8_t> WordsToBytes(const std::vector<uint32_t>& words, size_t bytes) {
  std::vector<uint8_t> out(4 * words.size());
  for (size_t w = 0; w < words.size(); ++w) {
    for (int k = 0; k < 4; ++k) out[4 * w + k] = static_cast<uint8_t>(words[w] >> (8 * k));
  }
  for (size_t k = bytes; k < out.size(); ++k) EXPECT_EQ(out[k], 0) << "padding byte " << k;
  out.resize(bytes);
  return out;
}

TEST(CodecMathTest, PackGroupMatchesBitByBitReference) {
  std::mt19937 gen(1);
  for (uint32_t b = 1; b <= 16; ++b) {
    for (uint32_t s = 0; s < 32; ++s) {
      uint32_t codes[32];
      for (auto& c : codes) c = gen() & ((1u << b) - 1);
      const std::vector<uint32_t> words = PackGroup(codes, b, s);
      std::vector<uint32_t> expected((s + 32 * b + 31) / 32, 0);
      for (uint32_t e = 0; e < 32; ++e) {
        for (uint32_t k = 0; k < b; ++k) {
          const uint64_t bit = s + uint64_t{e} * b + k;
          if ((codes[e] >> k) & 1u) expected[bit / 32] |= 1u << (bit % 32);
        }
      }
      EXPECT_EQ(words, expected) << "b=" << b << " s=" << s;
    }
  }
}

TEST(CodecMathTest, TwoBitWordInterleaves) {
  std::mt19937 gen(2);
  for (int trial = 0; trial < 1000; ++trial) {
    uint32_t codes[32];
    uint32_t low = 0, high = 0;
    for (uint32_t l = 0; l < 32; ++l) {
      codes[l] = gen() % 3;
      low |= (codes[l] & 1u) << l;
      high |= ((codes[l] >> 1) & 1u) << l;
    }
    const std::vector<uint32_t> expected = PackGroup(codes, 2, 0);
    ASSERT_EQ(expected.size(), 2u);
    EXPECT_EQ(TwoBitWord(low, high, 0), expected[0]);
    EXPECT_EQ(TwoBitWord(low, high, 1), expected[1]);
  }
}

TEST(CodecMathTest, BitHelpers) {
  for (uint32_t x : {1u, 2u, 3u, 0x80000000u, 0x12345678u, 0xffffffffu}) {
    EXPECT_EQ(LowBit(x), __builtin_ctz(x));
    EXPECT_EQ(HighBit(x), 31 - __builtin_clz(x));
    EXPECT_EQ(PopCount(x), __builtin_popcount(x));
  }
  for (uint32_t levels : {1u, 2u, 3u, 15u, 16u, 32767u}) {
    EXPECT_EQ(static_cast<int>(1 + BitWidth(levels)), QsgdCodec::Create([&] {
                                                        pb::CodecConfig c;
                                                        c.set_codec(pb::CODEC_QSGD);
                                                        c.mutable_qsgd()->set_levels(levels);
                                                        c.mutable_qsgd()->set_bucket(512);
                                                        return c;
                                                      }())
                                                          .value()
                                                          ->code_bits());
  }
}

TEST(CodecMathTest, SegmentPlans) {
  for (uint64_t len = 1; len <= 20000; ++len) {
    const SegmentPlan p = PlanSegment(len);
    if (len > kMaxRegisterSegment) {
      EXPECT_TRUE(p.loop) << len;
      EXPECT_EQ(p.threads, kLoopThreads);
      continue;
    }
    EXPECT_FALSE(p.loop) << len;
    EXPECT_EQ(p.threads % 32, 0u) << len;
    EXPECT_GE(p.threads, 32u);
    EXPECT_LE(p.threads, 256u) << len;
    EXPECT_GE(uint64_t{p.items} * p.threads, len) << len;
    EXPECT_TRUE(p.items == 4 || p.items == 8 || p.items == 16 || p.items == 32) << len;
  }
}

// ---- fp16 ---------------------------------------------------------------------------------------

TEST(CodecMathTest, HalfToFloatAllHalves) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = HalfBitsToFloat(static_cast<uint16_t>(h));
    const float b = HalfToFloat(static_cast<uint16_t>(h));
    ASSERT_EQ(FloatBits(a), FloatBits(b)) << h;
  }
}

TEST(CodecMathTest, FloatToHalfSweep) {
  // Every 251st bit pattern (all exponents and many mantissas), and the boundaries.
  for (uint64_t u = 0; u <= 0xffffffffull; u += 251) {
    const float f = BitsFloat(static_cast<uint32_t>(u));
    ASSERT_EQ(FloatToHalfBits(f), FloatToHalf(f)) << std::hex << u;
  }
  for (float f : {0.0f, -0.0f, 65504.0f, 65519.0f, 65520.0f, -65520.0f, INFINITY, -INFINITY,
                  std::nanf(""), 0x1p-24f, 0x1p-25f, 0x1.8p-25f, 0x1p-14f, 0x1.ffcp-15f}) {
    EXPECT_EQ(FloatToHalfBits(f), FloatToHalf(f)) << f;
  }
}

// ---- Encode emulations against the CPU codecs -------------------------------------------------

float Combine8(const float* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

TEST(CodecMathTest, QsgdEmulationEqualsCpuPayloadAndResidual) {
  for (const char* spec : {"qsgd", "qsgd:levels=4,bucket=128", "qsgd:levels=1,bucket=7",
                           "qsgd:levels=255,bucket=100", "qsgd:levels=32767,bucket=33"}) {
    auto codec = CpuCodec(spec);
    const auto& q = static_cast<const QsgdCodec&>(*codec);
    const uint32_t b = q.code_bits(), d = q.bucket(), levels = q.levels();
    for (size_t n : {size_t{1}, size_t{7}, size_t{100}, size_t{2049}, size_t{5000}}) {
      auto x = Gaussian(n, 11 + n);
      auto r0 = Gaussian(n, 12 + n, 0.3f);
      std::vector<float> r_cpu = r0;
      EncodedTensor t;
      Rng rng(21);
      ASSERT_THAT(codec->EncodeWithFeedback(x, std::span<float>(r_cpu), {}, rng, &t), IsOk());
      const uint32_t key = Rng(21).NextStream();
      const uint64_t buckets = (n + d - 1) / d;
      const uint64_t bytes = (n * b + 7) / 8;
      std::vector<uint32_t> words((bytes + 3) / 4, 0);
      const bool atomic = buckets > 1 && d % 32 != 0;
      std::vector<float> r_gpu(n);
      for (uint64_t k = 0; k < buckets; ++k) {
        const uint64_t lo = k * d, len = std::min<uint64_t>(d, n - lo);
        std::vector<float> v(len);
        float acc[8] = {};
        for (uint64_t j = 0; j < len; ++j) {
          v[j] = AddRn(x[lo + j], r0[lo + j]);
          acc[j % 8] += v[j] * v[j];
        }
        const float norm = std::sqrt(Combine8(acc));  // the CPU's order
        ASSERT_EQ(FloatBits(norm), FloatBits(t.scales[k])) << spec << " bucket " << k;
        const QsgdBucketParams p = QsgdParamsFor(norm, levels);
        for (uint64_t g = 0; g * 32 < len; ++g) {
          uint32_t codes[32] = {};
          for (uint32_t lane = 0; lane < 32; ++lane) {
            const uint64_t j = 32 * g + lane;
            if (j >= len) continue;
            const uint32_t level = QsgdLevel(v[j], static_cast<uint32_t>(lo + j), key, p.scale,
                                             static_cast<float>(levels));
            const bool negative = level != 0 && std::signbit(v[j]);
            codes[lane] = level | (uint32_t{negative} << (b - 1));
            r_gpu[lo + j] = SubRn(v[j], QsgdDecodedValue(level, negative, p.unit));
          }
          StoreGroup(&words, (lo + 32 * g) * b, codes, b, atomic);
        }
      }
      EXPECT_EQ(WordsToBytes(words, bytes), t.payload) << spec << " n=" << n;
      EXPECT_EQ(0, std::memcmp(r_gpu.data(), r_cpu.data(), 4 * n)) << spec << " n=" << n;
    }
  }
}

TEST(CodecMathTest, OneBitEmulationEqualsCpuPayloadAndResidual) {
  for (const char* spec : {"onebit", "onebit:bucket=64", "onebit:bucket=100", "onebit:bucket=1"}) {
    auto codec = CpuCodec(spec);
    for (size_t n : {size_t{1}, size_t{7}, size_t{300}, size_t{4099}}) {
      auto x = Gaussian(n, 31 + n);
      auto r0 = Gaussian(n, 32 + n, 0.3f);
      std::vector<float> r_cpu = r0;
      EncodedTensor t;
      Rng rng(1);
      ASSERT_THAT(codec->EncodeWithFeedback(x, std::span<float>(r_cpu), {}, rng, &t), IsOk());
      const uint64_t column = t.params[0];
      const uint64_t columns = (n + column - 1) / column;
      const bool atomic = columns > 1 && column % 32 != 0;
      std::vector<uint32_t> words((n + 31) / 32, 0);
      std::vector<float> r_gpu(n);
      for (uint64_t c = 0; c < columns; ++c) {
        const uint64_t begin = c * column, len = std::min(column, n - begin);
        // The class counts and the means' formula (the sums are the CPU's, from its scales).
        uint64_t count = 0;
        for (uint64_t j = 0; j < len; ++j) count += AddRn(x[begin + j], r0[begin + j]) >= 0.0f;
        const float neg = t.scales[2 * c], pos = t.scales[2 * c + 1];
        if (count == 0) {
          EXPECT_EQ(pos, 0.0f);
        }
        if (count == len) {
          EXPECT_EQ(neg, 0.0f);
        }
        for (uint64_t g = 0; g * 32 < len; ++g) {
          uint32_t bits[32] = {};
          for (uint32_t lane = 0; lane < 32; ++lane) {
            const uint64_t j = 32 * g + lane;
            if (j >= len) continue;
            const float v = AddRn(x[begin + j], r0[begin + j]);
            bits[lane] = v >= 0.0f;
            r_gpu[begin + j] = SubRn(v, v >= 0.0f ? pos : neg);
          }
          StoreGroup(&words, begin + 32 * g, bits, 1, atomic);
        }
      }
      EXPECT_EQ(WordsToBytes(words, (n + 7) / 8), t.payload) << spec << " n=" << n;
      EXPECT_EQ(0, std::memcmp(r_gpu.data(), r_cpu.data(), 4 * n)) << spec << " n=" << n;
    }
  }
}

TEST(CodecMathTest, ClassMeanMatchesTheCpuFormula) {
  std::mt19937 gen(4);
  for (int trial = 0; trial < 10000; ++trial) {
    const float sum = BitsFloat(gen() & 0x7f7fffffu) * ((gen() & 1) ? 1.0f : -1.0f);
    const uint64_t count = 1 + gen() % 100000;
    EXPECT_EQ(FloatBits(ClassMean(sum, count)),
              FloatBits(static_cast<float>(static_cast<double>(sum) / static_cast<double>(count))));
  }
  EXPECT_EQ(ClassMean(5.0f, 0), 0.0f);
}

TEST(CodecMathTest, TernGradEmulationEqualsCpuPayloadScaleAndResidual) {
  for (const char* spec : {"terngrad", "terngrad:clip=0", "terngrad:clip=1"}) {
    auto codec = CpuCodec(spec);
    const float clip = static_cast<const TernGradCodec&>(*codec).clip_sigma();
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{100}, size_t{4099}}) {
      auto x = Gaussian(n, 41 + n);
      auto r0 = Gaussian(n, 42 + n, 0.3f);
      std::vector<float> r_cpu = r0;
      EncodedTensor t;
      Rng rng(7);
      ASSERT_THAT(codec->EncodeWithFeedback(x, std::span<float>(r_cpu), {}, rng, &t), IsOk());
      const uint32_t key = Rng(7).NextStream();
      std::vector<float> v(n);
      double s1[8] = {}, s2[8] = {};
      uint32_t max_bits = 0;
      for (size_t i = 0; i < n; ++i) {
        v[i] = AddRn(x[i], r0[i]);
        max_bits = std::max(max_bits, FloatBits(v[i]) & 0x7fffffffu);
        s1[i % 8] += double(v[i]);
        s2[i % 8] += double(v[i]) * double(v[i]);
      }
      auto combine = [](const double* a) {
        return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
      };
      const float scale = TernScaleFromStats(combine(s1), combine(s2), max_bits, n, clip);
      ASSERT_EQ(t.scales.size(), 1u);
      EXPECT_EQ(FloatBits(scale), FloatBits(t.scales[0])) << spec << " n=" << n;
      const float inv = TernInverse(scale);
      std::vector<uint32_t> words((((n + 3) / 4) + 3) / 4, 0);
      std::vector<float> r_gpu(n);
      for (uint64_t g = 0; g * 32 < n; ++g) {
        uint32_t low = 0, high = 0;
        for (uint32_t lane = 0; lane < 32; ++lane) {
          const uint64_t i = 32 * g + lane;
          if (i >= n) continue;
          const uint32_t code = TernCode(v[i], static_cast<uint32_t>(i), key, scale, inv);
          low |= (code & 1u) << lane;
          high |= ((code >> 1) & 1u) << lane;
          r_gpu[i] = SubRn(v[i], TernValue(code, scale));
        }
        for (int half = 0; half < 2; ++half) {
          if (2 * g + half < words.size()) words[2 * g + half] = TwoBitWord(low, high, half);
        }
      }
      EXPECT_EQ(WordsToBytes(words, (n + 3) / 4), t.payload) << spec << " n=" << n;
      EXPECT_EQ(0, std::memcmp(r_gpu.data(), r_cpu.data(), 4 * n)) << spec << " n=" << n;
    }
  }
}

TEST(CodecMathTest, TernScaleNonFiniteIsInf) {
  EXPECT_EQ(FloatBits(TernScaleFromStats(0, 0, 0x7f800000u, 10, 2.5f)), 0x7f800000u);
  EXPECT_EQ(FloatBits(TernScaleFromStats(0, 0, 0x7fc00000u, 10, 0.0f)), 0x7f800000u);
  EXPECT_EQ(TernScaleFromStats(0, 0, FloatBits(3.0f), 0, 2.5f), 3.0f);
}

// The threshold encoder's three kernels, emulated: tiles of kThresholdTile elements, a run per
// 32-element word folded in order, the tile scan, and per-word writes at scanned offsets.
struct ThresholdEmulation {
  std::vector<uint8_t> payload;
  uint32_t entries = 0;
  std::vector<float> residual;
};

ThresholdEmulation EmulateThresholdEncode(std::span<const float> x, std::span<const float> r0,
                                          float tau) {
  const uint64_t n = x.size();
  const uint64_t tiles = (n + kThresholdTile - 1) / kThresholdTile;
  ThresholdEmulation out;
  out.residual.assign(r0.begin(), r0.end());
  std::vector<uint32_t> sel(tiles * kThresholdTileWords, 0), sgn(tiles * kThresholdTileWords, 0);
  std::vector<EntryRun> runs(tiles);
  for (uint64_t t = 0; t < tiles; ++t) {
    std::vector<EntryRun> word_runs;
    for (uint32_t q = 0; q < kThresholdTileWords; ++q) {
      const uint64_t base = t * kThresholdTile + 32 * q;
      for (uint32_t lane = 0; lane < 32; ++lane) {
        const uint64_t i = base + lane;
        if (i >= n) continue;
        const float v = AddRn(x[i], r0[i]);
        const bool selected = IsFiniteF(v) && AbsF(v) > tau;
        const bool negative = v < 0.0f;
        out.residual[i] = selected ? SubRn(v, negative ? -tau : tau) : v;
        sel[t * kThresholdTileWords + q] |= uint32_t{selected} << lane;
        sgn[t * kThresholdTileWords + q] |= uint32_t{selected && negative} << lane;
      }
      word_runs.push_back(WordRun(sel[t * kThresholdTileWords + q], base));
    }
    // The block combination is a tree (BlockCombineRuns); associativity makes it equal the fold.
    EntryRun fold = EmptyRun();
    for (const auto& r : word_runs) fold = CombineRuns(fold, r);
    std::vector<EntryRun> level = word_runs;
    while (level.size() > 1) {
      std::vector<EntryRun> next;
      for (size_t k = 0; k < level.size(); k += 2) {
        next.push_back(k + 1 < level.size() ? CombineRuns(level[k], level[k + 1]) : level[k]);
      }
      level = next;
    }
    EXPECT_EQ(level[0].count, fold.count);
    EXPECT_EQ(level[0].inner, fold.inner);
    runs[t] = fold;
  }
  EntryRun prefix = EmptyRun();
  std::vector<uint64_t> offsets(tiles), nexts(tiles);
  for (uint64_t t = 0; t < tiles; ++t) {
    offsets[t] = RunStreamBytes(prefix);
    nexts[t] = prefix.count ? uint64_t{prefix.last} + 1 : 0;
    prefix = CombineRuns(prefix, runs[t]);
  }
  out.entries = prefix.count;
  out.payload.assign(RunStreamBytes(prefix), 0xee);
  for (uint64_t t = 0; t < tiles; ++t) {
    uint64_t before = 0, offset = offsets[t];
    for (uint32_t q = 0; q < kThresholdTileWords; ++q) {
      const uint32_t s = sel[t * kThresholdTileWords + q];
      const uint64_t base = t * kThresholdTile + 32 * q;
      const uint64_t next = std::max(before, nexts[t]);
      const uint64_t bytes = WordBytes(s, base, next);
      EXPECT_LE(offset + bytes, out.payload.size());
      if (offset + bytes > out.payload.size()) return out;
      EXPECT_EQ(PutWordEntries(s, sgn[t * kThresholdTileWords + q], base, next,
                               out.payload.data() + offset),
                bytes);
      offset += bytes;
      if (s != 0) before = std::max<uint64_t>(before, base + HighBit(s) + 1);
    }
  }
  return out;
}

TEST(CodecMathTest, ThresholdEmulationEqualsCpuPayloadAndResidual) {
  for (float tau : {0.001f, 0.5f, 1.5f, 3.0f, 5.0f}) {
    auto codec = CpuCodec("threshold:tau=" + std::to_string(tau));
    const float cpu_tau = static_cast<const ThresholdCodec&>(*codec).tau();
    for (size_t n : {size_t{0}, size_t{1}, size_t{31}, size_t{4096}, size_t{4097}, size_t{70000}}) {
      auto x = Gaussian(n, 51 + n);
      auto r0 = Gaussian(n, 52 + n, 0.3f);
      // Long gaps too: zero some stretches so gaps reach 2 and 3 varint bytes.
      for (size_t i = 0; i < n; ++i) {
        if ((i / 9000) % 2 == 1) x[i] = r0[i] = 0.0f;
      }
      std::vector<float> r_cpu = r0;
      EncodedTensor t;
      Rng rng(1);
      ASSERT_THAT(codec->EncodeWithFeedback(x, std::span<float>(r_cpu), {}, rng, &t), IsOk());
      const ThresholdEmulation e = EmulateThresholdEncode(x, r0, cpu_tau);
      EXPECT_EQ(e.payload, t.payload) << "tau=" << tau << " n=" << n;
      EXPECT_EQ(e.entries, t.params[0]);
      EXPECT_EQ(0, std::memcmp(e.residual.data(), r_cpu.data(), 4 * n));
    }
  }
}

TEST(CodecMathTest, VarintBytesForGapMatchesPutVarint) {
  uint8_t buffer[8];
  for (uint64_t gap : {0ull, 1ull, 63ull, 64ull, 8191ull, 8192ull, (1ull << 20) - 1, 1ull << 20,
                       (1ull << 27) - 1, 1ull << 27, (1ull << 31) - 1}) {
    for (uint32_t sign : {0u, 1u}) {
      const uint32_t code = static_cast<uint32_t>((gap << 1) | sign);
      EXPECT_EQ(VarintBytesForGap(gap), PutVarint32(buffer, code)) << gap;
      uint8_t mine[8];
      EXPECT_EQ(PutVarint(mine, code), VarintBytesForGap(gap));
      EXPECT_EQ(0, std::memcmp(mine, buffer, VarintBytesForGap(gap)));
    }
  }
}

TEST(CodecMathTest, CombineRunsIsAssociative) {
  std::mt19937 gen(9);
  for (int trial = 0; trial < 10000; ++trial) {
    EntryRun r[3];
    uint64_t base = 0;
    for (auto& run : r) {
      base += gen() % 200;
      const uint32_t word = (gen() % 4 == 0) ? 0 : gen();
      run = WordRun(word, base);
      base += 32 + (gen() % 3 == 0 ? gen() % 100000 : 0);
    }
    const EntryRun a = CombineRuns(CombineRuns(r[0], r[1]), r[2]);
    const EntryRun b = CombineRuns(r[0], CombineRuns(r[1], r[2]));
    ASSERT_EQ(a.count, b.count);
    ASSERT_EQ(a.inner, b.inner);
    if (a.count) {
      ASSERT_EQ(a.first, b.first);
      ASSERT_EQ(a.last, b.last);
    }
  }
}

TEST(CodecMathTest, ParseVarintEndingAtAgreesWithForwardParser) {
  std::mt19937 gen(10);
  for (int trial = 0; trial < 20000; ++trial) {
    // Random bytes biased to continuation bits, ending with a terminator.
    const size_t len = 1 + gen() % 8;
    std::vector<uint8_t> bytes(len);
    for (auto& b : bytes) b = static_cast<uint8_t>(gen() % 3 ? (0x80 | gen()) : gen());
    bytes.back() &= 0x7f;
    if (gen() % 4 == 0) bytes.back() = 0;
    // The varint ending at the last byte starts after the previous terminator.
    size_t start = len - 1;
    while (start > 0 && bytes[start - 1] >= 0x80) --start;
    uint32_t forward = 0;
    size_t size = 0;
    const VarintStatus status =
        ParseVarint32(bytes.data() + start, bytes.data() + len, &forward, &size);
    uint32_t backward = 0;
    const int32_t e = ParseVarintEndingAt(bytes.data(), len - 1, &backward);
    switch (status) {
      case VarintStatus::kOk:
        ASSERT_EQ(e, kDecodeOk);
        ASSERT_EQ(size, len - start);
        ASSERT_EQ(backward, forward);
        break;
      case VarintStatus::kTooLong:
        ASSERT_EQ(e, kErrVarintTooLong);
        break;
      case VarintStatus::kOverflow:
        ASSERT_EQ(e, kErrVarintOverflow);
        break;
      case VarintStatus::kNonCanonical:
        ASSERT_EQ(e, kErrVarintNonCanonical);
        break;
      case VarintStatus::kTruncated:
        FAIL() << "cannot be truncated: the last byte is a terminator";
    }
  }
}

// ---- Device validation and decode, emulated, against UnpackBlob + the CPU decoder ------------

DecodeExpect ExpectFor(const Codec& codec, uint64_t n, uint64_t blob_bytes) {
  DecodeExpect e;
  e.codec = static_cast<uint32_t>(codec.id());
  e.max_version = 1;
  e.n = n;
  e.blob_bytes = blob_bytes;
  if (codec.id() == CodecId::kQsgd) {
    const auto& q = static_cast<const QsgdCodec&>(codec);
    e.levels = q.levels();
    e.bucket = q.bucket();
    e.code_bits = q.code_bits();
  }
  return e;
}

// What CudaCodec::DecodeAdd does, on the host: the host checks, CheckBlobHeader, the body checks
// of the codec's kernels, and (when all pass) the decode kernel's arithmetic. Returns the error.
int32_t EmulateDeviceDecode(const Codec& codec, const std::vector<uint8_t>& blob, uint64_t n,
                            std::vector<float>* out) {
  if (blob.size() < 32 || blob.size() % 16 != 0) return kErrBlobSize;  // host-side rejection
  const DecodeExpect e = ExpectFor(codec, n, blob.size());
  if (int32_t err = CheckBlobHeader(blob.data(), e); err != kDecodeOk) return err;
  const DevBlobHeader h = ReadBlobHeader(blob.data());
  const DevBlobLayout l = BlobLayoutOf(blob.data());
  auto scale = [&](uint64_t k) {
    return BitsFloat(LoadLe32(blob.data() + l.scales_offset + 4 * k));
  };
  const uint8_t* payload = blob.data() + l.payload_offset;
  // Payload words as the kernels read them (the bytes past the payload are the zero padding).
  std::vector<uint32_t> words((h.payload_bytes + 3) / 4 + 1, 0);
  for (uint64_t k = 0; k < 4 * ((h.payload_bytes + 3) / 4); ++k) {
    words[k / 4] |= uint32_t{payload[k]} << (8 * (k % 4));
  }
  int32_t err = kDecodeOk;
  auto report = [&](int32_t code) { err = std::max(err, code); };
  switch (codec.id()) {
    case CodecId::kFp16:
      for (uint64_t i = 0; i < n; ++i) {
        const uint16_t half = static_cast<uint16_t>(payload[2 * i] | (payload[2 * i + 1] << 8));
        (*out)[i] = AddRn((*out)[i], HalfBitsToFloat(half));
      }
      return kDecodeOk;
    case CodecId::kOneBit: {
      for (uint64_t k = 0; k < h.num_scales; ++k) {
        if (!IsFiniteF(scale(k))) report(kErrScaleValue);
      }
      if (err) return err;
      const uint32_t column = LoadLe32(blob.data() + l.params_offset);
      for (uint64_t i = 0; i < n; ++i) {
        const uint32_t bit = (words[i >> 5] >> (i & 31)) & 1u;
        (*out)[i] = AddRn((*out)[i], scale(2 * (i / column) + bit));
      }
      return kDecodeOk;
    }
    case CodecId::kQsgd: {
      for (uint64_t i = 0; i < n; ++i) {
        const float norm = scale(i / e.bucket);
        if (i % e.bucket == 0 && !QsgdNormValid(norm)) report(kErrScaleValue);
        report(QsgdCodeError(ReadCode(words.data(), i, e.code_bits), e.levels, e.code_bits,
                             norm == 0.0f));
      }
      if (err) return err;
      const uint32_t mask = (1u << (e.code_bits - 1)) - 1;
      for (uint64_t i = 0; i < n; ++i) {
        const uint32_t code = ReadCode(words.data(), i, e.code_bits);
        if ((code & mask) == 0) continue;
        const float unit = QsgdParamsFor(scale(i / e.bucket), e.levels).unit;
        (*out)[i] =
            AddRn((*out)[i], QsgdDecodedValue(code & mask, (code >> (e.code_bits - 1)) != 0, unit));
      }
      return kDecodeOk;
    }
    case CodecId::kTernGrad: {
      for (uint64_t w = 0; w < (h.payload_bytes + 3) / 4; ++w) {
        if (TernWordInvalid(words[w])) report(kErrInvalidTernaryCode);
      }
      if (err) return err;
      for (uint64_t i = 0; i < n; ++i) {
        const uint32_t code = (words[i >> 4] >> (2 * (i & 15))) & 3u;
        (*out)[i] = AddRn((*out)[i], TernValue(code, scale(0)));
      }
      return kDecodeOk;
    }
    case CodecId::kThreshold: {
      EXPECT_EQ(l.payload_offset, kThresholdPayloadOffset);
      uint64_t count = 0, sum = 0;
      std::vector<uint32_t> values;
      for (uint64_t p = 0; p < h.payload_bytes; ++p) {
        if (payload[p] >= 0x80) continue;
        uint32_t value = 0;
        const int32_t ve = ParseVarintEndingAt(payload, p, &value);
        if (ve != kDecodeOk) {
          report(ve);
          continue;
        }
        ++count;
        sum += uint64_t{value >> 1} + 1;
        values.push_back(value);
      }
      if (err) return err;
      if (count != LoadLe32(blob.data() + l.params_offset)) return kErrEntryCount;
      if (sum > n) return kErrIndexOutOfRange;
      const float tau = scale(0);
      uint64_t next = 0;
      for (uint32_t value : values) {
        const uint64_t index = next + (value >> 1);
        (*out)[index] = AddRn((*out)[index], (value & 1) ? -tau : tau);
        next = index + 1;
      }
      return kDecodeOk;
    }
    default:
      return kErrCodec;
  }
}

class DeviceValidationTest : public ::testing::TestWithParam<std::string> {};

TEST_P(DeviceValidationTest, AcceptsExactlyWhatTheCpuAccepts) {
  auto codec = CpuCodec(GetParam());
  std::mt19937 gen(77);
  int accepted = 0, rejected = 0;
  for (size_t n : {size_t{1}, size_t{13}, size_t{500}, size_t{1000}}) {
    auto x = Gaussian(n, 61 + n);
    if (codec->id() == CodecId::kThreshold) {
      for (size_t i = 0; i < n; i += 3) x[i] = 0.0f;  // gaps
    }
    EncodedTensor t;
    Rng rng(3);
    ASSERT_THAT(codec->Encode(x, {}, rng, &t), IsOk());
    std::vector<uint8_t> good;
    ASSERT_THAT(PackBlob(t, &good), IsOk());
    for (int trial = 0; trial < 1500; ++trial) {
      std::vector<uint8_t> blob = good;
      uint64_t elements = n;
      if (trial > 0) {
        const int kind = trial % 10;
        if (kind < 6) {  // bit flips anywhere (the header included)
          for (int f = 0; f < 1 + trial % 3; ++f) {
            const size_t at =
                (trial % 4 == 0) ? gen() % std::min<size_t>(blob.size(), 48) : gen() % blob.size();
            blob[at] ^= static_cast<uint8_t>(1u << (gen() % 8));
          }
        } else if (kind == 6) {  // random bytes in the payload
          const size_t payload = ComputeLayout(t.scales.size(), t.params.size(), 0).payload_offset;
          if (payload < blob.size()) blob[payload + gen() % (blob.size() - payload)] = gen();
        } else if (kind == 7) {  // truncation or extension
          blob.resize(gen() % 2 ? blob.size() - std::min<size_t>(blob.size(), 16 * (1 + gen() % 3))
                                : blob.size() + 16,
                      0);
        } else if (kind == 8) {  // another element count
          elements = n + (gen() % 2 ? 1 : 0) - (gen() % 2 && n > 0 ? 1 : 0);
        } else {  // a header word set to a random value
          const size_t word = gen() % 8;
          const uint32_t value = gen() % 3 == 0 ? gen() : gen() % 64;
          for (int k = 0; k < 4; ++k) blob[4 * word + k] = static_cast<uint8_t>(value >> (8 * k));
        }
      }
      std::vector<float> gpu_out(elements, 0.25f), cpu_out(elements, 0.25f);
      const int32_t device = EmulateDeviceDecode(*codec, blob, elements, &gpu_out);
      absl::Status cpu = absl::OkStatus();
      auto unpacked = UnpackBlob(blob, elements, {});
      cpu = unpacked.ok() ? codec->DecodeAdd(*unpacked, std::span<float>(cpu_out))
                          : unpacked.status();
      ASSERT_EQ(device == kDecodeOk, cpu.ok())
          << GetParam() << " n=" << n << " trial " << trial << ": device says "
          << DecodeErrorMessage(device) << ", CPU says " << cpu;
      if (cpu.ok()) {
        ++accepted;
        ASSERT_EQ(0, std::memcmp(gpu_out.data(), cpu_out.data(), 4 * elements))
            << GetParam() << " trial " << trial;
      } else {
        ++rejected;
        for (float v : gpu_out) ASSERT_EQ(v, 0.25f);
      }
    }
  }
  EXPECT_GT(accepted, 4);  // the untouched blobs at least
  EXPECT_GT(rejected, 1000);
}

INSTANTIATE_TEST_SUITE_P(Codecs, DeviceValidationTest,
                         ::testing::Values("fp16", "onebit", "onebit:bucket=64",
                                           "threshold:tau=0.5", "qsgd", "qsgd:levels=4,bucket=128",
                                           "qsgd:levels=1,bucket=7", "terngrad", "terngrad:clip=0"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name;
                           for (char c : info.param) name += std::isalnum(c) ? c : '_';
                           return name;
                         });

TEST(BlobCheckTest, NamesTheHeaderFields) {
  auto codec = CpuCodec("terngrad");
  auto x = Gaussian(10, 1);
  EncodedTensor t;
  Rng rng(1);
  ASSERT_THAT(codec->Encode(x, {}, rng, &t), IsOk());
  std::vector<uint8_t> good;
  ASSERT_THAT(PackBlob(t, &good), IsOk());
  auto check = [&](std::vector<uint8_t> blob, uint64_t n = 10) {
    return CheckBlobHeader(blob.data(), ExpectFor(*codec, n, blob.size()));
  };
  EXPECT_EQ(check(good), kDecodeOk);
  auto with = [&](size_t offset, uint32_t value) {
    std::vector<uint8_t> b = good;
    for (int k = 0; k < 4; ++k) b[offset + k] = static_cast<uint8_t>(value >> (8 * k));
    return b;
  };
  EXPECT_EQ(check(with(0, 0x12345678)), kErrMagic);
  EXPECT_EQ(check(with(4, 3)), kErrCodec);
  EXPECT_EQ(check(with(8, 0)), kErrVersion);
  EXPECT_EQ(check(with(8, 2)), kErrVersion);
  EXPECT_EQ(check(with(20, 1)), kErrEncoderNonFinite);
  EXPECT_EQ(check(with(20, 4)), kErrReserved);
  EXPECT_EQ(check(with(12, 1000)), kErrCountsTooLarge);
  EXPECT_EQ(check(with(24, 1000)), kErrCountsTooLarge);
  EXPECT_EQ(check(with(12, 5)), kErrBlobSize);              // 32 + 20 -> 64, payload 3 -> 80 != 64
  EXPECT_EQ(check(with(12, 2)), kErrScaleCount);            // same size, but terngrad has one scale
  EXPECT_EQ(check(with(32, 0x7fc00000u)), kErrScaleValue);  // NaN scale
  EXPECT_EQ(check(with(32, 0x80000000u)), kErrScaleValue);  // -0
  EXPECT_EQ(check(good, 13), kErrPayloadSize);              // 4 bytes, not 3
  std::vector<uint8_t> padded = good;
  padded[40] = 1;  // scale ends at 36, payload at 48
  EXPECT_EQ(check(padded), kErrPadding);
  std::vector<uint8_t> unused = good;
  unused[48 + 2] |= 0x10;  // element 10 of 10 (bits 4-5 of byte 2)
  EXPECT_EQ(check(unused), kErrUnusedBits);
  EXPECT_EQ(CheckBlobHeader(good.data(), ExpectFor(*codec, 10, 16)), kErrBlobTooShort);
  for (int32_t code = 0; code < kNumDecodeErrors; ++code) {
    EXPECT_STRNE(DecodeErrorMessage(code), "unknown decode error code") << code;
  }
}

}  // namespace
}  // namespace qtrain::compression::cuda
