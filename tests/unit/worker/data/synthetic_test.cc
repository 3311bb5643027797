#include "worker/data/synthetic.h"

#include <cmath>
#include <limits>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/data/batch.h"

namespace qtrain::data {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

SyntheticOptions Small() {
  SyntheticOptions o;
  o.train_size = 400;
  o.test_size = 200;
  o.num_classes = 5;
  o.channels = 2;
  o.height = 6;
  o.width = 5;
  o.seed = 42;
  return o;
}

TEST(SyntheticTest, ShapesAndBalancedLabels) {
  ASSERT_OK_AND_ASSIGN(DataSplits s, GenerateSynthetic(Small(), {}));
  EXPECT_EQ(s.train.size(), 400);
  EXPECT_EQ(s.test.size(), 200);
  EXPECT_EQ(s.train.channels, 2);
  EXPECT_EQ(s.train.height, 6);
  EXPECT_EQ(s.train.width, 5);
  EXPECT_EQ(s.train.num_classes, 5);
  EXPECT_EQ(s.train.pixels.size(), 400u * 60);
  std::vector<int> counts(5, 0);
  for (int32_t l : s.train.labels) ++counts[l];
  EXPECT_THAT(counts, ::testing::Each(80));
}

TEST(SyntheticTest, DefaultsMatchFashionMnistShape) {
  ASSERT_OK_AND_ASSIGN(DataSplits s, GenerateSynthetic({}, {}));
  EXPECT_EQ(s.train.example_size(), 784);
  EXPECT_EQ(s.train.num_classes, 10);
  EXPECT_EQ(s.train.size(), 1024);
  EXPECT_EQ(s.test.size(), 256);
}

TEST(SyntheticTest, SameSeedSameBytesDifferentSeedDifferentBytes) {
  ASSERT_OK_AND_ASSIGN(DataSplits a, GenerateSynthetic(Small(), {}));
  ASSERT_OK_AND_ASSIGN(DataSplits b, GenerateSynthetic(Small(), {}));
  EXPECT_EQ(a.train.pixels, b.train.pixels);
  EXPECT_EQ(a.test.pixels, b.test.pixels);
  SyntheticOptions other = Small();
  other.seed = 43;
  ASSERT_OK_AND_ASSIGN(DataSplits c, GenerateSynthetic(other, {}));
  EXPECT_NE(a.train.pixels, c.train.pixels);
}

TEST(SyntheticTest, CapsAndSmallerSizesGivePrefixes) {
  ASSERT_OK_AND_ASSIGN(DataSplits full, GenerateSynthetic(Small(), {}));
  LoadOptions load;
  load.max_train = 50;
  load.max_test = 7;
  ASSERT_OK_AND_ASSIGN(DataSplits capped, GenerateSynthetic(Small(), load));
  ASSERT_EQ(capped.train.size(), 50);
  ASSERT_EQ(capped.test.size(), 7);
  EXPECT_TRUE(std::equal(capped.train.pixels.begin(), capped.train.pixels.end(),
                         full.train.pixels.begin()));
  EXPECT_TRUE(
      std::equal(capped.test.pixels.begin(), capped.test.pixels.end(), full.test.pixels.begin()));
}

// Learnability: a nearest-class-mean classifier fitted on the training split classifies
// nearly every test example. With noise 0.3 and 60 pixels the class means are ~sqrt(60/6)
// = 3.2 apart (pixel units) against noise of 0.3 per direction, so errors are vanishingly rare.
TEST(SyntheticTest, NearestClassMeanClassifiesTestSet) {
  ASSERT_OK_AND_ASSIGN(DataSplits s, GenerateSynthetic(Small(), {}));
  const int64_t d = s.train.example_size();
  std::vector<double> means(5 * d, 0.0);
  for (int64_t i = 0; i < s.train.size(); ++i) {
    for (int64_t p = 0; p < d; ++p) means[s.train.labels[i] * d + p] += s.train.example(i)[p];
  }
  for (double& m : means) m /= 80.0;
  int correct = 0;
  for (int64_t i = 0; i < s.test.size(); ++i) {
    int best = -1;
    double best_dist = std::numeric_limits<double>::infinity();
    for (int k = 0; k < 5; ++k) {
      double dist = 0;
      for (int64_t p = 0; p < d; ++p) {
        const double diff = s.test.example(i)[p] - means[k * d + p];
        dist += diff * diff;
      }
      if (dist < best_dist) {
        best_dist = dist;
        best = k;
      }
    }
    correct += best == s.test.labels[i];
  }
  EXPECT_GE(correct, 196) << "of 200";
}

TEST(SyntheticTest, NormalizedTrainingDataIsStandardized) {
  ASSERT_OK_AND_ASSIGN(DataSplits s, GenerateSynthetic(Small(), {}));
  std::vector<int64_t> all(s.train.size());
  for (int64_t i = 0; i < s.train.size(); ++i) all[i] = i;
  std::vector<float> images(all.size() * s.train.example_size());
  std::vector<int32_t> labels(all.size());
  ASSERT_THAT(GatherBatch(s.train, all, images, labels), IsOk());
  for (int c = 0; c < 2; ++c) {
    double sum = 0, sum_sq = 0, n = 0;
    for (size_t i = 0; i < all.size(); ++i) {
      for (int p = 0; p < 30; ++p) {
        const double v = images[i * 60 + c * 30 + p];
        sum += v;
        sum_sq += v * v;
        ++n;
      }
    }
    EXPECT_NEAR(sum / n, 0.0, 1e-4) << "channel " << c;
    EXPECT_NEAR(sum_sq / n, 1.0, 1e-3) << "channel " << c;
  }
}

TEST(SyntheticTest, ZeroNoiseGivesPrototypes) {
  SyntheticOptions o = Small();
  o.noise = 0;
  ASSERT_OK_AND_ASSIGN(DataSplits s, GenerateSynthetic(o, {}));
  // Examples 0 and 5 share class 0, so they are identical.
  EXPECT_TRUE(
      std::equal(s.train.example(0).begin(), s.train.example(0).end(), s.train.example(5).begin()));
}

TEST(SyntheticTest, InvalidOptionsNameTheField) {
  SyntheticOptions o = Small();
  o.num_classes = 1;
  EXPECT_THAT(GenerateSynthetic(o, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("classes=1")));
  o = Small();
  o.train_size = 0;
  EXPECT_THAT(GenerateSynthetic(o, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("n=0")));
  o = Small();
  o.noise = -1;
  EXPECT_THAT(GenerateSynthetic(o, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("noise")));
  o = Small();
  o.noise = std::nan("");
  EXPECT_THAT(GenerateSynthetic(o, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  o = Small();
  o.height = 0;
  EXPECT_THAT(GenerateSynthetic(o, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("height")));
  o = Small();
  o.train_size = kMaxSyntheticExamples;
  o.channels = 3;
  o.height = o.width = 64;  // 123 GB
  EXPECT_THAT(GenerateSynthetic(o, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("more than the limit")));
}

}  // namespace
}  // namespace qtrain::data
