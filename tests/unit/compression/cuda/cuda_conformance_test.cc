// The GPU twin of tests/unit/compression/conformance_test.cc: the same contracts checked on
// payloads that the CUDA codecs encode and decode (round trip within the codec's named error
// limit, decode accumulates, determinism, payload size formula, GPU decode == CPU decode,
// error-feedback invariant and "the payload is the encoding of v", spec round trip, malformed
// payloads rejected with INVALID_ARGUMENT leaving the output untouched, random corruption never
// half-applied). Every case starts with QTRAIN_REQUIRE_GPU().
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/testing/cuda_testing.h"
#include "common/testing/status_matchers.h"
#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/cuda/cuda_codec.h"
#include "compression/packed_blob.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/compression/cuda/gpu_codec_harness.h"

namespace qtrain::compression::cuda {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;

const std::vector<std::string>& Specs() {
  static const std::vector<std::string> specs = {
      "fp16",
      "fp16:ef=1",
      "onebit",
      "onebit:bucket=64",
      "threshold",
      "threshold:tau=0.5",
      "qsgd",
      "qsgd:levels=4,bucket=128",
      "qsgd:levels=1,bucket=7",
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

// The named error limits of conformance_test.cc.
double MaxSquaredError(const Codec& codec, std::span<const float> x) {
  const pb::CodecConfig config = codec.Config();
  switch (codec.id()) {
    case CodecId::kFp32:
      return 0.0;
    case CodecId::kFp16: {
      double bound = 0;
      for (float v : x) {
        double e = std::max(std::fabs(v) * 0x1p-11, 0x1p-25);
        bound += e * e;
      }
      return bound * (1 + 1e-6);
    }
    case CodecId::kOneBit:
    case CodecId::kThreshold:
      return SquaredNorm(x) * (1 + 1e-5) + 1e-30;
    case CodecId::kQsgd: {
      const double s = config.qsgd().levels(), d = config.qsgd().bucket();
      return std::min<double>(d, x.size()) / (s * s) * SquaredNorm(x) * (1 + 1e-5) + 1e-30;
    }
    case CodecId::kTernGrad: {
      double m = 0;
      for (float v : x) m = std::max<double>(m, std::fabs(v));
      return 4 * m * m * x.size() * (1 + 1e-5) + 1e-30;
    }
  }
  return 0;
}

class CudaConformanceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_THAT(RegisterBuiltinCodecs(&registry_), IsOk());
    ASSERT_OK_AND_ASSIGN(config_, registry_.ParseSpec(GetParam()));
    ASSERT_OK_AND_ASSIGN(gpu_, CudaCodec::Create(config_));
    ASSERT_OK_AND_ASSIGN(cpu_, registry_.Create(config_));
  }

  // A GPU encode without feedback, key from Rng(seed) as a CPU Encode would take it.
  std::vector<uint8_t> EncodeOk(GpuCodecHarness& h, std::span<const float> x, uint64_t seed) {
    auto blob = h.Encode(x, nullptr, {}, Rng(seed).NextStream());
    EXPECT_THAT(blob, IsOk());
    return blob.ok() ? *blob : std::vector<uint8_t>{};
  }

  CodecRegistry registry_;
  pb::CodecConfig config_;
  std::unique_ptr<CudaCodec> gpu_;
  std::unique_ptr<Codec> cpu_;
};

TEST_P(CudaConformanceTest, RoundTripWithinNamedLimit) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(gpu_.get()));
  for (size_t n : kSizes) {
    auto x = Gaussian(n, 11 + n);
    const std::vector<uint8_t> blob = EncodeOk(h, x, 3);
    ASSERT_OK_AND_ASSIGN(EncodedTensor t, UnpackBlob(blob, n, {}));
    EXPECT_EQ(t.codec, gpu_->id());
    std::vector<float> out(n, 0.0f);
    ASSERT_THAT(h.Decode(blob, n, {}, &out), IsOk());
    double err = 0;
    for (size_t i = 0; i < n; ++i) err += (double(out[i]) - x[i]) * (double(out[i]) - x[i]);
    EXPECT_LE(err, MaxSquaredError(*cpu_, x)) << "n=" << n;
  }
}

TEST_P(CudaConformanceTest, DecodeAddAccumulates) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(gpu_.get()));
  auto x = Gaussian(1000, 5);
  const std::vector<uint8_t> blob = EncodeOk(h, x, 3);
  std::vector<float> once(1000, 0.0f), twice(1000, 1.5f);
  ASSERT_THAT(h.Decode(blob, 1000, {}, &once), IsOk());
  ASSERT_THAT(h.Decode(blob, 1000, {}, &twice), IsOk());
  for (size_t i = 0; i < once.size(); ++i) EXPECT_EQ(twice[i], 1.5f + once[i]) << i;
}

TEST_P(CudaConformanceTest, SameSeedSamePayload) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(gpu_.get()));
  auto x = Gaussian(4099, 6);
  EXPECT_EQ(EncodeOk(h, x, 42), EncodeOk(h, x, 42));
}

TEST_P(CudaConformanceTest, PayloadSizeMatchesFormula) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(gpu_.get()));
  for (size_t n : kSizes) {
    auto x = Gaussian(n, 7 + n);
    const std::vector<uint8_t> blob = EncodeOk(h, x, 1);
    ASSERT_OK_AND_ASSIGN(EncodedTensor t, UnpackBlob(blob, n, {}));
    const int64_t expected = cpu_->PayloadBytes({}, n);
    if (expected >= 0) {
      EXPECT_EQ(int64_t(t.payload.size()), expected) << "n=" << n;
      EXPECT_EQ(blob.size(), gpu_->MaxBlobBytes({}, n)) << "n=" << n;
    } else {
      EXPECT_LE(blob.size(), gpu_->MaxBlobBytes({}, n)) << "n=" << n;
    }
  }
}

// The CPU decoder (the reference) and the GPU decoder agree on every GPU payload, and the GPU
// decoder agrees with the CPU on CPU payloads.
TEST_P(CudaConformanceTest, GpuDecodeEqualsCpuDecode) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(gpu_.get()));
  for (size_t n : kSizes) {
    auto x = Gaussian(n, 8 + n);
    const std::vector<uint8_t> blob = EncodeOk(h, x, 9);
    ASSERT_OK_AND_ASSIGN(EncodedTensor t, UnpackBlob(blob, n, {}));
    std::vector<float> a(n, 0.25f), b(n, 0.25f);
    ASSERT_THAT(h.Decode(blob, n, {}, &a), IsOk());
    ASSERT_THAT(cpu_->DecodeAdd(t, std::span<float>(b)), IsOk());
    EXPECT_TRUE(SameBits(a, b)) << "n=" << n;
    EncodedTensor c;
    Rng rng(9);
    ASSERT_THAT(cpu_->Encode(x, {}, rng, &c), IsOk());
    std::vector<uint8_t> cpu_blob;
    ASSERT_THAT(PackBlob(c, &cpu_blob), IsOk());
    std::vector<float> d(n, 0.25f), e(n, 0.25f);
    ASSERT_THAT(h.Decode(cpu_blob, n, {}, &d), IsOk());
    ASSERT_THAT(cpu_->DecodeAdd(c, std::span<float>(e)), IsOk());
    EXPECT_TRUE(SameBits(d, e)) << "n=" << n;
  }
}

TEST_P(CudaConformanceTest, ErrorFeedbackInvariant) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(gpu_.get()));
  for (size_t n : {size_t{1}, size_t{9}, size_t{1000}, size_t{4099}}) {
    auto x = Gaussian(n, 21 + n);
    auto r_old = Gaussian(n, 22 + n, 0.3f);
    std::vector<float> r = r_old;
    const uint32_t key = Rng(5).NextStream();
    ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> blob, h.Encode(x, &r, {}, key));
    std::vector<float> decoded(n, 0.0f);
    ASSERT_THAT(h.Decode(blob, n, {}, &decoded), IsOk());
    for (size_t i = 0; i < n; ++i) {
      double lhs = double(x[i]) + r_old[i];
      double rhs = double(decoded[i]) + r[i];
      double scale = std::fabs(x[i]) + std::fabs(r_old[i]) + std::fabs(decoded[i]);
      EXPECT_NEAR(lhs, rhs, 4 * 0x1p-24 * scale + 1e-30) << "n=" << n << " i=" << i;
    }
    // The payload is exactly the encoding of v = x + r_old (same stream of random numbers).
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = x[i] + r_old[i];
    ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> direct, h.Encode(v, nullptr, {}, key));
    EXPECT_EQ(direct, blob) << "n=" << n;
  }
}

TEST_P(CudaConformanceTest, SpecRoundTrips) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(pb::CodecConfig again, registry_.ParseSpec(gpu_->Spec()));
  EXPECT_EQ(again.DebugString(), gpu_->Config().DebugString());
}

// Every malformed-envelope kind of conformance_test.cc, as a blob: error, output untouched.
TEST_P(CudaConformanceTest, MalformedPayloadsAreRejectedAndChangeNothing) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(gpu_.get()));
  const size_t n = 1000;
  auto x = Gaussian(n, 13);
  ASSERT_OK_AND_ASSIGN(const EncodedTensor good, UnpackBlob(EncodeOk(h, x, 2), n, {}));
  struct Bad {
    EncodedTensor t;
    uint64_t n;
  };
  std::vector<Bad> bad;
  auto add = [&](auto mutate, uint64_t elements) {
    EncodedTensor t = good;
    mutate(t);
    bad.push_back({std::move(t), elements});
  };
  add([](EncodedTensor& t) { t.payload.push_back(0); }, n);
  add(
      [](EncodedTensor& t) {
        t.codec = t.codec == CodecId::kFp32 ? CodecId::kFp16 : CodecId::kFp32;
      },
      n);
  add([](EncodedTensor& t) { t.format_version = 0; }, n);
  add([](EncodedTensor& t) { t.format_version += 1; }, n);
  // The receiver's element count differs (which some payloads survive, as on the CPU).
  add([](EncodedTensor&) {}, n - 1);
  if (!good.payload.empty()) {
    add([](EncodedTensor& t) { t.payload.pop_back(); }, n);
    add([](EncodedTensor& t) { t.payload.resize(t.payload.size() / 2); }, n);
    add([](EncodedTensor& t) { t.payload.clear(); }, n);
  }
  if (!good.scales.empty()) {
    add([](EncodedTensor& t) { t.scales.pop_back(); }, n);
    add([](EncodedTensor& t) { t.scales.push_back(1.0f); }, n);
    add([](EncodedTensor& t) { t.scales[0] = std::nanf(""); }, n);
    add([](EncodedTensor& t) { t.scales[0] = INFINITY; }, n);
  } else {
    add([](EncodedTensor& t) { t.scales.push_back(1.0f); }, n);
  }
  if (!good.params.empty()) {
    add([](EncodedTensor& t) { t.params.pop_back(); }, n);
    add([](EncodedTensor& t) { t.params[0] += 1000003; }, n);
  }
  for (size_t k = 0; k < bad.size(); ++k) {
    std::vector<uint8_t> blob;
    ASSERT_THAT(PackBlob(bad[k].t, &blob), IsOk());
    std::vector<float> out(bad[k].n, 0.25f), cpu_out(bad[k].n, 0.25f);
    const absl::Status gpu = h.Decode(blob, bad[k].n, {}, &out);
    auto unpacked = UnpackBlob(blob, bad[k].n, {});
    const absl::Status cpu =
        unpacked.ok() ? cpu_->DecodeAdd(*unpacked, std::span<float>(cpu_out)) : unpacked.status();
    EXPECT_EQ(gpu.ok(), cpu.ok()) << "case " << k << ": GPU " << gpu << ", CPU " << cpu;
    if (bad[k].n == n) {  // a mutated tensor: always malformed
      EXPECT_THAT(gpu, StatusIs(absl::StatusCode::kInvalidArgument)) << "malformed case " << k;
    }
    if (!gpu.ok()) {
      EXPECT_EQ(gpu.code(), absl::StatusCode::kInvalidArgument);
      for (size_t i = 0; i < out.size(); ++i) {
        ASSERT_EQ(out[i], 0.25f) << "case " << k << " wrote out[" << i << "]";
      }
    }
  }
  // What the host sees (shape, size) fails before anything is enqueued.
  std::vector<uint8_t> blob;
  ASSERT_THAT(PackBlob(good, &blob), IsOk());
  std::vector<float> out(n, 0.25f);
  const std::vector<int64_t> wrong_shape = {3, 7}, negative_shape = {-1, -1000};
  EXPECT_THAT(h.Decode(blob, n, wrong_shape, &out), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(h.Decode(blob, n, negative_shape, &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(gpu_->DecodeAdd(reinterpret_cast<void*>(uintptr_t{4096}), blob.size(),
                              uint64_t{1} << 40, {}, reinterpret_cast<float*>(uintptr_t{4096}),
                              reinterpret_cast<int32_t*>(uintptr_t{4096}), h.stream()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  for (float v : out) ASSERT_EQ(v, 0.25f);
}

// Random corruption of payload bytes: any result is fine except a crash, a hang, or a modified
// output after an error; and the verdict is the CPU decoder's.
TEST_P(CudaConformanceTest, CorruptedBytesNeverHalfApply) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(gpu_.get()));
  const size_t n = 1000;
  ASSERT_OK_AND_ASSIGN(const EncodedTensor good,
                       UnpackBlob(EncodeOk(h, Gaussian(n, 14), 2), n, {}));
  if (good.payload.empty()) GTEST_SKIP();
  std::mt19937 gen(77);
  for (int trial = 0; trial < 300; ++trial) {
    EncodedTensor t = good;
    int flips = 1 + trial % 4;
    for (int f = 0; f < flips; ++f)
      t.payload[gen() % t.payload.size()] ^= uint8_t(1u << (gen() % 8));
    if (trial % 3 == 0) t.payload.resize(gen() % (t.payload.size() + 1));
    std::vector<uint8_t> blob;
    ASSERT_THAT(PackBlob(t, &blob), IsOk());
    std::vector<float> out(n, 0.25f), cpu_out(n, 0.25f);
    const absl::Status s = h.Decode(blob, n, {}, &out);
    const absl::Status cpu = cpu_->DecodeAdd(t, std::span<float>(cpu_out));
    ASSERT_EQ(s.ok(), cpu.ok()) << "trial " << trial << ": GPU " << s << ", CPU " << cpu;
    if (!s.ok()) {
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], 0.25f) << "trial " << trial;
    } else {
      ASSERT_TRUE(SameBitsOrBothNan(out, cpu_out)) << "trial " << trial;
    }
  }
}

TEST_P(CudaConformanceTest, EncodeRejectsMismatchedShape) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(GpuCodecHarness h, GpuCodecHarness::Create(gpu_.get()));
  auto x = Gaussian(12, 1);
  std::vector<int64_t> shape = {5, 2};
  EXPECT_THAT(h.Encode(x, nullptr, shape, 1), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<float> r(12, 0.0f);
  EXPECT_THAT(h.Encode(x, &r, shape, 1), StatusIs(absl::StatusCode::kInvalidArgument));
}

INSTANTIATE_TEST_SUITE_P(AllGpuCodecs, CudaConformanceTest, ::testing::ValuesIn(Specs()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name;
                           for (char c : info.param) name += std::isalnum(c) ? c : '_';
                           return name;
                         });

}  // namespace
}  // namespace qtrain::compression::cuda
