#include "compression/fp16.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace qtrain::compression {
namespace {

using ::qtrain::testing::IsOk;

TEST(Fp16Test, KnownConversions) {
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(1e6f), 0x7bff);       // saturates
  EXPECT_EQ(FloatToHalf(-INFINITY), 0xfbff);  // saturates
  EXPECT_EQ(FloatToHalf(0x1p-24f), 0x0001);   // smallest subnormal
  EXPECT_EQ(FloatToHalf(0x1p-25f), 0x0000);   // tie rounds to even (zero)
  EXPECT_EQ(FloatToHalf(0x1.8p-25f), 0x0001);
  EXPECT_EQ(FloatToHalf(1.0f + 0x1p-11f), 0x3c00);  // tie to even
  EXPECT_EQ(FloatToHalf(1.0f + 0x3p-11f), 0x3c02);  // tie to even (up)
  EXPECT_EQ(FloatToHalf(std::nanf("")) & 0x7e00, 0x7e00);
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0x0001), 0x1p-24f);
  EXPECT_EQ(HalfToFloat(0x7c00), INFINITY);
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7e00)));
}

TEST(Fp16Test, EveryHalfRoundTripsExactly) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f) || std::isinf(f)) continue;
    EXPECT_EQ(FloatToHalf(f), h) << std::hex << h;
  }
}

// The F16C path and the scalar reference agree on every float of a dense sweep of bit patterns
// (every 97th of all 2^32), NaN and saturation included.
TEST(Fp16Test, FastPathMatchesReferenceOnBitPatternSweep) {
  if (!CpuHasAvx2()) GTEST_SKIP() << "no AVX2/F16C";
  std::vector<float> x;
  for (uint64_t b = 0; b < (uint64_t{1} << 32); b += 97) x.push_back(std::bit_cast<float>(uint32_t(b)));
  Fp16Codec fast(CodecOptions{KernelPath::kAuto}), ref(CodecOptions{KernelPath::kReference});
  EncodedTensor a, c;
  Rng rng(1);
  ASSERT_THAT(fast.Encode(x, {}, rng, &a), IsOk());
  ASSERT_THAT(ref.Encode(x, {}, rng, &c), IsOk());
  ASSERT_EQ(a.payload.size(), c.payload.size());
  size_t mismatches = 0;
  for (size_t i = 0; i < a.payload.size(); i += 2) {
    if (std::memcmp(&a.payload[i], &c.payload[i], 2) != 0 && ++mismatches < 5) {
      ADD_FAILURE() << "float bits " << std::hex << std::bit_cast<uint32_t>(x[i / 2]);
    }
  }
  EXPECT_EQ(mismatches, 0u);
}

}  // namespace
}  // namespace qtrain::compression
