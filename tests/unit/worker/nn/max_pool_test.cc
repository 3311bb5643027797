#include "worker/nn/max_pool.h"

#include <algorithm>
#include <numeric>
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
using testing::SingleThreadContext;

TEST(MaxPoolTest, ForwardAndShape) {
  MaxPool2d pool("pool", {.kernel = 2, .stride = 2});
  // One 3x4 plane: windows cover rows 0-1 (row 2 is dropped by the floor).
  const Tensor x({1, 1, 3, 4}, {1, 5, 2, 0,  //
                                3, 4, 7, 8,  //
                                9, 9, 9, 9});
  Tensor y;
  RunContext ctx = SingleThreadContext();
  pool.Forward(ctx, x, &y);
  ASSERT_EQ(y.shape(), (Shape{1, 1, 1, 2}));
  EXPECT_EQ(y[0], 5.0f);
  EXPECT_EQ(y[1], 8.0f);
  Tensor dx;
  pool.Backward(ctx, Tensor({1, 1, 1, 2}, {10.0f, 20.0f}), &dx);
  ASSERT_EQ(dx.shape(), x.shape());
  for (int64_t i = 0; i < dx.size(); ++i) {
    EXPECT_EQ(dx[i], i == 1 ? 10.0f : i == 7 ? 20.0f : 0.0f) << i;
  }
  EXPECT_THAT(pool.OutputShape({1, 1, 1, 4}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(pool.OutputShape({1, 4, 4}), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Inputs are a shuffled grid with spacing 0.05, so every window's maximum leads the runner-up by
// >= 0.05 > 2 * eps: no probe changes the arg-max and the function is locally linear.
TEST(MaxPoolTest, GradientsMatchFiniteDifferences) {
  MaxPool2d pool("pool", {.kernel = 2, .stride = 2});
  const Shape shape = {2, 2, 4, 5};
  std::vector<int> order(NumElements(shape));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(1);
  std::shuffle(order.begin(), order.end(), rng);
  Tensor x(shape);
  for (int64_t i = 0; i < x.size(); ++i) x[i] = -2.0f + 0.05f * static_cast<float>(order[i]);
  CheckGradients(pool, x, GradCheckOptions{.epsilon = 1e-2f, .abs_tol = 1e-4, .rel_tol = 1e-3});
}

}  // namespace
}  // namespace qtrain::nn
