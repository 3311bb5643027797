// GPU tests of compression/cuda/cuda_codec.h against the CPU codecs (every case starts with
// QTRAIN_REQUIRE_GPU() and is skipped without a device).
//
//   GpuEncodeMatchesCpu      GPU encode -> CPU decode equals GPU decode-add (bit for bit); the
//                            GPU payload, scales and residual equal the CPU codec's, exactly for
//                            fp16 and threshold and onebit's bits; where a GPU reduction
//                            (mean, norm, sigma) rounds differently, the scale is within the
//                            bound of its summation error, the payload and residual are exactly
//                            what the codec math gives for the GPU's own scale (so only the
//                            reduction differs), and the elements that differ from the CPU payload
//                            are within a bound derived from the scale difference.
//   CpuEncodeGpuDecode       PackBlob of a CPU encoding decodes on the GPU to the CPU's bits.
//   ErrorFeedbackOverSteps   v = grad + old residual == decode(blob) + new residual, 5 steps.
//   Unbiased / Variance      qsgd and terngrad: the mean of many decodes converges to the input
//                            (CLT bound), and the error variance is within the codec's bound.
//   Malformed blobs          every field corrupted: INVALID_ARGUMENT naming it, out unchanged.
//   RandomCorruption         GPU verdict == CPU verdict (UnpackBlob + DecodeAdd), out unchanged
//                            on error and equal to the CPU's on success.
//   SharedErrorWord, NonFinite, Determinism, TernGrad shared scale.
#include "compression/cuda/cuda_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/cuda_testing.h"
#include "common/testing/status_matchers.h"
#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/cuda/codec_math.h"
#include "compression/packed_blob.h"
#include "compression/qsgd.h"
#include "compression/terngrad.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/compression/cuda/gpu_codec_harness.h"

namespace qtrain::compression::cuda {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

constexpr float kU = 0x1p-24f;  // unit roundoff of float

std::vector<float> Gaussian(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

uint64_t Elements(const std::vector<int64_t>& shape, uint64_t n_1d) {
  if (shape.empty()) return n_1d;
  uint64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

uint32_t BitsAt(const std::vector<uint8_t>& payload, uint64_t first_bit, uint32_t count) {
  uint32_t v = 0;
  for (uint32_t k = 0; k < count; ++k) {
    const uint64_t bit = first_bit + k;
    v |= uint32_t{(payload[bit / 8] >> (bit % 8)) & 1u} << k;
  }
  return v;
}

struct Fixture {
  std::unique_ptr<CudaCodec> gpu;
  std::unique_ptr<Codec> cpu;
};

Fixture Make(const std::string& spec) {
  Fixture f;
  auto gpu = CudaCodec::CreateFromSpec(spec);
  EXPECT_THAT(gpu, IsOk());
  f.gpu = std::move(*gpu);
  CodecRegistry registry;
  EXPECT_THAT(RegisterBuiltinCodecs(&registry), IsOk());
  auto cpu = registry.CreateFromSpec(spec);
  EXPECT_THAT(cpu, IsOk());
  f.cpu = std::move(*cpu);
  return f;
}

// ---- GPU encode against the CPU encode --------------------------------------------------------

struct Case {
  std::string spec;
  std::vector<int64_t> shape;  // empty: 1-D of n elements
  uint64_t n;
  float stddev;  // of the gradient (threshold's tau is chosen against it)
};

std::vector<Case> EncodeCases() {
  std::vector<Case> cases;
  const std::vector<std::string> specs = {"onebit",
                                          "onebit:bucket=100",
                                          "threshold:tau=1",
                                          "threshold:tau=2.5",
                                          "qsgd",
                                          "qsgd:levels=4,bucket=128",
                                          "qsgd:levels=1,bucket=7",
                                          "qsgd:levels=16,bucket=2000",
                                          "qsgd:levels=16,bucket=10000",
                                          "terngrad",
                                          "terngrad:clip=0",
                                          "fp16"};
  for (const auto& spec : specs) {
    for (uint64_t n : {uint64_t{1}, uint64_t{7}, uint64_t{2047}, uint64_t{2048}, uint64_t{2049},
                       (uint64_t{1} << 20) + 3}) {
      cases.push_back({spec, {}, n, 1.0f});
    }
    for (const std::vector<int64_t>& shape :
         {std::vector<int64_t>{8, 300}, std::vector<int64_t>{64, 1024},
          std::vector<int64_t>{3, 9000}, std::vector<int64_t>{4, 2049}}) {
      cases.push_back({spec, shape, 0, 1.0f});
    }
  }
  return cases;
}

class GpuEncodeTest : public ::testing::TestWithParam<Case> {};

TEST_P(GpuEncodeTest, GpuEncodeMatchesCpu) {
  QTRAIN_REQUIRE_GPU();
  const Case& c = GetParam();
  Fixture f = Make(c.spec);
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
  const uint64_t n = Elements(c.shape, c.n);
  const auto x = Gaussian(n, 100 + n, c.stddev);
  const auto r0 = Gaussian(n, 200 + n, 0.3f * c.stddev);
  const uint64_t seed = 17;
  // CPU.
  std::vector<float> r_cpu = r0;
  EncodedTensor cpu;
  Rng rng(seed);
  ASSERT_THAT(f.cpu->EncodeWithFeedback(x, std::span<float>(r_cpu), c.shape, rng, &cpu), IsOk());
  // GPU, with the stream key the CPU encoder took.
  const uint32_t key = Rng(seed).NextStream();
  std::vector<float> r_gpu = r0;
  ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> blob, h.Encode(x, &r_gpu, c.shape, key));
  ASSERT_OK_AND_ASSIGN(EncodedTensor gpu, UnpackBlob(blob, n, c.shape));
  EXPECT_EQ(blob.size(), f.gpu->fixed_size() ? f.gpu->MaxBlobBytes(c.shape, n) : blob.size());
  EXPECT_EQ(gpu.codec, cpu.codec);
  EXPECT_EQ(gpu.format_version, cpu.format_version);
  EXPECT_EQ(gpu.params, cpu.params);
  ASSERT_EQ(gpu.scales.size(), cpu.scales.size());
  ASSERT_EQ(gpu.payload.size(), cpu.payload.size());

  std::vector<float> v(n);
  for (uint64_t i = 0; i < n; ++i) v[i] = AddRn(x[i], r0[i]);
  switch (f.gpu->id()) {
    case CodecId::kFp16:
    case CodecId::kThreshold:
      // No reduction: identical.
      EXPECT_EQ(gpu.payload, cpu.payload);
      EXPECT_TRUE(SameBits(gpu.scales, cpu.scales));
      EXPECT_TRUE(SameBits(r_gpu, r_cpu));
      break;
    case CodecId::kOneBit: {
      EXPECT_EQ(gpu.payload, cpu.payload);  // the signs of v
      const uint64_t column = gpu.params[0];
      for (uint64_t k = 0; k < gpu.scales.size(); ++k) {
        const uint64_t len = std::min(column, n - (k / 2) * column);
        // Sums of same-sign values: any order errs by at most (len - 1) u relative.
        const float tol = (2.0f * len + 4.0f) * kU * std::fabs(cpu.scales[k]);
        EXPECT_NEAR(gpu.scales[k], cpu.scales[k], tol) << "scale " << k;
      }
      for (uint64_t i = 0; i < n; ++i) {  // the residual is v minus the GPU's own mean
        const uint64_t col = i / column;
        const float mean = v[i] >= 0.0f ? gpu.scales[2 * col + 1] : gpu.scales[2 * col];
        ASSERT_EQ(FloatBits(r_gpu[i]), FloatBits(SubRn(v[i], mean))) << i;
      }
      break;
    }
    case CodecId::kQsgd: {
      const auto& q = static_cast<const QsgdCodec&>(*f.cpu);
      const uint32_t b = q.code_bits(), d = q.bucket(), levels = q.levels();
      uint64_t mismatches = 0;
      double allowed = 10;
      for (uint64_t k = 0; k < gpu.scales.size(); ++k) {
        const uint64_t lo = k * d, len = std::min<uint64_t>(d, n - lo);
        const float tol = (len + 2.0f) * kU * cpu.scales[k];
        EXPECT_NEAR(gpu.scales[k], cpu.scales[k], tol) << "norm of bucket " << k;
        const double delta = cpu.scales[k] > 0
                                 ? std::fabs(double(gpu.scales[k]) - cpu.scales[k]) / cpu.scales[k]
                                 : 0.0;
        const QsgdBucketParams p = QsgdParamsFor(gpu.scales[k], levels);
        uint64_t bucket_mismatches = 0;
        for (uint64_t j = 0; j < len; ++j) {
          const uint64_t i = lo + j;
          // Exactly the codec math on the GPU's norm.
          const uint32_t level =
              QsgdLevel(v[i], static_cast<uint32_t>(i), key, p.scale, static_cast<float>(levels));
          const bool negative = level != 0 && std::signbit(v[i]);
          const uint32_t code = level | (uint32_t{negative} << (b - 1));
          ASSERT_EQ(BitsAt(gpu.payload, i * b, b), code) << "element " << i;
          ASSERT_EQ(FloatBits(r_gpu[i]),
                    FloatBits(SubRn(v[i], QsgdDecodedValue(level, negative, p.unit))))
              << i;
          bucket_mismatches += BitsAt(cpu.payload, i * b, b) != code;
        }
        if (gpu.scales[k] == cpu.scales[k]) {
          EXPECT_EQ(bucket_mismatches, 0u) << "bucket " << k << " has the CPU's norm";
        }
        mismatches += bucket_mismatches;
        // A level moves only if r + U crosses an integer: probability <= |delta r| + 2^-24.
        allowed += 6.0 * len * (levels * (delta + 3.0 * kU) + kU);
      }
      EXPECT_LE(mismatches, allowed) << "elements whose code differs from the CPU payload";
      break;
    }
    case CodecId::kTernGrad: {
      const float clip = static_cast<const TernGradCodec&>(*f.cpu).clip_sigma();
      const float s_gpu = gpu.scales[0], s_cpu = cpu.scales[0];
      if (clip == 0.0f) {
        EXPECT_EQ(FloatBits(s_gpu), FloatBits(s_cpu));  // max |v|: exact
      } else {
        EXPECT_NEAR(s_gpu, s_cpu, 2.5e-7f * s_cpu);  // double sums: at most an ulp of float
      }
      const float inv = TernInverse(s_gpu);
      uint64_t mismatches = 0;
      for (uint64_t i = 0; i < n; ++i) {
        const uint32_t code = TernCode(v[i], static_cast<uint32_t>(i), key, s_gpu, inv);
        ASSERT_EQ(BitsAt(gpu.payload, 2 * i, 2), code) << "element " << i;
        ASSERT_EQ(FloatBits(r_gpu[i]), FloatBits(SubRn(v[i], TernValue(code, s_gpu)))) << i;
        mismatches += BitsAt(cpu.payload, 2 * i, 2) != code;
      }
      const double delta = s_cpu > 0 ? std::fabs(double(s_gpu) - s_cpu) / s_cpu : 0.0;
      if (s_gpu == s_cpu) {
        EXPECT_EQ(mismatches, 0u);
      } else {
        EXPECT_LE(mismatches, 10 + 6.0 * n * (delta + 4.0 * kU));
      }
      break;
    }
    case CodecId::kFp32:
      FAIL();
  }

  // The GPU blob decodes on the CPU to the GPU decode's bits.
  const auto init = Gaussian(n, 300 + n);
  std::vector<float> on_cpu = init, on_gpu = init;
  ASSERT_THAT(f.cpu->DecodeAdd(gpu, std::span<float>(on_cpu)), IsOk());
  ASSERT_THAT(h.Decode(blob, n, c.shape, &on_gpu), IsOk());
  EXPECT_TRUE(SameBits(on_cpu, on_gpu));
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  std::string name;
  for (char ch : info.param.spec) name += std::isalnum(ch) ? ch : '_';
  if (info.param.shape.empty()) {
    absl::StrAppend(&name, "_n", info.param.n);
  } else {
    for (int64_t d : info.param.shape) absl::StrAppend(&name, "_", d);
  }
  return name;
}

INSTANTIATE_TEST_SUITE_P(Codecs, GpuEncodeTest, ::testing::ValuesIn(EncodeCases()), CaseName);

// ---- CPU encode -> GPU decode -------------------------------------------------------------------

class CodecSpecTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CodecSpecTest, CpuEncodeGpuDecode) {
  QTRAIN_REQUIRE_GPU();
  Fixture f = Make(GetParam());
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
  for (uint64_t n : {uint64_t{0}, uint64_t{1}, uint64_t{7}, uint64_t{2049}, uint64_t{100003}}) {
    const auto x = Gaussian(n, 400 + n);
    EncodedTensor t;
    Rng rng(5);
    ASSERT_THAT(f.cpu->Encode(x, {}, rng, &t), IsOk());
    std::vector<uint8_t> blob;
    ASSERT_THAT(PackBlob(t, &blob), IsOk());
    const auto init = Gaussian(n, 500 + n);
    std::vector<float> on_cpu = init, on_gpu = init;
    ASSERT_THAT(f.cpu->DecodeAdd(t, std::span<float>(on_cpu)), IsOk());
    ASSERT_THAT(h.Decode(blob, n, {}, &on_gpu), IsOk()) << "n=" << n;
    EXPECT_TRUE(SameBits(on_cpu, on_gpu)) << "n=" << n;
  }
}

// The threshold decode adds a dense tile (entries spanning at most 16384 elements) by sweeping
// its span in 16-byte groups, and a sparse one entry by entry. Blocks of 65536 elements alternate
// between ~30% sent (one-byte varints, dense tiles) and ~0.4% sent (two-byte varints, sparse
// tiles), so one blob holds both kinds and tiles that straddle the change; decoded into outputs
// at every alignment (a bucket inside a flat buffer), bit-identical to the CPU decode.
TEST(CudaThresholdDecodeTest, MixedDensityMatchesCpu) {
  QTRAIN_REQUIRE_GPU();
  Fixture f = Make("threshold:tau=1");
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
  const uint64_t n = 1000003;
  const auto dense = Gaussian(n, 801, 1.0f);
  const auto sparse = Gaussian(n, 802, 0.37f);
  std::vector<float> x(n);
  for (uint64_t i = 0; i < n; ++i) x[i] = (i >> 16) % 2 == 0 ? dense[i] : sparse[i];
  EncodedTensor t;
  Rng rng(5);
  ASSERT_THAT(f.cpu->Encode(x, {}, rng, &t), IsOk());
  ASSERT_GT(t.payload.size(), 8 * 4096u);  // several 4096-byte decode tiles
  std::vector<uint8_t> blob;
  ASSERT_THAT(PackBlob(t, &blob), IsOk());
  const auto init = Gaussian(n, 803);
  std::vector<float> on_cpu = init, on_gpu = init;
  ASSERT_THAT(f.cpu->DecodeAdd(t, std::span<float>(on_cpu)), IsOk());
  for (uint64_t offset : {1, 2, 3}) {
    std::vector<float> shifted = init;
    ASSERT_THAT(h.Decode(blob, n, {}, &shifted, 0, "test blob", offset), IsOk());
    EXPECT_TRUE(SameBits(on_cpu, shifted)) << "output " << offset << " floats into its buffer";
  }
  ASSERT_THAT(h.Decode(blob, n, {}, &on_gpu), IsOk());
  EXPECT_TRUE(SameBits(on_cpu, on_gpu));
  uint64_t changed_dense = 0, changed_sparse = 0;
  for (uint64_t i = 0; i < n; ++i) {
    if (FloatBits(on_gpu[i]) == FloatBits(init[i])) continue;
    ++((i >> 16) % 2 == 0 ? changed_dense : changed_sparse);
  }
  EXPECT_GT(changed_dense, n / 8);     // ~30% of the dense half
  EXPECT_GT(changed_sparse, 100u);     // some of the sparse half
  EXPECT_LT(changed_sparse, n / 100);  // but few
}

// v = grad + old residual equals decode(payload) + new residual, step after step.
TEST_P(CodecSpecTest, ErrorFeedbackOverSteps) {
  QTRAIN_REQUIRE_GPU();
  Fixture f = Make(GetParam());
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
  const uint64_t n = 50000;
  const std::vector<int64_t> shape = {50, 1000};
  std::vector<float> residual(n, 0.0f);
  Rng rng(8);
  for (int step = 0; step < 5; ++step) {
    const auto grad = Gaussian(n, 600 + step);
    const std::vector<float> old = residual;
    ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> blob,
                         h.Encode(grad, &residual, shape, rng.NextStream()));
    std::vector<float> decoded(n, 0.0f);
    ASSERT_THAT(h.Decode(blob, n, shape, &decoded), IsOk());
    for (uint64_t i = 0; i < n; ++i) {
      // v is rounded once, v - decoded once more: a few ulps of the magnitudes.
      const double lhs = double(grad[i]) + old[i];
      const double rhs = double(decoded[i]) + residual[i];
      const double scale = std::fabs(grad[i]) + std::fabs(old[i]) + std::fabs(decoded[i]);
      ASSERT_NEAR(lhs, rhs, 4 * kU * scale + 1e-30) << "step " << step << " i=" << i;
    }
  }
}

// Two encodes with the same key give identical blobs and residuals.
TEST_P(CodecSpecTest, Determinism) {
  QTRAIN_REQUIRE_GPU();
  Fixture f = Make(GetParam());
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
  for (const std::vector<int64_t>& shape :
       {std::vector<int64_t>{300001}, std::vector<int64_t>{64, 1024}}) {
    const uint64_t n = Elements(shape, 0);
    const auto x = Gaussian(n, 700);
    const auto r0 = Gaussian(n, 701, 0.3f);
    std::vector<float> ra = r0, rb = r0;
    ASSERT_OK_AND_ASSIGN(auto a, h.Encode(x, &ra, shape, 12345));
    ASSERT_OK_AND_ASSIGN(auto b, h.Encode(x, &rb, shape, 12345));
    EXPECT_EQ(a, b);
    EXPECT_TRUE(SameBits(ra, rb));
    ASSERT_OK_AND_ASSIGN(auto c, h.Encode(x, nullptr, shape, 12345));
    ASSERT_OK_AND_ASSIGN(auto d, h.Encode(x, nullptr, shape, 12345));
    EXPECT_EQ(c, d);
  }
}

// A NaN in v: the blob is marked, every decoder rejects it saying so.
TEST_P(CodecSpecTest, NonFiniteInputMarksTheBlob) {
  QTRAIN_REQUIRE_GPU();
  Fixture f = Make(GetParam());
  if (f.gpu->id() == CodecId::kFp16) GTEST_SKIP() << "fp16 encodes NaN (as the CPU codec does)";
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
  const uint64_t n = 10000;
  auto x = Gaussian(n, 800);
  x[4321] = std::nanf("");
  const auto r0 = Gaussian(n, 801, 0.3f);
  std::vector<float> r = r0;
  ASSERT_OK_AND_ASSIGN(auto blob, h.Encode(x, &r, {}, 1));
  std::vector<float> out(n, 0.5f);
  EXPECT_THAT(h.Decode(blob, n, {}, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("non-finite")));
  for (float o : out) ASSERT_EQ(o, 0.5f);
  EXPECT_THAT(UnpackBlob(blob, n, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("non-finite")));
  // The element's own residual is kept (threshold) or the whole residual (terngrad).
  EXPECT_EQ(FloatBits(r[4321]), FloatBits(r0[4321]));
  if (f.gpu->id() == CodecId::kTernGrad) {
    EXPECT_TRUE(SameBits(r, r0));
  }
}

INSTANTIATE_TEST_SUITE_P(Codecs, CodecSpecTest,
                         ::testing::Values("onebit", "onebit:bucket=100", "threshold:tau=1", "qsgd",
                                           "qsgd:levels=1,bucket=7", "qsgd:levels=4,bucket=128",
                                           "terngrad", "terngrad:clip=0", "fp16"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name;
                           for (char c : info.param) name += std::isalnum(c) ? c : '_';
                           return name;
                         });

// ---- Statistics -----------------------------------------------------------------------------

// K decodes of independent draws: the mean converges to the expected value of the codec (x for
// qsgd, clip(x, scale) for terngrad) within a CLT bound, and the mean squared error of one draw
// stays within the codec's variance bound.
void CheckUnbiased(const std::string& spec, int draws) {
  Fixture f = Make(spec);
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
  const uint64_t n = 4096;
  const auto x = Gaussian(n, 900);
  std::vector<double> sum(n, 0.0);
  double squared_error = 0.0;
  double scale_seen = -1;
  Rng rng(31);
  for (int k = 0; k < draws; ++k) {
    ASSERT_OK_AND_ASSIGN(auto blob, h.Encode(x, nullptr, {}, rng.NextStream()));
    ASSERT_OK_AND_ASSIGN(EncodedTensor t, UnpackBlob(blob, n, {}));
    if (f.gpu->id() == CodecId::kTernGrad) {
      if (scale_seen < 0) scale_seen = t.scales[0];
      ASSERT_EQ(t.scales[0], scale_seen);  // the scale does not depend on the draw
    }
    std::vector<float> decoded(n, 0.0f);
    ASSERT_THAT(h.Decode(blob, n, {}, &decoded), IsOk());
    for (uint64_t i = 0; i < n; ++i) {
      sum[i] += decoded[i];
      squared_error += (double(decoded[i]) - x[i]) * (double(decoded[i]) - x[i]);
    }
  }
  // Per-element expectation and variance of one draw.
  std::vector<double> expect(n), var(n);
  double variance_bound = 0;
  if (f.gpu->id() == CodecId::kQsgd) {
    const auto& q = static_cast<const QsgdCodec&>(*f.cpu);
    const uint32_t d = q.bucket();
    const double s = q.levels();
    for (uint64_t lo = 0; lo < n; lo += d) {
      double norm2 = 0;
      for (uint64_t i = lo; i < std::min<uint64_t>(n, lo + d); ++i) norm2 += double(x[i]) * x[i];
      const double unit = std::sqrt(norm2) / s;
      for (uint64_t i = lo; i < std::min<uint64_t>(n, lo + d); ++i) {
        expect[i] = x[i];
        const double p = std::fabs(x[i]) / unit - std::floor(std::fabs(x[i]) / unit);
        var[i] = unit * unit * p * (1 - p);
      }
      // Lemma 3.1: E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2 per bucket.
      variance_bound += std::min(d / (s * s), std::sqrt(double(d)) / s) * norm2;
    }
  } else {
    const double s = scale_seen;
    for (uint64_t i = 0; i < n; ++i) {
      const double a = std::min<double>(std::fabs(x[i]), s);  // clipped magnitude
      expect[i] = std::copysign(a, x[i]);
      var[i] = s * a - a * a;  // s * Bernoulli(a / s)
      // Error against x: variance plus the clipping bias.
      variance_bound += var[i] + (std::fabs(x[i]) - a) * (std::fabs(x[i]) - a);
    }
  }
  double total_var = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const double mean = sum[i] / draws;
    const double se = std::sqrt(var[i] / draws);
    // 6 standard errors (p ~ 2e-9 per element), plus float rounding of the decoded values.
    ASSERT_NEAR(mean, expect[i], 6 * se + 1e-6 * (std::fabs(x[i]) + 1)) << spec << " i=" << i;
    total_var += var[i];
  }
  // The average over draws of ||decoded - x||^2: within the bound (with CLT slack).
  const double mse = squared_error / draws;
  EXPECT_LE(mse, variance_bound * 1.05 + 1e-9) << spec;
  if (f.gpu->id() == CodecId::kTernGrad) {
    // For terngrad the expectation is exact: sum of variances plus the clipping bias.
    EXPECT_NEAR(mse, variance_bound, 0.05 * variance_bound + 1e-9) << spec;
  }
  EXPECT_GT(total_var, 0.0);
}

TEST(CudaCodecStatisticsTest, QsgdIsUnbiased) {
  QTRAIN_REQUIRE_GPU();
  CheckUnbiased("qsgd:levels=4,bucket=512", 2000);
  CheckUnbiased("qsgd:levels=16,bucket=128", 1000);
}

TEST(CudaCodecStatisticsTest, TernGradIsUnbiasedForTheClippedValue) {
  QTRAIN_REQUIRE_GPU();
  CheckUnbiased("terngrad:clip=0", 2000);
  CheckUnbiased("terngrad", 2000);
}

// ---- Malformed blobs ----------------------------------------------------------------------------

void Put32(std::vector<uint8_t>* b, size_t offset, uint32_t v) {
  for (int k = 0; k < 4; ++k) (*b)[offset + k] = static_cast<uint8_t>(v >> (8 * k));
}
void Put64(std::vector<uint8_t>* b, size_t offset, uint64_t v) {
  for (int k = 0; k < 8; ++k) (*b)[offset + k] = static_cast<uint8_t>(v >> (8 * k));
}

struct Malformed {
  std::string what;
  std::vector<uint8_t> blob;
  uint64_t n;
  uint64_t blob_bytes;  // 0: blob.size()
  std::string message;  // expected in the error
};

// The checks every blob gets, from a valid blob of n elements.
std::vector<Malformed> HeaderCorruptions(const std::vector<uint8_t>& good, uint64_t n) {
  std::vector<Malformed> cases;
  auto add = [&](const std::string& what, auto mutate, const std::string& message,
                 uint64_t elements = 0, uint64_t bytes = 0) {
    Malformed m{what, good, elements ? elements : n, bytes, message};
    mutate(&m.blob);
    cases.push_back(std::move(m));
  };
  const DevBlobHeader h = ReadBlobHeader(good.data());
  const DevBlobLayout l = BlobLayoutOf(good.data());
  add(
      "magic", [](auto* b) { (*b)[0] ^= 1; }, "magic");
  add(
      "codec", [&](auto* b) { Put32(b, 4, h.codec == 2 ? 3 : 2); }, "another codec");
  add(
      "version 0", [](auto* b) { Put32(b, 8, 0); }, "format version");
  add(
      "version 2", [](auto* b) { Put32(b, 8, 2); }, "format version");
  add(
      "reserved", [](auto* b) { Put32(b, 20, 2); }, "reserved");
  add(
      "non-finite mark", [](auto* b) { Put32(b, 20, 1); }, "non-finite");
  add(
      "num_scales", [](auto* b) { Put32(b, 12, 0x40000000u); }, "do not fit");
  add(
      "num_params", [](auto* b) { Put32(b, 16, 0xffffffffu); }, "do not fit");
  add(
      "payload_bytes", [&](auto* b) { Put64(b, 24, good.size()); }, "do not fit");
  // Too short for what the header declares: "size differs" or "counts do not fit".
  add(
      "truncated by 16", [](auto*) {}, "blob", 0, good.size() - 16);
  add(
      "truncated by 1", [](auto*) {}, "malformed", 0, good.size() - 1);
  if (h.codec != kDevThreshold) {  // a threshold payload is valid for any larger tensor
    add(
        "elements", [](auto*) {}, "", n + 8);  // the message depends on the codec
  }
  if (l.payload_offset + h.payload_bytes < l.total) {
    add(
        "padding after", [&](auto* b) { (*b)[l.total - 1] = 1; }, "padding");
  }
  if (l.params_end < l.payload_offset) {
    add(
        "padding before", [&](auto* b) { (*b)[l.params_end] = 1; }, "padding");
  }
  if (h.num_scales > 0) {
    add(
        "NaN scale", [&](auto* b) { Put32(b, l.scales_offset, 0x7fc00000u); }, "not finite");
    add(
        "Inf scale", [&](auto* b) { Put32(b, l.scales_offset, 0x7f800000u); }, "not finite");
  }
  return cases;
}

void ExpectRejected(const CudaCodec& codec, const std::vector<Malformed>& cases) {
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(&codec));
  for (const Malformed& m : cases) {
    const auto init = Gaussian(m.n, 1000);
    std::vector<float> out = init;
    EXPECT_THAT(h.Decode(m.blob, m.n, {}, &out, m.blob_bytes, "rank 3"),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(m.message)))
        << codec.Spec() << ": " << m.what;
    if (m.blob_bytes == 0 || m.blob_bytes % 16 == 0) {
      EXPECT_THAT(h.Decode(m.blob, m.n, {}, &out, m.blob_bytes, "rank 3"),
                  StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("rank 3")))
          << codec.Spec() << ": " << m.what;
    }
    EXPECT_TRUE(SameBits(out, init)) << codec.Spec() << ": " << m.what << " changed the output";
  }
}

std::vector<uint8_t> GoodBlob(const CudaCodec& codec, uint64_t n, float stddev = 1.0f) {
  auto h = GpuCodecHarness::Create(&codec);
  EXPECT_THAT(h, IsOk());
  auto x = Gaussian(n, 1100, stddev);
  auto blob = h->Encode(x, nullptr, {}, 77);
  EXPECT_THAT(blob, IsOk());
  return *blob;
}

TEST(CudaCodecMalformedTest, EveryCodecRejectsHeaderCorruptions) {
  QTRAIN_REQUIRE_GPU();
  for (const char* spec : {"onebit", "threshold:tau=1", "qsgd", "terngrad", "fp16"}) {
    ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec(spec));
    const uint64_t n = 1001;
    ExpectRejected(*codec, HeaderCorruptions(GoodBlob(*codec, n), n));
  }
}

TEST(CudaCodecMalformedTest, WrongCodec) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(auto fp16, CudaCodec::CreateFromSpec("fp16"));
  ASSERT_OK_AND_ASSIGN(auto onebit, CudaCodec::CreateFromSpec("onebit"));
  ASSERT_OK_AND_ASSIGN(auto qsgd4, CudaCodec::CreateFromSpec("qsgd:levels=4"));
  ASSERT_OK_AND_ASSIGN(auto qsgd, CudaCodec::CreateFromSpec("qsgd"));
  const uint64_t n = 1000;
  ExpectRejected(*onebit, {{"fp16 blob", GoodBlob(*fp16, n), n, 0, "another codec"}});
  // Same codec, other settings: qsgd's params must equal the decoder's [levels, bucket].
  ExpectRejected(*qsgd, {{"levels=4 blob", GoodBlob(*qsgd4, n), n, 0, "differs from this"}});
}

TEST(CudaCodecMalformedTest, CodecFields) {
  QTRAIN_REQUIRE_GPU();
  const uint64_t n = 1001;  // n % 8 == 1: unused bits in onebit's and terngrad's last byte
  {
    ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec("onebit"));
    const auto good = GoodBlob(*codec, n);
    const DevBlobLayout l = BlobLayoutOf(good.data());
    const uint64_t last = l.payload_offset + (n + 7) / 8 - 1;
    std::vector<Malformed> cases;
    cases.push_back({"unused bits", good, n, 0, "unused bits"});
    cases.back().blob[last] |= 0x80;
    cases.push_back({"column length 0", good, n, 0, "out of range"});
    Put32(&cases.back().blob, l.params_offset, 0);
    cases.push_back({"column length > n", good, n, 0, "out of range"});
    Put32(&cases.back().blob, l.params_offset, n + 1);
    cases.push_back({"last scale NaN", good, n, 0, "not finite"});
    Put32(&cases.back().blob, l.params_offset - 4, 0xffc00000u);
    ExpectRejected(*codec, cases);
  }
  {
    ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec("terngrad"));
    const auto good = GoodBlob(*codec, n);
    const DevBlobLayout l = BlobLayoutOf(good.data());
    std::vector<Malformed> cases;
    cases.push_back({"code 11", good, n, 0, "code 11"});
    cases.back().blob[l.payload_offset + 100] = 0xff;
    cases.push_back({"unused bits", good, n, 0, "unused bits"});
    cases.back().blob[l.payload_offset + (n + 3) / 4 - 1] |= 0x40;
    cases.push_back({"negative scale", good, n, 0, "not finite"});
    Put32(&cases.back().blob, l.scales_offset, 0x80000000u | 0x3f800000u);
    ExpectRejected(*codec, cases);
  }
  {
    ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec("qsgd"));  // b = 6
    const auto good = GoodBlob(*codec, n);
    const DevBlobLayout l = BlobLayoutOf(good.data());
    std::vector<Malformed> cases;
    cases.push_back({"level 31 > 16", good, n, 0, "over `levels`"});
    cases.back().blob[l.payload_offset] = static_cast<uint8_t>(
        (cases.back().blob[l.payload_offset] & 0xc0) | 0x1f);  // element 0: level 31, sign 0
    cases.push_back({"negative zero", good, n, 0, "negative zero"});
    cases.back().blob[l.payload_offset] =
        static_cast<uint8_t>((cases.back().blob[l.payload_offset] & 0xc0) | 0x20);
    cases.push_back({"code in a zero-norm bucket", good, n, 0, "norm is 0"});
    Put32(&cases.back().blob, l.scales_offset, 0);  // bucket 0 has non-zero codes
    cases.push_back({"negative norm", good, n, 0, "not finite"});
    Put32(&cases.back().blob, l.scales_offset + 4, 0xbf800000u);
    cases.push_back({"params", good, n, 0, "differs from this"});
    Put32(&cases.back().blob, l.params_offset, 15);
    const uint64_t used_bits = n * 6;  // 6006: 6 bits used in the last byte
    cases.push_back({"unused bits", good, n, 0, "unused bits"});
    cases.back().blob[l.payload_offset + (used_bits + 7) / 8 - 1] |= 0x80;
    ExpectRejected(*codec, cases);
  }
  {
    ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec("threshold:tau=2"));
    const auto good = GoodBlob(*codec, n);  // N(0,1) against tau = 2: ~5% sent, gaps varied
    const DevBlobHeader h = ReadBlobHeader(good.data());
    const DevBlobLayout l = BlobLayoutOf(good.data());
    ASSERT_GE(h.payload_bytes, 36u);  // the cases below write up to byte 35
    const uint32_t entries = LoadLe32(good.data() + l.params_offset);
    ASSERT_OK_AND_ASSIGN(EncodedTensor t, UnpackBlob(good, n, {}));
    uint64_t last_index = 0, next = 0;
    for (size_t p = 0; p < t.payload.size(); ++p) {  // all one-byte varints at this density?
      if (t.payload[p] < 0x80) {
        uint32_t value = 0;
        ASSERT_EQ(ParseVarintEndingAt(t.payload.data(), p, &value), kDecodeOk);
        last_index = next + (value >> 1);
        next = last_index + 1;
      }
    }
    const uint64_t p0 = l.payload_offset;
    std::vector<Malformed> cases;
    cases.push_back({"index past n", good, last_index, 0, "past the tensor"});
    cases.push_back({"entry count + 1", good, n, 0, "entry count"});
    Put32(&cases.back().blob, l.params_offset, entries + 1);
    cases.push_back({"entry count - 1", good, n, 0, "entry count"});
    Put32(&cases.back().blob, l.params_offset, entries - 1);
    cases.push_back({"truncated varint", good, n, 0, "ends inside a varint"});
    cases.back().blob[p0 + h.payload_bytes - 1] |= 0x80;
    cases.push_back({"varint too long", good, n, 0, "longer than 5"});
    for (int k = 0; k < 6; ++k) cases.back().blob[p0 + k] = 0x80;
    cases.back().blob[p0 + 6] = 0x01;
    cases.push_back({"varint overflow", good, n, 0, "over 32 bits"});
    for (int k = 0; k < 4; ++k) cases.back().blob[p0 + k] = 0x80;
    cases.back().blob[p0 + 4] = 0x7f;
    cases.push_back({"non-canonical varint", good, n, 0, "non-canonical"});
    cases.back().blob[p0] = 0x80;
    cases.back().blob[p0 + 1] = 0x00;
    // The same three across the 16-byte chunks a decode thread parses: the varint's last byte in
    // one chunk, its first bytes in the chunk before.
    cases.push_back({"varint too long across chunks", good, n, 0, "longer than 5"});
    for (int k = 0; k < 6; ++k) cases.back().blob[p0 + 29 + k] = 0x80;
    cases.back().blob[p0 + 35] = 0x01;
    cases.push_back({"varint overflow across chunks", good, n, 0, "over 32 bits"});
    cases.back().blob[p0 + 13] = 0x01;  // ends the varint before
    for (int k = 0; k < 4; ++k) cases.back().blob[p0 + 14 + k] = 0x80;
    cases.back().blob[p0 + 18] = 0x7f;
    cases.push_back({"non-canonical varint across chunks", good, n, 0, "non-canonical"});
    cases.back().blob[p0 + 30] = 0x01;
    cases.back().blob[p0 + 31] = 0x80;
    cases.back().blob[p0 + 32] = 0x00;
    cases.push_back({"tau 0", good, n, 0, "not finite"});
    Put32(&cases.back().blob, l.scales_offset, 0);
    ExpectRejected(*codec, cases);
  }
}

// One error word for several blobs: after a bad blob nothing more is decoded, the first error is
// reported, and the reset word lets the next decode through.
TEST(CudaCodecMalformedTest, SharedErrorWord) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec("onebit"));
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(codec.get()));
  const uint64_t n = 5000;
  std::vector<uint8_t> good = GoodBlob(*codec, n);
  std::vector<uint8_t> bad = good;
  bad[0] ^= 1;
  ASSERT_OK_AND_ASSIGN(auto d_good, qtrain::cuda::DeviceArray<uint8_t>::Create(good.size()));
  ASSERT_OK_AND_ASSIGN(auto d_bad, qtrain::cuda::DeviceArray<uint8_t>::Create(bad.size()));
  ASSERT_OK_AND_ASSIGN(auto d_out, qtrain::cuda::DeviceArray<float>::Create(n));
  ASSERT_OK_AND_ASSIGN(auto d_error, qtrain::cuda::DeviceArray<int32_t>::Create(1));
  ASSERT_THAT(h.Upload<uint8_t>(good, d_good.data()), IsOk());
  ASSERT_THAT(h.Upload<uint8_t>(bad, d_bad.data()), IsOk());
  const std::vector<float> zeros(n, 0.0f);
  ASSERT_THAT(h.Upload<float>(zeros, d_out.data()), IsOk());
  ASSERT_EQ(cudaMemset(d_error.data(), 0, 4), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_THAT(
      codec->DecodeAdd(d_bad.data(), bad.size(), n, {}, d_out.data(), d_error.data(), h.stream()),
      IsOk());
  ASSERT_THAT(
      codec->DecodeAdd(d_good.data(), good.size(), n, {}, d_out.data(), d_error.data(), h.stream()),
      IsOk());
  EXPECT_THAT(CudaCodec::CheckDecodeError(d_error.data(), "rank 1", h.stream()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr("rank 1"), HasSubstr("magic"))));
  std::vector<float> out(n);
  ASSERT_THAT(h.Download<float>(d_out.data(), std::span<float>(out)), IsOk());
  EXPECT_TRUE(SameBits(out, zeros));  // the good blob after the bad one was skipped
  // Reset: the good blob now decodes.
  ASSERT_THAT(
      codec->DecodeAdd(d_good.data(), good.size(), n, {}, d_out.data(), d_error.data(), h.stream()),
      IsOk());
  EXPECT_THAT(CudaCodec::CheckDecodeError(d_error.data(), "rank 1", h.stream()), IsOk());
  ASSERT_THAT(h.Download<float>(d_out.data(), std::span<float>(out)), IsOk());
  std::vector<float> expected = zeros;
  ASSERT_THAT(h.Decode(good, n, {}, &expected), IsOk());
  EXPECT_TRUE(SameBits(out, expected));
}

// Random corruption: the GPU accepts exactly what UnpackBlob + the CPU decoder accept; on
// rejection the output is untouched, on acceptance it equals the CPU's.
TEST_P(CodecSpecTest, RandomCorruptionVerdictEqualsCpu) {
  QTRAIN_REQUIRE_GPU();
  Fixture f = Make(GetParam());
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
  const uint64_t n = 1000;
  const std::vector<uint8_t> good = GoodBlob(*f.gpu, n);
  std::mt19937 gen(99);
  int accepted = 0, rejected = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<uint8_t> blob = good;
    for (int k = 0; k < 1 + trial % 3; ++k) {
      const size_t at = trial % 4 == 0 ? gen() % 48 : gen() % blob.size();
      blob[at] ^= static_cast<uint8_t>(1u << (gen() % 8));
    }
    const auto init = Gaussian(n, 1200 + trial);
    std::vector<float> on_gpu = init, on_cpu = init;
    const absl::Status gpu = h.Decode(blob, n, {}, &on_gpu);
    auto unpacked = UnpackBlob(blob, n, {});
    const absl::Status cpu =
        unpacked.ok() ? f.cpu->DecodeAdd(*unpacked, std::span<float>(on_cpu)) : unpacked.status();
    ASSERT_EQ(gpu.ok(), cpu.ok()) << "trial " << trial << ": GPU " << gpu << ", CPU " << cpu;
    if (gpu.ok()) {
      ++accepted;
      ASSERT_TRUE(SameBitsOrBothNan(on_gpu, on_cpu)) << "trial " << trial;
    } else {
      ++rejected;
      EXPECT_EQ(gpu.code(), absl::StatusCode::kInvalidArgument);
      ASSERT_TRUE(SameBits(on_gpu, init)) << "trial " << trial;
    }
  }
  EXPECT_GT(rejected, 30);  // fp16 accepts every payload byte: only header flips fail
}

// ---- TernGrad's shared scale ------------------------------------------------------------------

TEST(CudaTernGradSharedTest, StepsMatchTheCpu) {
  QTRAIN_REQUIRE_GPU();
  for (const char* spec : {"terngrad:shared=1", "terngrad:clip=0,shared=1", "terngrad"}) {
    Fixture f = Make(spec);
    const auto& cpu = static_cast<const TernGradCodec&>(*f.cpu);
    ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
    const uint64_t n = 300001;
    const auto x = Gaussian(n, 1300);
    const auto r0 = Gaussian(n, 1301, 0.3f);
    // Step 1 on both sides.
    std::vector<float> r_cpu = r0;
    ASSERT_OK_AND_ASSIGN(const float local_cpu, cpu.PrepareFeedback(x, std::span<float>(r_cpu)));
    ASSERT_OK_AND_ASSIGN(auto d_x, qtrain::cuda::DeviceArray<float>::Create(n));
    ASSERT_OK_AND_ASSIGN(auto d_r, qtrain::cuda::DeviceArray<float>::Create(n));
    ASSERT_OK_AND_ASSIGN(auto d_scale, qtrain::cuda::DeviceArray<float>::Create(1));
    ASSERT_THAT(h.Upload<float>(x, d_x.data()), IsOk());
    ASSERT_THAT(h.Upload<float>(r0, d_r.data()), IsOk());
    ASSERT_THAT(f.gpu->PrepareScale(d_x.data(), d_r.data(), n, d_scale.data(), h.stream()), IsOk());
    float local_gpu = 0;
    ASSERT_THAT(h.Download<float>(d_scale.data(), std::span<float>(&local_gpu, 1)), IsOk());
    std::vector<float> v_gpu(n);
    ASSERT_THAT(h.Download<float>(d_r.data(), std::span<float>(v_gpu)), IsOk());
    EXPECT_TRUE(SameBits(v_gpu, r_cpu)) << "step 1 leaves v = grad + residual in the residual";
    EXPECT_NEAR(local_gpu, local_cpu, 2.5e-7f * local_cpu);
    // Step 2 with an agreed scale above the local one (another rank's), on both sides.
    const float shared = local_cpu * 1.25f;
    EncodedTensor t_cpu;
    Rng rng(44);
    ASSERT_THAT(cpu.EncodePreparedWithScale(std::span<float>(r_cpu), {}, shared, rng, &t_cpu),
                IsOk());
    const uint32_t key = Rng(44).NextStream();
    ASSERT_THAT(h.Upload<float>(std::span<const float>(&shared, 1), d_scale.data()), IsOk());
    const uint64_t capacity = f.gpu->MaxBlobBytes({}, n);
    ASSERT_OK_AND_ASSIGN(auto d_blob, qtrain::cuda::DeviceArray<uint8_t>::Create(capacity));
    ASSERT_THAT(f.gpu->EncodeWithScale(nullptr, d_r.data(), n, {}, key, d_scale.data(),
                                       d_blob.data(), capacity, nullptr, h.stream()),
                IsOk());
    std::vector<uint8_t> blob(capacity);
    ASSERT_THAT(h.Download<uint8_t>(d_blob.data(), std::span<uint8_t>(blob)), IsOk());
    std::vector<float> r_gpu(n);
    ASSERT_THAT(h.Download<float>(d_r.data(), std::span<float>(r_gpu)), IsOk());
    ASSERT_OK_AND_ASSIGN(EncodedTensor t_gpu, UnpackBlob(blob, n, {}));
    ASSERT_EQ(t_gpu.scales.size(), 1u);
    EXPECT_EQ(t_gpu.scales[0], shared);
    // The clip level is the local scale of v (recomputed from the same v: the same value).
    const float inv = TernInverse(shared);
    uint64_t mismatches = 0;
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t code = TernCode(v_gpu[i], static_cast<uint32_t>(i), key, local_gpu, inv);
      ASSERT_EQ(BitsAt(t_gpu.payload, 2 * i, 2), code) << i;
      ASSERT_EQ(FloatBits(r_gpu[i]), FloatBits(SubRn(v_gpu[i], TernValue(code, shared)))) << i;
      mismatches += BitsAt(t_cpu.payload, 2 * i, 2) != code;
    }
    if (local_gpu == local_cpu) {
      EXPECT_EQ(mismatches, 0u) << spec;
      EXPECT_TRUE(SameBits(r_gpu, r_cpu)) << spec;
    } else {
      EXPECT_LE(mismatches, 10 + 6.0 * n * 4 * kU) << spec;
    }
    // An invalid agreed scale marks the blob and leaves the residual alone.
    const std::vector<float> before = r_gpu;
    for (float bad : {std::nanf(""), -1.0f, INFINITY}) {
      ASSERT_THAT(h.Upload<float>(std::span<const float>(&bad, 1), d_scale.data()), IsOk());
      ASSERT_THAT(f.gpu->EncodeWithScale(nullptr, d_r.data(), n, {}, key, d_scale.data(),
                                         d_blob.data(), capacity, nullptr, h.stream()),
                  IsOk());
      ASSERT_THAT(h.Download<uint8_t>(d_blob.data(), std::span<uint8_t>(blob)), IsOk());
      ASSERT_THAT(h.Download<float>(d_r.data(), std::span<float>(r_gpu)), IsOk());
      EXPECT_TRUE(SameBits(r_gpu, before)) << bad;
      EXPECT_THAT(UnpackBlob(blob, n, {}),
                  StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("non-finite")))
          << bad;
    }
    // Without feedback, v = grad.
    ASSERT_THAT(f.gpu->PrepareScale(d_x.data(), nullptr, n, d_scale.data(), h.stream()), IsOk());
    float plain = 0;
    ASSERT_THAT(h.Download<float>(d_scale.data(), std::span<float>(&plain, 1)), IsOk());
    EXPECT_NEAR(plain, cpu.LocalScale(x), 2.5e-7f * plain);
  }
}

TEST(CudaTernGradSharedTest, NonFiniteLocalScaleIsInfinity) {
  QTRAIN_REQUIRE_GPU();
  Fixture f = Make("terngrad:shared=1");
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(f.gpu.get()));
  const uint64_t n = 5000;
  auto x = Gaussian(n, 1400);
  x[17] = std::nanf("");
  ASSERT_OK_AND_ASSIGN(auto d_x, qtrain::cuda::DeviceArray<float>::Create(n));
  ASSERT_OK_AND_ASSIGN(auto d_scale, qtrain::cuda::DeviceArray<float>::Create(1));
  ASSERT_THAT(h.Upload<float>(x, d_x.data()), IsOk());
  ASSERT_THAT(f.gpu->PrepareScale(d_x.data(), nullptr, n, d_scale.data(), h.stream()), IsOk());
  float scale = 0;
  ASSERT_THAT(h.Download<float>(d_scale.data(), std::span<float>(&scale, 1)), IsOk());
  EXPECT_EQ(scale, INFINITY);
}

}  // namespace
}  // namespace qtrain::compression::cuda
