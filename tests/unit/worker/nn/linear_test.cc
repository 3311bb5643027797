#include "worker/nn/linear.h"

#include <cmath>
#include <random>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"
#include "worker/kernels/cpu/thread_pool.h"

namespace qtrain::nn {
namespace {

using ::qtrain::testing::StatusIs;
using testing::CheckGradients;
using testing::GradCheckOptions;
using testing::RandomTensor;
using testing::SingleThreadContext;

TEST(LinearTest, ParametersAndInit) {
  std::mt19937_64 rng(7);
  Linear fc("fc", {.in_features = 200, .out_features = 300}, rng);
  std::vector<Parameter*> params;
  fc.CollectParameters(&params);
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(params[0]->name, "weight");
  EXPECT_EQ(params[0]->kind, ParamKind::kWeight);
  EXPECT_EQ(params[0]->value.shape(), (Shape{300, 200}));
  EXPECT_EQ(params[0]->grad.shape(), (Shape{300, 200}));
  EXPECT_EQ(params[1]->name, "bias");
  EXPECT_EQ(params[1]->kind, ParamKind::kBias);
  // U(-b, b) with b = 1/sqrt(fan_in): every element within the bound, mean 0, variance b^2/3.
  // 60000 samples: the sample variance of a uniform has relative standard deviation
  // sqrt(0.8 / 60000) ~ 0.37%, so 2% is a >5-sigma bound.
  const double bound = 1.0 / std::sqrt(200.0);
  for (const Parameter* p : params) {
    for (int64_t i = 0; i < p->value.size(); ++i) {
      ASSERT_LE(std::fabs(p->value[i]), bound) << p->name;
    }
  }
  double sum = 0.0, sum_sq = 0.0;
  const Tensor& w = params[0]->value;
  for (int64_t i = 0; i < w.size(); ++i) {
    sum += w[i];
    sum_sq += static_cast<double>(w[i]) * w[i];
  }
  const double mean = sum / w.size();
  const double var = sum_sq / w.size() - mean * mean;
  EXPECT_NEAR(mean, 0.0, 5 * std::sqrt(bound * bound / 3 / w.size()));
  EXPECT_NEAR(var, bound * bound / 3, 0.02 * bound * bound / 3);
  EXPECT_EQ(fc.Describe(), "linear 200->300");
}

TEST(LinearTest, SameSeedSameWeights) {
  std::mt19937_64 a(42), b(42), c(43);
  Linear fa("fc", {.in_features = 5, .out_features = 4}, a);
  Linear fb("fc", {.in_features = 5, .out_features = 4}, b);
  Linear fc("fc", {.in_features = 5, .out_features = 4}, c);
  for (int64_t i = 0; i < 20; ++i) EXPECT_EQ(fa.weight().value[i], fb.weight().value[i]);
  EXPECT_NE(fa.weight().value[0], fc.weight().value[0]);
}

TEST(LinearTest, ForwardMatchesHandComputation) {
  std::mt19937_64 rng(1);
  Linear fc("fc", {.in_features = 3, .out_features = 2}, rng);
  fc.weight().value = Tensor({2, 3}, {1, 2, 3, -1, 0, 1});
  fc.bias().value = Tensor({2}, {0.5f, -0.5f});
  const Tensor x({2, 3}, {1, 1, 1, 2, 0, -1});
  Tensor y;
  RunContext ctx = SingleThreadContext();
  fc.Forward(ctx, x, &y);
  ASSERT_EQ(y.shape(), (Shape{2, 2}));
  EXPECT_FLOAT_EQ(y[0], 6.5f);   // 1+2+3 + 0.5
  EXPECT_FLOAT_EQ(y[1], -0.5f);  // -1+0+1 - 0.5
  EXPECT_FLOAT_EQ(y[2], -0.5f);  // 2+0-3 + 0.5
  EXPECT_FLOAT_EQ(y[3], -3.5f);  // -2+0-1 - 0.5
}

TEST(LinearTest, OutputShapeRejectsWrongInput) {
  std::mt19937_64 rng(1);
  Linear fc("fc", {.in_features = 3, .out_features = 2}, rng);
  EXPECT_EQ(*fc.OutputShape({5, 3}), (Shape{5, 2}));
  EXPECT_THAT(fc.OutputShape({5, 4}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("'fc'")));
  EXPECT_THAT(fc.OutputShape({5, 3, 1}), StatusIs(absl::StatusCode::kInvalidArgument));
}

// L is linear in x and in W separately, so the central difference is exact up to rounding for any
// eps: eps = 0.5 makes the float rounding of y (~1e-7 * |y| per element, ~20 outputs) negligible
// next to the 1e-4 tolerance.
TEST(LinearTest, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(3);
  Linear fc("fc", {.in_features = 5, .out_features = 4}, rng);
  for (int64_t i = 0; i < 4; ++i) fc.bias().value[i] = 0.1f * static_cast<float>(i);
  const Tensor x = RandomTensor({3, 5}, rng);
  CheckGradients(fc, x, GradCheckOptions{.epsilon = 0.5f, .abs_tol = 1e-4, .rel_tol = 1e-4});
}

TEST(LinearTest, GradientsWithoutBias) {
  std::mt19937_64 rng(4);
  Linear fc("fc", {.in_features = 6, .out_features = 3, .bias = false}, rng);
  std::vector<Parameter*> params;
  fc.CollectParameters(&params);
  EXPECT_EQ(params.size(), 1u);
  CheckGradients(fc, RandomTensor({2, 6}, rng),
                 GradCheckOptions{.epsilon = 0.5f, .abs_tol = 1e-4, .rel_tol = 1e-4});
}

TEST(LinearTest, ThreadedMatchesSingleThreaded) {
  std::mt19937_64 rng(5);
  Linear fc("fc", {.in_features = 64, .out_features = 48}, rng);
  const Tensor x = RandomTensor({32, 64}, rng);
  const Tensor dy = RandomTensor({32, 48}, rng);
  RunContext one = SingleThreadContext();
  Tensor y1, dx1;
  fc.Forward(one, x, &y1);
  fc.Backward(one, dy, &dx1);
  const Tensor dw1 = fc.weight().grad;
  kernels::ThreadPool pool(2);
  RunContext two = SingleThreadContext();
  two.cpu.pool = &pool;
  Tensor y2, dx2;
  fc.Forward(two, x, &y2);
  fc.Backward(two, dy, &dx2);
  // Different GEMM splits round differently: length-64 float dot products, |terms| <~ 1.
  for (int64_t i = 0; i < y1.size(); ++i) EXPECT_NEAR(y1[i], y2[i], 1e-4);
  for (int64_t i = 0; i < dx1.size(); ++i) EXPECT_NEAR(dx1[i], dx2[i], 1e-4);
  for (int64_t i = 0; i < dw1.size(); ++i) EXPECT_NEAR(dw1[i], fc.weight().grad[i], 1e-4);
}

TEST(LinearTest, NullDxSkipsDataGradient) {
  std::mt19937_64 rng(6);
  Linear fc("fc", {.in_features = 3, .out_features = 2}, rng);
  const Tensor x = RandomTensor({4, 3}, rng);
  RunContext ctx = SingleThreadContext();
  Tensor y;
  fc.Forward(ctx, x, &y);
  fc.Backward(ctx, RandomTensor({4, 2}, rng), nullptr);
  EXPECT_EQ(fc.weight().grad.shape(), (Shape{2, 3}));
}

}  // namespace
}  // namespace qtrain::nn
