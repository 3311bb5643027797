#include "compression/onebit.h"

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
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace qtrain::compression {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

constexpr double kU = 0x1p-24;  // unit roundoff of float

std::unique_ptr<OneBitCodec> MakeCodec(uint32_t bucket, KernelPath path) {
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_ONEBIT);
  config.mutable_onebit()->set_bucket(bucket);
  auto codec = OneBitCodec::Create(config, CodecOptions{path});
  EXPECT_THAT(codec, IsOk());
  return codec.ok() ? std::move(codec).value() : nullptr;
}

std::vector<float> Gaussian(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// Gaussian values with exact zeros, negative zeros and all-positive stretches mixed in.
std::vector<float> MixedInput(size_t n, uint32_t seed) {
  std::vector<float> v = Gaussian(n, seed);
  std::mt19937 gen(seed + 1000);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t r = gen() % 16;
    if (r == 0) v[i] = 0.0f;
    if (r == 1) v[i] = -0.0f;
  }
  // An all-non-negative stretch, so some columns have an empty negative class.
  for (size_t i = n / 3; i < n / 3 + std::min<size_t>(n / 4, 600); ++i) v[i] = std::fabs(v[i]);
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

// ---- Exact payloads --------------------------------------------------------------------------

TEST(OneBitTest, HandComputedSingleBucket) {
  // Non-negative: 1, 3, 0, 5, 7, 8 -> mean 24 / 6 = 4. Negative: -2, -4, -6 -> mean -4.
  // Bits (LSB first): 1 0 1 0 1 1 0 1 | 1 -> bytes 0xB5, 0x01.
  const std::vector<float> input = {1, -2, 3, -4, 0, 5, -6, 7, 8};
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(0, path);
    Rng rng(1);
    EncodedTensor t;
    ASSERT_THAT(codec->Encode(input, {}, rng, &t), IsOk());
    EXPECT_EQ(t.codec, CodecId::kOneBit);
    EXPECT_EQ(t.format_version, 1u);
    EXPECT_EQ(t.num_elements, 9u);
    EXPECT_EQ(t.payload, (std::vector<uint8_t>{0xB5, 0x01}));
    EXPECT_EQ(t.scales, (std::vector<float>{-4.0f, 4.0f}));
    EXPECT_EQ(t.params, (std::vector<uint32_t>{9}));  // the 2048 bucket, clamped to the tensor
    EXPECT_EQ(Decode(*codec, t), (std::vector<float>{4, -4, 4, -4, 4, 4, -4, 4, 4}));
  }
}

TEST(OneBitTest, HandComputedBucketsCrossBytes) {
  // bucket=4 over 10 elements: columns [0,4), [4,8), [8,10).
  //   [2, -1, 4, -3]  -> neg mean -2, pos mean 3
  //   [-8, -4, -6, 0] -> neg mean -6, pos mean 0 (the zero)
  //   [5, 7]          -> neg mean 0 (empty class), pos mean 6
  // Bits: 1 0 1 0 | 0 0 0 1 | 1 1 -> byte0 = 0b10000101 = 0x85, byte1 = 0b11 = 0x03.
  const std::vector<float> input = {2, -1, 4, -3, -8, -4, -6, 0, 5, 7};
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(4, path);
    Rng rng(1);
    EncodedTensor t;
    ASSERT_THAT(codec->Encode(input, {}, rng, &t), IsOk());
    EXPECT_EQ(t.payload, (std::vector<uint8_t>{0x85, 0x03}));
    EXPECT_EQ(t.scales, (std::vector<float>{-2, 3, -6, 0, 0, 6}));
    EXPECT_EQ(t.params, (std::vector<uint32_t>{4}));
    EXPECT_EQ(Decode(*codec, t), (std::vector<float>{3, -2, 3, -2, -6, -6, -6, 0, 6, 6}));
  }
}

TEST(OneBitTest, ColumnLengthRule) {
  auto codec = MakeCodec(0, KernelPath::kReference);
  using Shape = std::vector<int64_t>;
  EXPECT_EQ(codec->ColumnLength(Shape{}), 2048u);
  EXPECT_EQ(codec->ColumnLength(Shape{5000}), 2048u);
  EXPECT_EQ(codec->ColumnLength(Shape{4, 255}), 2048u);  // columns too short
  EXPECT_EQ(codec->ColumnLength(Shape{4, 256}), 256u);
  EXPECT_EQ(codec->ColumnLength(Shape{16, 3, 3, 3}), 2048u);  // 27 < 256
  EXPECT_EQ(codec->ColumnLength(Shape{64, 64, 3, 3}), 576u);  // [out, in, kh, kw]
  EXPECT_EQ(codec->ColumnLength(Shape{0, 300}), 300u);
  EXPECT_EQ(MakeCodec(100, KernelPath::kReference)->ColumnLength(Shape{64, 64, 3, 3}), 100u);

  // The encoder uses it: 3 columns of 300 give 6 scales.
  const std::vector<float> input = Gaussian(900, 5);
  Rng rng(1);
  EncodedTensor t;
  const Shape shape = {3, 300};
  ASSERT_THAT(codec->Encode(input, shape, rng, &t), IsOk());
  EXPECT_EQ(t.params, (std::vector<uint32_t>{300}));
  EXPECT_EQ(t.scales.size(), 6u);
  EXPECT_EQ(t.shape, shape);
}

// Bound on |mean_computed - mean_exact| for one class of one column of `len` elements.
// Each of the 8 accumulators adds at most ceil(len/8) terms in sequence and the combination adds
// 3 levels, so any term passes through k = ceil(len/8) - 1 + 3 float additions:
// |S~ - S| <= gamma_k * sum|x| with gamma_k = k u / (1 - k u) (Higham, Thm 4.4). Within a class
// all terms have one sign, so sum|x| = |S|. The mean is float(double(S~) / count), one more
// rounding of relative size u. Total: |mean~ - mean| <= (gamma_k + u (1 + gamma_k)) |mean|,
// which (k + 2) u |mean| covers for k u << 1.
double MeanTolerance(size_t len, double exact_mean) {
  const double k = static_cast<double>((len + 7) / 8 - 1 + 3);
  return (k + 2) * kU * std::fabs(exact_mean);
}

TEST(OneBitTest, PerColumnMeansMatchExactMeans) {
  const std::vector<int64_t> shape = {5, 300};
  const std::vector<float> input = MixedInput(1500, 11);
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(0, path);
    Rng rng(1);
    EncodedTensor t;
    ASSERT_THAT(codec->Encode(input, shape, rng, &t), IsOk());
    ASSERT_EQ(t.scales.size(), 10u);
    for (int c = 0; c < 5; ++c) {
      double pos = 0, neg = 0;
      int count_pos = 0, count_neg = 0;
      for (int j = 0; j < 300; ++j) {
        const float v = input[c * 300 + j];
        if (v >= 0.0f) {
          pos += v;
          ++count_pos;
        } else {
          neg += v;
          ++count_neg;
        }
      }
      const double mean_pos = count_pos ? pos / count_pos : 0.0;
      const double mean_neg = count_neg ? neg / count_neg : 0.0;
      EXPECT_NEAR(t.scales[2 * c], mean_neg, MeanTolerance(300, mean_neg)) << "column " << c;
      EXPECT_NEAR(t.scales[2 * c + 1], mean_pos, MeanTolerance(300, mean_pos)) << "column " << c;
    }
  }
}

TEST(OneBitTest, DecodedSumEqualsColumnSum) {
  // Each class decodes to count * mean~, and |count * mean~ - S| <= count * MeanTolerance =
  // (k + 2) u |S| (see MeanTolerance), so per column
  //   |sum(decoded) - sum(input)| <= (k + 2) u (|S_pos| + |S_neg|) = (k + 2) u sum|v|.
  // Sums here are in double: count * mean (< 2^35) is exact and the input sum errs by ~1e-16.
  const std::vector<int64_t> shape = {4, 1000};
  const std::vector<float> input = MixedInput(4000, 12);
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(0, path);
    Rng rng(1);
    EncodedTensor t;
    ASSERT_THAT(codec->Encode(input, shape, rng, &t), IsOk());
    const std::vector<float> decoded = Decode(*codec, t);
    for (int c = 0; c < 4; ++c) {
      double in_sum = 0, in_abs = 0, out_sum = 0;
      for (int j = 0; j < 1000; ++j) {
        in_sum += input[c * 1000 + j];
        in_abs += std::fabs(input[c * 1000 + j]);
        out_sum += decoded[c * 1000 + j];
      }
      const double k = (1000 + 7) / 8 - 1 + 3;
      EXPECT_NEAR(out_sum, in_sum, (k + 2) * kU * in_abs) << "column " << c;
    }
  }
}

// ---- Reference == fast -----------------------------------------------------------------------

struct Case {
  std::vector<int64_t> shape;  // empty: 1-D
  size_t n;
};

std::vector<Case> Cases() {
  // 1-D sizes around every vector width and bucket boundary, including 0.
  const std::vector<size_t> sizes = {0,   1,   7,    8,    9,    15,   16,   17,   31,
                                     32,  33,  39,   40,   63,   64,   65,   100,  255,
                                     256, 257, 1000, 2047, 2048, 2049, 2056, 5000, 6149};
  // Columns of 256, 300, 257 (not byte aligned) and 1000; short columns (2048 buckets); n = 0.
  const std::vector<std::vector<int64_t>> shapes = {
      {4, 256}, {3, 300}, {5, 257}, {2, 1000}, {7, 33}, {16, 3, 3, 3}, {8, 8, 3, 3}, {0, 300}};
  std::vector<Case> cases;
  for (size_t n : sizes) cases.push_back({{}, n});
  for (const std::vector<int64_t>& shape : shapes) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    cases.push_back({shape, n});
  }
  return cases;
}

TEST(OneBitTest, FastPathMatchesReferenceBitForBit) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2: both paths are the reference";
  for (uint32_t bucket : {0u, 1u, 3u, 8u, 13u, 100u, 2048u}) {
    auto ref = MakeCodec(bucket, KernelPath::kReference);
    auto fast = MakeCodec(bucket, KernelPath::kAuto);
    for (const Case& c : Cases()) {
      for (uint32_t seed : {1u, 2u}) {
        SCOPED_TRACE(::testing::Message() << "bucket " << bucket << " n " << c.n << " rank "
                                          << c.shape.size() << " seed " << seed);
        const std::vector<float> input = MixedInput(c.n, seed);
        Rng rng_a(seed), rng_b(seed);
        EncodedTensor a, b;
        ASSERT_THAT(ref->Encode(input, c.shape, rng_a, &a), IsOk());
        ASSERT_THAT(fast->Encode(input, c.shape, rng_b, &b), IsOk());
        EXPECT_EQ(a.payload, b.payload);
        EXPECT_TRUE(SameBits(a.scales, b.scales));
        EXPECT_EQ(a.params, b.params);

        // Error feedback, twice, from the same non-zero residual.
        std::vector<float> res_a = Gaussian(c.n, seed + 50, 0.5f);
        std::vector<float> res_b = res_a;
        for (int step = 0; step < 2; ++step) {
          ASSERT_THAT(ref->EncodeWithFeedback(input, std::span<float>(res_a), c.shape, rng_a, &a),
                      IsOk());
          ASSERT_THAT(fast->EncodeWithFeedback(input, std::span<float>(res_b), c.shape, rng_b, &b),
                      IsOk());
          EXPECT_EQ(a.payload, b.payload);
          EXPECT_TRUE(SameBits(a.scales, b.scales));
          EXPECT_TRUE(SameBits(res_a, res_b));
        }

        // DecodeAdd into the same non-zero output, each codec decoding the other's payload too.
        std::vector<float> out_a = Gaussian(c.n, seed + 99);
        std::vector<float> out_b = out_a;
        ASSERT_THAT(ref->DecodeAdd(a, std::span<float>(out_a)), IsOk());
        ASSERT_THAT(fast->DecodeAdd(a, std::span<float>(out_b)), IsOk());
        EXPECT_TRUE(SameBits(out_a, out_b));
      }
    }
  }
}

// ---- Error feedback --------------------------------------------------------------------------

TEST(OneBitTest, FeedbackKeepsWhatWasNotSent) {
  // v = fl(g + r_old) and r_new = fl(v - d), so
  //   |(g + r_old) - (d + r_new)| <= |fl(g + r_old) - (g + r_old)| + |fl(v - d) - (v - d)|
  //                               <= u |v| + u |r_new| (1 + u), bounded by 1.001 u (|v| + |r_new|).
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(0, path);
    const std::vector<int64_t> shape = {6, 500};
    std::vector<float> residual(3000, 0.0f);
    Rng rng(3);
    for (int step = 0; step < 4; ++step) {
      const std::vector<float> grad = MixedInput(3000, 40 + step);
      const std::vector<float> old_residual = residual;
      std::vector<float> v(3000);
      for (size_t i = 0; i < v.size(); ++i) v[i] = grad[i] + old_residual[i];

      EncodedTensor fused, plain;
      ASSERT_THAT(codec->EncodeWithFeedback(grad, std::span<float>(residual), shape, rng, &fused),
                  IsOk());
      ASSERT_THAT(codec->Encode(v, shape, rng, &plain), IsOk());
      EXPECT_EQ(fused.payload, plain.payload);
      EXPECT_TRUE(SameBits(fused.scales, plain.scales));
      EXPECT_EQ(fused.params, plain.params);

      const std::vector<float> decoded = Decode(*codec, fused);
      for (size_t i = 0; i < v.size(); ++i) {
        const double lhs = static_cast<double>(grad[i]) + old_residual[i];
        const double rhs = static_cast<double>(decoded[i]) + residual[i];
        ASSERT_NEAR(lhs, rhs, 1.001 * kU * (std::fabs(v[i]) + std::fabs(residual[i])))
            << "step " << step << " element " << i;
      }
    }
  }
}

TEST(OneBitTest, ConstantGradientMeanConverges) {
  // Per column of d elements the reconstruction is the orthogonal projection of v onto
  // span{1_pos, 1_neg}, so |v - Q(v)|^2 = |v|^2 - |Q(v)|^2, and
  // |Q(v)|^2 = S_pos^2 / n_pos + S_neg^2 / n_neg >= (|S_pos| + |S_neg|)^2 / d = |v|_1^2 / d
  // >= |v|^2 / d (Cauchy-Schwarz twice). Hence |r_{t+1}| <= rho |g + r_t| <= rho (|g| + |r_t|)
  // with rho = sqrt(1 - 1/d); allowing a relative rounding slack eta = 1e-4 (the float errors
  // are ~(d/8 + 5) u ~ 1e-6 relative), rho' = rho (1 + eta), and from r_0 = 0 by induction
  //   |r_t| <= B = rho' |g| / (1 - rho')   (per column).
  // Summing the identity g + r_t = d_t + r_{t+1} over T steps: mean(d) - g = -r_T / T (plus
  // rounding of at most 2 u (|v_t| + |r_{t+1}|) per step and element, see the test above), so
  //   |mean(d) - g| <= (B + T * 2u * (|g| + 2B) * sqrt(d)) / T   per column (norms over d).
  constexpr int kBucket = 64;
  constexpr int kColumns = 4;
  constexpr int kSteps = 2000;
  const double rho = std::sqrt(1.0 - 1.0 / kBucket) * (1.0 + 1e-4);
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(kBucket, path);
    const std::vector<float> g = Gaussian(kBucket * kColumns, 77);
    std::vector<float> residual(g.size(), 0.0f);
    std::vector<double> sum(g.size(), 0.0);
    std::vector<float> decoded(g.size());
    Rng rng(1);
    EncodedTensor t;
    std::vector<double> bound(kColumns);
    std::vector<double> g_norm(kColumns);
    for (int c = 0; c < kColumns; ++c) {
      double sq = 0;
      for (int j = 0; j < kBucket; ++j) sq += double{g[c * kBucket + j]} * g[c * kBucket + j];
      g_norm[c] = std::sqrt(sq);
      bound[c] = rho * g_norm[c] / (1.0 - rho);
    }
    for (int step = 0; step < kSteps; ++step) {
      ASSERT_THAT(codec->EncodeWithFeedback(g, std::span<float>(residual), {}, rng, &t), IsOk());
      std::fill(decoded.begin(), decoded.end(), 0.0f);
      ASSERT_THAT(codec->DecodeAdd(t, std::span<float>(decoded)), IsOk());
      for (size_t i = 0; i < g.size(); ++i) sum[i] += decoded[i];
      for (int c = 0; c < kColumns; ++c) {
        double sq = 0;
        for (int j = 0; j < kBucket; ++j) {
          sq += double{residual[c * kBucket + j]} * residual[c * kBucket + j];
        }
        ASSERT_LE(std::sqrt(sq), bound[c]) << "step " << step << " column " << c;
      }
    }
    for (int c = 0; c < kColumns; ++c) {
      double sq = 0;
      for (int j = 0; j < kBucket; ++j) {
        const double e = sum[c * kBucket + j] / kSteps - g[c * kBucket + j];
        sq += e * e;
      }
      const double slack = kSteps * 2 * kU * (g_norm[c] + 2 * bound[c]) * std::sqrt(kBucket);
      EXPECT_LE(std::sqrt(sq), (bound[c] + slack) / kSteps) << "column " << c;
    }
  }
}

// ---- Sizes and buffers -----------------------------------------------------------------------

TEST(OneBitTest, PayloadSizeFormula) {
  auto codec = MakeCodec(0, KernelPath::kAuto);
  for (const Case& c : Cases()) {
    const std::vector<float> input = MixedInput(c.n, 3);
    Rng rng(1);
    EncodedTensor t;
    ASSERT_THAT(codec->Encode(input, c.shape, rng, &t), IsOk());
    EXPECT_EQ(static_cast<int64_t>(t.payload.size()), codec->PayloadBytes(c.shape, c.n));
    EXPECT_EQ(t.payload.size(), (c.n + 7) / 8);
    const uint64_t len = codec->ColumnLength(c.shape);
    EXPECT_EQ(t.scales.size(), 2 * ((c.n + len - 1) / len));
    EXPECT_EQ(t.params[0], std::min<uint64_t>(len, std::max<size_t>(c.n, 1)));
  }
  // Bits per element of a 1-D tensor of 25.6M elements: 1 + 64 / 2048 (payload bits plus two
  // float scales per 2048-element bucket), from the same formulas.
  const uint64_t n = 25'600'000;
  const double bits = 8.0 * (codec->PayloadBytes({}, n) + 4 * 2 * ((n + 2047) / 2048)) / n;
  EXPECT_LE(bits, 1.1);
  EXPECT_NEAR(bits, 1.0 + 64.0 / 2048, 1e-3);
}

TEST(OneBitTest, EncodeReusesBuffers) {
  auto codec = MakeCodec(0, KernelPath::kAuto);
  const std::vector<float> input = Gaussian(10000, 4);
  std::vector<float> residual(10000, 0.0f);
  Rng rng(1);
  EncodedTensor t;
  ASSERT_THAT(codec->Encode(input, {}, rng, &t), IsOk());
  const uint8_t* payload = t.payload.data();
  const float* scales = t.scales.data();
  ASSERT_THAT(codec->EncodeWithFeedback(input, std::span<float>(residual), {}, rng, &t), IsOk());
  EXPECT_EQ(t.payload.data(), payload);
  EXPECT_EQ(t.scales.data(), scales);
}

// ---- Non-finite input ------------------------------------------------------------------------

TEST(OneBitTest, NonFiniteInputIsRejected) {
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(0, path);
    for (float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
          -std::numeric_limits<float>::infinity()}) {
      std::vector<float> input = Gaussian(5000, 9);
      input[2100] = bad;
      Rng rng(1);
      EncodedTensor t;
      EXPECT_THAT(codec->Encode(input, {}, rng, &t),
                  StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("column 1")));
      std::vector<float> residual(5000, 0.0f);
      EXPECT_THAT(codec->EncodeWithFeedback(input, std::span<float>(residual), {}, rng, &t),
                  StatusIs(absl::StatusCode::kInvalidArgument));
    }
    // Finite values whose class sum overflows float.
    std::vector<float> big(100, 3e38f);
    Rng rng(1);
    EncodedTensor t;
    EXPECT_THAT(codec->Encode(big, {}, rng, &t), StatusIs(absl::StatusCode::kInvalidArgument));
  }
}

// ---- Malformed payloads ----------------------------------------------------------------------

// A valid 100-element tensor in buckets of 16 (7 columns).
EncodedTensor ValidTensor() {
  auto codec = MakeCodec(16, KernelPath::kReference);
  Rng rng(1);
  EncodedTensor t;
  EXPECT_THAT(codec->Encode(Gaussian(100, 21), {}, rng, &t), IsOk());
  return t;
}

void ExpectRejected(const EncodedTensor& bad, const std::string& message_part) {
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(0, path);
    std::vector<float> out = Gaussian(100, 5);
    const std::vector<float> before = out;
    EXPECT_THAT(codec->DecodeAdd(bad, std::span<float>(out)),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(message_part)));
    EXPECT_TRUE(SameBits(out, before)) << "out modified on error";
  }
}

TEST(OneBitMalformedTest, ValidTensorDecodes) {
  auto codec = MakeCodec(0, KernelPath::kAuto);
  std::vector<float> out(100, 0.0f);
  EXPECT_THAT(codec->DecodeAdd(ValidTensor(), std::span<float>(out)), IsOk());
}

TEST(OneBitMalformedTest, TruncatedPayload) {
  EncodedTensor t = ValidTensor();
  t.payload.pop_back();
  ExpectRejected(t, "payload is 12 bytes, expected 13");
}

TEST(OneBitMalformedTest, PayloadTooLong) {
  EncodedTensor t = ValidTensor();
  t.payload.push_back(0);
  ExpectRejected(t, "payload is 14 bytes, expected 13");
}

TEST(OneBitMalformedTest, WrongScaleCount) {
  EncodedTensor t = ValidTensor();
  t.scales.pop_back();
  ExpectRejected(t, "13 scales, expected 14");
  t.scales.push_back(1.0f);
  t.scales.push_back(1.0f);
  ExpectRejected(t, "15 scales, expected 14");
}

TEST(OneBitMalformedTest, ColumnLengthZero) {
  EncodedTensor t = ValidTensor();
  t.params[0] = 0;
  ExpectRejected(t, "column length 0");
}

TEST(OneBitMalformedTest, ColumnLengthInconsistentWithScales) {
  EncodedTensor t = ValidTensor();
  t.params[0] = 32;  // 4 columns: 8 scales, but the tensor carries 14
  ExpectRejected(t, "expected 8");
  t.params[0] = 100;  // 1 column
  ExpectRejected(t, "expected 2");
}

TEST(OneBitMalformedTest, ColumnLengthLongerThanTensor) {
  // Any length >= n would describe the same single column; only L = n is canonical.
  EncodedTensor t = ValidTensor();
  t.params[0] = 101;
  t.scales.resize(2);
  ExpectRejected(t, "column length 101 for 100 elements");
  t.params[0] = 0xffffffffu;
  ExpectRejected(t, "column length 4294967295");
}

TEST(OneBitMalformedTest, MissingOrExtraParams) {
  EncodedTensor t = ValidTensor();
  t.params.clear();
  ExpectRejected(t, "0 params");
  t.params = {16, 16};
  ExpectRejected(t, "2 params");
}

TEST(OneBitMalformedTest, NonFiniteScales) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    EncodedTensor t = ValidTensor();
    t.scales[5] = bad;
    ExpectRejected(t, "scale 5");
  }
}

TEST(OneBitMalformedTest, PaddingBitsSet) {
  EncodedTensor t = ValidTensor();  // 100 elements: the last byte uses 4 bits
  t.payload.back() |= 0x10;
  ExpectRejected(t, "padding bits");
}

TEST(OneBitMalformedTest, WrongCodecId) {
  EncodedTensor t = ValidTensor();
  t.codec = CodecId::kThreshold;
  ExpectRejected(t, "codec id");
}

TEST(OneBitMalformedTest, WrongVersion) {
  EncodedTensor t = ValidTensor();
  t.format_version = 2;
  ExpectRejected(t, "version");
  t.format_version = 0;
  ExpectRejected(t, "version");
}

TEST(OneBitMalformedTest, ElementCountMismatch) {
  EncodedTensor t = ValidTensor();
  t.num_elements = 99;
  ExpectRejected(t, "99 elements");
  t = ValidTensor();
  t.shape = {3, 33};  // 99 != 100
  ExpectRejected(t, "shape");
}

// ---- Spec and config -------------------------------------------------------------------------

CodecRegistry Registry() {
  CodecRegistry registry;
  EXPECT_THAT(registry.Register(OneBitRegistration()), IsOk());
  return registry;
}

TEST(OneBitConfigTest, SpecRoundTrips) {
  CodecRegistry registry = Registry();
  for (const char* spec : {"onebit", "onebit:bucket=512", "onebit:bucket=1,ef=0", "onebit:ef=1",
                           "onebit:bucket=16777216"}) {
    SCOPED_TRACE(spec);
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Codec> codec, registry.CreateFromSpec(spec));
    EXPECT_TRUE(codec->DefaultErrorFeedback());
    ASSERT_OK_AND_ASSIGN(pb::CodecConfig reparsed, registry.ParseSpec(codec->Spec()));
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(reparsed, codec->Config()))
        << codec->Spec();
    ASSERT_OK_AND_ASSIGN(pb::CodecConfig parsed, registry.ParseSpec(spec));
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(parsed, codec->Config()));
  }
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Codec> codec, registry.CreateFromSpec("onebit:bucket=512"));
  EXPECT_EQ(codec->Spec(), "onebit:bucket=512");
}

TEST(OneBitConfigTest, BadSettingsAreRejected) {
  CodecRegistry registry = Registry();
  EXPECT_THAT(registry.ParseSpec("onebit:bucket=0"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bucket")));
  EXPECT_THAT(registry.ParseSpec("onebit:bucket=16777217"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bucket")));
  EXPECT_THAT(registry.ParseSpec("onebit:levels=3"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bucket")));

  pb::CodecConfig config;
  config.set_codec(pb::CODEC_ONEBIT);
  config.mutable_onebit()->set_bucket(OneBitCodec::kMaxBucket + 1);
  EXPECT_THAT(registry.Create(config),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bucket=16777217")));
  config.mutable_threshold()->set_tau(1.0f);  // settings of another codec
  EXPECT_THAT(OneBitCodec::Create(config, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("another codec")));
  config.set_codec(pb::CODEC_QSGD);
  EXPECT_THAT(OneBitCodec::Create(config, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("codec id")));
  // Unset settings mean the defaults.
  pb::CodecConfig bare;
  bare.set_codec(pb::CODEC_ONEBIT);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Codec> codec, registry.Create(bare));
  EXPECT_EQ(codec->Spec(), "onebit");
}

}  // namespace
}  // namespace qtrain::compression
