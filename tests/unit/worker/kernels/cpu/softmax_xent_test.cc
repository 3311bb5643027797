#include "worker/kernels/cpu/softmax_xent.h"

#include <cmath>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"

namespace qtrain::kernels {
namespace {

using qtrain::testing::IsOk;
using qtrain::testing::StatusIs;
using testing::KernelTest;
using testing::RandomVector;

struct Reference {
  double mean_loss = 0.0;
  int64_t correct = 0;
  std::vector<double> dlogits;
};

Reference SoftmaxReference(int64_t batch, int64_t classes, const std::vector<float>& z,
                           const std::vector<int32_t>& labels) {
  Reference r;
  r.dlogits.resize(batch * classes);
  for (int64_t i = 0; i < batch; ++i) {
    const float* row = z.data() + i * classes;
    int64_t argmax = 0;
    for (int64_t j = 1; j < classes; ++j) {
      if (row[j] > row[argmax]) argmax = j;
    }
    r.correct += argmax == labels[i] ? 1 : 0;
    double sum = 0.0;
    for (int64_t j = 0; j < classes; ++j)
      sum += std::exp(static_cast<double>(row[j]) - row[argmax]);
    r.mean_loss += std::log(sum) + row[argmax] - row[labels[i]];
    for (int64_t j = 0; j < classes; ++j) {
      const double p = std::exp(static_cast<double>(row[j]) - row[argmax]) / sum;
      r.dlogits[i * classes + j] = (p - (j == labels[i] ? 1.0 : 0.0)) / batch;
    }
  }
  r.mean_loss /= batch;
  return r;
}

std::vector<int32_t> RandomLabels(int64_t batch, int64_t classes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> labels(batch);
  for (int32_t& l : labels) l = static_cast<int32_t>(rng() % classes);
  return labels;
}

class SoftmaxXentTest : public KernelTest {};

TEST_P(SoftmaxXentTest, MatchesDoubleReference) {
  for (auto [batch, classes] :
       std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {1, 10}, {7, 3}, {128, 10}, {600, 17}}) {
    SCOPED_TRACE(::testing::Message() << "batch=" << batch << " classes=" << classes);
    const std::vector<float> z = RandomVector(batch * classes, 21, -4.0f, 4.0f);
    const std::vector<int32_t> labels = RandomLabels(batch, classes, 22);
    std::vector<float> dz(batch * classes, -7.0f);
    ASSERT_OK_AND_ASSIGN(SoftmaxXentResult got, SoftmaxCrossEntropy(ctx_, batch, classes, z.data(),
                                                                    labels.data(), dz.data()));
    const Reference want = SoftmaxReference(batch, classes, z, labels);
    EXPECT_NEAR(got.mean_loss, want.mean_loss, 1e-12 * (1.0 + want.mean_loss));
    EXPECT_EQ(got.correct, want.correct);
    for (int64_t i = 0; i < batch * classes; ++i) {
      // One float rounding of a value computed in double.
      ASSERT_NEAR(dz[i], want.dlogits[i], 2.0 * testing::kU * std::fabs(want.dlogits[i]) + 1e-30)
          << i;
    }
  }
}

TEST_P(SoftmaxXentTest, StableForHugeLogits) {
  const std::vector<float> z = {1000.0f, -1000.0f, 999.0f, 3e38f, -3e38f, 0.0f};
  const std::vector<int32_t> labels = {2, 1};
  std::vector<float> dz(6);
  ASSERT_OK_AND_ASSIGN(SoftmaxXentResult got,
                       SoftmaxCrossEntropy(ctx_, 2, 3, z.data(), labels.data(), dz.data()));
  // Row 0: log(1 + e^-1 + e^-2000) + 1000 - 999; row 1: its label sits 6e38 below the max (more
  // than FLT_MAX, fine in double).
  EXPECT_TRUE(std::isfinite(got.mean_loss));
  const double row1 = static_cast<double>(z[3]) - z[4];
  EXPECT_NEAR(got.mean_loss, (std::log1p(std::exp(-1.0)) + 1.0 + row1) / 2, 1e25);
  for (float v : dz) EXPECT_TRUE(std::isfinite(v));
  EXPECT_EQ(got.correct, 0);
}

TEST_P(SoftmaxXentTest, TiesPickTheFirstMaximum) {
  const std::vector<float> z = {2.0f, 2.0f, 1.0f, 0.5f, 3.0f, 3.0f};
  const std::vector<int32_t> labels = {0, 2};  // row 0 correct (first max), row 1 not
  ASSERT_OK_AND_ASSIGN(SoftmaxXentResult got,
                       SoftmaxCrossEntropy(ctx_, 2, 3, z.data(), labels.data(), nullptr));
  EXPECT_EQ(got.correct, 1);
}

TEST_P(SoftmaxXentTest, GradientMatchesFiniteDifferences) {
  const int64_t batch = 3, classes = 4;
  std::vector<float> z = RandomVector(batch * classes, 23, -2.0f, 2.0f);
  const std::vector<int32_t> labels = {3, 0, 1};
  std::vector<float> dz(batch * classes);
  ASSERT_THAT(SoftmaxCrossEntropy(ctx_, batch, classes, z.data(), labels.data(), dz.data()),
              IsOk());
  // The loss is computed in double from float logits, so a central difference with h = 1e-3
  // has truncation error ~h^2 and rounding error ~1e-16 / h.
  const float h = 1.0f / 1024;
  for (int64_t i = 0; i < batch * classes; ++i) {
    const float saved = z[i];
    z[i] = saved + h;
    const double plus =
        SoftmaxCrossEntropy(ctx_, batch, classes, z.data(), labels.data(), nullptr)->mean_loss;
    z[i] = saved - h;
    const double minus =
        SoftmaxCrossEntropy(ctx_, batch, classes, z.data(), labels.data(), nullptr)->mean_loss;
    z[i] = saved;
    EXPECT_NEAR(dz[i], (plus - minus) / (2.0 * h), 1e-5) << "logit " << i;
  }
}

TEST_P(SoftmaxXentTest, RejectsBadLabelsWithoutWriting) {
  const std::vector<float> z(6, 0.0f);
  std::vector<float> dz(6, 42.0f);
  for (std::vector<int32_t> labels : {std::vector<int32_t>{0, 3}, std::vector<int32_t>{-1, 0}}) {
    EXPECT_THAT(SoftmaxCrossEntropy(ctx_, 2, 3, z.data(), labels.data(), dz.data()),
                StatusIs(absl::StatusCode::kInvalidArgument));
  }
  EXPECT_EQ(dz, std::vector<float>(6, 42.0f));
}

TEST_P(SoftmaxXentTest, RejectsEmptyShapes) {
  const std::vector<float> z(1, 0.0f);
  const std::vector<int32_t> labels(1, 0);
  EXPECT_THAT(SoftmaxCrossEntropy(ctx_, 0, 3, z.data(), labels.data(), nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(SoftmaxCrossEntropy(ctx_, 1, 0, z.data(), labels.data(), nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

QTRAIN_INSTANTIATE_KERNEL_TEST(SoftmaxXentTest);

}  // namespace
}  // namespace qtrain::kernels
