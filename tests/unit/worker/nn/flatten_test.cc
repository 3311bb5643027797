#include "worker/nn/flatten.h"

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

TEST(FlattenTest, ForwardBackward) {
  Flatten flatten("flatten");
  std::mt19937_64 rng(1);
  const Tensor x = RandomTensor({2, 3, 2, 2}, rng);
  Tensor y;
  RunContext ctx = SingleThreadContext();
  flatten.Forward(ctx, x, &y);
  ASSERT_EQ(y.shape(), (Shape{2, 12}));
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(y[i], x[i]);
  Tensor dx;
  flatten.Backward(ctx, y, &dx);
  EXPECT_EQ(dx.shape(), x.shape());
  for (int64_t i = 0; i < x.size(); ++i) EXPECT_EQ(dx[i], x[i]);
  EXPECT_EQ(*flatten.OutputShape({7, 64, 7, 7}), (Shape{7, 3136}));
  EXPECT_THAT(flatten.OutputShape({7}), StatusIs(absl::StatusCode::kInvalidArgument));
}

// The identity up to layout: exact central differences with a large eps.
TEST(FlattenTest, GradientsMatchFiniteDifferences) {
  Flatten flatten("flatten");
  std::mt19937_64 rng(2);
  CheckGradients(flatten, RandomTensor({2, 2, 3, 1}, rng),
                 GradCheckOptions{.epsilon = 0.5f, .abs_tol = 1e-5, .rel_tol = 1e-5});
}

}  // namespace
}  // namespace qtrain::nn
