#include "compression/threshold.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "compression/codec_registry.h"
#include "compression/varint.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace qtrain::compression {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

constexpr double kU = 0x1p-24;  // unit roundoff of float

std::unique_ptr<ThresholdCodec> MakeCodec(float tau, KernelPath path) {
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_THRESHOLD);
  config.mutable_threshold()->set_tau(tau);
  auto codec = ThresholdCodec::Create(config, CodecOptions{path});
  EXPECT_THAT(codec, IsOk());
  return codec.ok() ? std::move(codec).value() : nullptr;
}

std::vector<float> Gaussian(size_t n, uint32_t seed, float stddev) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

bool SameBits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

std::vector<float> Decode(const Codec& codec, const EncodedTensor& t) {
  std::vector<float> out(t.num_elements, 0.0f);
  EXPECT_THAT(codec.DecodeAdd(t, std::span<float>(out)), IsOk());
  return out;
}

constexpr KernelPath kPaths[] = {KernelPath::kReference, KernelPath::kAuto};

// ---- Exact payloads --------------------------------------------------------------------------

TEST(ThresholdTest, HandComputedExample) {
  // tau = 1: entries at 1 (+), 2 (-), 5 (+), 7 (-).
  //   index 1: gap 1 -> code 1<<1|0 = 2;  index 2: gap 0 -> 0<<1|1 = 1;
  //   index 5: gap 2 -> 2<<1|0 = 4;       index 7: gap 1 -> 1<<1|1 = 3.
  const std::vector<float> input = {0.5f, 2.0f, -3.0f, 0.0f, 0.0f, 1.5f, -0.25f, -1.25f};
  for (KernelPath path : kPaths) {
    auto codec = MakeCodec(1.0f, path);
    Rng rng(1);
    EncodedTensor t;
    ASSERT_THAT(codec->Encode(input, {}, rng, &t), IsOk());
    EXPECT_EQ(t.codec, CodecId::kThreshold);
    EXPECT_EQ(t.format_version, 1u);
    EXPECT_EQ(t.payload, (std::vector<uint8_t>{0x02, 0x01, 0x04, 0x03}));
    EXPECT_EQ(t.scales, (std::vector<float>{1.0f}));
    EXPECT_EQ(t.params, (std::vector<uint32_t>{4}));
    EXPECT_EQ(Decode(*codec, t), (std::vector<float>{0, 1, -1, 0, 0, 1, 0, -1}));

    std::vector<float> residual(8, 0.0f);
    ASSERT_THAT(codec->EncodeWithFeedback(input, std::span<float>(residual), {}, rng, &t), IsOk());
    EXPECT_EQ(t.payload, (std::vector<uint8_t>{0x02, 0x01, 0x04, 0x03}));
    EXPECT_EQ(residual, (std::vector<float>{0.5f, 1.0f, -2.0f, 0, 0, 0.5f, -0.25f, -0.25f}));
  }
}

TEST(ThresholdTest, SignsAndTheStrictThreshold) {
  // |v| == tau is not sent; the next float above is. Zeros of either sign are not sent.
  const float above = std::nextafter(0.5f, 1.0f);
  const std::vector<float> input = {0.5f, -0.5f, above, -above, -0.0f, 0.0f, 1e30f, -1e30f};
  // Entries: 2 (+, gap 2 -> 4), 3 (-, gap 0 -> 1), 6 (+, gap 2 -> 4), 7 (-, gap 0 -> 1).
  for (KernelPath path : kPaths) {
    auto codec = MakeCodec(0.5f, path);
    Rng rng(1);
    EncodedTensor t;
    ASSERT_THAT(codec->Encode(input, {}, rng, &t), IsOk());
    EXPECT_EQ(t.payload, (std::vector<uint8_t>{4, 1, 4, 1}));
    EXPECT_EQ(Decode(*codec, t), (std::vector<float>{0, 0, 0.5f, -0.5f, 0, 0, 0.5f, -0.5f}));
    std::vector<float> residual(input.size(), 0.0f);
    ASSERT_THAT(codec->EncodeWithFeedback(input, std::span<float>(residual), {}, rng, &t), IsOk());
    EXPECT_EQ(residual[0], 0.5f);
    EXPECT_EQ(residual[1], -0.5f);
    EXPECT_EQ(residual[2], above - 0.5f);
    EXPECT_EQ(residual[3], 0.5f - above);
    EXPECT_EQ(residual[4], 0.0f);
    EXPECT_EQ(residual[6], 1e30f - 0.5f);
  }
}

TEST(ThresholdTest, LargeGapsUseMultiByteVarints) {
  // n = 2^22 + 10. Entries: index 0 (+): code 0 -> 00.
  //   index 2^21 + 5 (-): gap 2^21 + 4, code 2^22 + 9 = 0x400009 -> 89 80 80 02.
  //   index 2^22 + 9 (+): gap 2^21 + 3, code 2^22 + 6 = 0x400006 -> 86 80 80 02.
  const size_t n = (size_t{1} << 22) + 10;
  std::vector<float> input(n, 0.0f);
  input[0] = 1.0f;
  input[(size_t{1} << 21) + 5] = -2.0f;
  input[n - 1] = 3.0f;
  for (KernelPath path : kPaths) {
    auto codec = MakeCodec(0.5f, path);
    Rng rng(1);
    EncodedTensor t;
    ASSERT_THAT(codec->Encode(input, {}, rng, &t), IsOk());
    EXPECT_EQ(t.payload,
              (std::vector<uint8_t>{0x00, 0x89, 0x80, 0x80, 0x02, 0x86, 0x80, 0x80, 0x02}));
    EXPECT_EQ(t.params, (std::vector<uint32_t>{3}));
    const std::vector<float> decoded = Decode(*codec, t);
    EXPECT_EQ(decoded[0], 0.5f);
    EXPECT_EQ(decoded[(size_t{1} << 21) + 5], -0.5f);
    EXPECT_EQ(decoded[n - 1], 0.5f);
    double total = 0;
    for (float x : decoded) total += std::fabs(x);
    EXPECT_EQ(total, 1.5);
  }
}

TEST(ThresholdTest, VarintBoundaries) {
  for (uint32_t value : {0u, 1u, 127u, 128u, 16383u, 16384u, (1u << 21) - 1, 1u << 21,
                         (1u << 28) - 1, 1u << 28, 0xffffffffu}) {
    uint8_t buffer[kMaxVarint32Bytes];
    const size_t size = PutVarint32(buffer, value);
    const size_t expected = value < (1u << 7)    ? 1
                            : value < (1u << 14) ? 2
                            : value < (1u << 21) ? 3
                            : value < (1u << 28) ? 4
                                                 : 5;
    EXPECT_EQ(size, expected) << value;
    uint32_t back = 0;
    size_t used = 0;
    EXPECT_EQ(ParseVarint32(buffer, buffer + size, &back, &used), VarintStatus::kOk);
    EXPECT_EQ(back, value);
    EXPECT_EQ(used, size);
    EXPECT_EQ(ParseVarint32(buffer, buffer + size - 1, &back, &used), VarintStatus::kTruncated);
  }
}

TEST(ThresholdTest, EmptySelection) {
  for (KernelPath path : kPaths) {
    auto codec = MakeCodec(1.0f, path);
    for (size_t n : {0, 1, 100, 1000}) {
      std::vector<float> input(n, 0.0f);
      for (size_t i = 0; i < n; ++i) {
        input[i] = (i % 2 ? 1.0f : -1.0f) * static_cast<float>(i % 3) / 2;  // |x| <= tau
      }
      Rng rng(1);
      EncodedTensor t;
      ASSERT_THAT(codec->Encode(input, {}, rng, &t), IsOk());
      EXPECT_TRUE(t.payload.empty());
      EXPECT_EQ(t.params, (std::vector<uint32_t>{0}));
      EXPECT_EQ(t.scales, (std::vector<float>{1.0f}));
      std::vector<float> out(n, 7.0f);
      ASSERT_THAT(codec->DecodeAdd(t, std::span<float>(out)), IsOk());
      EXPECT_EQ(out, std::vector<float>(n, 7.0f));
    }
  }
}

// ---- Reference == fast -----------------------------------------------------------------------

TEST(ThresholdTest, FastPathMatchesReferenceBitForBit) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2: both paths are the reference";
  constexpr float kTau = 1e-3f;
  auto ref = MakeCodec(kTau, KernelPath::kReference);
  auto fast = MakeCodec(kTau, KernelPath::kAuto);
  // Spreads from nothing selected through ~0.1% (gaps of ~1000: multi-byte varints) and ~32%
  // to ~92% (runs of one-byte codes).
  for (float stddev : {1e-4f, 3e-4f, 1e-3f, 1e-2f}) {
    for (size_t n : {0,  1,  7,  8,   9,   15,  16,   17,   31,   32,    33,
                     63, 64, 65, 255, 256, 257, 1000, 2049, 5000, 100003}) {
      for (uint32_t seed : {1u, 2u}) {
        SCOPED_TRACE(::testing::Message() << "stddev " << stddev << " n " << n << " seed " << seed);
        const std::vector<float> input = Gaussian(n, seed, stddev);
        Rng rng_a(seed), rng_b(seed);
        EncodedTensor a, b;
        ASSERT_THAT(ref->Encode(input, {}, rng_a, &a), IsOk());
        ASSERT_THAT(fast->Encode(input, {}, rng_b, &b), IsOk());
        EXPECT_EQ(a.payload, b.payload);
        EXPECT_EQ(a.params, b.params);
        EXPECT_TRUE(SameBits(a.scales, b.scales));

        std::vector<float> res_a = Gaussian(n, seed + 50, stddev);
        std::vector<float> res_b = res_a;
        for (int step = 0; step < 2; ++step) {
          ASSERT_THAT(ref->EncodeWithFeedback(input, std::span<float>(res_a), {}, rng_a, &a),
                      IsOk());
          ASSERT_THAT(fast->EncodeWithFeedback(input, std::span<float>(res_b), {}, rng_b, &b),
                      IsOk());
          EXPECT_EQ(a.payload, b.payload);
          EXPECT_EQ(a.params, b.params);
          EXPECT_TRUE(SameBits(res_a, res_b));
        }

        std::vector<float> out_a = Gaussian(n, seed + 99, 1.0f);
        std::vector<float> out_b = out_a;
        ASSERT_THAT(ref->DecodeAdd(a, std::span<float>(out_a)), IsOk());
        ASSERT_THAT(fast->DecodeAdd(a, std::span<float>(out_b)), IsOk());
        EXPECT_TRUE(SameBits(out_a, out_b));
      }
    }
  }
}

// ---- Error feedback --------------------------------------------------------------------------

TEST(ThresholdTest, FeedbackKeepsWhatWasNotSent) {
  // v = fl(g + r_old); r_new = v exactly (not sent) or fl(v -+ tau), so
  // |(g + r_old) - (d + r_new)| <= u |v| + u |r_new|, bounded by 1.001 u (|v| + |r_new|).
  constexpr float kTau = 1e-3f;
  for (KernelPath path : kPaths) {
    auto codec = MakeCodec(kTau, path);
    std::vector<float> residual(5000, 0.0f);
    Rng rng(3);
    for (int step = 0; step < 5; ++step) {
      const std::vector<float> grad = Gaussian(5000, 40 + step, 1e-3f);
      const std::vector<float> old_residual = residual;
      std::vector<float> v(grad.size());
      for (size_t i = 0; i < v.size(); ++i) v[i] = grad[i] + old_residual[i];

      EncodedTensor fused, plain;
      ASSERT_THAT(codec->EncodeWithFeedback(grad, std::span<float>(residual), {}, rng, &fused),
                  IsOk());
      ASSERT_THAT(codec->Encode(v, {}, rng, &plain), IsOk());
      EXPECT_EQ(fused.payload, plain.payload);
      EXPECT_EQ(fused.params, plain.params);

      const std::vector<float> decoded = Decode(*codec, fused);
      for (size_t i = 0; i < v.size(); ++i) {
        const double lhs = static_cast<double>(grad[i]) + old_residual[i];
        const double rhs = static_cast<double>(decoded[i]) + residual[i];
        ASSERT_NEAR(lhs, rhs, 1.001 * kU * (std::fabs(v[i]) + std::fabs(residual[i])))
            << "step " << step << " element " << i;
        ASSERT_LE(std::fabs(residual[i]), std::fabs(v[i]));  // feedback never grows |v|
      }
    }
  }
}

TEST(ThresholdTest, ConstantGradientBelowTauIsSentOnAverage) {
  // For |g_i| <= tau and r_0 = 0: if |r_t| <= tau then |v| <= 2 tau (exactly, 2 tau is a float),
  // and r_{t+1} = v (|v| <= tau) or v -+ tau with |.| <= tau: the residual stays in [-tau, tau].
  // Summing g + r_t = d_t + r_{t+1} over T steps, mean(d) - g = -r_T / T plus rounding of at most
  // u (|v| + |r|) <= 3 u tau per step, so |mean(d)_i - g_i| <= (tau + 3 u tau T) / T.
  constexpr float kTau = 1e-3f;
  constexpr int kSteps = 1000;
  for (KernelPath path : kPaths) {
    auto codec = MakeCodec(kTau, path);
    std::vector<float> g = Gaussian(1000, 8, 5e-4f);
    for (float& x : g) x = std::clamp(x, -kTau, kTau);
    std::vector<float> residual(g.size(), 0.0f);
    std::vector<double> sum(g.size(), 0.0);
    Rng rng(1);
    EncodedTensor t;
    for (int step = 0; step < kSteps; ++step) {
      ASSERT_THAT(codec->EncodeWithFeedback(g, std::span<float>(residual), {}, rng, &t), IsOk());
      const std::vector<float> decoded = Decode(*codec, t);
      for (size_t i = 0; i < g.size(); ++i) {
        sum[i] += decoded[i];
        ASSERT_LE(std::fabs(residual[i]), kTau) << "step " << step << " element " << i;
      }
    }
    for (size_t i = 0; i < g.size(); ++i) {
      EXPECT_NEAR(sum[i] / kSteps, g[i], (kTau + 3 * kU * kTau * kSteps) / kSteps) << i;
    }
  }
}

TEST(ThresholdTest, NonFiniteInputIsRejected) {
  for (KernelPath path : kPaths) {
    auto codec = MakeCodec(1e-3f, path);
    for (float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
          -std::numeric_limits<float>::infinity()}) {
      for (size_t at : {size_t{0}, size_t{300}, size_t{1003}}) {  // vector body and scalar tail
        std::vector<float> input = Gaussian(1004, 9, 1e-3f);
        input[at] = bad;
        Rng rng(1);
        EncodedTensor t;
        const std::string where = "element " + std::to_string(at) + " ";
        EXPECT_THAT(codec->Encode(input, {}, rng, &t),
                    StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(where)));
        std::vector<float> residual(input.size(), 0.0f);
        EXPECT_THAT(codec->EncodeWithFeedback(input, std::span<float>(residual), {}, rng, &t),
                    StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(where)));
      }
    }
  }
}

TEST(ThresholdTest, EncodeReusesBuffers) {
  auto codec = MakeCodec(1e-3f, KernelPath::kAuto);
  const std::vector<float> input = Gaussian(100000, 4, 1e-3f);
  Rng rng(1);
  EncodedTensor t;
  ASSERT_THAT(codec->Encode(input, {}, rng, &t), IsOk());
  const uint8_t* payload = t.payload.data();
  const std::vector<uint8_t> first = t.payload;
  ASSERT_THAT(codec->Encode(input, {}, rng, &t), IsOk());
  EXPECT_EQ(t.payload.data(), payload);
  EXPECT_EQ(t.payload, first);
}

// ---- Malformed payloads ----------------------------------------------------------------------

constexpr uint64_t kN = 1000;

EncodedTensor Tensor(std::vector<uint8_t> payload, uint32_t entries, float tau = 1.0f) {
  EncodedTensor t;
  t.codec = CodecId::kThreshold;
  t.format_version = 1;
  t.num_elements = kN;
  t.scales = {tau};
  t.params = {entries};
  t.payload = std::move(payload);
  return t;
}

// Entries at 1 (+), 2 (-), 5 (+), 7 (-), then index 999 (+): gap 991 -> code 1982 = BE 0F.
EncodedTensor ValidTensor() { return Tensor({0x02, 0x01, 0x04, 0x03, 0xBE, 0x0F}, 5); }

void ExpectRejected(const EncodedTensor& bad, const std::string& message_part) {
  for (KernelPath path : kPaths) {
    auto codec = MakeCodec(0.25f, path);
    std::vector<float> out = Gaussian(kN, 5, 1.0f);
    const std::vector<float> before = out;
    EXPECT_THAT(codec->DecodeAdd(bad, std::span<float>(out)),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(message_part)));
    EXPECT_TRUE(SameBits(out, before)) << "out modified on error";
  }
}

TEST(ThresholdMalformedTest, ValidTensorDecodes) {
  for (KernelPath path : kPaths) {
    auto codec = MakeCodec(0.25f, path);  // the payload's tau (1) is used, not the codec's
    std::vector<float> out(kN, 0.0f);
    ASSERT_THAT(codec->DecodeAdd(ValidTensor(), std::span<float>(out)), IsOk());
    EXPECT_EQ(out[1], 1.0f);
    EXPECT_EQ(out[2], -1.0f);
    EXPECT_EQ(out[5], 1.0f);
    EXPECT_EQ(out[7], -1.0f);
    EXPECT_EQ(out[999], 1.0f);
  }
}

TEST(ThresholdMalformedTest, TruncatedVarint) {
  ExpectRejected(Tensor({0x02, 0x81}, 2), "truncated varint at byte 1 (entry 1)");
  ExpectRejected(Tensor({0xDE}, 1), "truncated varint");
}

TEST(ThresholdMalformedTest, OverlongVarint) {
  ExpectRejected(Tensor({0x80, 0x80, 0x80, 0x80, 0x80, 0x00}, 1), "longer than 5 bytes");
  ExpectRejected(Tensor({0xFF, 0xFF, 0xFF, 0xFF, 0x1F}, 1), "over 32 bits");
  ExpectRejected(Tensor({0x82, 0x00}, 1), "non-canonical");
}

TEST(ThresholdMalformedTest, IndexOutOfRange) {
  // Gap 1000 from the start: index 1000 of 1000 elements. Code 2000 = D0 0F.
  ExpectRejected(Tensor({0xD0, 0x0F}, 1), "index 1000");
  // 40 one-byte entries of gap 63 (code 0x7E): entry k has index 64 k + 63, and entry 15
  // (index 1023) is the first out of range; the fast path's 32-entry block must find it too.
  ExpectRejected(Tensor(std::vector<uint8_t>(40, 0x7E), 40), "entry 15 has index 1023");
  // A 5-byte gap far past the end.
  ExpectRejected(Tensor({0xFE, 0xFF, 0xFF, 0xFF, 0x0F}, 1), "index 2147483647");
}

TEST(ThresholdMalformedTest, CountDeclaredAboveActual) {
  EncodedTensor t = ValidTensor();
  t.params[0] = 6;
  ExpectRejected(t, "ends after 5 entries, params declare 6");
  t.params[0] = kN + 1;
  ExpectRejected(t, "declares 1001 entries");
}

TEST(ThresholdMalformedTest, CountDeclaredBelowActual) {
  EncodedTensor t = ValidTensor();
  t.params[0] = 4;
  ExpectRejected(t, "2 trailing bytes");
  t.params[0] = 0;
  ExpectRejected(t, "6 trailing bytes");
}

TEST(ThresholdMalformedTest, TrailingGarbage) {
  EncodedTensor t = ValidTensor();
  t.payload.push_back(0x00);
  ExpectRejected(t, "1 trailing bytes");
  t.payload.back() = 0xFF;
  ExpectRejected(t, "1 trailing bytes");
}

TEST(ThresholdMalformedTest, BadTau) {
  for (float tau : {0.0f, -0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(),
                    std::numeric_limits<float>::infinity()}) {
    EncodedTensor t = ValidTensor();
    t.scales[0] = tau;
    ExpectRejected(t, "tau");
  }
  EncodedTensor t = ValidTensor();
  t.scales.clear();
  ExpectRejected(t, "0 scales");
  t.scales = {1.0f, 1.0f};
  ExpectRejected(t, "2 scales");
}

TEST(ThresholdMalformedTest, BadParamsCount) {
  EncodedTensor t = ValidTensor();
  t.params.clear();
  ExpectRejected(t, "0 params");
  t.params = {5, 5};
  ExpectRejected(t, "2 params");
}

TEST(ThresholdMalformedTest, WrongCodecIdOrVersion) {
  EncodedTensor t = ValidTensor();
  t.codec = CodecId::kOneBit;
  ExpectRejected(t, "codec id");
  t = ValidTensor();
  t.format_version = 2;
  ExpectRejected(t, "version");
  t.format_version = 0;
  ExpectRejected(t, "version");
  t = ValidTensor();
  t.num_elements = kN + 1;
  ExpectRejected(t, "1001 elements");
}

// ---- Spec and config -------------------------------------------------------------------------

CodecRegistry Registry() {
  CodecRegistry registry;
  EXPECT_THAT(registry.Register(ThresholdRegistration()), IsOk());
  return registry;
}

TEST(ThresholdConfigTest, SpecRoundTrips) {
  CodecRegistry registry = Registry();
  for (const char* spec :
       {"threshold", "threshold:tau=0.001", "threshold:tau=0.5,ef=0", "threshold:ef=1,tau=1e-7",
        "threshold:tau=3.4e38", "threshold:tau=0.1234567"}) {
    SCOPED_TRACE(spec);
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Codec> codec, registry.CreateFromSpec(spec));
    EXPECT_TRUE(codec->DefaultErrorFeedback());
    ASSERT_OK_AND_ASSIGN(pb::CodecConfig reparsed, registry.ParseSpec(codec->Spec()));
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(reparsed, codec->Config()))
        << codec->Spec();
    ASSERT_OK_AND_ASSIGN(pb::CodecConfig parsed, registry.ParseSpec(spec));
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(parsed, codec->Config()));
  }
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Codec> codec, registry.CreateFromSpec("threshold"));
  EXPECT_EQ(codec->Spec(), "threshold:tau=0.001");
  EXPECT_EQ(codec->PayloadBytes({}, 1000), -1);
}

TEST(ThresholdConfigTest, BadSettingsAreRejected) {
  CodecRegistry registry = Registry();
  for (const char* spec : {"threshold:tau=0", "threshold:tau=-1", "threshold:tau=nan",
                           "threshold:tau=inf", "threshold:tau=abc"}) {
    EXPECT_THAT(registry.ParseSpec(spec),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tau")))
        << spec;
  }
  EXPECT_THAT(registry.ParseSpec("threshold:bucket=3"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tau")));

  pb::CodecConfig config;
  config.set_codec(pb::CODEC_THRESHOLD);
  for (float tau : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(),
                    std::numeric_limits<float>::infinity()}) {
    config.mutable_threshold()->set_tau(tau);
    EXPECT_THAT(registry.Create(config),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tau")))
        << tau;
  }
  config.mutable_onebit();  // settings of another codec
  EXPECT_THAT(ThresholdCodec::Create(config, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("another codec")));
  config.set_codec(pb::CODEC_ONEBIT);
  EXPECT_THAT(ThresholdCodec::Create(config, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("codec id")));
  pb::CodecConfig bare;  // unset settings mean the default tau
  bare.set_codec(pb::CODEC_THRESHOLD);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Codec> codec, registry.Create(bare));
  EXPECT_EQ(codec->Spec(), "threshold:tau=0.001");
}

}  // namespace
}  // namespace qtrain::compression
