#include "worker/quant/ldnq/levels.h"

#include <cmath>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::quant::ldnq {
namespace {

TEST(LevelSetTest, CountsAndLevels) {
  EXPECT_FALSE(LevelSet::FromCount(4).ok());
  EXPECT_FALSE(LevelSet::FromCount(11).ok());
  EXPECT_EQ(LevelSet::FromCount(4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(LevelSet::FromCount(3)->UnitLevels(), ::testing::ElementsAre(-1, 0, 1));
  EXPECT_THAT(LevelSet::FromCount(5)->UnitLevels(), ::testing::ElementsAre(-2, -1, 0, 1, 2));
  EXPECT_THAT(LevelSet::FromCount(9)->UnitLevels(),
              ::testing::ElementsAre(-8, -4, -2, -1, 0, 1, 2, 4, 8));
  EXPECT_EQ(LevelSet::FromCount(7)->count(), 7);
  EXPECT_EQ(LevelSet::FromCount(7)->max_exponent(), 2);
}

TEST(LevelSetTest, NearestMatchesBruteForce) {
  for (int count : {3, 5, 7, 9}) {
    const LevelSet levels = *LevelSet::FromCount(count);
    const std::vector<float> all = levels.UnitLevels();
    for (int i = -2000; i <= 2000; ++i) {
      const float v = static_cast<float>(i) * 0.0061f;
      float best = all[0];
      for (float l : all) {
        if (std::fabs(v - l) < std::fabs(v - best)) best = l;
      }
      const float got = levels.Nearest(v);
      // Ties may go either way; the distance must be minimal.
      EXPECT_FLOAT_EQ(std::fabs(v - got), std::fabs(v - best)) << "v=" << v << " count=" << count;
    }
  }
}

TEST(ProjectToLevelsTest, RecoversWeightsAlreadyOnTheLevels) {
  // The alternation is a local method: from mean|v| it recovers a grid whose values are mostly
  // +-alpha (as here), not every grid (mostly +-4 alpha would start it at the wrong scale).
  const LevelSet levels = *LevelSet::FromCount(5);
  const float alpha = 0.0375f;
  std::vector<float> v = {1,  -2, 1, 0, -1, 1,  2, -1, 0.5f /*bias*/,
                          -1, 0,  0, 2, 1,  -1, 1, 1,  -3.25f /*bias*/};
  for (size_t i = 0; i < v.size(); ++i) {
    if (i % 9 != 8) v[i] *= alpha;
  }
  std::vector<float> g(v.size());
  const Projection p = ProjectToLevels(v, MatrixLayout{.rows = 2, .cols = 9, .quantized_cols = 8},
                                       levels, 0.0f, 10, g);
  EXPECT_NEAR(p.alpha, alpha, 1e-7);
  for (size_t i = 0; i < v.size(); ++i) EXPECT_NEAR(g[i], v[i], 1e-7) << i;
}

TEST(ProjectToLevelsTest, ConvergedResultIsAFixedPointOfBothSteps) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  for (int count : {3, 5, 9}) {
    const LevelSet levels = *LevelSet::FromCount(count);
    const MatrixLayout layout{.rows = 16, .cols = 10, .quantized_cols = 9};
    std::vector<float> v(160), g(160);
    for (float& x : v) x = normal(rng);
    const Projection p = ProjectToLevels(v, layout, levels, 0.0f, 100, g);
    ASSERT_LT(p.rounds, 100);
    double vq = 0, qq = 0;
    for (int64_t r = 0; r < 16; ++r) {
      for (int64_t c = 0; c < 10; ++c) {
        const float x = v[r * 10 + c], y = g[r * 10 + c];
        if (c == 9) {
          EXPECT_EQ(y, x);  // bias column copied
          continue;
        }
        const float q = levels.Nearest(x / p.alpha);
        EXPECT_NEAR(y, p.alpha * q, 1e-6);
        vq += static_cast<double>(x) * q;
        qq += static_cast<double>(q) * q;
      }
    }
    EXPECT_NEAR(p.alpha, vq / qq, 1e-6 * p.alpha);
  }
}

TEST(ProjectToLevelsTest, StartsFromMeanAbsAndHandlesZeros) {
  const LevelSet levels = *LevelSet::FromCount(3);
  std::vector<float> v(6, 0.0f), g(6, 1.0f);
  const MatrixLayout layout{.rows = 2, .cols = 3, .quantized_cols = 3};
  EXPECT_EQ(MeanAbsQuantized(v, layout), 0.0f);
  ProjectToLevels(v, layout, levels, 0.0f, 10, g);
  for (float x : g) EXPECT_EQ(x, 0.0f);
  // One round: Q from mean|v| = 5/6 is {1, 0, -1, 1, 1, 0}, then alpha = <v,Q>/<Q,Q>.
  v = {1.5f, 0.2f, -1.1f, 0.9f, 1.3f, 0.0f};
  const Projection p = ProjectToLevels(v, layout, levels, 0.0f, 1, g);
  EXPECT_EQ(p.rounds, 1);
  EXPECT_NEAR(p.alpha, (1.5 + 1.1 + 0.9 + 1.3) / 4.0, 1e-6);
}

}  // namespace
}  // namespace qtrain::quant::ldnq
