#include "worker/data/normalize.h"

#include <cmath>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::data {
namespace {

using ::testing::ElementsAre;
using ::testing::FloatEq;
using ::testing::FloatNear;

TEST(NormalizeTest, ComputeIsExactPerChannel) {
  // 2 examples, 2 channels, 2 pixels each. Channel 0: bytes 0, 255, 0, 255 -> mean 0.5, std 0.5.
  // Channel 1: all 51 -> mean 0.2, constant, so stddev is replaced by 1.
  const std::vector<uint8_t> pixels = {0, 255, 51, 51, 0, 255, 51, 51};
  const Normalization n = ComputeNormalization(pixels, 2, 2);
  EXPECT_THAT(n.mean, ElementsAre(FloatEq(0.5f), FloatEq(0.2f)));
  EXPECT_THAT(n.stddev, ElementsAre(FloatEq(0.5f), FloatEq(1.0f)));
}

TEST(NormalizeTest, TableAndImage) {
  const Normalization n{{0.5f, 0.0f}, {0.5f, 2.0f}};
  const std::vector<float> table = NormalizationTable(n);
  ASSERT_EQ(table.size(), 512u);
  EXPECT_THAT(table[0], FloatEq(-1.0f));
  EXPECT_THAT(table[255], FloatEq(1.0f));
  EXPECT_THAT(table[256 + 255], FloatEq(0.5f));
  const std::vector<uint8_t> src = {0, 255, 255, 0};
  std::vector<float> dst(4);
  NormalizeImage(src, table, 2, 2, dst);
  EXPECT_THAT(dst, ElementsAre(FloatEq(-1.0f), FloatEq(1.0f), FloatEq(0.5f), FloatEq(0.0f)));
}

TEST(NormalizeTest, EmptyInputGivesZeroMeanUnitStd) {
  const Normalization n = ComputeNormalization({}, 3, 4);
  EXPECT_THAT(n.mean, ElementsAre(0.0f, 0.0f, 0.0f));
  EXPECT_THAT(n.stddev, ElementsAre(1.0f, 1.0f, 1.0f));
}

}  // namespace
}  // namespace qtrain::data
