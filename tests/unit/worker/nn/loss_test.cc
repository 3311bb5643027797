#include "worker/nn/loss.h"

#include <cmath>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"

namespace qtrain::nn {
namespace {

using ::qtrain::testing::StatusIs;
using testing::SingleThreadContext;

TEST(LossTest, MatchesHandComputation) {
  const Tensor logits({2, 3}, {0.0f, 0.0f, 0.0f, 1.0f, 2.0f, 3.0f});
  const std::vector<int32_t> labels = {1, 2};
  Tensor dlogits;
  RunContext ctx = SingleThreadContext();
  ASSERT_OK_AND_ASSIGN(auto result, SoftmaxCrossEntropyLoss(ctx, logits, labels, &dlogits));
  const double z = 1 + std::exp(-1.0) + std::exp(-2.0);  // row 1 shifted by its max (3)
  const double expected = (std::log(3.0) + std::log(z)) / 2;
  EXPECT_NEAR(result.mean_loss, expected, 1e-6);
  EXPECT_EQ(result.correct, 1);  // row 0 ties (first arg-max 0 != 1), row 1 is right
  ASSERT_EQ(dlogits.shape(), logits.shape());
  EXPECT_NEAR(dlogits[1], (1.0 / 3 - 1) / 2, 1e-6);
  EXPECT_NEAR(dlogits[5], (1 / z - 1) / 2, 1e-6);
}

TEST(LossTest, RejectsBadShapesAndLabels) {
  RunContext ctx = SingleThreadContext();
  const Tensor logits({2, 3});
  const std::vector<int32_t> one = {0};
  EXPECT_THAT(SoftmaxCrossEntropyLoss(ctx, logits, one, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const std::vector<int32_t> bad = {0, 3};
  EXPECT_THAT(SoftmaxCrossEntropyLoss(ctx, logits, bad, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const Tensor flat({6});
  const std::vector<int32_t> six(6, 0);
  EXPECT_THAT(SoftmaxCrossEntropyLoss(ctx, flat, six, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::nn
