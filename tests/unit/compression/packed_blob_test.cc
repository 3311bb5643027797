// Tests of compression/packed_blob.h: the layout formula, a round trip through PackBlob and
// UnpackBlob for every codec (and the CPU decoder's acceptance of the result), and one test per
// kind of malformed blob (each must be INVALID_ARGUMENT naming the field).
#include "compression/packed_blob.h"

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::compression {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

std::vector<float> Gaussian(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

void Put32(std::vector<uint8_t>* blob, size_t offset, uint32_t v) {
  for (int k = 0; k < 4; ++k) (*blob)[offset + k] = static_cast<uint8_t>(v >> (8 * k));
}
void Put64(std::vector<uint8_t>* blob, size_t offset, uint64_t v) {
  for (int k = 0; k < 8; ++k) (*blob)[offset + k] = static_cast<uint8_t>(v >> (8 * k));
}

TEST(PackedBlobTest, LayoutFormula) {
  BlobLayout l = ComputeLayout(0, 0, 0);
  EXPECT_EQ(l.scales_offset, 32u);
  EXPECT_EQ(l.params_offset, 32u);
  EXPECT_EQ(l.payload_offset, 32u);
  EXPECT_EQ(l.total_bytes, 32u);
  l = ComputeLayout(1, 1, 5);  // threshold-like: 32 + 4 + 4 = 40 -> 48; 48 + 5 = 53 -> 64
  EXPECT_EQ(l.params_offset, 36u);
  EXPECT_EQ(l.payload_offset, 48u);
  EXPECT_EQ(l.total_bytes, 64u);
  l = ComputeLayout(3, 0, 16);  // 44 -> 48; 64
  EXPECT_EQ(l.payload_offset, 48u);
  EXPECT_EQ(l.total_bytes, 64u);
  l = ComputeLayout(0xffffffffu, 0xffffffffu, kMaxBlobPayloadBytes);  // no overflow
  EXPECT_EQ(l.params_offset, 32u + 4 * uint64_t{0xffffffffu});
  EXPECT_EQ(l.total_bytes % 16, 0u);
  EXPECT_GT(l.total_bytes, kMaxBlobPayloadBytes);
}

TEST(PackedBlobTest, HeaderBytesAreLittleEndian) {
  EncodedTensor t;
  t.codec = CodecId::kQsgd;
  t.format_version = 1;
  t.num_elements = 3;
  t.scales = {1.5f};
  t.params = {16, 512};
  t.payload = {0xab, 0xcd, 0xef};
  std::vector<uint8_t> blob;
  ASSERT_THAT(PackBlob(t, &blob), IsOk());
  ASSERT_EQ(blob.size(), 64u);  // 32 + 4 + 8 = 44 -> 48; 51 -> 64
  const std::vector<uint8_t> header = {'Q', 'T', 'B', 'L', 5, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0,
                                       2,   0,   0,   0,   0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(std::vector<uint8_t>(blob.begin(), blob.begin() + 32), header);
  float scale;
  std::memcpy(&scale, blob.data() + 32, 4);
  EXPECT_EQ(scale, 1.5f);
  EXPECT_EQ(blob[36], 16);
  EXPECT_EQ(blob[40], 0);
  EXPECT_EQ(blob[41], 2);  // 512 = 0x200
  for (size_t k = 44; k < 48; ++k) EXPECT_EQ(blob[k], 0) << k;
  EXPECT_EQ(blob[48], 0xab);
  EXPECT_EQ(blob[50], 0xef);
  for (size_t k = 51; k < 64; ++k) EXPECT_EQ(blob[k], 0) << k;
}

class PackedBlobCodecTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_THAT(RegisterBuiltinCodecs(&registry_), IsOk());
    ASSERT_OK_AND_ASSIGN(codec_, registry_.CreateFromSpec(GetParam()));
  }
  CodecRegistry registry_;
  std::unique_ptr<Codec> codec_;
};

TEST_P(PackedBlobCodecTest, RoundTripDecodesLikeTheOriginal) {
  for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{1000}, size_t{4099}}) {
    const std::vector<int64_t> shape =
        n == 1000 ? std::vector<int64_t>{4, 250} : std::vector<int64_t>{};
    auto x = Gaussian(n, 3 + n);
    EncodedTensor t;
    Rng rng(9);
    ASSERT_THAT(codec_->Encode(x, shape, rng, &t), IsOk());
    std::vector<uint8_t> blob;
    ASSERT_THAT(PackBlob(t, &blob), IsOk());
    EXPECT_EQ(blob.size() % 16, 0u);
    EXPECT_EQ(blob.size(),
              ComputeLayout(t.scales.size(), t.params.size(), t.payload.size()).total_bytes);
    ASSERT_OK_AND_ASSIGN(EncodedTensor back, UnpackBlob(blob, n, shape));
    EXPECT_EQ(back.codec, t.codec);
    EXPECT_EQ(back.format_version, t.format_version);
    EXPECT_EQ(back.num_elements, n);
    EXPECT_EQ(back.shape, t.shape);
    ASSERT_EQ(back.scales.size(), t.scales.size());
    EXPECT_EQ(0, std::memcmp(back.scales.data(), t.scales.data(), 4 * t.scales.size()));
    EXPECT_EQ(back.params, t.params);
    EXPECT_EQ(back.payload, t.payload);
    std::vector<float> a(n, 0.5f), b(n, 0.5f);
    ASSERT_THAT(codec_->DecodeAdd(t, std::span<float>(a)), IsOk());
    ASSERT_THAT(codec_->DecodeAdd(back, std::span<float>(b)), IsOk());
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), 4 * n)) << "n=" << n;
  }
}

// Every truncation of a valid blob is rejected (the size must be exactly the layout's).
TEST_P(PackedBlobCodecTest, EveryTruncationIsRejected) {
  auto x = Gaussian(100, 4);
  EncodedTensor t;
  Rng rng(1);
  ASSERT_THAT(codec_->Encode(x, {}, rng, &t), IsOk());
  std::vector<uint8_t> blob;
  ASSERT_THAT(PackBlob(t, &blob), IsOk());
  for (size_t size = 0; size < blob.size(); ++size) {
    EXPECT_THAT(UnpackBlob(std::span<const uint8_t>(blob.data(), size), 100, {}),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << "size " << size;
  }
  std::vector<uint8_t> longer = blob;
  longer.resize(blob.size() + 16, 0);
  EXPECT_THAT(UnpackBlob(longer, 100, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("implies")));
}

INSTANTIATE_TEST_SUITE_P(AllCodecs, PackedBlobCodecTest,
                         ::testing::Values("fp32", "fp16", "onebit", "threshold", "qsgd",
                                           "qsgd:coding=elias", "terngrad"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name;
                           for (char c : info.param) name += std::isalnum(c) ? c : '_';
                           return name;
                         });

// A valid blob to corrupt: threshold with 1 scale, 1 param and a 5-byte payload (64 bytes).
std::vector<uint8_t> GoodBlob() {
  EncodedTensor t;
  t.codec = CodecId::kThreshold;
  t.format_version = 1;
  t.scales = {0.5f};
  t.params = {3};
  t.payload = {0, 2, 5, 1, 7};
  std::vector<uint8_t> blob;
  EXPECT_THAT(PackBlob(t, &blob), IsOk());
  return blob;
}

TEST(PackedBlobTest, GoodBlobIsAccepted) { EXPECT_THAT(UnpackBlob(GoodBlob(), 10, {}), IsOk()); }

TEST(PackedBlobTest, ShortHeader) {
  std::vector<uint8_t> blob = GoodBlob();
  blob.resize(31);
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("header")));
  EXPECT_THAT(UnpackBlob({}, 10, {}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(PackedBlobTest, BadMagic) {
  std::vector<uint8_t> blob = GoodBlob();
  blob[3] = 'X';
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("magic")));
}

TEST(PackedBlobTest, UnknownCodec) {
  for (uint32_t id : {0u, 7u, 0xffffffffu}) {
    std::vector<uint8_t> blob = GoodBlob();
    Put32(&blob, 4, id);
    EXPECT_THAT(UnpackBlob(blob, 10, {}),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("codec id")))
        << id;
  }
}

TEST(PackedBlobTest, ReservedField) {
  std::vector<uint8_t> blob = GoodBlob();
  Put32(&blob, 20, 2);
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("reserved")));
  Put32(&blob, 20, kBlobReservedNonFinite);
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("non-finite")));
}

TEST(PackedBlobTest, CountsBoundedByTheBlob) {
  std::vector<uint8_t> blob = GoodBlob();  // 64 bytes: 32 past the header
  Put32(&blob, 12, 9);                     // 36 bytes of scales
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_scales")));
  Put32(&blob, 12, 0xffffffffu);
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_scales")));
  blob = GoodBlob();
  Put32(&blob, 16, 8);  // 4 + 32 > 32
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_params")));
  Put32(&blob, 16, 0xffffffffu);
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_params")));
  blob = GoodBlob();
  Put64(&blob, 24, 65);
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("payload_bytes")));
  Put64(&blob, 24, ~uint64_t{0});
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("payload_bytes")));
}

TEST(PackedBlobTest, CountsThatDisagreeWithTheSize) {
  std::vector<uint8_t> blob = GoodBlob();
  Put64(&blob, 24, 20);  // 48 + 20 -> 80 != 64
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("implies")));
  blob = GoodBlob();
  Put32(&blob, 12, 4);  // 32 + 16 + 4 -> 64; payload at 64: total 80
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("implies")));
}

TEST(PackedBlobTest, NonZeroPadding) {
  std::vector<uint8_t> blob = GoodBlob();
  blob[44] = 1;  // between the params (ending at 40) and the payload (at 48)
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("before the payload")));
  blob = GoodBlob();
  blob[63] = 0x80;  // after the payload (ending at 53)
  EXPECT_THAT(UnpackBlob(blob, 10, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("after the payload")));
}

TEST(PackedBlobTest, VersionAndElementCountAreTheDecodersToCheck) {
  std::vector<uint8_t> blob = GoodBlob();
  Put32(&blob, 8, 7);
  ASSERT_OK_AND_ASSIGN(EncodedTensor t, UnpackBlob(blob, 10, {}));
  EXPECT_EQ(t.format_version, 7u);
  CodecRegistry registry;
  ASSERT_THAT(RegisterBuiltinCodecs(&registry), IsOk());
  ASSERT_OK_AND_ASSIGN(auto codec, registry.CreateFromSpec("threshold"));
  std::vector<float> out(10, 0.0f);
  EXPECT_THAT(codec->DecodeAdd(t, std::span<float>(out)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("version")));
}

// Random corruption: UnpackBlob either rejects with INVALID_ARGUMENT or returns a tensor that the
// CPU decoder then judges; nothing crashes.
TEST(PackedBlobTest, RandomCorruptionNeverCrashes) {
  CodecRegistry registry;
  ASSERT_THAT(RegisterBuiltinCodecs(&registry), IsOk());
  ASSERT_OK_AND_ASSIGN(auto codec, registry.CreateFromSpec("onebit"));
  auto x = Gaussian(300, 8);
  EncodedTensor t;
  Rng rng(1);
  ASSERT_THAT(codec->Encode(x, {}, rng, &t), IsOk());
  std::vector<uint8_t> good;
  ASSERT_THAT(PackBlob(t, &good), IsOk());
  std::mt19937 gen(5);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<uint8_t> blob = good;
    for (int f = 0; f < 1 + trial % 3; ++f) blob[gen() % blob.size()] ^= uint8_t(1u << (gen() % 8));
    auto back = UnpackBlob(blob, 300, {});
    if (!back.ok()) {
      EXPECT_EQ(back.status().code(), absl::StatusCode::kInvalidArgument);
      continue;
    }
    std::vector<float> out(300, 0.25f);
    absl::Status s = codec->DecodeAdd(*back, std::span<float>(out));
    if (!s.ok()) {
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

}  // namespace
}  // namespace qtrain::compression
