// Tests of compression/qsgd.h (and the bit streams of compression/bit_stream.h it uses): the
// hand-computed layouts of both codings, fast == reference, error feedback, sizes, the paper's
// unbiasedness and variance bounds, and one test per malformed-payload kind.
#include "compression/qsgd.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "compression/bit_stream.h"
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

using Coding = QsgdCodec::Coding;

std::unique_ptr<QsgdCodec> MakeCodec(uint32_t levels, uint32_t bucket, Coding coding,
                                     KernelPath path) {
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_QSGD);
  pb::QsgdConfig* q = config.mutable_qsgd();
  q->set_levels(levels);
  q->set_bucket(bucket);
  q->set_coding(coding == Coding::kDense ? pb::QsgdConfig::CODING_DENSE
                                         : pb::QsgdConfig::CODING_ELIAS);
  auto codec = QsgdCodec::Create(config, {path});
  EXPECT_THAT(codec, IsOk());
  return codec.ok() ? std::move(*codec) : nullptr;
}

std::vector<float> Gaussian(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// Gaussian values with the awkward cases mixed in: zeros, -0.0, a whole zero bucket (elements
// [bucket, 2 * bucket) when they exist), tiny and denormal values.
std::vector<float> Awkward(size_t n, uint32_t bucket, uint32_t seed) {
  std::vector<float> v = Gaussian(n, seed);
  for (size_t i = 0; i < n; ++i) {
    if (i % 11 == 3) v[i] = 0.0f;
    if (i % 13 == 5) v[i] = -0.0f;
    if (i % 17 == 7) v[i] *= 1e-30f;
    if (i % 19 == 2) v[i] = 1e-42f;  // denormal
    if (i >= bucket && i < 2 * uint64_t{bucket}) v[i] = (i % 2) ? 0.0f : -0.0f;
  }
  return v;
}

bool SameBits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), 4 * a.size()) == 0);
}

EncodedTensor EncodeOk(const Codec& codec, std::span<const float> x, uint64_t seed) {
  EncodedTensor t;
  Rng rng(seed);
  EXPECT_THAT(codec.Encode(x, {}, rng, &t), IsOk());
  return t;
}

// Overwrites `count` bits at bit offset `pos` (LSB-first) of a payload.
void SetBits(std::vector<uint8_t>* payload, uint64_t pos, int count, uint32_t value) {
  for (int k = 0; k < count; ++k, ++pos) {
    uint8_t& byte = (*payload)[pos / 8];
    const uint8_t bit = static_cast<uint8_t>(1u << (pos % 8));
    byte = ((value >> k) & 1) ? (byte | bit) : (byte & ~bit);
  }
}

// ---- Bit streams --------------------------------------------------------------------------------

TEST(BitStreamTest, GammaRoundTripsAndHasTheClassicLength) {
  const std::vector<uint32_t> values = {
      1, 2, 3, 4, 5, 7, 8, 255, 256, 65535, 65536, 1u << 24, (1u << 31) + 12345, 0xFFFFFFFFu};
  std::vector<uint8_t> buffer(256, 0xAA);  // garbage: the writer must not need a cleared buffer
  BitWriter writer(buffer.data(), buffer.size());
  uint64_t bits = 0;
  for (uint32_t x : values) {
    writer.WriteGamma(x);
    writer.Write(x & 1, 1);
    bits += GammaBits(x) + 1;
    EXPECT_EQ(GammaBits(x), 2 * (31 - std::countl_zero(x)) + 1);
  }
  EXPECT_EQ(writer.bits_written(), bits);
  const size_t bytes = writer.Finish();
  EXPECT_FALSE(writer.overflowed());
  EXPECT_EQ(bytes, (bits + 7) / 8);
  BitReader reader(buffer.data(), bytes);
  for (uint32_t x : values) {
    uint64_t got = 0;
    ASSERT_EQ(reader.ReadGamma(&got), BitReader::GammaResult::kOk);
    EXPECT_EQ(got, x);
    uint32_t bit = 0;
    ASSERT_TRUE(reader.Read(1, &bit));
    EXPECT_EQ(bit, x & 1);
  }
  EXPECT_TRUE(reader.RestIsZero());
}

TEST(BitStreamTest, GammaLayoutIsLsbFirst) {
  // gamma(5): N = 2 -> bits 0,0,1 then the low bits 01 of 5 LSB first: 1,0 -> 0b01100 = 0x0C.
  uint8_t byte = 0xFF;
  BitWriter writer(&byte, 1);
  writer.WriteGamma(5);
  EXPECT_EQ(writer.Finish(), 1u);
  EXPECT_EQ(byte, 0x0C);
}

TEST(BitStreamTest, ReaderRefusesOverrunsAndLongCodes) {
  // 33 zeros then a one: too long. 32 zeros, a one and 32 more bits: fine (value 2^32 + low).
  std::vector<uint8_t> too_long(16, 0);
  too_long[4] = 0x02;  // bit 33
  uint64_t x = 0;
  BitReader r1(too_long.data(), too_long.size());
  EXPECT_EQ(r1.ReadGamma(&x), BitReader::GammaResult::kTooLong);
  std::vector<uint8_t> longest(9, 0);
  longest[4] = 0x01;  // bit 32; then 32 zero bits and a byte of padding
  BitReader r2(longest.data(), longest.size());
  ASSERT_EQ(r2.ReadGamma(&x), BitReader::GammaResult::kOk);
  EXPECT_EQ(x, uint64_t{1} << 32);
  EXPECT_EQ(r2.position(), 65u);
  // All zero: overrun (short stream) or too long (long stream).
  std::vector<uint8_t> zeros(4, 0);
  BitReader r3(zeros.data(), zeros.size());
  EXPECT_EQ(r3.ReadGamma(&x), BitReader::GammaResult::kOverrun);
  std::vector<uint8_t> many_zeros(64, 0);
  BitReader r4(many_zeros.data(), many_zeros.size());
  EXPECT_EQ(r4.ReadGamma(&x), BitReader::GammaResult::kTooLong);
  // The one is present but the low bits run past the end: gamma(4) = 0,0,1,0,0 in 4 bits.
  uint8_t cut = 0x04;
  BitReader r5(&cut, 1);
  ASSERT_TRUE(r5.Skip(4));
  EXPECT_EQ(r5.ReadGamma(&x), BitReader::GammaResult::kOverrun);
  BitReader r6(&cut, 1);
  uint32_t bits = 0;
  ASSERT_TRUE(r6.Skip(6));
  EXPECT_FALSE(r6.Read(3, &bits));
  EXPECT_EQ(r6.position(), 6u);
}

TEST(BitStreamTest, WriterDropsBitsPastItsCapacity) {
  std::vector<uint8_t> buffer(3, 0);
  BitWriter writer(buffer.data(), 2);
  for (int i = 0; i < 5; ++i) writer.Write(0x1F, 5);  // 25 bits into 16
  writer.Finish();
  EXPECT_TRUE(writer.overflowed());
  EXPECT_EQ(buffer[2], 0);
}

// ---- Settings and registry ---------------------------------------------------------------------

TEST(QsgdCodecTest, SpecRoundTripsThroughTheRegistry) {
  CodecRegistry registry;
  ASSERT_THAT(registry.Register(QsgdRegistration()), IsOk());
  ASSERT_OK_AND_ASSIGN(auto codec, registry.CreateFromSpec("qsgd"));
  EXPECT_EQ(codec->Spec(), "qsgd:levels=16,bucket=512,coding=dense");
  EXPECT_FALSE(codec->DefaultErrorFeedback());
  EXPECT_EQ(codec->PayloadBytes({}, 512), 384);
  for (const std::string spec : {"qsgd", "qsgd:levels=1,bucket=1", "qsgd:coding=elias,ef=1",
                                 "qsgd:levels=32767,bucket=16777216,coding=dense,ef=0"}) {
    ASSERT_OK_AND_ASSIGN(pb::CodecConfig config, registry.ParseSpec(spec));
    ASSERT_OK_AND_ASSIGN(auto c, registry.Create(config));
    EXPECT_EQ(c->Config().SerializeAsString(), config.SerializeAsString()) << spec;
    ASSERT_OK_AND_ASSIGN(pb::CodecConfig again, registry.ParseSpec(c->Spec()));
    EXPECT_EQ(again.SerializeAsString(), config.SerializeAsString()) << c->Spec();
  }
}

TEST(QsgdCodecTest, BadSettingsAreInvalidAndNamed) {
  CodecRegistry registry;
  ASSERT_THAT(registry.Register(QsgdRegistration()), IsOk());
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_THAT(registry.ParseSpec("qsgd:levels=0"), StatusIs(kInvalid, HasSubstr("levels")));
  EXPECT_THAT(registry.ParseSpec("qsgd:levels=32768"), StatusIs(kInvalid, HasSubstr("levels")));
  EXPECT_THAT(registry.ParseSpec("qsgd:bucket=0"), StatusIs(kInvalid, HasSubstr("bucket")));
  EXPECT_THAT(registry.ParseSpec("qsgd:bucket=16777217"), StatusIs(kInvalid, HasSubstr("bucket")));
  EXPECT_THAT(registry.ParseSpec("qsgd:coding=huffman"), StatusIs(kInvalid, HasSubstr("coding")));
  EXPECT_THAT(registry.ParseSpec("qsgd:bits=4"), StatusIs(kInvalid, HasSubstr("levels")));
  // Configs from the wire are validated too.
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_QSGD);
  config.mutable_qsgd()->set_levels(0);
  config.mutable_qsgd()->set_bucket(512);
  EXPECT_THAT(registry.Create(config), StatusIs(kInvalid, HasSubstr("levels")));
  config.mutable_qsgd()->set_levels(16);
  config.mutable_qsgd()->set_bucket((1u << 24) + 1);
  EXPECT_THAT(registry.Create(config), StatusIs(kInvalid, HasSubstr("bucket")));
  config.mutable_qsgd()->set_bucket(512);
  config.mutable_qsgd()->set_coding(static_cast<pb::QsgdConfig::Coding>(7));
  EXPECT_THAT(registry.Create(config), StatusIs(kInvalid, HasSubstr("coding")));
  config.mutable_onebit();
  EXPECT_THAT(registry.Create(config), StatusIs(kInvalid, HasSubstr("another codec")));
}

TEST(QsgdCodecTest, CodeBitsAndPayloadSizeFormula) {
  // b = 1 + ceil(log2(s + 1)).
  const std::vector<std::pair<uint32_t, int>> cases = {
      {1, 2},  {2, 3},  {3, 3},  {4, 4},   {7, 4},    {8, 5},     {15, 5},
      {16, 6}, {31, 6}, {32, 7}, {255, 9}, {256, 10}, {32767, 16}};
  for (auto [s, b] : cases) {
    auto codec = MakeCodec(s, 64, Coding::kDense, KernelPath::kAuto);
    EXPECT_EQ(codec->code_bits(), b) << "s=" << s;
    EXPECT_EQ(int(std::ceil(std::log2(s + 1.0))) + 1, b) << "s=" << s;
    for (size_t n : {0, 1, 7, 8, 9, 100, 1001}) {
      const int64_t expected = static_cast<int64_t>((n * b + 7) / 8);
      EXPECT_EQ(codec->PayloadBytes({}, n), expected);
      auto x = Gaussian(n, static_cast<uint32_t>(n + s));
      EncodedTensor t = EncodeOk(*codec, x, 1);
      EXPECT_EQ(static_cast<int64_t>(t.payload.size()), expected) << "s=" << s << " n=" << n;
      EXPECT_EQ(t.scales.size(), (n + 63) / 64);
    }
  }
  EXPECT_EQ(MakeCodec(16, 512, Coding::kElias, KernelPath::kAuto)->PayloadBytes({}, 100), -1);
}

TEST(QsgdCodecTest, DefaultSettingsSendAbout6BitsPerElement) {
  // s=16, d=512: 6 bits of code per element plus one 32-bit norm per 512 elements.
  auto codec = MakeCodec(16, 512, Coding::kDense, KernelPath::kAuto);
  const size_t n = 512 * 100;
  EncodedTensor t = EncodeOk(*codec, Gaussian(n, 2), 3);
  const double bits = 8.0 * t.payload.size() + 32.0 * t.scales.size();
  EXPECT_DOUBLE_EQ(bits / n, 6.0625);
  EXPECT_LE(bits / n, 6.1);
}

// ---- Hand-computed payloads --------------------------------------------------------------------

// s=5 (b = 4), d=4, three buckets. Bucket 0 = {3,-4,0,0} and bucket 1 = {0,0,0,-5} have norm 5,
// so scale = 5/5 = 1 and r = |v| is an integer: floor(r + U) = r whatever the draw. Bucket 2 = {0}
// has norm 0. Codes (level | sign << 3): 3, 4|8=12, 0, 0, 0, 0, 0, 5|8=13, 0.
// Bytes (two codes per byte, the first in the low nibble): C3 00 00 D0 00.
TEST(QsgdCodecTest, DenseHandExample) {
  const std::vector<float> x = {3, -4, 0, 0, 0, 0, 0, -5, 0};
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(5, 4, Coding::kDense, path);
    for (uint64_t seed : {1, 2, 99}) {
      EncodedTensor t = EncodeOk(*codec, x, seed);
      EXPECT_EQ(t.codec, CodecId::kQsgd);
      EXPECT_EQ(t.format_version, 1u);
      EXPECT_EQ(t.num_elements, 9u);
      EXPECT_THAT(t.payload, ElementsAre(0xC3, 0x00, 0x00, 0xD0, 0x00));
      EXPECT_THAT(t.scales, ElementsAre(5.0f, 5.0f, 0.0f));
      EXPECT_THAT(t.params, ElementsAre(5u, 4u));
      std::vector<float> out(9, 0.0f);
      ASSERT_THAT(codec->DecodeAdd(t, std::span<float>(out)), IsOk());
      EXPECT_THAT(out, ElementsAreArray(x));  // unit = 5/5 = 1: exact
    }
  }
}

// The same tensor with Elias coding. gamma(x): N = floor(log2 x) zeros, a one, the N low bits LSB
// first: gamma(1)=1, gamma(2)=010, gamma(3)=011, gamma(4)=00100, gamma(5)=00110 (in stream order).
// Bucket 0: count 2 -> gamma(3); gap 0 -> gamma(1), sign 0, level gamma(3); gap 0 -> gamma(1),
//           sign 1, gamma(4).
// Bucket 1: count 1 -> gamma(2); gap 3 -> gamma(4), sign 1, gamma(5).   Bucket 2: gamma(1).
// Stream: 011 1 0 011 1 1 00100 | 010 00100 1 00110 | 1  (30 bits)
// Bytes LSB first: 01110011 -> 0xCE, 11001000 -> 0x13, 10001001 -> 0x91, 001101(00) -> 0x2C.
TEST(QsgdCodecTest, EliasHandExample) {
  const std::vector<float> x = {3, -4, 0, 0, 0, 0, 0, -5, 0};
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto codec = MakeCodec(5, 4, Coding::kElias, path);
    EncodedTensor t = EncodeOk(*codec, x, 7);
    EXPECT_THAT(t.payload, ElementsAre(0xCE, 0x13, 0x91, 0x2C));
    EXPECT_THAT(t.scales, ElementsAre(5.0f, 5.0f, 0.0f));
    EXPECT_THAT(t.params, ElementsAre(5u, 4u));
    std::vector<float> out(9, 0.0f);
    ASSERT_THAT(codec->DecodeAdd(t, std::span<float>(out)), IsOk());
    EXPECT_THAT(out, ElementsAreArray(x));
  }
}

// s=2 (b = 3), one bucket v = {2,-2,2,-1,1,-1,1,0}: sum of squares 16, norm 4, scale 2/4 = 0.5,
// r = {1,1,1,.5,.5,.5,.5,0}, all exact. floor(1 + U) = 1 always; floor(0.5 + U) = 1 iff U >= 0.5,
// with U = StreamUniform(key, i) and key = the Rng's first stream. unit = 4/2 = 2.
TEST(QsgdCodecTest, DenseHandExampleWithFixedKey) {
  const std::vector<float> x = {2, -2, 2, -1, 1, -1, 1, 0};
  bool saw_zero = false, saw_one = false;
  for (uint64_t seed = 1; seed <= 16; ++seed) {
    const uint32_t key = Rng(seed).NextStream();
    uint32_t levels[8] = {1, 1, 1, 0, 0, 0, 0, 0};
    for (int i = 3; i <= 6; ++i) {
      levels[i] = StreamUniform(key, i) >= 0.5f ? 1 : 0;
      (levels[i] ? saw_one : saw_zero) = true;
    }
    uint32_t stream = 0;  // 24 bits: code i at bits [3i, 3i + 3)
    std::vector<float> expected(8);
    for (int i = 0; i < 8; ++i) {
      const bool negative = x[i] < 0 && levels[i] != 0;
      stream |= (levels[i] | (negative ? 4u : 0u)) << (3 * i);
      expected[i] = (negative ? -2.0f : 2.0f) * levels[i];
    }
    for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
      auto codec = MakeCodec(2, 8, Coding::kDense, path);
      EncodedTensor t = EncodeOk(*codec, x, seed);
      EXPECT_THAT(t.payload, ElementsAre(stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16));
      EXPECT_THAT(t.scales, ElementsAre(4.0f));
      std::vector<float> out(8, 0.0f);
      ASSERT_THAT(codec->DecodeAdd(t, std::span<float>(out)), IsOk());
      EXPECT_THAT(out, ElementsAreArray(expected));
    }
  }
  EXPECT_TRUE(saw_zero && saw_one);  // both roundings were exercised
}

// ---- Fast path == reference --------------------------------------------------------------------

struct Setting {
  uint32_t levels;
  uint32_t bucket;
  Coding coding;
};

// Code widths 2..16, buckets that do and do not keep codes byte-aligned (the b = 6 fast packer
// runs on buckets starting at a multiple of 4 elements), buckets of 1, and buckets longer than the
// Elias encoder's stack buffer (2048) and than the tensor.
const std::vector<Setting>& Settings() {
  static const std::vector<Setting> settings = {
      {16, 512, Coding::kDense},     {16, 512, Coding::kElias},      {1, 7, Coding::kDense},
      {1, 7, Coding::kElias},        {2, 3, Coding::kDense},         {3, 5, Coding::kDense},
      {5, 13, Coding::kElias},       {7, 100, Coding::kDense},       {16, 1, Coding::kDense},
      {16, 8, Coding::kDense},       {16, 37, Coding::kDense},       {17, 100, Coding::kDense},
      {31, 36, Coding::kElias},      {100, 33, Coding::kDense},      {255, 64, Coding::kElias},
      {1000, 29, Coding::kDense},    {16384, 16, Coding::kDense},    {32767, 9, Coding::kDense},
      {32767, 9, Coding::kElias},    {16, 1u << 24, Coding::kDense}, {16, 1u << 24, Coding::kElias},
      {1, 1u << 24, Coding::kElias}, {2, 3000, Coding::kElias}};
  return settings;
}

const std::vector<size_t> kSizes = {0, 1, 7, 8, 9, 15, 16, 17, 31, 100, 511, 512, 513, 1000, 4099};

std::string Name(const Setting& s, size_t n) {
  return absl::StrCat("levels=", s.levels, " bucket=", s.bucket,
                      s.coding == Coding::kDense ? " dense" : " elias", " n=", n);
}

TEST(QsgdCodecTest, FastPathMatchesReferenceBitForBit) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2: both paths are the reference";
  for (const Setting& s : Settings()) {
    auto reference = MakeCodec(s.levels, s.bucket, s.coding, KernelPath::kReference);
    auto fast = MakeCodec(s.levels, s.bucket, s.coding, KernelPath::kAuto);
    ASSERT_TRUE(fast->uses_fast_path());
    ASSERT_FALSE(reference->uses_fast_path());
    for (size_t n : kSizes) {
      SCOPED_TRACE(Name(s, n));
      const auto x = Awkward(n, s.bucket, static_cast<uint32_t>(n * 31 + s.levels));
      for (uint64_t seed : {1, 77}) {
        EncodedTensor a = EncodeOk(*reference, x, seed);
        EncodedTensor b = EncodeOk(*fast, x, seed);
        ASSERT_EQ(a.payload, b.payload);
        ASSERT_TRUE(SameBits(a.scales, b.scales));
        EXPECT_EQ(a.params, b.params);
        // Decode each payload with both paths into the same (awkward) starting values.
        const auto start = Awkward(n, s.bucket, 5);
        std::vector<float> out_ref = start, out_fast = start;
        ASSERT_THAT(reference->DecodeAdd(b, std::span<float>(out_ref)), IsOk());
        ASSERT_THAT(fast->DecodeAdd(a, std::span<float>(out_fast)), IsOk());
        ASSERT_TRUE(SameBits(out_ref, out_fast));
        // Error feedback: the same payload and the same new residual.
        const auto input = Gaussian(n, static_cast<uint32_t>(seed + n));
        std::vector<float> res_ref = Awkward(n, s.bucket, 9), res_fast = res_ref;
        EncodedTensor c, d;
        Rng r1(seed), r2(seed);
        ASSERT_THAT(reference->EncodeWithFeedback(input, std::span<float>(res_ref), {}, r1, &c),
                    IsOk());
        ASSERT_THAT(fast->EncodeWithFeedback(input, std::span<float>(res_fast), {}, r2, &d),
                    IsOk());
        ASSERT_EQ(c.payload, d.payload);
        ASSERT_TRUE(SameBits(c.scales, d.scales));
        ASSERT_TRUE(SameBits(res_ref, res_fast));
      }
    }
  }
}

TEST(QsgdCodecTest, DenseAndEliasDecodeIdentically) {
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    for (const Setting& s : Settings()) {
      if (s.coding != Coding::kDense) continue;
      auto dense = MakeCodec(s.levels, s.bucket, Coding::kDense, path);
      auto elias = MakeCodec(s.levels, s.bucket, Coding::kElias, path);
      for (size_t n : {size_t{0}, size_t{9}, size_t{1000}, size_t{4099}}) {
        SCOPED_TRACE(Name(s, n));
        const auto x = Awkward(n, s.bucket, static_cast<uint32_t>(n + 3));
        EncodedTensor a = EncodeOk(*dense, x, 42);
        EncodedTensor b = EncodeOk(*elias, x, 42);
        ASSERT_TRUE(SameBits(a.scales, b.scales));
        const auto start = Awkward(n, s.bucket, 8);
        std::vector<float> out_a = start, out_b = start;
        ASSERT_THAT(dense->DecodeAdd(a, std::span<float>(out_a)), IsOk());
        ASSERT_THAT(elias->DecodeAdd(b, std::span<float>(out_b)), IsOk());
        ASSERT_TRUE(SameBits(out_a, out_b));
      }
    }
  }
}

// Long zero runs: gaps of thousands (gamma codes past the fast paths' 8- and 12-bit tables and
// windows) and levels up to 32767, in one bucket of 2^24.
TEST(QsgdCodecTest, EliasHandlesLongGapsAndLargeLevels) {
  const size_t n = 40000;
  std::vector<float> x(n, 0.0f);
  x[3] = 1.0f;
  x[9000] = -1.0f;
  x[9001] = 0.5f;
  x[39999] = 2.0f;
  // norm^2 = 1 + 1 + 0.25 + 4 = 6.25: norm 2.5 exactly; r_i = |x_i| * 32767 / 2.5.
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    auto elias = MakeCodec(32767, 1u << 24, Coding::kElias, path);
    auto dense = MakeCodec(32767, 1u << 24, Coding::kDense, path);
    EncodedTensor t = EncodeOk(*elias, x, 3);
    EncodedTensor d = EncodeOk(*dense, x, 3);
    EXPECT_THAT(t.scales, ElementsAre(2.5f));
    std::vector<float> out_elias(n, 0.0f), out_dense(n, 0.0f);
    ASSERT_THAT(elias->DecodeAdd(t, std::span<float>(out_elias)), IsOk());
    ASSERT_THAT(dense->DecodeAdd(d, std::span<float>(out_dense)), IsOk());
    EXPECT_TRUE(SameBits(out_elias, out_dense));
    for (size_t i = 0; i < n; ++i) {
      // Each nonzero lands within one unit (2.5 / 32767) of its value; zeros stay zero.
      EXPECT_NEAR(out_elias[i], x[i], 2.5 / 32767) << "i=" << i;
    }
  }
  auto reference = MakeCodec(32767, 1u << 24, Coding::kElias, KernelPath::kReference);
  auto fast = MakeCodec(32767, 1u << 24, Coding::kElias, KernelPath::kAuto);
  EXPECT_EQ(EncodeOk(*reference, x, 9).payload, EncodeOk(*fast, x, 9).payload);
}

// ---- Error feedback ----------------------------------------------------------------------------

TEST(QsgdCodecTest, FeedbackLeavesExactlyWhatWasNotSent) {
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    for (const Setting& s : Settings()) {
      auto codec = MakeCodec(s.levels, s.bucket, s.coding, path);
      for (size_t n : {size_t{1}, size_t{9}, size_t{513}, size_t{4099}}) {
        SCOPED_TRACE(Name(s, n));
        const auto input = Gaussian(n, static_cast<uint32_t>(n));
        std::vector<float> residual = Awkward(n, s.bucket, 4);
        std::vector<float> v(n);
        for (size_t i = 0; i < n; ++i) v[i] = input[i] + residual[i];
        EncodedTensor fed;
        Rng rng(11);
        ASSERT_THAT(codec->EncodeWithFeedback(input, std::span<float>(residual), {}, rng, &fed),
                    IsOk());
        // The payload is Encode(input + old residual) with the same stream.
        EncodedTensor plain = EncodeOk(*codec, v, 11);
        ASSERT_EQ(fed.payload, plain.payload);
        ASSERT_TRUE(SameBits(fed.scales, plain.scales));
        // residual = v - decoded exactly (decoding into zeros gives decoded exactly).
        std::vector<float> decoded(n, 0.0f);
        ASSERT_THAT(codec->DecodeAdd(fed, std::span<float>(decoded)), IsOk());
        for (size_t i = 0; i < n; ++i) {
          ASSERT_EQ(residual[i], v[i] - decoded[i]) << "i=" << i;
        }
      }
    }
  }
}

TEST(QsgdCodecTest, FeedbackRejectsAResidualOfAnotherSize) {
  auto codec = MakeCodec(16, 512, Coding::kDense, KernelPath::kAuto);
  std::vector<float> input(10, 1.0f), residual(9, 0.0f);
  EncodedTensor t;
  Rng rng(1);
  EXPECT_THAT(codec->EncodeWithFeedback(input, std::span<float>(residual), {}, rng, &t),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("residual")));
}

// ---- Statistics --------------------------------------------------------------------------------

// E[decoded_i] = v_i. Per element Var = unit^2 p(1-p) <= unit^2 / 4 (unit = norm / s), so the mean
// of N independent draws has standard deviation <= unit / (2 sqrt(N)); we allow 5 of those plus
// the deterministic bias of the implementation: U has 24 bits (E[floor(r + U)] - r is within
// 2^-24) and r, unit are rounded floats (relative 2^-23 each), far below 1e-5 * unit.
TEST(QsgdCodecTest, DecodedValuesAreUnbiased) {
  const uint32_t s = 4, d = 256;
  const int kDraws = 4000;
  auto codec = MakeCodec(s, d, Coding::kDense, KernelPath::kAuto);
  const auto v = Gaussian(d, 123);
  std::vector<double> sum(d, 0.0);
  Rng rng(2024);  // each Encode takes a fresh stream
  EncodedTensor t;
  std::vector<float> out(d);
  for (int draw = 0; draw < kDraws; ++draw) {
    ASSERT_THAT(codec->Encode(v, {}, rng, &t), IsOk());
    std::fill(out.begin(), out.end(), 0.0f);
    ASSERT_THAT(codec->DecodeAdd(t, std::span<float>(out)), IsOk());
    for (uint32_t i = 0; i < d; ++i) sum[i] += out[i];
  }
  const double unit = t.scales[0] / s;
  const double bound = 5.0 * unit / (2.0 * std::sqrt(double(kDraws))) + 1e-5 * unit;
  for (uint32_t i = 0; i < d; ++i) {
    EXPECT_NEAR(sum[i] / kDraws, v[i], bound) << "i=" << i;
  }
}

// Lemma 3.1: E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2. The exact expectation for a given v
// is sum_i unit^2 p_i (1 - p_i), p_i = frac(r_i); it must satisfy the bound, and the empirical
// mean over N draws must agree with it within 5 standard errors (from the draws' own spread).
TEST(QsgdCodecTest, VarianceMatchesItsExactValueAndThePaperBound) {
  for (uint32_t s : {1u, 2u, 16u}) {
    const uint32_t d = 512;
    const int kDraws = 1000;
    auto codec = MakeCodec(s, d, Coding::kDense, KernelPath::kAuto);
    const auto v = Gaussian(d, 77 + s);
    double norm2 = 0;
    for (float x : v) norm2 += double(x) * x;
    // The norm as the codec computes it (float), for r_i and unit.
    EncodedTensor t = EncodeOk(*codec, v, 1);
    const float norm = t.scales[0];
    EXPECT_NEAR(norm, std::sqrt(norm2), 1e-5 * std::sqrt(norm2));
    const float scale = static_cast<float>(s) / norm;
    const double unit = norm / static_cast<float>(s);
    double exact = 0;
    for (float x : v) {
      const double r = std::fabs(x) * scale;
      const double p = r - std::floor(r);
      exact += unit * unit * p * (1 - p);
    }
    const double bound = std::min(double(d) / (s * s), std::sqrt(double(d)) / s) * norm2;
    EXPECT_LE(exact, bound) << "s=" << s;

    Rng rng(31);
    double sum = 0, sum_sq = 0;
    std::vector<float> out(d);
    for (int draw = 0; draw < kDraws; ++draw) {
      ASSERT_THAT(codec->Encode(v, {}, rng, &t), IsOk());
      std::fill(out.begin(), out.end(), 0.0f);
      ASSERT_THAT(codec->DecodeAdd(t, std::span<float>(out)), IsOk());
      double err = 0;
      for (uint32_t i = 0; i < d; ++i) err += (double(out[i]) - v[i]) * (double(out[i]) - v[i]);
      sum += err;
      sum_sq += err * err;
    }
    const double mean = sum / kDraws;
    const double sd = std::sqrt(std::max(0.0, sum_sq / kDraws - mean * mean));
    const double margin = 5.0 * sd / std::sqrt(double(kDraws)) + 1e-6 * norm2;
    EXPECT_NEAR(mean, exact, margin) << "s=" << s;
    EXPECT_LE(mean, bound + margin) << "s=" << s;
  }
}

// ---- Special values ----------------------------------------------------------------------------

TEST(QsgdCodecTest, ZeroBucketsEncodeZerosAndDecodingLeavesZeroLevelsAlone) {
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    for (Coding coding : {Coding::kDense, Coding::kElias}) {
      auto codec = MakeCodec(16, 8, coding, path);
      std::vector<float> x(20, 0.0f);
      x[3] = -0.0f;
      x[17] = 2.0f;  // bucket 2 = {0,2,0,0}: norm 2, r = 16 -> level 16 exactly
      EncodedTensor t = EncodeOk(*codec, x, 5);
      EXPECT_THAT(t.scales, ElementsAre(0.0f, 0.0f, 2.0f));
      std::vector<float> out(20, -0.0f);
      ASSERT_THAT(codec->DecodeAdd(t, std::span<float>(out)), IsOk());
      for (size_t i = 0; i < 20; ++i) {
        if (i == 17) {
          EXPECT_EQ(out[i], 2.0f);
        } else {
          EXPECT_TRUE(std::signbit(out[i])) << "element " << i << " was touched";
        }
      }
    }
  }
}

TEST(QsgdCodecTest, NonFiniteNormIsInvalidAndNamesTheBucket) {
  const float kNan = std::numeric_limits<float>::quiet_NaN();
  const float kInf = std::numeric_limits<float>::infinity();
  for (KernelPath path : {KernelPath::kReference, KernelPath::kAuto}) {
    for (Coding coding : {Coding::kDense, Coding::kElias}) {
      auto codec = MakeCodec(16, 8, coding, path);
      for (float bad : {kNan, kInf, -kInf, 1e20f /* square overflows */}) {
        std::vector<float> x = Gaussian(40, 1);
        x[21] = bad;  // bucket 2
        EncodedTensor t;
        Rng rng(1);
        EXPECT_THAT(codec->Encode(x, {}, rng, &t),
                    StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bucket 2")));
        // Feedback: buckets 0 and 1 are updated, bucket 2 on are unchanged.
        std::vector<float> input(40, 0.5f), residual = x;
        Rng rng2(1);
        EXPECT_THAT(codec->EncodeWithFeedback(input, std::span<float>(residual), {}, rng2, &t),
                    StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bucket 2")));
        EXPECT_TRUE(SameBits(std::span<const float>(residual).subspan(16),
                             std::span<const float>(x).subspan(16)));
      }
    }
  }
}

TEST(QsgdCodecTest, ShapeMustMatch) {
  auto codec = MakeCodec(16, 512, Coding::kDense, KernelPath::kAuto);
  std::vector<float> x(8, 1.0f);
  const std::vector<int64_t> good = {2, 4}, bad = {3, 3};
  EncodedTensor t;
  Rng rng(1);
  EXPECT_THAT(codec->Encode(x, good, rng, &t), IsOk());
  EXPECT_THAT(t.shape, ElementsAre(2, 4));
  EXPECT_THAT(codec->Encode(x, bad, rng, &t), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(QsgdCodecTest, EncodeReusesTheOutputBuffers) {
  for (Coding coding : {Coding::kDense, Coding::kElias}) {
    auto codec = MakeCodec(16, 512, coding, KernelPath::kAuto);
    const auto x = Gaussian(5000, 3);
    EncodedTensor t;
    Rng rng(1);
    ASSERT_THAT(codec->Encode(x, {}, rng, &t), IsOk());
    const uint8_t* payload = t.payload.data();
    const float* scales = t.scales.data();
    ASSERT_THAT(codec->Encode(x, {}, rng, &t), IsOk());
    EXPECT_EQ(t.payload.data(), payload);
    EXPECT_EQ(t.scales.data(), scales);
  }
}

// ---- Malformed payloads ------------------------------------------------------------------------

class MalformedTest : public ::testing::TestWithParam<KernelPath> {
 protected:
  // Expects INVALID_ARGUMENT whose message contains `what`, with `out` left bit-for-bit unchanged.
  void ExpectRejected(const Codec& codec, const EncodedTensor& t, const std::string& what) {
    std::vector<float> out = Gaussian(t.num_elements, 99);
    const std::vector<float> before = out;
    EXPECT_THAT(codec.DecodeAdd(t, std::span<float>(out)),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(what)));
    EXPECT_TRUE(SameBits(out, before)) << "out was modified";
  }
  // Nonzero Gaussian input: every bucket has a nonzero norm.
  EncodedTensor Valid(const Codec& codec, size_t n) { return EncodeOk(codec, Gaussian(n, 8), 4); }
};

TEST_P(MalformedTest, WrongCodecId) {
  auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
  EncodedTensor t = Valid(*codec, 20);
  t.codec = CodecId::kTernGrad;
  ExpectRejected(*codec, t, "codec");
}

TEST_P(MalformedTest, WrongVersion) {
  auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
  EncodedTensor t = Valid(*codec, 20);
  t.format_version = 2;
  ExpectRejected(*codec, t, "version");
  t.format_version = 0;
  ExpectRejected(*codec, t, "version");
}

TEST_P(MalformedTest, ElementCountOrShapeMismatch) {
  auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
  EncodedTensor t = Valid(*codec, 20);
  std::vector<float> out(21, 1.0f);
  EXPECT_THAT(codec->DecodeAdd(t, std::span<float>(out)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(out, ::testing::Each(1.0f));
  t.shape = {3, 7};
  ExpectRejected(*codec, t, "shape");
}

TEST_P(MalformedTest, DenseTruncated) {
  auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
  EncodedTensor t = Valid(*codec, 20);  // 120 bits = 15 bytes
  t.payload.pop_back();
  ExpectRejected(*codec, t, "payload is 14 bytes, expected 15 for 20 elements");
  t.payload.clear();
  ExpectRejected(*codec, t, "expected 15");
}

TEST_P(MalformedTest, DenseTooLong) {
  auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
  EncodedTensor t = Valid(*codec, 20);
  t.payload.push_back(0);
  ExpectRejected(*codec, t, "payload is 16 bytes, expected 15");
}

TEST_P(MalformedTest, WrongNumberOfNorms) {
  for (Coding coding : {Coding::kDense, Coding::kElias}) {
    auto codec = MakeCodec(16, 8, coding, GetParam());
    EncodedTensor t = Valid(*codec, 20);  // 3 buckets
    t.scales.push_back(1.0f);
    ExpectRejected(*codec, t, "4 bucket norms, expected 3");
    t.scales.resize(2);
    ExpectRejected(*codec, t, "2 bucket norms, expected 3");
  }
}

TEST_P(MalformedTest, BadNormValues) {
  for (float norm : {std::numeric_limits<float>::quiet_NaN(),
                     std::numeric_limits<float>::infinity(), -1.0f, -0.0f}) {
    auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
    EncodedTensor t = Valid(*codec, 20);
    t.scales[1] = norm;
    ExpectRejected(*codec, t, "norm of bucket 1");
  }
}

TEST_P(MalformedTest, ParamsMismatch) {
  for (Coding coding : {Coding::kDense, Coding::kElias}) {
    auto codec = MakeCodec(16, 8, coding, GetParam());
    EncodedTensor t = Valid(*codec, 20);
    t.params = {8, 8};
    ExpectRejected(*codec, t, "params are [8,8]");
    t.params = {16, 16};
    ExpectRejected(*codec, t, "params");
    t.params = {16};
    ExpectRejected(*codec, t, "params");
    t.params = {16, 8, 0};
    ExpectRejected(*codec, t, "params");
  }
}

TEST_P(MalformedTest, DenseLevelOverS) {
  // s = 16, b = 6: the 5-bit level field can hold 17..31, all invalid.
  auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
  for (uint32_t element : {0u, 5u, 13u, 19u}) {
    EncodedTensor t = Valid(*codec, 20);
    SetBits(&t.payload, element * 6, 6, 17);
    ExpectRejected(*codec, t, absl::StrCat("element ", element, " has level 17, over levels=16"));
    SetBits(&t.payload, element * 6, 6, 31 | 32);
    ExpectRejected(*codec, t, "has level 31");
  }
}

TEST_P(MalformedTest, DenseNegativeZero) {
  auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
  EncodedTensor t = Valid(*codec, 20);
  SetBits(&t.payload, 9 * 6, 6, 32);  // sign 1, level 0
  ExpectRejected(*codec, t, "element 9 has the sign bit set with level 0");
}

TEST_P(MalformedTest, DenseNonzeroLevelInZeroNormBucket) {
  auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
  EncodedTensor t = Valid(*codec, 20);
  t.scales[1] = 0.0f;  // bucket 1 holds nonzero levels
  ExpectRejected(*codec, t, "whose norm is 0");
}

TEST_P(MalformedTest, DenseNonzeroPadding) {
  auto codec = MakeCodec(16, 8, Coding::kDense, GetParam());
  EncodedTensor t = Valid(*codec, 21);  // 126 bits in 16 bytes: 2 bits of padding
  SetBits(&t.payload, 127, 1, 1);
  ExpectRejected(*codec, t, "padding");
}

// Elias streams built by hand: gamma(count + 1), then (gamma(gap + 1), sign, gamma(level))...
class EliasStream {
 public:
  EliasStream() : buffer_(1024, 0), writer_(buffer_.data(), buffer_.size()) {}
  EliasStream& Gamma(uint32_t x) {
    writer_.WriteGamma(x);
    return *this;
  }
  EliasStream& Bits(uint32_t bits, int count) {
    writer_.Write(bits, count);
    return *this;
  }
  std::vector<uint8_t> Finish() {
    buffer_.resize(writer_.Finish());
    return buffer_;
  }

 private:
  std::vector<uint8_t> buffer_;
  BitWriter writer_;
};

// Two buckets of 4 elements with norms 1 and 2, s = 16, and the valid stream
// bucket 0: {0, -3, 0, 0}, bucket 1: {16, 0, 0, 1}.
EncodedTensor EliasTensor(std::vector<uint8_t> payload) {
  EncodedTensor t;
  t.codec = CodecId::kQsgd;
  t.format_version = 1;
  t.num_elements = 8;
  t.scales = {1.0f, 2.0f};
  t.params = {16, 4};
  t.payload = std::move(payload);
  return t;
}

EliasStream ValidEliasPrefix() {
  EliasStream s;
  s.Gamma(2).Gamma(2).Bits(1, 1).Gamma(3);                       // bucket 0
  s.Gamma(3).Gamma(1).Bits(0, 1).Gamma(16).Gamma(3).Bits(0, 1);  // bucket 1, up to the last level
  return s;
}

TEST_P(MalformedTest, EliasHandBuiltStreamIsValid) {
  auto codec = MakeCodec(16, 4, Coding::kElias, GetParam());
  EncodedTensor t = EliasTensor(ValidEliasPrefix().Gamma(1).Finish());
  std::vector<float> out(8, 0.0f);
  ASSERT_THAT(codec->DecodeAdd(t, std::span<float>(out)), IsOk());
  // unit = norm / 16.
  EXPECT_THAT(out, ElementsAre(0.0f, -3.0f / 16, 0.0f, 0.0f, 2.0f, 0.0f, 0.0f, 2.0f / 16));
}

TEST_P(MalformedTest, EliasGammaOverrun) {
  auto codec = MakeCodec(16, 4, Coding::kElias, GetParam());
  // The last level's gamma code is cut: the stream ends inside it.
  std::vector<uint8_t> payload = ValidEliasPrefix().Finish();
  ExpectRejected(*codec, EliasTensor(payload), "ends inside the gamma code of a level");
  // An empty payload ends inside the first count.
  ExpectRejected(*codec, EliasTensor({}), "ends inside the gamma code of the nonzero count");
  // A stream ending right before a sign bit: gamma(2) gamma(4) is exactly one byte.
  EliasStream s;
  s.Gamma(2).Gamma(4);
  std::vector<uint8_t> cut = s.Finish();
  ASSERT_EQ(cut.size(), 1u);
  ExpectRejected(*codec, EliasTensor(cut), "ends inside a sign bit");
}

TEST_P(MalformedTest, EliasGammaTooLong) {
  auto codec = MakeCodec(16, 4, Coding::kElias, GetParam());
  EliasStream s;
  s.Gamma(2).Bits(0, 32).Bits(0, 1).Bits(1, 1).Bits(0, 32).Bits(0, 1);  // 33 leading zeros
  ExpectRejected(*codec, EliasTensor(s.Finish()), "more than 32 leading zeros");
}

TEST_P(MalformedTest, EliasPositionPastBucketEnd) {
  auto codec = MakeCodec(16, 4, Coding::kElias, GetParam());
  EliasStream s;
  s.Gamma(2).Gamma(5).Bits(0, 1).Gamma(1);  // one nonzero at position 4 of a 4-element bucket
  s.Gamma(1);
  ExpectRejected(*codec, EliasTensor(s.Finish()), "at position 4, past the bucket's 4 elements");
  EliasStream t;  // second nonzero lands past the end after a valid first
  t.Gamma(3).Gamma(3).Bits(0, 1).Gamma(1).Gamma(2).Bits(0, 1).Gamma(1).Gamma(1);
  ExpectRejected(*codec, EliasTensor(t.Finish()), "at position 4");
}

TEST_P(MalformedTest, EliasLevelOverS) {
  auto codec = MakeCodec(16, 4, Coding::kElias, GetParam());
  EliasStream s;
  s.Gamma(2).Gamma(1).Bits(0, 1).Gamma(17).Gamma(1);
  ExpectRejected(*codec, EliasTensor(s.Finish()), "element 0 has level 17, over levels=16");
}

TEST_P(MalformedTest, EliasCountOverBucketLength) {
  auto codec = MakeCodec(16, 4, Coding::kElias, GetParam());
  EliasStream s;
  s.Gamma(6);  // 5 nonzeros in a bucket of 4
  for (int i = 0; i < 5; ++i) s.Gamma(1).Bits(0, 1).Gamma(1);
  s.Gamma(1);
  ExpectRejected(*codec, EliasTensor(s.Finish()), "declares 5 nonzero levels, more than its 4");
  // A huge count (near 2^33) is refused before any loop runs.
  EliasStream big;
  big.Bits(0, 32).Bits(1, 1).Bits(0xFFFFFFFF, 32);
  ExpectRejected(*codec, EliasTensor(big.Finish()), "more than its 4");
}

TEST_P(MalformedTest, EliasCountMismatch) {
  auto codec = MakeCodec(16, 4, Coding::kElias, GetParam());
  // Bucket 0 declares 2 nonzeros but holds 1: the next bucket's count is read as a gap and
  // the stream runs out.
  EliasStream fewer;
  fewer.Gamma(3).Gamma(2).Bits(1, 1).Gamma(3);
  fewer.Gamma(1);  // bucket 1: no nonzeros
  ExpectRejected(*codec, EliasTensor(fewer.Finish()), "qsgd elias");
  // Bucket 1 declares 1 nonzero but holds 2: the extra entry is left over after the last bucket.
  EliasStream more;
  more.Gamma(1);
  more.Gamma(2).Gamma(1).Bits(0, 1).Gamma(5).Gamma(1).Bits(0, 1).Gamma(5);
  ExpectRejected(*codec, EliasTensor(more.Finish()), "stream ends after");
  // A zero-norm bucket that declares nonzeros.
  EncodedTensor t = EliasTensor(ValidEliasPrefix().Gamma(1).Finish());
  t.scales[0] = 0.0f;
  ExpectRejected(*codec, t, "but its norm is 0");
}

TEST_P(MalformedTest, EliasTrailingBytes) {
  auto codec = MakeCodec(16, 4, Coding::kElias, GetParam());
  std::vector<uint8_t> payload = ValidEliasPrefix().Gamma(1).Finish();
  payload.push_back(0);
  ExpectRejected(*codec, EliasTensor(payload), "stream ends after");
}

TEST_P(MalformedTest, EliasNonzeroPaddingBits) {
  auto codec = MakeCodec(16, 4, Coding::kElias, GetParam());
  EliasStream s = ValidEliasPrefix();
  s.Gamma(1);
  std::vector<uint8_t> payload = s.Finish();
  EncodedTensor valid = EliasTensor(payload);
  std::vector<float> out(8, 0.0f);
  ASSERT_THAT(codec->DecodeAdd(valid, std::span<float>(out)), IsOk());
  // The stream is (3+3+1+3) + (3+1+1+9+3+1) + 1 = 29 bits: bits 29..31 are padding.
  SetBits(&payload, 31, 1, 1);
  ExpectRejected(*codec, EliasTensor(payload), "padding");
}

TEST_P(MalformedTest, EliasRandomCorruptionNeverHalfApplies) {
  // Every single-bit flip of a real stream is either still valid or rejected with `out` intact.
  auto codec = MakeCodec(4, 16, Coding::kElias, GetParam());
  EncodedTensor t = Valid(*codec, 40);
  for (size_t bit = 0; bit < 8 * t.payload.size(); ++bit) {
    EncodedTensor bad = t;
    bad.payload[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    std::vector<float> out = Gaussian(40, 99);
    const std::vector<float> before = out;
    if (!codec->DecodeAdd(bad, std::span<float>(out)).ok()) {
      ASSERT_TRUE(SameBits(out, before)) << "bit " << bit;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(BothPaths, MalformedTest,
                         ::testing::Values(KernelPath::kReference, KernelPath::kAuto),
                         [](const ::testing::TestParamInfo<KernelPath>& info) {
                           return info.param == KernelPath::kReference ? "Reference" : "Fast";
                         });

}  // namespace
}  // namespace qtrain::compression
