#include "worker/data/dataset.h"

#include <cmath>
#include <filesystem>
#include <numeric>
#include <set>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/data/test_util.h"
#include "worker/data/batch.h"
#include "worker/data/data_spec.h"
#include "worker/data/idx.h"
#include "worker/data/idx_dataset.h"
#include "worker/data/load_dataset.h"

namespace qtrain::data {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Mean and stddev of the normalized floats of all examples of `d`.
std::pair<double, double> NormalizedMoments(const Dataset& d) {
  std::vector<int64_t> idx(d.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::vector<float> images(d.size() * d.example_size());
  std::vector<int32_t> labels(d.size());
  EXPECT_THAT(GatherBatch(d, idx, images, labels), IsOk());
  double sum = 0, sum_sq = 0;
  for (float v : images) {
    sum += v;
    sum_sq += double{v} * v;
  }
  const double mean = sum / images.size();
  return {mean, std::sqrt(sum_sq / images.size() - mean * mean)};
}

TEST(LoadDatasetTest, RealFashionMnistWithCap) {
  if (!std::filesystem::exists(std::string(kFashionMnistDefaultDir) +
                               "/train-images-idx3-ubyte.gz")) {
    GTEST_SKIP() << "Fashion-MNIST is not installed at " << kFashionMnistDefaultDir;
  }
  ASSERT_OK_AND_ASSIGN(DataSpec spec, ParseDataSpec("fashion-mnist"));
  LoadOptions load;
  load.max_train = 500;
  load.max_test = 200;
  ASSERT_OK_AND_ASSIGN(DataSplits s, LoadDataset(spec, load));
  for (const Dataset* d : {&s.train, &s.test}) {
    EXPECT_EQ(d->channels, 1);
    EXPECT_EQ(d->height, 28);
    EXPECT_EQ(d->width, 28);
    EXPECT_EQ(d->num_classes, 10);
    std::set<int32_t> classes(d->labels.begin(), d->labels.end());
    EXPECT_EQ(classes.size(), 10u) << d->name;  // all classes appear in a few hundred examples
    EXPECT_GE(*classes.begin(), 0);
    EXPECT_LE(*classes.rbegin(), 9);
  }
  EXPECT_EQ(s.train.size(), 500);
  EXPECT_EQ(s.test.size(), 200);
  // The files' first labels (ankle boot, T-shirt, T-shirt, dress, ...).
  EXPECT_THAT(std::vector<int32_t>(s.train.labels.begin(), s.train.labels.begin() + 5),
              ElementsAre(9, 0, 0, 3, 0));
  EXPECT_THAT(std::vector<int32_t>(s.test.labels.begin(), s.test.labels.begin() + 3),
              ElementsAre(9, 2, 1));
  // Normalized with the full training set's statistics. Per-image means vary with a stddev
  // of ~0.1 on the [0, 1] scale, so a 500-image sample's mean is within ~0.005 (0.015 after
  // dividing by 0.353) of the population's; the bounds below are several times that.
  const auto [mean, stddev] = NormalizedMoments(s.train);
  EXPECT_NEAR(mean, 0.0, 0.1);
  EXPECT_NEAR(stddev, 1.0, 0.1);
  EXPECT_EQ(TrainAugmentation(spec).enabled(), false);
}

TEST(LoadDatasetTest, SyntheticThroughTheSpec) {
  ASSERT_OK_AND_ASSIGN(DataSpec spec, ParseDataSpec("synthetic:n=64,test=16,shape=3x4x4"));
  ASSERT_OK_AND_ASSIGN(DataSplits s, LoadDataset(spec, {}));
  EXPECT_EQ(s.train.size(), 64);
  EXPECT_EQ(s.test.size(), 16);
  EXPECT_EQ(s.train.example_size(), 48);
  EXPECT_THAT(ValidateDataset(s.train), IsOk());
}

TEST(LoadDatasetTest, IdxThroughTheSpec) {
  const std::string dir = test_util::MakeTestDir();
  const std::vector<int64_t> image_dims = {4, 2, 2};
  const std::vector<int64_t> label_dims = {4};
  const std::vector<uint8_t> labels = {0, 1, 1, 0};
  for (const char* prefix : {"train", "t10k"}) {
    test_util::WriteFile(dir + "/" + prefix + "-images-idx3-ubyte",
                         EncodeIdx(image_dims, test_util::PatternBytes(16)));
    test_util::WriteFile(dir + "/" + prefix + "-labels-idx1-ubyte.gz",
                         test_util::Gzip(EncodeIdx(label_dims, labels)));
  }
  ASSERT_OK_AND_ASSIGN(DataSpec spec, ParseDataSpec("idx:" + dir));
  ASSERT_OK_AND_ASSIGN(DataSplits s, LoadDataset(spec, {}));
  EXPECT_EQ(s.train.num_classes, 2);
  EXPECT_EQ(s.test.size(), 4);
  const auto [mean, stddev] = NormalizedMoments(s.train);
  EXPECT_NEAR(mean, 0.0, 1e-5);
  EXPECT_NEAR(stddev, 1.0, 1e-4);
}

TEST(LoadDatasetTest, MissingDirectoriesAreNotFound) {
  const std::string dir = test_util::MakeTestDir() + "/absent";
  for (const std::string& text :
       std::vector<std::string>{"idx:" + dir, "cifar10:" + dir, "fashion-mnist:" + dir}) {
    ASSERT_OK_AND_ASSIGN(DataSpec spec, ParseDataSpec(text));
    EXPECT_THAT(LoadDataset(spec, {}), StatusIs(absl::StatusCode::kNotFound)) << text;
  }
}

TEST(LoadDatasetTest, CifarGetsCropAndFlip) {
  ASSERT_OK_AND_ASSIGN(DataSpec spec, ParseDataSpec("cifar10:/x"));
  const AugmentOptions a = TrainAugmentation(spec);
  EXPECT_EQ(a.crop_padding, 4);
  EXPECT_TRUE(a.random_horizontal_flip);
}

TEST(LoadDatasetTest, BadLoadOptionsAreInvalidArgument) {
  ASSERT_OK_AND_ASSIGN(DataSpec spec, ParseDataSpec("synthetic"));
  LoadOptions load;
  load.max_test = -3;
  EXPECT_THAT(LoadDataset(spec, load), StatusIs(absl::StatusCode::kInvalidArgument));
  load = LoadOptions{};
  load.max_file_bytes = 0;
  EXPECT_THAT(LoadDataset(spec, load), StatusIs(absl::StatusCode::kInvalidArgument));
}

Dataset Valid() {
  Dataset d;
  d.name = "v";
  d.channels = 1;
  d.height = 1;
  d.width = 2;
  d.num_classes = 2;
  d.pixels = {1, 2, 3, 4, 5, 6};
  d.labels = {0, 1, 1};
  d.normalization = Normalization{{0.5f}, {0.5f}};
  return d;
}

TEST(DatasetTest, ValidateCatchesEachInconsistency) {
  EXPECT_THAT(ValidateDataset(Valid()), IsOk());
  Dataset d = Valid();
  d.pixels.pop_back();
  EXPECT_THAT(ValidateDataset(d),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("5 pixel bytes")));
  d = Valid();
  d.labels[1] = 2;
  EXPECT_THAT(ValidateDataset(d),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("label 2")));
  d = Valid();
  d.width = 0;
  EXPECT_THAT(ValidateDataset(d), StatusIs(absl::StatusCode::kInvalidArgument));
  d = Valid();
  d.normalization.mean.push_back(0);
  EXPECT_THAT(ValidateDataset(d), StatusIs(absl::StatusCode::kInvalidArgument));
  d = Valid();
  d.normalization.stddev[0] = 0;
  EXPECT_THAT(ValidateDataset(d), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(DatasetTest, TruncateKeepsPrefix) {
  Dataset d = Valid();
  TruncateDataset(0, d);  // 0 keeps all
  EXPECT_EQ(d.size(), 3);
  TruncateDataset(10, d);
  EXPECT_EQ(d.size(), 3);
  TruncateDataset(2, d);
  EXPECT_EQ(d.size(), 2);
  EXPECT_THAT(d.pixels, ElementsAre(1, 2, 3, 4));
  EXPECT_THAT(d.example(1), ElementsAre(3, 4));
}

}  // namespace
}  // namespace qtrain::data
