#include "worker/data/augment.h"

#include <climits>
#include <random>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/data/test_util.h"

namespace qtrain::data {
namespace {

using test_util::PatternBytes;
using ::testing::ElementsAre;

constexpr int kC = 3;
constexpr int kH = 5;
constexpr int kW = 7;
constexpr int kSize = kC * kH * kW;

std::vector<uint8_t> Apply(const ImageTransform& t, const std::vector<uint8_t>& src) {
  std::vector<uint8_t> dst(src.size(), 0xcd);
  ApplyTransform(t, kC, kH, kW, src, dst);
  return dst;
}

TEST(AugmentTest, IdentityTransformCopies) {
  const std::vector<uint8_t> img = PatternBytes(kSize);
  EXPECT_EQ(Apply(ImageTransform{}, img), img);
}

TEST(AugmentTest, FlipTwiceIsIdentity) {
  const std::vector<uint8_t> img = PatternBytes(kSize);
  const ImageTransform flip{.flip = true};
  const std::vector<uint8_t> once = Apply(flip, img);
  EXPECT_NE(once, img);
  EXPECT_EQ(Apply(flip, once), img);
}

TEST(AugmentTest, FlipMirrorsEachRow) {
  const std::vector<uint8_t> img = PatternBytes(kSize);
  const std::vector<uint8_t> out = Apply(ImageTransform{.flip = true}, img);
  for (int c = 0; c < kC; ++c) {
    for (int y = 0; y < kH; ++y) {
      for (int x = 0; x < kW; ++x) {
        EXPECT_EQ(out[(c * kH + y) * kW + x], img[(c * kH + y) * kW + (kW - 1 - x)]);
      }
    }
  }
}

TEST(AugmentTest, ShiftMovesPixelsAndFillsZeros) {
  // 1 channel, 3x3: out(y, x) = in(y + 1, x - 1).
  const std::vector<uint8_t> img = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::vector<uint8_t> out(9);
  ApplyTransform(ImageTransform{.shift_y = 1, .shift_x = -1}, 1, 3, 3, img, out);
  EXPECT_THAT(out, ElementsAre(0, 4, 5, 0, 7, 8, 0, 0, 0));
  // Crop then flip: out(y, x) = cropped(y, 2 - x).
  ApplyTransform(ImageTransform{.shift_y = 1, .shift_x = -1, .flip = true}, 1, 3, 3, img, out,
                 /*fill=*/255);
  EXPECT_THAT(out, ElementsAre(5, 4, 255, 8, 7, 255, 255, 255, 255));
}

TEST(AugmentTest, ShiftBeyondImageIsAllFill) {
  const std::vector<uint8_t> img = PatternBytes(kSize);
  EXPECT_EQ(Apply(ImageTransform{.shift_x = kW}, img), std::vector<uint8_t>(kSize, 0));
  EXPECT_EQ(Apply(ImageTransform{.shift_y = -kH}, img), std::vector<uint8_t>(kSize, 0));
  EXPECT_EQ(Apply(ImageTransform{.shift_y = INT_MAX, .shift_x = INT_MIN}, img),
            std::vector<uint8_t>(kSize, 0));
}

TEST(AugmentTest, FloatVersionMatchesByteVersion) {
  const std::vector<uint8_t> img = PatternBytes(kSize);
  const std::vector<float> fimg(img.begin(), img.end());
  const ImageTransform t{.shift_y = -2, .shift_x = 3, .flip = true};
  const std::vector<uint8_t> bytes = Apply(t, img);
  std::vector<float> floats(kSize);
  ApplyTransform(t, kC, kH, kW, fimg, floats);
  EXPECT_EQ(std::vector<float>(bytes.begin(), bytes.end()), floats);
}

TEST(AugmentTest, SampleIsDeterministicForASeed) {
  const AugmentOptions options{.crop_padding = 4, .random_horizontal_flip = true};
  std::mt19937_64 a(123);
  std::mt19937_64 b(123);
  std::mt19937_64 c(124);
  bool any_differs = false;
  for (int i = 0; i < 100; ++i) {
    const ImageTransform ta = SampleTransform(options, a);
    EXPECT_EQ(ta, SampleTransform(options, b));
    any_differs |= !(ta == SampleTransform(options, c));
  }
  EXPECT_TRUE(any_differs);
}

TEST(AugmentTest, SamplesCoverTheRange) {
  const AugmentOptions options{.crop_padding = 2, .random_horizontal_flip = true};
  std::mt19937_64 rng(7);
  std::set<int> ys, xs;
  int flips = 0;
  constexpr int kDraws = 2000;
  for (int i = 0; i < kDraws; ++i) {
    const ImageTransform t = SampleTransform(options, rng);
    ys.insert(t.shift_y);
    xs.insert(t.shift_x);
    flips += t.flip;
  }
  EXPECT_THAT(ys, ElementsAre(-2, -1, 0, 1, 2));
  EXPECT_THAT(xs, ElementsAre(-2, -1, 0, 1, 2));
  // Binomial(2000, 1/2): stddev 22.4; 6 sigma is 134.
  EXPECT_NEAR(flips, kDraws / 2, 134);
}

TEST(AugmentTest, DisabledOptionsGiveIdentityAndDrawNothing) {
  std::mt19937_64 rng(5);
  const std::mt19937_64 before = rng;
  EXPECT_EQ(SampleTransform(AugmentOptions{}, rng), ImageTransform{});
  EXPECT_TRUE(rng == before);
  EXPECT_FALSE(AugmentOptions{}.enabled());
  // Flip only: crops stay zero.
  for (int i = 0; i < 20; ++i) {
    const ImageTransform t = SampleTransform(AugmentOptions{.random_horizontal_flip = true}, rng);
    EXPECT_EQ(t.shift_x, 0);
    EXPECT_EQ(t.shift_y, 0);
  }
}

}  // namespace
}  // namespace qtrain::data
