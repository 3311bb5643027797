#include "worker/nn/batch_norm.h"

#include <cmath>
#include <random>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"

namespace qtrain::nn {
namespace {

using ::qtrain::testing::StatusIs;
using testing::CheckGradients;
using testing::GradCheckOptions;
using testing::RandomTensor;
using testing::SingleThreadContext;

// Per-channel mean and biased variance of an [N, C, spatial] tensor, in double.
void ChannelStats(const Tensor& t, int64_t c, double* mean, double* var) {
  const int64_t n = t.dim(0), channels = t.dim(1);
  const int64_t spatial = t.size() / (n * channels);
  double sum = 0.0, sum_sq = 0.0;
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < spatial; ++i) {
      const double v = t[(b * channels + c) * spatial + i];
      sum += v;
      sum_sq += v * v;
    }
  const double m = static_cast<double>(n * spatial);
  *mean = sum / m;
  *var = sum_sq / m - *mean * *mean;
}

TEST(BatchNormTest, ParametersAndBuffers) {
  BatchNorm2d bn("bn", {.channels = 3});
  std::vector<Parameter*> params;
  bn.CollectParameters(&params);
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(params[0]->name, "gamma");
  EXPECT_EQ(params[0]->kind, ParamKind::kNormScale);
  EXPECT_EQ(params[1]->name, "beta");
  EXPECT_EQ(params[1]->kind, ParamKind::kNormShift);
  std::vector<Buffer*> buffers;
  bn.CollectBuffers(&buffers);
  ASSERT_EQ(buffers.size(), 2u);
  EXPECT_EQ(buffers[0]->name, "running_mean");
  EXPECT_EQ(buffers[1]->name, "running_var");
  for (int c = 0; c < 3; ++c) {
    EXPECT_EQ(params[0]->value[c], 1.0f);
    EXPECT_EQ(params[1]->value[c], 0.0f);
    EXPECT_EQ(buffers[0]->value[c], 0.0f);
    EXPECT_EQ(buffers[1]->value[c], 1.0f);
  }
}

TEST(BatchNormTest, TrainForwardNormalizesAndUpdatesRunningStats) {
  BatchNorm2d bn("bn", {.channels = 2});
  std::mt19937_64 rng(1);
  Tensor x = RandomTensor({4, 2, 3, 3}, rng, 1.0f, 5.0f);  // mean ~3, var ~1.3
  RunContext ctx = SingleThreadContext(Mode::kTrain);
  Tensor y;
  bn.Forward(ctx, x, &y);
  for (int c = 0; c < 2; ++c) {
    double mean, var, x_mean, x_var;
    ChannelStats(y, c, &mean, &var);
    EXPECT_NEAR(mean, 0.0, 1e-5);
    ChannelStats(x, c, &x_mean, &x_var);
    EXPECT_NEAR(var, x_var / (x_var + 1e-5), 1e-5);
    // momentum 0.1 from (0, 1); the running variance takes the unbiased variance (M = 36).
    EXPECT_NEAR(bn.running_mean().value[c], 0.1 * x_mean, 1e-5);
    EXPECT_NEAR(bn.running_var().value[c], 0.9 + 0.1 * x_var * 36.0 / 35.0, 1e-5);
  }
}

TEST(BatchNormTest, EvalForwardUsesRunningStatsAndChangesNothing) {
  BatchNorm2d bn("bn", {.channels = 2});
  bn.running_mean().value = Tensor({2}, {1.0f, -2.0f});
  bn.running_var().value = Tensor({2}, {4.0f, 0.25f});
  bn.gamma().value = Tensor({2}, {2.0f, 1.0f});
  bn.beta().value = Tensor({2}, {0.5f, 0.0f});
  const Tensor x({1, 2, 1, 2}, {3.0f, 1.0f, -1.0f, 0.0f});
  RunContext ctx = SingleThreadContext(Mode::kEval);
  Tensor y;
  bn.Forward(ctx, x, &y);
  const double s0 = 2.0 / std::sqrt(4.0 + 1e-5), s1 = 1.0 / std::sqrt(0.25 + 1e-5);
  EXPECT_NEAR(y[0], (3.0 - 1.0) * s0 + 0.5, 1e-5);
  EXPECT_NEAR(y[1], (1.0 - 1.0) * s0 + 0.5, 1e-5);
  EXPECT_NEAR(y[2], (-1.0 + 2.0) * s1, 1e-5);
  EXPECT_NEAR(y[3], (0.0 + 2.0) * s1, 1e-5);
  EXPECT_EQ(bn.running_mean().value[0], 1.0f);
  EXPECT_EQ(bn.running_var().value[1], 0.25f);
}

TEST(BatchNormTest, OutputShape) {
  BatchNorm2d bn("bn", {.channels = 3});
  EXPECT_EQ(*bn.OutputShape({2, 3, 4, 4}), (Shape{2, 3, 4, 4}));
  EXPECT_EQ(*bn.OutputShape({2, 3}), (Shape{2, 3}));
  EXPECT_THAT(bn.OutputShape({2, 4, 4, 4}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(bn.OutputShape({2, 3, 4}), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Training mode differentiates through the batch mean and variance: a smooth but non-linear
// function, so eps must be small. eps = 1e-2: truncation error ~eps^2 * |L'''| / 6 <~ 1e-4, and
// the float rounding of ~100 outputs of size ~1 contributes ~1e-6 / (2 eps) ~ 1e-4; 1e-3 absolute
// plus 1% relative bounds both with margin.
TEST(BatchNormTest, TrainGradientsMatchFiniteDifferences) {
  BatchNorm2d bn("bn", {.channels = 3});
  std::mt19937_64 rng(2);
  bn.gamma().value = RandomTensor({3}, rng, 0.5f, 1.5f);
  bn.beta().value = RandomTensor({3}, rng);
  CheckGradients(bn, RandomTensor({4, 3, 3, 3}, rng, -2.0f, 2.0f),
                 GradCheckOptions{.epsilon = 1e-2f, .abs_tol = 1e-3, .rel_tol = 1e-2});
}

TEST(BatchNormTest, TrainGradientsOnFullyConnectedInput) {
  BatchNorm2d bn("bn", {.channels = 4});
  std::mt19937_64 rng(3);
  bn.gamma().value = RandomTensor({4}, rng, 0.5f, 1.5f);
  CheckGradients(bn, RandomTensor({6, 4}, rng, -2.0f, 2.0f),
                 GradCheckOptions{.epsilon = 1e-2f, .abs_tol = 1e-3, .rel_tol = 1e-2});
}

// Eval mode is affine in x and in (gamma, beta): exact central differences, large eps.
TEST(BatchNormTest, EvalGradientsMatchFiniteDifferences) {
  BatchNorm2d bn("bn", {.channels = 3});
  std::mt19937_64 rng(4);
  bn.gamma().value = RandomTensor({3}, rng, 0.5f, 1.5f);
  bn.beta().value = RandomTensor({3}, rng);
  bn.running_mean().value = RandomTensor({3}, rng);
  bn.running_var().value = RandomTensor({3}, rng, 0.5f, 2.0f);
  CheckGradients(
      bn, RandomTensor({3, 3, 2, 3}, rng),
      GradCheckOptions{.epsilon = 0.5f, .abs_tol = 1e-4, .rel_tol = 1e-4, .mode = Mode::kEval});
}

TEST(BatchNormTest, NullDxStillComputesParameterGradients) {
  BatchNorm2d bn("bn", {.channels = 2});
  std::mt19937_64 rng(5);
  const Tensor x = RandomTensor({3, 2, 2, 2}, rng);
  const Tensor dy = RandomTensor({3, 2, 2, 2}, rng);
  RunContext ctx = SingleThreadContext();
  Tensor y, dx;
  bn.Forward(ctx, x, &y);
  bn.Backward(ctx, dy, &dx);
  const Tensor dgamma = bn.gamma().grad;
  bn.gamma().grad.Fill(0.0f);
  bn.Backward(ctx, dy, nullptr);
  for (int c = 0; c < 2; ++c) EXPECT_EQ(bn.gamma().grad[c], dgamma[c]);
}

}  // namespace
}  // namespace qtrain::nn
