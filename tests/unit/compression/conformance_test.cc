// The conformance suite: every registered codec (in several settings) against the contracts of
// compression/codec.h — round trip within the codec's named error limit, error-feedback
// invariant, determinism, payload size formula, fast path == reference path, wire round trip,
// and malformed payloads rejected with INVALID_ARGUMENT leaving the output untouched.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::compression {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;

const std::vector<std::string>& Specs() {
  static const std::vector<std::string> specs = {
      "fp32",
      "fp16",
      "fp16:ef=1",
      "onebit",
      "onebit:bucket=64",
      "threshold",
      "threshold:tau=0.5",
      "qsgd",
      "qsgd:levels=4,bucket=128",
      "qsgd:levels=1,bucket=7",
      "qsgd:coding=elias",
      "qsgd:levels=16,bucket=512,coding=elias,ef=1",
      "terngrad",
      "terngrad:clip=0",
  };
  return specs;
}

const std::vector<size_t> kSizes = {0, 1, 7, 8, 9, 100, 1000, 4099};

std::vector<float> Gaussian(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

double SquaredNorm(std::span<const float> v) {
  double s = 0;
  for (float x : v) s += double(x) * x;
  return s;
}

// The named error limit of each codec family: an upper bound on ||decode(encode(x)) - x||^2
// that holds for every draw (not just on average), derived from the codec's math.
double MaxSquaredError(const Codec& codec, std::span<const float> x) {
  const pb::CodecConfig config = codec.Config();
  switch (codec.id()) {
    case CodecId::kFp32:
      return 0.0;
    case CodecId::kFp16: {
      // Round to nearest: relative error <= 2^-11 for normal halves; absolute <= 2^-25 below.
      double bound = 0;
      for (float v : x) {
        double e = std::max(std::fabs(v) * 0x1p-11, 0x1p-25);
        bound += e * e;
      }
      return bound * (1 + 1e-6);
    }
    case CodecId::kOneBit:
      // Each column's two means are the least-squares reconstruction for the sign partition,
      // and reconstructing with zeros is one candidate: error <= ||x||^2.
    case CodecId::kThreshold:
      // Each sent entry moves toward x by tau < |x_i|; unsent entries err by |x_i|.
      return SquaredNorm(x) * (1 + 1e-5) + 1e-30;
    case CodecId::kQsgd: {
      // Each element lands on one of the two levels around |x_i| s / norm: per-element error
      // < norm / s, so the bucket error is < d norm_b^2 / s^2 and the total < (d / s^2) ||x||^2.
      const double s = config.qsgd().levels(), d = config.qsgd().bucket();
      return std::min<double>(d, x.size()) / (s * s) * SquaredNorm(x) * (1 + 1e-5) + 1e-30;
    }
    case CodecId::kTernGrad: {
      // decoded_i is 0 or sign * scale, scale <= max|x|, so |decoded_i - x_i| <= 2 max|x|.
      double m = 0;
      for (float v : x) m = std::max<double>(m, std::fabs(v));
      return 4 * m * m * x.size() * (1 + 1e-5) + 1e-30;
    }
  }
  return 0;
}

class ConformanceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_THAT(RegisterBuiltinCodecs(&registry_), IsOk());
    auto config = registry_.ParseSpec(GetParam());
    ASSERT_THAT(config, IsOk());
    config_ = *config;
    ASSERT_OK_AND_ASSIGN(fast_, registry_.Create(config_, {KernelPath::kAuto}));
    ASSERT_OK_AND_ASSIGN(reference_, registry_.Create(config_, {KernelPath::kReference}));
  }

  EncodedTensor EncodeOk(const Codec& codec, std::span<const float> x, uint64_t seed) {
    EncodedTensor t;
    Rng rng(seed);
    EXPECT_THAT(codec.Encode(x, {}, rng, &t), IsOk());
    return t;
  }

  CodecRegistry registry_;
  pb::CodecConfig config_;
  std::unique_ptr<Codec> fast_, reference_;
};

TEST_P(ConformanceTest, RoundTripWithinNamedLimit) {
  for (size_t n : kSizes) {
    auto x = Gaussian(n, 11 + n);
    EncodedTensor t = EncodeOk(*fast_, x, 3);
    EXPECT_EQ(t.num_elements, n);
    EXPECT_EQ(t.codec, fast_->id());
    std::vector<float> out(n, 0.0f);
    ASSERT_THAT(fast_->DecodeAdd(t, std::span<float>(out)), IsOk());
    double err = 0;
    for (size_t i = 0; i < n; ++i) err += (double(out[i]) - x[i]) * (double(out[i]) - x[i]);
    EXPECT_LE(err, MaxSquaredError(*fast_, x)) << "n=" << n;
  }
}

TEST_P(ConformanceTest, DecodeAddAccumulates) {
  auto x = Gaussian(1000, 5);
  EncodedTensor t = EncodeOk(*fast_, x, 3);
  std::vector<float> once(1000, 0.0f), twice(1000, 1.5f);
  ASSERT_THAT(fast_->DecodeAdd(t, std::span<float>(once)), IsOk());
  ASSERT_THAT(fast_->DecodeAdd(t, std::span<float>(twice)), IsOk());
  for (size_t i = 0; i < once.size(); ++i) EXPECT_EQ(twice[i], 1.5f + once[i]) << i;
}

TEST_P(ConformanceTest, SameSeedSamePayload) {
  auto x = Gaussian(4099, 6);
  EncodedTensor a = EncodeOk(*fast_, x, 42), b = EncodeOk(*fast_, x, 42);
  EXPECT_EQ(a.payload, b.payload);
  EXPECT_EQ(a.scales, b.scales);
  EXPECT_EQ(a.params, b.params);
}

TEST_P(ConformanceTest, PayloadSizeMatchesFormula) {
  for (size_t n : kSizes) {
    auto x = Gaussian(n, 7 + n);
    EncodedTensor t = EncodeOk(*fast_, x, 1);
    int64_t expected = fast_->PayloadBytes({}, n);
    if (expected >= 0) {
      EXPECT_EQ(int64_t(t.payload.size()), expected) << "n=" << n;
    }
  }
}

TEST_P(ConformanceTest, FastPathEqualsReference) {
  for (size_t n : kSizes) {
    auto x = Gaussian(n, 8 + n);
    EncodedTensor a = EncodeOk(*fast_, x, 9), b = EncodeOk(*reference_, x, 9);
    EXPECT_EQ(a.payload, b.payload) << "n=" << n;
    ASSERT_EQ(a.scales.size(), b.scales.size());
    EXPECT_EQ(0, std::memcmp(a.scales.data(), b.scales.data(), 4 * a.scales.size()));
    EXPECT_EQ(a.params, b.params);
    std::vector<float> da(n, 0.25f), db(n, 0.25f);
    ASSERT_THAT(fast_->DecodeAdd(a, std::span<float>(da)), IsOk());
    ASSERT_THAT(reference_->DecodeAdd(a, std::span<float>(db)), IsOk());
    EXPECT_EQ(0, std::memcmp(da.data(), db.data(), 4 * n)) << "n=" << n;
    // Residuals from the fused error-feedback paths agree too.
    auto r0 = Gaussian(n, 99, 0.1f);
    std::vector<float> ra = r0, rb = r0;
    Rng rng_a(4), rng_b(4);
    ASSERT_THAT(fast_->EncodeWithFeedback(x, std::span<float>(ra), {}, rng_a, &a), IsOk());
    ASSERT_THAT(reference_->EncodeWithFeedback(x, std::span<float>(rb), {}, rng_b, &b), IsOk());
    EXPECT_EQ(a.payload, b.payload) << "n=" << n;
    EXPECT_EQ(0, std::memcmp(ra.data(), rb.data(), 4 * n)) << "n=" << n;
  }
}

TEST_P(ConformanceTest, ErrorFeedbackInvariant) {
  for (size_t n : {size_t{1}, size_t{9}, size_t{1000}, size_t{4099}}) {
    auto x = Gaussian(n, 21 + n);
    auto r_old = Gaussian(n, 22 + n, 0.3f);
    std::vector<float> r = r_old;
    EncodedTensor t;
    Rng rng(5);
    ASSERT_THAT(fast_->EncodeWithFeedback(x, std::span<float>(r), {}, rng, &t), IsOk());
    std::vector<float> decoded(n, 0.0f);
    ASSERT_THAT(fast_->DecodeAdd(t, std::span<float>(decoded)), IsOk());
    for (size_t i = 0; i < n; ++i) {
      // v = x + r_old is rounded once; v - decoded once more: a few ulps of the magnitudes.
      double lhs = double(x[i]) + r_old[i];
      double rhs = double(decoded[i]) + r[i];
      double scale = std::fabs(x[i]) + std::fabs(r_old[i]) + std::fabs(decoded[i]);
      EXPECT_NEAR(lhs, rhs, 4 * 0x1p-24 * scale + 1e-30) << "n=" << n << " i=" << i;
    }
    // The payload is exactly the encoding of v = x + r_old (same stream of random numbers).
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = x[i] + r_old[i];
    EncodedTensor direct;
    Rng rng2(5);
    ASSERT_THAT(fast_->Encode(v, {}, rng2, &direct), IsOk());
    EXPECT_EQ(direct.payload, t.payload) << "n=" << n;
  }
}

TEST_P(ConformanceTest, WireRoundTripAndChecksum) {
  auto x = Gaussian(1000, 12);
  EncodedTensor t = EncodeOk(*fast_, x, 2);
  std::string bytes = Serialize(t, Checksum::kCrc32);
  auto span = std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  ASSERT_OK_AND_ASSIGN(EncodedTensor back, Parse(span, 1 << 20));
  EXPECT_EQ(back.payload, t.payload);
  EXPECT_EQ(back.scales, t.scales);
  EXPECT_EQ(back.params, t.params);
  EXPECT_EQ(back.num_elements, t.num_elements);
  EXPECT_THAT(Parse(span, bytes.size() - 1), StatusIs(absl::StatusCode::kInvalidArgument));
  if (!t.payload.empty()) {
    pb::EncodedTensor proto = ToProto(t, Checksum::kCrc32);
    std::string payload = proto.payload();
    payload[payload.size() / 2] ^= 0x10;
    proto.set_payload(payload);
    EXPECT_THAT(FromProto(proto), StatusIs(absl::StatusCode::kDataLoss));
  }
}

TEST_P(ConformanceTest, SpecRoundTrips) {
  ASSERT_OK_AND_ASSIGN(pb::CodecConfig again, registry_.ParseSpec(fast_->Spec()));
  pb::CodecConfig expected = fast_->Config();
  EXPECT_EQ(again.DebugString(), expected.DebugString());
}

// Every malformed-envelope kind: error, and the output is left exactly as it was.
TEST_P(ConformanceTest, MalformedPayloadsAreRejectedAndChangeNothing) {
  const size_t n = 1000;
  auto x = Gaussian(n, 13);
  const EncodedTensor good = EncodeOk(*fast_, x, 2);
  std::vector<EncodedTensor> bad;
  auto add = [&](auto mutate) {
    EncodedTensor t = good;
    mutate(t);
    bad.push_back(std::move(t));
  };
  add([](EncodedTensor& t) { t.payload.push_back(0); });                       // oversized
  add([](EncodedTensor& t) { t.codec = t.codec == CodecId::kFp32 ? CodecId::kFp16 : CodecId::kFp32; });
  add([](EncodedTensor& t) { t.format_version = 0; });
  add([](EncodedTensor& t) { t.format_version += 1; });
  add([](EncodedTensor& t) { t.num_elements = uint64_t{1} << 40; });            // huge size
  add([](EncodedTensor& t) { t.num_elements -= 1; });
  add([](EncodedTensor& t) { t.shape = {3, 7}; });
  add([](EncodedTensor& t) { t.shape = {-1, -1000}; });
  if (!good.payload.empty()) {
    add([](EncodedTensor& t) { t.payload.pop_back(); });                          // truncated
    add([](EncodedTensor& t) { t.payload.resize(t.payload.size() / 2); });
    add([](EncodedTensor& t) { t.payload.clear(); });
  }
  if (!good.scales.empty()) {
    add([](EncodedTensor& t) { t.scales.pop_back(); });
    add([](EncodedTensor& t) { t.scales.push_back(1.0f); });
    add([](EncodedTensor& t) { t.scales[0] = std::nanf(""); });
    add([](EncodedTensor& t) { t.scales[0] = INFINITY; });
  } else {
    add([](EncodedTensor& t) { t.scales.push_back(1.0f); });
  }
  if (!good.params.empty()) {
    add([](EncodedTensor& t) { t.params.pop_back(); });
    add([](EncodedTensor& t) { t.params[0] += 1000003; });
  }
  for (size_t k = 0; k < bad.size(); ++k) {
    std::vector<float> out(n, 0.25f);
    EXPECT_THAT(fast_->DecodeAdd(bad[k], std::span<float>(out)),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << "malformed case " << k;
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], 0.25f) << "case " << k << " wrote out[" << i << "]";
  }
}

// Random corruption of payload bytes: any result is fine except a crash, a hang, or a
// modified output after an error. (The libFuzzer targets push this much further.)
TEST_P(ConformanceTest, CorruptedBytesNeverHalfApply) {
  const size_t n = 1000;
  EncodedTensor good = EncodeOk(*fast_, Gaussian(n, 14), 2);
  if (good.payload.empty()) GTEST_SKIP();
  std::mt19937 gen(77);
  for (int trial = 0; trial < 300; ++trial) {
    EncodedTensor t = good;
    int flips = 1 + trial % 4;
    for (int f = 0; f < flips; ++f) t.payload[gen() % t.payload.size()] ^= uint8_t(1u << (gen() % 8));
    if (trial % 3 == 0) t.payload.resize(gen() % (t.payload.size() + 1));
    std::vector<float> out(n, 0.25f);
    absl::Status s = fast_->DecodeAdd(t, std::span<float>(out));
    if (!s.ok()) {
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], 0.25f) << "trial " << trial;
    }
  }
}

TEST_P(ConformanceTest, EncodeRejectsMismatchedShape) {
  auto x = Gaussian(12, 1);
  EncodedTensor t;
  Rng rng(1);
  std::vector<int64_t> shape = {5, 2};
  EXPECT_THAT(fast_->Encode(x, shape, rng, &t), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<float> r(11, 0.0f);
  EXPECT_THAT(fast_->EncodeWithFeedback(x, std::span<float>(r), {}, rng, &t),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

INSTANTIATE_TEST_SUITE_P(AllCodecs, ConformanceTest, ::testing::ValuesIn(Specs()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name;
                           for (char c : info.param) name += std::isalnum(c) ? c : '_';
                           return name;
                         });

TEST(ConformanceRegistryTest, BuiltinsAreAllRegistered) {
  CodecRegistry registry;
  ASSERT_THAT(RegisterBuiltinCodecs(&registry), IsOk());
  EXPECT_THAT(registry.Names(), ::testing::ElementsAre("fp32", "fp16", "onebit", "threshold",
                                                       "qsgd", "terngrad"));
}

}  // namespace
}  // namespace qtrain::compression
