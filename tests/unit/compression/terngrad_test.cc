#include "compression/terngrad.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "compression/codec_registry.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::compression {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

std::unique_ptr<TernGradCodec> MakeCodec(float clip, bool shared,
                                         KernelPath path = KernelPath::kAuto) {
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_TERNGRAD);
  config.mutable_terngrad()->set_clip_sigma(clip);
  config.mutable_terngrad()->set_shared_scale(shared);
  CodecOptions options;
  options.path = path;
  auto codec = TernGradCodec::Create(config, options);
  if (!codec.ok()) {
    ADD_FAILURE() << codec.status();
    std::abort();
  }
  return std::move(codec).value();
}

std::vector<uint32_t> Bits(std::span<const float> v) {
  std::vector<uint32_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) bits[i] = std::bit_cast<uint32_t>(v[i]);
  return bits;
}

// Normal values with a few outliers (so clipping happens), exact zeros and negative zeros.
std::vector<float> TestVector(size_t n, uint32_t seed, float sd = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, sd);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    v[i] = normal(gen);
    if (i % 97 == 5) v[i] *= 20.0f;
    if (i % 61 == 3) v[i] = 0.0f;
    if (i % 89 == 7) v[i] = -0.0f;
  }
  return v;
}

std::vector<float> Decode(const TernGradCodec& codec, const EncodedTensor& enc) {
  std::vector<float> out(enc.num_elements, 0.0f);
  EXPECT_THAT(codec.DecodeAdd(enc, std::span<float>(out)), IsOk());
  return out;
}

// ---- Spec, config, registry ------------------------------------------------------------------

TEST(TernGradSpecTest, DefaultsAndRoundTrip) {
  CodecRegistry registry;
  ASSERT_THAT(registry.Register(TernGradRegistration()), IsOk());
  ASSERT_OK_AND_ASSIGN(pb::CodecConfig config, registry.ParseSpec("terngrad"));
  EXPECT_EQ(config.terngrad().clip_sigma(), 2.5f);
  EXPECT_FALSE(config.terngrad().shared_scale());
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Codec> codec, registry.Create(config));
  EXPECT_EQ(codec->Spec(), "terngrad:clip=2.5,shared=0");
  EXPECT_FALSE(codec->DefaultErrorFeedback());
  EXPECT_EQ(codec->id(), CodecId::kTernGrad);

  for (const char* spec :
       {"terngrad:clip=2.5,shared=0", "terngrad:clip=0,shared=0", "terngrad:clip=1.25,shared=1",
        "terngrad:clip=0.1,shared=0,ef=1", "terngrad:clip=3,shared=1,ef=0"}) {
    SCOPED_TRACE(spec);
    ASSERT_OK_AND_ASSIGN(pb::CodecConfig parsed, registry.ParseSpec(spec));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Codec> c, registry.Create(parsed));
    EXPECT_EQ(c->Spec(), spec);
    ASSERT_OK_AND_ASSIGN(pb::CodecConfig reparsed, registry.ParseSpec(c->Spec()));
    EXPECT_EQ(reparsed.SerializeAsString(), parsed.SerializeAsString());
    EXPECT_EQ(c->Config().SerializeAsString(), parsed.SerializeAsString());
  }
}

TEST(TernGradSpecTest, BadSpecsAndConfigs) {
  CodecRegistry registry;
  ASSERT_THAT(registry.Register(TernGradRegistration()), IsOk());
  for (const char* spec : {"terngrad:clip=-1", "terngrad:clip=nan", "terngrad:clip=inf",
                           "terngrad:clip=x", "terngrad:shared=2", "terngrad:levels=4"}) {
    SCOPED_TRACE(spec);
    EXPECT_THAT(registry.ParseSpec(spec), StatusIs(absl::StatusCode::kInvalidArgument));
  }
  for (float clip :
       {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    pb::CodecConfig config;
    config.set_codec(pb::CODEC_TERNGRAD);
    config.mutable_terngrad()->set_clip_sigma(clip);
    EXPECT_THAT(TernGradCodec::Create(config),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("clip_sigma")));
  }
  pb::CodecConfig other;
  other.set_codec(pb::CODEC_TERNGRAD);
  other.mutable_qsgd()->set_levels(4);
  EXPECT_THAT(TernGradCodec::Create(other), StatusIs(absl::StatusCode::kInvalidArgument));
  // No settings at all means the defaults.
  pb::CodecConfig bare;
  bare.set_codec(pb::CODEC_TERNGRAD);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<TernGradCodec> codec, TernGradCodec::Create(bare));
  EXPECT_EQ(codec->Spec(), "terngrad:clip=2.5,shared=0");
}

// ---- Hand-computed payloads ------------------------------------------------------------------

// Rng(42)'s first stream key is 0x923c5cb3; its draws u_i = StreamUniform(key, i) are
//   u0 .3678 u1 .1348 u2 .3366 u3 .3879 u4 .3587 u5 .5029 u6 .6085 u7 .1253
//   u8 .2799 u9 .0245 (then .6774 .8584 .9141 .3904 .3560 .8922).
TEST(TernGradHandTest, DrawsAreAsListed) {
  Rng rng(42);
  const uint32_t key = rng.NextStream();
  EXPECT_EQ(key, 0x923c5cb3u);
  const float expected[10] = {0.367781937f, 0.134827733f, 0.336586714f, 0.387943506f,
                              0.358741879f, 0.502919137f, 0.608458221f, 0.125259817f,
                              0.279854774f, 0.0244911313f};
  for (uint32_t i = 0; i < 10; ++i) EXPECT_EQ(StreamUniform(key, i), expected[i]) << i;
}

TEST(TernGradHandTest, NoClipping) {
  // s = max|v| = 2, p = |v| / 2 = .5 .5 0 .25 .125 1 1 .375 .75 .0625.
  // sent (u < p): 1 1 0 0 0 1 1 1 1 1 -> codes 01 10 00 00 | 00 01 10 01 | 10 01.
  // byte0 = 01 | 10<<2 = 0x09; byte1 = 01<<2 | 10<<4 | 01<<6 = 0x64; byte2 = 10 | 01<<2 = 0x06.
  const std::vector<float> v = {1.0f, -1.0f, 0.0f, 0.5f, -0.25f, 2.0f, -2.0f, 0.75f, -1.5f, 0.125f};
  for (KernelPath path : {KernelPath::kAuto, KernelPath::kReference}) {
    auto codec = MakeCodec(0.0f, false, path);
    Rng rng(42);
    EncodedTensor enc;
    ASSERT_THAT(codec->Encode(v, {}, rng, &enc), IsOk());
    EXPECT_EQ(enc.codec, CodecId::kTernGrad);
    EXPECT_EQ(enc.format_version, 1u);
    EXPECT_EQ(enc.num_elements, 10u);
    EXPECT_THAT(enc.scales, ElementsAre(2.0f));
    EXPECT_TRUE(enc.params.empty());
    EXPECT_THAT(enc.payload, ElementsAre(0x09, 0x64, 0x06));
    EXPECT_THAT(Decode(*codec, enc),
                ElementsAre(2.0f, -2.0f, 0.0f, 0.0f, 0.0f, 2.0f, -2.0f, 2.0f, -2.0f, 2.0f));
  }
}

TEST(TernGradHandTest, Clipping) {
  // mean 0, S2 = 25+25+4+4+6*1 = 64, n = 16: sigma = 2; clip 1.5 -> c*sigma = 3 < max|v| = 5,
  // so s = 3 and inv = float(1/3). p: |5| -> 3*inv = 1 exactly; |2| -> .6667; |1| -> .3333.
  // sent: e0..e3 (u < 1, 1, .6667, .6667); e4..e6 no (.3587, .5029, .6085 >= .3333);
  // e7 (.1253), e8 (.2799), e9 (.0245) yes; zeros never.
  // codes: 01 10 01 10 | 00 00 00 10 | 01 10 00 00 | 00 00 00 00 -> 0x99 0x80 0x09 0x00.
  const std::vector<float> v = {5, -5, 2, -2, 1, -1, 1, -1, 1, -1, 0, 0, 0, 0, 0, 0};
  for (KernelPath path : {KernelPath::kAuto, KernelPath::kReference}) {
    auto codec = MakeCodec(1.5f, false, path);
    EXPECT_EQ(codec->LocalScale(v), 3.0f);
    Rng rng(42);
    EncodedTensor enc;
    ASSERT_THAT(codec->Encode(v, {}, rng, &enc), IsOk());
    EXPECT_THAT(enc.scales, ElementsAre(3.0f));
    EXPECT_THAT(enc.payload, ElementsAre(0x99, 0x80, 0x09, 0x00));
    EXPECT_THAT(Decode(*codec, enc),
                ElementsAre(3, -3, 3, -3, 0, 0, 0, -3, 3, -3, 0, 0, 0, 0, 0, 0));

    // The same with error feedback from a zero residual: residual = v - decoded.
    std::vector<float> residual(v.size(), 0.0f);
    Rng rng2(42);
    ASSERT_THAT(codec->EncodeWithFeedback(v, residual, {}, rng2, &enc), IsOk());
    EXPECT_THAT(enc.payload, ElementsAre(0x99, 0x80, 0x09, 0x00));
    EXPECT_THAT(residual, ElementsAre(2, -2, -1, 1, 1, -1, 1, 2, -2, 2, 0, 0, 0, 0, 0, 0));
  }
}

// ---- Sizes -----------------------------------------------------------------------------------

TEST(TernGradSizeTest, PayloadBytesAndBitsPerElement) {
  auto codec = MakeCodec(2.5f, false);
  for (uint64_t n : {0u, 1u, 2u, 3u, 4u, 5u, 7u, 8u, 9u, 1000u, 1001u}) {
    SCOPED_TRACE(n);
    EXPECT_EQ(codec->PayloadBytes({}, n), static_cast<int64_t>((n + 3) / 4));
    std::vector<float> v = TestVector(n, 7);
    Rng rng(1);
    EncodedTensor enc;
    ASSERT_THAT(codec->Encode(v, {}, rng, &enc), IsOk());
    EXPECT_EQ(static_cast<int64_t>(enc.payload.size()), codec->PayloadBytes({}, n));
    EXPECT_EQ(enc.scales.size(), 1u);
    EXPECT_TRUE(enc.params.empty());
  }
  // Bits per element = (8 * payload + 32 bits of scale) / n = 2 + 32/n when 4 divides n.
  for (uint64_t n : {uint64_t{4}, uint64_t{1024}, uint64_t{1} << 20, uint64_t{25600000}}) {
    const double bits = (8.0 * codec->PayloadBytes({}, n) + 32.0) / static_cast<double>(n);
    EXPECT_EQ(bits, 2.0 + 32.0 / static_cast<double>(n));
  }
  EXPECT_LE((8.0 * codec->PayloadBytes({}, 25600000) + 32.0) / 25600000.0, 2.01);
  EXPECT_LE((8.0 * codec->PayloadBytes({}, 3200) + 32.0) / 3200.0, 2.01);
}

TEST(TernGradSizeTest, ReusesOutputBuffers) {
  auto codec = MakeCodec(2.5f, false);
  std::vector<float> v = TestVector(1000, 3);
  Rng rng(1);
  EncodedTensor enc;
  ASSERT_THAT(codec->Encode(v, {}, rng, &enc), IsOk());
  const uint8_t* payload = enc.payload.data();
  const float* scales = enc.scales.data();
  ASSERT_THAT(codec->Encode(v, {}, rng, &enc), IsOk());
  EXPECT_EQ(enc.payload.data(), payload);
  EXPECT_EQ(enc.scales.data(), scales);
}

TEST(TernGradSizeTest, ShapeMustMatch) {
  auto codec = MakeCodec(2.5f, false);
  std::vector<float> v = TestVector(12, 3);
  Rng rng(1);
  EncodedTensor enc;
  const int64_t good[] = {3, 4};
  const int64_t bad[] = {5, 4};
  ASSERT_THAT(codec->Encode(v, good, rng, &enc), IsOk());
  EXPECT_THAT(enc.shape, ElementsAre(3, 4));
  EXPECT_THAT(Decode(*codec, enc), ::testing::SizeIs(12));
  EXPECT_THAT(codec->Encode(v, bad, rng, &enc), StatusIs(absl::StatusCode::kInvalidArgument));
}

// ---- Reference and AVX2 paths agree bit for bit ------------------------------------------------

TEST(TernGradPathsTest, ReferenceAndFastAreBitIdentical) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2 on this CPU";
  const size_t sizes[] = {0,  1,  2,  3,  4,  5,  7,  8,   9,    15,   16,
                          17, 31, 32, 33, 63, 64, 65, 127, 1000, 4099, 100003};
  for (float clip : {0.0f, 2.5f, 1.0f}) {
    auto ref = MakeCodec(clip, false, KernelPath::kReference);
    auto fast = MakeCodec(clip, false, KernelPath::kAuto);
    ASSERT_FALSE(ref->uses_fast_path());
    ASSERT_TRUE(fast->uses_fast_path());
    for (size_t n : sizes) {
      for (uint32_t seed : {1u, 2u, 3u}) {
        if (n > 5000 && seed > 1) continue;
        SCOPED_TRACE(::testing::Message() << "clip " << clip << " n " << n << " seed " << seed);
        const std::vector<float> g = TestVector(n, seed);
        const std::vector<float> r0 = TestVector(n, seed + 100, 0.1f);

        EXPECT_EQ(std::bit_cast<uint32_t>(ref->LocalScale(g)),
                  std::bit_cast<uint32_t>(fast->LocalScale(g)));

        EncodedTensor a, b;
        Rng ra(seed), rb(seed);
        ASSERT_THAT(ref->Encode(g, {}, ra, &a), IsOk());
        ASSERT_THAT(fast->Encode(g, {}, rb, &b), IsOk());
        EXPECT_EQ(a.payload, b.payload);
        EXPECT_EQ(Bits(a.scales), Bits(b.scales));

        std::vector<float> out_a = TestVector(n, seed + 200);
        std::vector<float> out_b = out_a;
        ASSERT_THAT(ref->DecodeAdd(a, std::span<float>(out_a)), IsOk());
        ASSERT_THAT(fast->DecodeAdd(a, std::span<float>(out_b)), IsOk());
        EXPECT_EQ(Bits(out_a), Bits(out_b));

        std::vector<int32_t> counts_a(n, 5), counts_b(n, 5);
        ASSERT_THAT(ref->AccumulateTernary(a, std::span<int32_t>(counts_a)), IsOk());
        ASSERT_THAT(fast->AccumulateTernary(a, std::span<int32_t>(counts_b)), IsOk());
        EXPECT_EQ(counts_a, counts_b);

        std::vector<float> res_a = r0, res_b = r0;
        ASSERT_THAT(ref->EncodeWithFeedback(g, res_a, {}, ra, &a), IsOk());
        ASSERT_THAT(fast->EncodeWithFeedback(g, res_b, {}, rb, &b), IsOk());
        EXPECT_EQ(a.payload, b.payload);
        EXPECT_EQ(Bits(a.scales), Bits(b.scales));
        EXPECT_EQ(Bits(res_a), Bits(res_b));

        const float shared = 1.5f * ref->LocalScale(g);
        ASSERT_THAT(ref->EncodeWithScale(g, {}, shared, ra, &a), IsOk());
        ASSERT_THAT(fast->EncodeWithScale(g, {}, shared, rb, &b), IsOk());
        EXPECT_EQ(a.payload, b.payload);

        res_a = r0;
        res_b = r0;
        ASSERT_OK_AND_ASSIGN(float local_a, ref->PrepareFeedback(g, res_a));
        ASSERT_OK_AND_ASSIGN(float local_b, fast->PrepareFeedback(g, res_b));
        EXPECT_EQ(std::bit_cast<uint32_t>(local_a), std::bit_cast<uint32_t>(local_b));
        EXPECT_EQ(Bits(res_a), Bits(res_b));
        ASSERT_THAT(ref->EncodePreparedWithScale(res_a, {}, local_a * 1.25f, ra, &a), IsOk());
        ASSERT_THAT(fast->EncodePreparedWithScale(res_b, {}, local_a * 1.25f, rb, &b), IsOk());
        EXPECT_EQ(a.payload, b.payload);
        EXPECT_EQ(Bits(res_a), Bits(res_b));
      }
    }
  }
}

// ---- Error feedback --------------------------------------------------------------------------

TEST(TernGradFeedbackTest, InvariantAndSamePayloadAsEncode) {
  for (KernelPath path : {KernelPath::kAuto, KernelPath::kReference}) {
    for (float clip : {0.0f, 2.5f}) {
      auto codec = MakeCodec(clip, false, path);
      for (size_t n : {1u, 7u, 8u, 9u, 100u, 1001u}) {
        SCOPED_TRACE(::testing::Message() << "clip " << clip << " n " << n);
        const std::vector<float> g = TestVector(n, 11);
        const std::vector<float> old_residual = TestVector(n, 12, 0.3f);
        std::vector<float> v(n);
        for (size_t i = 0; i < n; ++i) v[i] = g[i] + old_residual[i];

        std::vector<float> residual = old_residual;
        Rng rng_a(5), rng_b(5);
        EncodedTensor fused, plain;
        ASSERT_THAT(codec->EncodeWithFeedback(g, residual, {}, rng_a, &fused), IsOk());
        ASSERT_THAT(codec->Encode(v, {}, rng_b, &plain), IsOk());
        EXPECT_EQ(fused.payload, plain.payload);
        EXPECT_EQ(Bits(fused.scales), Bits(plain.scales));

        const std::vector<float> decoded = Decode(*codec, fused);
        for (size_t i = 0; i < n; ++i) {
          // new residual = v - decoded exactly as float arithmetic gives it ...
          EXPECT_EQ(std::bit_cast<uint32_t>(residual[i]),
                    std::bit_cast<uint32_t>(v[i] - decoded[i]))
              << i;
          // ... so decoded + residual reconstructs v to within one rounding of v - decoded.
          const double err = static_cast<double>(decoded[i]) + residual[i] - v[i];
          EXPECT_LE(std::abs(err), std::ldexp(std::abs(double{v[i]} - decoded[i]), -24)) << i;
        }
      }
    }
  }
}

TEST(TernGradFeedbackTest, SharedModeInvariant) {
  for (KernelPath path : {KernelPath::kAuto, KernelPath::kReference}) {
    for (float clip : {0.0f, 2.5f}) {
      auto codec = MakeCodec(clip, true, path);
      for (size_t n : {1u, 9u, 100u, 1001u}) {
        SCOPED_TRACE(::testing::Message() << "clip " << clip << " n " << n);
        const std::vector<float> g = TestVector(n, 21);
        const std::vector<float> old_residual = TestVector(n, 22, 0.3f);
        std::vector<float> v(n);
        for (size_t i = 0; i < n; ++i) v[i] = g[i] + old_residual[i];

        std::vector<float> residual = old_residual;
        ASSERT_OK_AND_ASSIGN(const float local, codec->PrepareFeedback(g, residual));
        EXPECT_EQ(Bits(residual), Bits(v));
        EXPECT_EQ(std::bit_cast<uint32_t>(local), std::bit_cast<uint32_t>(codec->LocalScale(v)));
        const float scale = 2.0f * local;  // another worker's larger local scale
        Rng rng_a(9), rng_b(9);
        EncodedTensor fused, plain;
        ASSERT_THAT(codec->EncodePreparedWithScale(residual, {}, scale, rng_a, &fused), IsOk());
        ASSERT_THAT(codec->EncodeWithScale(v, {}, scale, rng_b, &plain), IsOk());
        EXPECT_EQ(fused.payload, plain.payload);
        EXPECT_THAT(fused.scales, ElementsAre(scale));
        const std::vector<float> decoded = Decode(*codec, fused);
        for (size_t i = 0; i < n; ++i) {
          EXPECT_EQ(std::bit_cast<uint32_t>(residual[i]),
                    std::bit_cast<uint32_t>(v[i] - decoded[i]))
              << i;
          EXPECT_TRUE(decoded[i] == 0.0f || std::abs(decoded[i]) == scale) << i;
        }
      }
    }
  }
}

// ---- Statistics ------------------------------------------------------------------------------

// E[decoded_i] = v_c_i. Each trial draws b_i ~ Bernoulli(p_i) with p_i = |v_c_i| / s, so
// decoded_i = sign * s * b_i has variance s^2 p_i (1 - p_i), and the mean of N independent trials
// (one Rng stream each) has standard deviation s sqrt(p_i (1 - p_i) / N). Every element must lie
// within 5 of those of v_c_i (N p_i >= 400 here, so the normal approximation holds; a false alarm
// has probability about 64 * 6e-7). On top, the codec's p is not exactly |v_c|/s: p is rounded
// twice (1/s and the product: <= 2^-23 absolute for p <= 1) and u is a multiple of 2^-24, so
// P(b = 1) = ceil(p 2^24) / 2^24 is off by at most 2^-24: a deterministic slack of s 2^-22.
void ExpectUnbiased(float clip, const std::vector<float>& v, int trials) {
  auto codec = MakeCodec(clip, false);
  const size_t n = v.size();
  Rng probe(1);
  EncodedTensor enc;
  ASSERT_THAT(codec->Encode(v, {}, probe, &enc), IsOk());
  const float s = enc.scales[0];
  ASSERT_GT(s, 0.0f);
  // Elements at or beyond the scale have p = s * (1/s) = 1 exactly for this data, so they are
  // always sent: a precondition on the chosen inputs, not on the random draws.
  ASSERT_EQ(s * (1.0f / s), 1.0f);

  std::vector<double> sum(n, 0.0);
  Rng rng(2024);
  std::vector<float> decoded(n);
  for (int t = 0; t < trials; ++t) {
    ASSERT_THAT(codec->Encode(v, {}, rng, &enc), IsOk());
    std::fill(decoded.begin(), decoded.end(), 0.0f);
    ASSERT_THAT(codec->DecodeAdd(enc, std::span<float>(decoded)), IsOk());
    for (size_t i = 0; i < n; ++i) sum[i] += decoded[i];
  }
  for (size_t i = 0; i < n; ++i) {
    const double vc = std::clamp(static_cast<double>(v[i]), -double{s}, double{s});
    const double p = std::abs(vc) / s;
    const double bound = 5.0 * s * std::sqrt(p * (1.0 - p) / trials) + std::ldexp(double{s}, -22);
    EXPECT_NEAR(sum[i] / trials, vc, bound) << "element " << i << " v " << v[i] << " p " << p;
  }
}

// 64 values in (-1, 1) (|v| >= 1/64, and one exact zero) plus two outliers.
std::vector<float> StatVector(float big, float small) {
  std::vector<float> v(64);
  for (int i = 0; i < 64; ++i) v[i] = static_cast<float>((i * 37) % 64 - 31.5) / 32.0f;
  v[2] = 0.0f;
  v[10] = big;
  v[40] = small;
  return v;
}

TEST(TernGradStatsTest, UnbiasedWithoutClipping) {
  // clip = 0: s = max|v| = 4 (a power of two, so p = 1 exactly for it) and E[decoded] = v.
  ExpectUnbiased(0.0f, StatVector(4.0f, -3.0f), 200000);
}

TEST(TernGradStatsTest, UnbiasedForClippedValue) {
  // clip = 2.5: sigma ~ 2.965, so 20 and -12 are clipped to +-s ~ +-7.413 and E[decoded] = v_c
  // (smallest p: (1/64) / 7.413 ~ 0.0021).
  ExpectUnbiased(2.5f, StatVector(20.0f, -12.0f), 200000);
}

TEST(TernGradStatsTest, ClippingBoundsTheScale) {
  const std::vector<float> v = StatVector(20.0f, -12.0f);
  // sigma computed independently (two-pass, in double).
  double mean = 0.0;
  for (float x : v) mean += x;
  mean /= v.size();
  double var = 0.0;
  for (float x : v) var += (x - mean) * (x - mean);
  const double sigma = std::sqrt(var / v.size());
  for (float clip : {2.5f, 1.0f}) {
    auto codec = MakeCodec(clip, false);
    Rng rng(3);
    EncodedTensor enc;
    ASSERT_THAT(codec->Encode(v, {}, rng, &enc), IsOk());
    const float s = enc.scales[0];
    EXPECT_NEAR(s, clip * sigma, 1e-6 * s);
    EXPECT_LT(s, 12.0f);
    EXPECT_EQ(codec->LocalScale(v), s);
    for (int t = 0; t < 50; ++t) {
      ASSERT_THAT(codec->Encode(v, {}, rng, &enc), IsOk());
      const std::vector<float> decoded = Decode(*codec, enc);
      for (size_t i = 0; i < v.size(); ++i) {
        EXPECT_TRUE(decoded[i] == 0.0f || std::abs(decoded[i]) == s) << i;
        EXPECT_FALSE(decoded[i] != 0.0f && std::signbit(decoded[i]) != std::signbit(v[i])) << i;
      }
      // The outliers beyond c*sigma have p = 1 (when s * (1/s) == 1) and always decode to +-s.
      if (s * (1.0f / s) == 1.0f) {
        EXPECT_EQ(decoded[10], s);
        EXPECT_EQ(decoded[40], -s);
      }
    }
  }
}

TEST(TernGradStatsTest, ZeroAndConstantTensors) {
  auto codec = MakeCodec(2.5f, false);
  Rng rng(1);
  EncodedTensor enc;
  const std::vector<float> zeros(37, 0.0f);
  ASSERT_THAT(codec->Encode(zeros, {}, rng, &enc), IsOk());
  EXPECT_THAT(enc.scales, ElementsAre(0.0f));
  EXPECT_EQ(enc.payload, std::vector<uint8_t>(10, 0));
  // A constant tensor has sigma = 0: everything is clipped to 0 and error feedback keeps it.
  const std::vector<float> constant(37, 0.75f);
  std::vector<float> residual(37, 0.0f);
  ASSERT_THAT(codec->EncodeWithFeedback(constant, residual, {}, rng, &enc), IsOk());
  EXPECT_THAT(enc.scales, ElementsAre(0.0f));
  EXPECT_EQ(enc.payload, std::vector<uint8_t>(10, 0));
  EXPECT_EQ(residual, constant);
  // Without clipping the constant is sent at full scale.
  auto noclip = MakeCodec(0.0f, false);
  ASSERT_THAT(noclip->Encode(constant, {}, rng, &enc), IsOk());
  EXPECT_THAT(Decode(*noclip, enc), ::testing::Each(0.75f));
  // Empty.
  ASSERT_THAT(codec->Encode({}, {}, rng, &enc), IsOk());
  EXPECT_TRUE(enc.payload.empty());
  EXPECT_THAT(enc.scales, ElementsAre(0.0f));
  std::vector<float> none;
  EXPECT_THAT(codec->DecodeAdd(enc, std::span<float>(none)), IsOk());
}

TEST(TernGradStatsTest, NonFiniteInputIsRejected) {
  for (KernelPath path : {KernelPath::kAuto, KernelPath::kReference}) {
    for (float clip : {0.0f, 2.5f}) {
      auto codec = MakeCodec(clip, false, path);
      for (float bad :
           {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
            -std::numeric_limits<float>::infinity()}) {
        for (size_t where : {0u, 13u, 40u}) {
          std::vector<float> v = TestVector(41, 1);
          v[where] = bad;
          Rng rng(1);
          EncodedTensor enc;
          EXPECT_THAT(codec->Encode(v, {}, rng, &enc),
                      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("non-finite")));
          EXPECT_FALSE(std::isfinite(codec->LocalScale(v)));
          // Error feedback: the residual is left as it was.
          const std::vector<float> g = TestVector(41, 2);
          const std::vector<float> before = v;
          std::vector<float> residual = v;
          EXPECT_THAT(codec->EncodeWithFeedback(g, residual, {}, rng, &enc),
                      StatusIs(absl::StatusCode::kInvalidArgument));
          EXPECT_EQ(Bits(residual), Bits(before));
          EXPECT_THAT(codec->EncodeWithScale(v, {}, 1.0f, rng, &enc),
                      StatusIs(absl::StatusCode::kInvalidArgument));
          EXPECT_THAT(codec->EncodePreparedWithScale(residual, {}, 1.0f, rng, &enc),
                      StatusIs(absl::StatusCode::kInvalidArgument));
          EXPECT_EQ(Bits(residual), Bits(before));
        }
      }
    }
  }
}

// ---- Shared-scale mode -----------------------------------------------------------------------

TEST(TernGradSharedTest, IntegerSumsMatchDecodeAdd) {
  // Four workers, clip = 0: local scales are max|v|; worker 2 holds 4.0, the maximum, so the
  // agreed scale is 4 (a power of two): every partial sum of +-4 is exact in float, and the
  // float sum of DecodeAdds equals 4 * (integer sum of ternary values) exactly.
  constexpr int kWorkers = 4;
  constexpr size_t kN = 1003;
  for (KernelPath path : {KernelPath::kAuto, KernelPath::kReference}) {
    auto codec = MakeCodec(0.0f, true, path);
    std::vector<std::vector<float>> grads;
    float scale = 0.0f;
    for (int w = 0; w < kWorkers; ++w) {
      std::vector<float> g = TestVector(kN, 50 + w, 0.8f);
      for (float& x : g) x = std::clamp(x, -3.5f, 3.5f);
      if (w == 2) g[517] = -4.0f;
      scale = std::max(scale, codec->LocalScale(g));
      grads.push_back(std::move(g));
    }
    ASSERT_EQ(scale, 4.0f);
    std::vector<int32_t> counts(kN, 0);
    std::vector<float> sum(kN, 0.0f);
    Rng rng(77);
    for (int w = 0; w < kWorkers; ++w) {
      EncodedTensor enc;
      ASSERT_THAT(codec->EncodeWithScale(grads[w], {}, scale, rng, &enc), IsOk());
      EXPECT_THAT(enc.scales, ElementsAre(4.0f));
      ASSERT_THAT(codec->AccumulateTernary(enc, std::span<int32_t>(counts)), IsOk());
      ASSERT_THAT(codec->DecodeAdd(enc, std::span<float>(sum)), IsOk());
    }
    int nonzero = 0;
    for (size_t i = 0; i < kN; ++i) {
      EXPECT_EQ(sum[i], scale * static_cast<float>(counts[i])) << i;
      EXPECT_LE(std::abs(counts[i]), kWorkers);
      nonzero += counts[i] != 0;
    }
    EXPECT_GT(nonzero, 0);
  }
}

TEST(TernGradSharedTest, PlainEncodeNeedsAScale) {
  auto codec = MakeCodec(2.5f, true);
  std::vector<float> v = TestVector(16, 1);
  std::vector<float> residual(16, 0.0f);
  Rng rng(1);
  EncodedTensor enc;
  EXPECT_THAT(codec->Encode(v, {}, rng, &enc),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("EncodeWithScale")));
  EXPECT_THAT(codec->EncodeWithFeedback(v, residual, {}, rng, &enc),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("EncodeWithScale")));
  EXPECT_EQ(rng.streams_used(), 0u);
}

TEST(TernGradSharedTest, BadScalesAreRejected) {
  auto codec = MakeCodec(2.5f, true);
  std::vector<float> v = TestVector(16, 1);
  const std::vector<float> before = v;
  Rng rng(1);
  EncodedTensor enc;
  for (float bad :
       {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    EXPECT_THAT(codec->EncodeWithScale(v, {}, bad, rng, &enc),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("scale")));
    EXPECT_THAT(codec->EncodePreparedWithScale(v, {}, bad, rng, &enc),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("scale")));
    EXPECT_EQ(Bits(v), Bits(before));
  }
  std::vector<float> short_residual(15, 0.0f);
  EXPECT_THAT(codec->PrepareFeedback(v, short_residual),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // Scale 0 (every worker's tensor is zero after clipping) sends nothing; -0 is stored as +0.
  ASSERT_THAT(codec->EncodeWithScale(v, {}, -0.0f, rng, &enc), IsOk());
  EXPECT_EQ(std::bit_cast<uint32_t>(enc.scales[0]), 0u);
  EXPECT_EQ(enc.payload, std::vector<uint8_t>(4, 0));
}

TEST(TernGradSharedTest, ScaleBelowLocalSaturates) {
  // p = min(|v_c| / scale, 1): a scale below |v_c| sends the element every time.
  auto codec = MakeCodec(0.0f, true);
  const std::vector<float> v = {3.0f, -3.0f, 0.0f, 0.5f};
  for (int t = 0; t < 20; ++t) {
    Rng rng(t);
    EncodedTensor enc;
    ASSERT_THAT(codec->EncodeWithScale(v, {}, 1.0f, rng, &enc), IsOk());
    const std::vector<float> d = Decode(*codec, enc);
    EXPECT_EQ(d[0], 1.0f);
    EXPECT_EQ(d[1], -1.0f);
    EXPECT_EQ(d[2], 0.0f);
  }
}

// ---- Malformed payloads: INVALID_ARGUMENT and `out` untouched ----------------------------------

class TernGradMalformedTest : public ::testing::TestWithParam<KernelPath> {
 protected:
  // A valid payload of n elements where every code is non-zero somewhere.
  EncodedTensor Valid(size_t n) {
    auto codec = MakeCodec(0.0f, false, GetParam());
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = (i % 3 == 0) ? 1.0f : (i % 3 == 1 ? -1.0f : 0.0f);
    Rng rng(1);
    EncodedTensor enc;
    EXPECT_THAT(codec->Encode(v, {}, rng, &enc), IsOk());
    return enc;
  }

  void ExpectRejected(const EncodedTensor& bad, const std::string& what) {
    SCOPED_TRACE(what);
    auto codec = MakeCodec(2.5f, false, GetParam());
    std::vector<float> out = TestVector(bad.num_elements, 9);
    const std::vector<uint32_t> before = Bits(out);
    EXPECT_THAT(codec->DecodeAdd(bad, std::span<float>(out)),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("terngrad")));
    EXPECT_EQ(Bits(out), before);
    std::vector<int32_t> counts(bad.num_elements, 3);
    EXPECT_THAT(codec->AccumulateTernary(bad, std::span<int32_t>(counts)),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_EQ(counts, std::vector<int32_t>(bad.num_elements, 3));
  }
};

TEST_P(TernGradMalformedTest, ValidPayloadDecodes) {
  auto codec = MakeCodec(2.5f, false, GetParam());
  for (size_t n : {37u, 1000u}) {
    EncodedTensor enc = Valid(n);
    std::vector<float> out(n, 0.0f);
    EXPECT_THAT(codec->DecodeAdd(enc, std::span<float>(out)), IsOk());
  }
}

TEST_P(TernGradMalformedTest, Truncated) {
  EncodedTensor bad = Valid(37);
  bad.payload.pop_back();
  ExpectRejected(bad, "truncated");
  bad.payload.clear();
  ExpectRejected(bad, "empty");
}

TEST_P(TernGradMalformedTest, TooLong) {
  EncodedTensor bad = Valid(37);
  bad.payload.push_back(0);
  ExpectRejected(bad, "one byte too long");
  bad = Valid(36);
  bad.payload.push_back(0);
  ExpectRejected(bad, "one byte too long, n % 4 == 0");
}

TEST_P(TernGradMalformedTest, InvalidCode11) {
  for (size_t n : {37u, 1000u, 4099u}) {
    for (size_t element : {size_t{0}, n / 2 + 1, n - 1}) {
      EncodedTensor bad = Valid(n);
      bad.payload[element / 4] |= static_cast<uint8_t>(3u << (2 * (element % 4)));
      ExpectRejected(bad,
                     "code 11 at element " + std::to_string(element) + " of " + std::to_string(n));
    }
  }
}

TEST_P(TernGradMalformedTest, BitsPastTheLastElement) {
  EncodedTensor bad = Valid(37);  // 37 % 4 == 1: bits 2..7 of the last byte are unused
  bad.payload.back() |= 0x80;
  ExpectRejected(bad, "reserved bits set");
}

TEST_P(TernGradMalformedTest, BadScaleValue) {
  for (float s :
       {-1.0f, -0.0f, std::numeric_limits<float>::quiet_NaN(),
        std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}) {
    EncodedTensor bad = Valid(37);
    bad.scales[0] = s;
    ExpectRejected(bad, "scale " + std::to_string(s));
  }
}

TEST_P(TernGradMalformedTest, WrongScaleCount) {
  EncodedTensor bad = Valid(37);
  bad.scales.clear();
  ExpectRejected(bad, "no scale");
  bad.scales = {1.0f, 1.0f};
  ExpectRejected(bad, "two scales");
}

TEST_P(TernGradMalformedTest, UnexpectedParams) {
  EncodedTensor bad = Valid(37);
  bad.params = {1};
  ExpectRejected(bad, "params");
}

TEST_P(TernGradMalformedTest, WrongCodecId) {
  EncodedTensor bad = Valid(37);
  bad.codec = CodecId::kQsgd;
  ExpectRejected(bad, "codec id");
}

TEST_P(TernGradMalformedTest, WrongVersion) {
  EncodedTensor bad = Valid(37);
  bad.format_version = 0;
  ExpectRejected(bad, "version 0");
  bad.format_version = 2;
  ExpectRejected(bad, "version 2");
}

TEST_P(TernGradMalformedTest, CountMismatch) {
  auto codec = MakeCodec(2.5f, false, GetParam());
  EncodedTensor enc = Valid(37);
  std::vector<float> out(36, 1.0f);
  EXPECT_THAT(codec->DecodeAdd(enc, std::span<float>(out)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(out, std::vector<float>(36, 1.0f));
  EncodedTensor bad = Valid(37);
  bad.shape = {6, 6};
  ExpectRejected(bad, "shape product");
  bad = Valid(37);
  bad.num_elements = kMaxElements + 1;
  std::vector<float> small(37, 1.0f);
  EXPECT_THAT(codec->DecodeAdd(bad, std::span<float>(small)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(small, std::vector<float>(37, 1.0f));
}

INSTANTIATE_TEST_SUITE_P(Paths, TernGradMalformedTest,
                         ::testing::Values(KernelPath::kAuto, KernelPath::kReference),
                         [](const ::testing::TestParamInfo<KernelPath>& info) {
                           return info.param == KernelPath::kAuto ? "Auto" : "Reference";
                         });

}  // namespace
}  // namespace qtrain::compression
