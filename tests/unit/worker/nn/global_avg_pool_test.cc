#include "worker/nn/global_avg_pool.h"

#include <random>

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

TEST(GlobalAvgPoolTest, Forward) {
  GlobalAvgPool gap("gap");
  const Tensor x({1, 2, 2, 2}, {1, 2, 3, 4, -1, -1, -1, 3});
  Tensor y;
  RunContext ctx = SingleThreadContext();
  gap.Forward(ctx, x, &y);
  ASSERT_EQ(y.shape(), (Shape{1, 2}));
  EXPECT_FLOAT_EQ(y[0], 2.5f);
  EXPECT_FLOAT_EQ(y[1], 0.0f);
  EXPECT_EQ(*gap.OutputShape({4, 64, 8, 8}), (Shape{4, 64}));
  EXPECT_THAT(gap.OutputShape({4, 64}), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Linear in x: exact central differences with a large eps.
TEST(GlobalAvgPoolTest, GradientsMatchFiniteDifferences) {
  GlobalAvgPool gap("gap");
  std::mt19937_64 rng(1);
  CheckGradients(gap, RandomTensor({2, 3, 3, 2}, rng),
                 GradCheckOptions{.epsilon = 0.5f, .abs_tol = 1e-5, .rel_tol = 1e-4});
}

}  // namespace
}  // namespace qtrain::nn
