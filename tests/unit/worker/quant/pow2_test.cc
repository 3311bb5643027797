#include "worker/quant/pow2.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/quant/quant_test_util.h"

namespace qtrain::quant {
namespace {

using nn::testing::SingleThreadContext;
using testing::ExpectOnCodebook;

bool SameBits(const nn::Tensor& a, const nn::Tensor& b) {
  if (a.shape() != b.shape()) return false;
  for (int64_t i = 0; i < a.size(); ++i) {
    if (std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i])) return false;
  }
  return true;
}

TEST(Pow2Test, RecognisesPowerOfTwoLevelSets) {
  const float a = 0.0371f;  // not a power of two, so the mantissa test matters
  float alpha = -1.0f;
  // 9 levels reach 8 alpha; 3 levels only alpha.
  const std::vector<float> nine = {0.0f, a, -2 * a, 4 * a, -8 * a, 0.0f};
  EXPECT_TRUE(OnPow2Levels(nine, 3, &alpha));
  EXPECT_EQ(alpha, a);
  EXPECT_FALSE(OnPow2Levels(nine, 2, &alpha));  // 8 alpha is beyond 7 levels
  // Levels {2a, 4a}: alpha is the smallest magnitude, 2a.
  const std::vector<float> upper = {2 * a, -4 * a};
  EXPECT_TRUE(OnPow2Levels(upper, 1, &alpha));
  EXPECT_EQ(alpha, 2 * a);
  // 3 alpha is no power-of-two multiple; nor is a value one ulp off.
  EXPECT_FALSE(OnPow2Levels(std::vector<float>{a, 3 * a}, 3, &alpha));
  EXPECT_FALSE(OnPow2Levels(std::vector<float>{a, std::nextafter(2 * a, 1.0f)}, 3, &alpha));
  EXPECT_FALSE(OnPow2Levels(std::vector<float>{a, NAN}, 3, &alpha));
  EXPECT_TRUE(OnPow2Levels(std::vector<float>{0.0f, -0.0f}, 0, &alpha));
  EXPECT_EQ(alpha, 0.0f);
}

// A random weight lands on alpha * {0, +-1, ..., +-2^b}; quantizing that again changes no bit
// (what lets `--wq=pow2` evaluate an L-DNQ checkpoint as written); the gradient is straight
// through.
TEST(Pow2Test, ProjectsOntoTheLevelsIdempotentlyWithStraightThroughGradient) {
  std::mt19937_64 rng(3);
  nn::RunContext ctx = SingleThreadContext();
  for (int levels : {3, 5, 7, 9}) {
    Pow2WeightQuantizer q(levels);
    EXPECT_EQ(q.bits(), Pow2WeightQuantizer::StorageBits(levels));
    const nn::Tensor w = nn::testing::RandomTensor({16, 4, 3, 3}, rng, -0.4f, 0.4f);
    nn::Tensor wq;
    q.Forward(ctx, w, &wq);
    const float alpha = q.alpha();
    ASSERT_GT(alpha, 0.0f) << levels;
    const std::vector<float> codebook = q.Levels();
    EXPECT_EQ(static_cast<int>(codebook.size()), levels);
    ExpectOnCodebook(wq, codebook);
    // Every weight went to the level nearest to w / alpha (the projection at the final alpha).
    const ldnq::LevelSet set = *ldnq::LevelSet::FromCount(levels);
    for (int64_t i = 0; i < w.size(); ++i) {
      ASSERT_EQ(wq[i], alpha * set.Nearest(w[i] / alpha)) << levels << " levels, i=" << i;
    }
    nn::Tensor again;
    q.Forward(ctx, wq, &again);
    EXPECT_TRUE(SameBits(again, wq)) << levels;
    const nn::Tensor g = nn::testing::RandomTensor(w.shape(), rng);
    nn::Tensor dw;
    q.Backward(ctx, w, g, &dw);
    EXPECT_TRUE(SameBits(dw, g));
  }
  EXPECT_EQ(Pow2WeightQuantizer::StorageBits(3), 2);
  EXPECT_EQ(Pow2WeightQuantizer::StorageBits(5), 3);
  EXPECT_EQ(Pow2WeightQuantizer::StorageBits(7), 3);
  EXPECT_EQ(Pow2WeightQuantizer::StorageBits(9), 4);
}

// Weights written by L-DNQ (alpha * levels, alpha from ADMM) come back unchanged, even when the
// top or the bottom level is unused.
TEST(Pow2Test, WeightsAlreadyOnLevelsPassUnchanged) {
  nn::RunContext ctx = SingleThreadContext();
  const float a = 0.01234567f;
  const nn::Tensor w({2, 3}, {0.0f, 2 * a, -4 * a, 4 * a, -0.0f, -2 * a});
  Pow2WeightQuantizer q(7);
  nn::Tensor wq;
  q.Forward(ctx, w, &wq);
  EXPECT_TRUE(SameBits(wq, w));
  EXPECT_EQ(q.alpha(), 2 * a);
  ExpectOnCodebook(wq, q.Levels());
  // All zero: alpha 0, one level.
  const nn::Tensor zero({3}, {0.0f, 0.0f, 0.0f});
  q.Forward(ctx, zero, &wq);
  EXPECT_EQ(q.alpha(), 0.0f);
  EXPECT_EQ(q.Levels(), std::vector<float>{0.0f});
}

}  // namespace
}  // namespace qtrain::quant
