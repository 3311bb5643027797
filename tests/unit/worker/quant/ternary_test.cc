#include "worker/quant/ternary.h"

#include <random>

#include "gtest/gtest.h"
#include "tests/unit/worker/quant/quant_test_util.h"

namespace qtrain::quant {
namespace {

using nn::testing::SingleThreadContext;
using testing::ExpectOnCodebook;

// Hand example: E|w| = 4/6, delta = 0.7 * 4/6 = 0.4667; |w| > delta for 1.0, 2.0, 0.5, so
// alpha = (1.0 + 2.0 + 0.5) / 3 = 7/6.
TEST(TernaryTest, ThresholdAndScaleMatchTwnOnHandExample) {
  const nn::Tensor w({2, 3}, {1.0f, -2.0f, 0.2f, -0.2f, 0.1f, 0.5f});
  TernaryWeightQuantizer q;
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor wq;
  q.Forward(ctx, w, &wq);
  EXPECT_FLOAT_EQ(q.threshold(), 0.7f * 4.0f / 6.0f);
  EXPECT_FLOAT_EQ(q.scale(), 7.0f / 6.0f);
  const float a = q.scale();
  const std::vector<float> expected = {a, -a, 0.0f, 0.0f, 0.0f, a};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(wq[i], expected[i]) << i;
  EXPECT_EQ(q.Levels(), (std::vector<float>{-a, 0.0f, a}));
}

TEST(TernaryTest, CodebookAndStraightThrough) {
  std::mt19937_64 rng(1);
  const nn::Tensor w = nn::testing::RandomTensor({8, 4, 3, 3}, rng, -0.3f, 0.3f);
  TernaryWeightQuantizer q;
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor wq, dw;
  q.Forward(ctx, w, &wq);
  ExpectOnCodebook(wq, q.Levels());
  const nn::Tensor g = nn::testing::RandomTensor(w.shape(), rng);
  q.Backward(ctx, w, g, &dw);
  for (int64_t i = 0; i < w.size(); ++i) ASSERT_EQ(dw[i], g[i]);
  EXPECT_EQ(q.bits(), 2);
}

}  // namespace
}  // namespace qtrain::quant
