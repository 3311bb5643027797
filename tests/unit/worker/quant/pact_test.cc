#include "worker/quant/pact.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "tests/unit/worker/quant/quant_test_util.h"
#include "worker/kernels/cpu/thread_pool.h"

namespace qtrain::quant {
namespace {

using nn::testing::CheckGradients;
using nn::testing::CheckTensor;
using nn::testing::GradCheckOptions;
using nn::testing::Projection;
using nn::testing::RandomTensor;
using nn::testing::SingleThreadContext;
using testing::ExpectOnCodebook;
using testing::RandomAvoiding;

TEST(PactTest, ParameterAndCodebook) {
  PactActivationQuantizer aq("aq", {.bits = 2, .alpha_init = 1.5f});
  std::vector<nn::Parameter*> params;
  aq.CollectParameters(&params);
  ASSERT_EQ(params.size(), 1u);
  EXPECT_EQ(params[0]->name, "alpha");
  EXPECT_EQ(params[0]->kind, nn::ParamKind::kQuantizer);
  std::mt19937_64 rng(1);
  const nn::Tensor x = RandomTensor({4, 100}, rng, -1.0f, 3.0f);
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor y;
  aq.Forward(ctx, x, &y);
  const std::vector<float> levels = aq.Levels();
  ASSERT_EQ(levels.size(), 4u);
  EXPECT_EQ(levels.front(), 0.0f);
  EXPECT_FLOAT_EQ(levels[1], 0.5f);
  EXPECT_FLOAT_EQ(levels.back(), 1.5f);
  ExpectOnCodebook(y, levels);
}

TEST(PactTest, StraightThroughRule) {
  PactActivationQuantizer aq("aq", {.bits = 3, .alpha_init = 1.0f, .l2 = 0.0f});
  const nn::Tensor x({1, 6}, {-0.5f, 0.0f, 0.4f, 0.99f, 1.0f, 2.0f});
  const nn::Tensor dy({1, 6}, {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f});
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor y, dx;
  aq.Forward(ctx, x, &y);
  aq.Backward(ctx, dy, &dx);
  EXPECT_EQ(dx[0], 0.0f);  // x < 0
  EXPECT_EQ(dx[1], 2.0f);
  EXPECT_EQ(dx[2], 3.0f);
  EXPECT_EQ(dx[3], 4.0f);
  EXPECT_EQ(dx[4], 0.0f);  // x >= alpha
  EXPECT_EQ(dx[5], 0.0f);
  EXPECT_EQ(aq.alpha().grad[0], 11.0f);  // dy summed where x >= alpha
}

TEST(PactTest, L2PenaltyIsFoldedIntoAlphaGradient) {
  PactActivationQuantizer aq("aq", {.bits = 3, .alpha_init = 2.0f, .l2 = 0.1f});
  const nn::Tensor x({1, 2}, {0.5f, 3.0f});
  const nn::Tensor dy({1, 2}, {1.0f, 1.0f});
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor y, dx;
  aq.Forward(ctx, x, &y);
  aq.Backward(ctx, dy, &dx);
  EXPECT_FLOAT_EQ(aq.alpha().grad[0], 1.0f + 0.1f * 2.0f);
  EXPECT_DOUBLE_EQ(aq.LossPenalty(), 0.5 * 0.1f * 2.0 * 2.0);
}

// With Discretize::kOff, y = clip(x, 0, alpha): the paper's rule is its exact derivative. Inputs
// stay 0.05 away from 0 and alpha, so eps = 1e-2 never crosses a kink.
TEST(PactTest, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(2);
  PactActivationQuantizer aq("aq", {.bits = 2, .alpha_init = 1.5f, .discretize = Discretize::kOff});
  CheckGradients(aq, RandomAvoiding({3, 40}, rng, -1.0f, 3.0f, {0.0f, 1.5f}, 0.05f),
                 GradCheckOptions{.epsilon = 1e-2f, .abs_tol = 1e-3, .rel_tol = 1e-3});
}

// The same with the penalty: the loss is the projection plus (l2/2) alpha^2.
TEST(PactTest, GradientWithPenaltyMatchesFiniteDifferences) {
  std::mt19937_64 rng(3);
  PactActivationQuantizer aq(
      "aq", {.bits = 2, .alpha_init = 1.5f, .l2 = 0.5f, .discretize = Discretize::kOff});
  nn::Tensor x = RandomAvoiding({2, 30}, rng, -1.0f, 3.0f, {0.0f, 1.5f}, 0.05f);
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor y, dx;
  aq.Forward(ctx, x, &y);
  const nn::Tensor r = RandomTensor(y.shape(), rng);
  aq.Backward(ctx, r, &dx);
  const nn::Tensor analytic = aq.alpha().grad;
  auto loss = [&] {
    nn::Tensor out;
    aq.Forward(ctx, x, &out);
    return Projection(r, out) + aq.LossPenalty();
  };
  CheckTensor("dalpha", &aq.alpha().value, analytic,
              GradCheckOptions{.epsilon = 1e-2f, .abs_tol = 1e-3, .rel_tol = 1e-3}, loss);
}

TEST(PactTest, ThreadCountDoesNotChangeResults) {
  std::mt19937_64 rng(4);
  const nn::Tensor x = RandomTensor({8, 20000}, rng, -1.0f, 3.0f);
  const nn::Tensor dy = RandomTensor(x.shape(), rng);
  PactActivationQuantizer a("a", {.bits = 2, .alpha_init = 1.5f});
  PactActivationQuantizer b("b", {.bits = 2, .alpha_init = 1.5f});
  nn::RunContext serial = SingleThreadContext();
  kernels::ThreadPool pool(2);
  nn::RunContext parallel = SingleThreadContext();
  parallel.cpu.pool = &pool;
  nn::Tensor ya, yb, dxa, dxb;
  a.Forward(serial, x, &ya);
  b.Forward(parallel, x, &yb);
  a.Backward(serial, dy, &dxa);
  b.Backward(parallel, dy, &dxb);
  for (int64_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(ya[i], yb[i]);
    ASSERT_EQ(dxa[i], dxb[i]);
  }
  EXPECT_NEAR(a.alpha().grad[0], b.alpha().grad[0], 1e-3);
}

}  // namespace
}  // namespace qtrain::quant
