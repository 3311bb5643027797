#include "compression/error_feedback.h"

#include <vector>

#include "common/testing/status_matchers.h"
#include "compression/fp16.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::compression {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;

// fp16 keeps a non-zero rounding residual, which makes it a good carrier for these checks.
TEST(ErrorFeedbackTest, ResidualPerKeyAccumulatesWhatWasNotSent) {
  ErrorFeedback ef(std::make_unique<Fp16Codec>(CodecOptions{}), FeedbackMode::kOn);
  std::vector<float> g = {1.0f + 0x1p-13f, 3.0f, -2.0f - 0x1p-12f};
  EncodedTensor t;
  Rng rng(1);
  ASSERT_THAT(ef.Encode("w", g, {}, rng, &t), IsOk());
  auto r = ef.Residual("w");
  ASSERT_EQ(r.size(), 3u);
  // 1 + 2^-13 is below half an fp16 ulp at 1 (2^-11): it rounds to 1, the rest is kept.
  EXPECT_EQ(r[0], 0x1p-13f);
  EXPECT_EQ(r[1], 0.0f);
  EXPECT_EQ(r[2], -0x1p-12f);
  EXPECT_TRUE(ef.Residual("other").empty());
  // Eight steps of the same gradient: the kept 2^-13 adds up to one fp16 ulp and is sent.
  std::vector<float> sum(3, 0.0f);
  ASSERT_THAT(ef.codec().DecodeAdd(t, std::span<float>(sum)), IsOk());
  for (int step = 1; step < 8; ++step) {
    ASSERT_THAT(ef.Encode("w", g, {}, rng, &t), IsOk());
    ASSERT_THAT(ef.codec().DecodeAdd(t, std::span<float>(sum)), IsOk());
  }
  // Sent total + residual == 8 * g exactly (all values are exact in float here).
  EXPECT_EQ(sum[0] + ef.Residual("w")[0], 8 * g[0]);
  EXPECT_EQ(sum[2] + ef.Residual("w")[2], 8 * g[2]);
}

TEST(ErrorFeedbackTest, SizeChangeForAKeyIsAnError) {
  ErrorFeedback ef(std::make_unique<Fp16Codec>(CodecOptions{}), FeedbackMode::kOn);
  EncodedTensor t;
  Rng rng(1);
  std::vector<float> a(4, 1.0f), b(5, 1.0f);
  ASSERT_THAT(ef.Encode("k", a, {}, rng, &t), IsOk());
  EXPECT_THAT(ef.Encode("k", b, {}, rng, &t), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ErrorFeedbackTest, OffKeepsNoResidual) {
  ErrorFeedback ef(std::make_unique<Fp16Codec>(CodecOptions{}), FeedbackMode::kOff);
  EncodedTensor t;
  Rng rng(1);
  std::vector<float> g = {1.0f + 0x1p-13f};
  ASSERT_THAT(ef.Encode("w", g, {}, rng, &t), IsOk());
  EXPECT_TRUE(ef.Residual("w").empty());
  EXPECT_TRUE(ef.Keys().empty());
}

TEST(ErrorFeedbackTest, SetResidualAndKeysForCheckpoints) {
  ErrorFeedback ef(std::make_unique<Fp16Codec>(CodecOptions{}), FeedbackMode::kOn);
  std::vector<float> r = {0.5f, -0.25f};
  ef.SetResidual("b", r);
  ef.SetResidual("a", r);
  EXPECT_THAT(ef.Keys(), ::testing::ElementsAre("a", "b"));
  EncodedTensor t;
  Rng rng(1);
  std::vector<float> g = {1.0f, 1.0f};
  ASSERT_THAT(ef.Encode("a", g, {}, rng, &t), IsOk());
  std::vector<float> out(2, 0.0f);
  ASSERT_THAT(ef.codec().DecodeAdd(t, std::span<float>(out)), IsOk());
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], 0.75f);
  ef.Clear();
  EXPECT_TRUE(ef.Keys().empty());
}

}  // namespace
}  // namespace qtrain::compression
