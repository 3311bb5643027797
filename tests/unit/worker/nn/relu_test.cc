#include "worker/nn/relu.h"

#include <random>

#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"

namespace qtrain::nn {
namespace {

using testing::CheckGradients;
using testing::GradCheckOptions;
using testing::RandomAwayFromZero;
using testing::SingleThreadContext;

TEST(ReluTest, Forward) {
  Relu relu("relu");
  const Tensor x({1, 4}, {-1.0f, 0.0f, 2.5f, -0.5f});
  Tensor y;
  RunContext ctx = SingleThreadContext();
  relu.Forward(ctx, x, &y);
  EXPECT_EQ(y.shape(), x.shape());
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_EQ(y[1], 0.0f);
  EXPECT_EQ(y[2], 2.5f);
  EXPECT_EQ(y[3], 0.0f);
  EXPECT_EQ(*relu.OutputShape({2, 3, 4}), (Shape{2, 3, 4}));
}

// Inputs are at least 0.1 away from the kink and eps = 1e-2 never crosses it, so each output is
// locally linear in its input: the central difference is exact up to rounding.
TEST(ReluTest, GradientsMatchFiniteDifferences) {
  Relu relu("relu");
  std::mt19937_64 rng(1);
  CheckGradients(relu, RandomAwayFromZero({2, 3, 2, 2}, rng, 0.1f, 1.0f),
                 GradCheckOptions{.epsilon = 1e-2f, .abs_tol = 1e-4, .rel_tol = 1e-3});
}

TEST(ReluTest, InPlace) {
  Relu relu("relu");
  Tensor t({1, 3}, {-1.0f, 2.0f, 3.0f});
  RunContext ctx = SingleThreadContext();
  relu.Forward(ctx, t, &t);
  EXPECT_EQ(t[0], 0.0f);
  EXPECT_EQ(t[1], 2.0f);
  Tensor g({1, 3}, {5.0f, 6.0f, 7.0f});
  relu.Backward(ctx, g, &g);
  EXPECT_EQ(g[0], 0.0f);
  EXPECT_EQ(g[1], 6.0f);
  EXPECT_EQ(g[2], 7.0f);
}

}  // namespace
}  // namespace qtrain::nn
