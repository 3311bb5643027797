#include "worker/train/metrics.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

TEST(MetricsLogTest, WritesOneJsonObjectPerLine) {
  const std::string path = ::testing::TempDir() + "/metrics_test.jsonl";
  std::filesystem::remove(path);
  {
    ASSERT_OK_AND_ASSIGN(MetricsLog log, MetricsLog::Open(path));
    StepMetrics s;
    s.epoch = 1;
    s.step = 7;
    s.loss = 0.5;
    s.bytes_sent = 123;
    ASSERT_THAT(log.Write(s), IsOk());
    EpochMetrics e;
    e.test_accuracy = NAN;
    ASSERT_THAT(log.Write(e), IsOk());
  }
  std::ifstream in(path);
  std::string a, b, c;
  std::getline(in, a);
  std::getline(in, b);
  EXPECT_FALSE(std::getline(in, c));
  EXPECT_THAT(a, HasSubstr("{\"type\":\"step\",\"epoch\":1,\"step\":7,\"loss\":0.5,"));
  EXPECT_THAT(a, HasSubstr("\"bytes_sent\":123,"));
  EXPECT_EQ(a.back(), '}');
  EXPECT_THAT(b, HasSubstr("\"type\":\"epoch\""));
  EXPECT_THAT(b, HasSubstr("\"test_accuracy\":null"));
}

TEST(MetricsLogTest, UnwritablePathIsAnError) {
  EXPECT_THAT(MetricsLog::Open("/nonexistent-dir/x.jsonl"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--metrics")));
}

TEST(FormatDurationTest, Formats) {
  EXPECT_EQ(FormatDuration(45), "45s");
  EXPECT_EQ(FormatDuration(192), "3m12s");
  EXPECT_EQ(FormatDuration(3720), "1h02m");
  EXPECT_EQ(FormatDuration(NAN), "?");
}

}  // namespace
}  // namespace qtrain::train
