#include "worker/train/lr_schedule.h"

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

TEST(LrScheduleTest, CosineWithWarmup) {
  LrScheduleOptions o;
  o.base_lr = 0.2f;
  o.warmup_epochs = 1;
  o.total_epochs = 11;
  ASSERT_THAT(ParseLrSchedule("cosine", &o), IsOk());
  ASSERT_OK_AND_ASSIGN(LrSchedule s, LrSchedule::Create(o));
  EXPECT_FLOAT_EQ(s.At(0), 0.0f);
  EXPECT_FLOAT_EQ(s.At(0.5), 0.1f);
  EXPECT_FLOAT_EQ(s.At(1), 0.2f);
  EXPECT_NEAR(s.At(6), 0.1f, 1e-6);  // half way through the cosine
  EXPECT_NEAR(s.At(11), 0.0f, 1e-7);
}

TEST(LrScheduleTest, StepMilestones) {
  LrScheduleOptions o;
  o.base_lr = 1.0f;
  o.gamma = 0.5f;
  o.total_epochs = 20;
  ASSERT_THAT(ParseLrSchedule("step:10,5", &o), IsOk());
  ASSERT_OK_AND_ASSIGN(LrSchedule s, LrSchedule::Create(o));
  EXPECT_FLOAT_EQ(s.At(4.9), 1.0f);
  EXPECT_FLOAT_EQ(s.At(5), 0.5f);
  EXPECT_FLOAT_EQ(s.At(12), 0.25f);
}

TEST(LrScheduleTest, BadSpecsAndOptions) {
  LrScheduleOptions o;
  EXPECT_THAT(ParseLrSchedule("linear", &o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("valid: constant, cosine")));
  EXPECT_THAT(ParseLrSchedule("step:", &o), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseLrSchedule("step:3,x", &o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.base_lr = 0;
  EXPECT_THAT(LrSchedule::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.base_lr = 0.1f;
  o.warmup_epochs = 5;
  o.total_epochs = 2;
  EXPECT_THAT(LrSchedule::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::train
