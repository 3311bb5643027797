#include "worker/data/idx_dataset.h"

#include <filesystem>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/data/test_util.h"
#include "worker/data/idx.h"

namespace qtrain::data {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using test_util::Gzip;
using test_util::MakeTestDir;
using test_util::PatternBytes;
using test_util::WriteFile;
using ::testing::ElementsAre;
using ::testing::FloatEq;
using ::testing::HasSubstr;

enum class Compression { kGzip, kPlain };

std::vector<uint8_t> Images(int64_t n, int64_t rows, int64_t cols) {
  const std::vector<int64_t> dims = {n, rows, cols};
  return EncodeIdx(dims, PatternBytes(n * rows * cols));
}

std::vector<uint8_t> Labels(const std::vector<uint8_t>& labels) {
  const std::vector<int64_t> dims = {static_cast<int64_t>(labels.size())};
  return EncodeIdx(dims, labels);
}

void WriteIdx(const std::string& dir, const std::string& stem, const std::vector<uint8_t>& bytes,
              Compression compression) {
  if (compression == Compression::kGzip) {
    WriteFile(dir + "/" + stem + ".gz", Gzip(bytes));
  } else {
    WriteFile(dir + "/" + stem, bytes);
  }
}

// A valid 4x4 data set: 6 training examples (labels 0..2), 3 test examples.
std::string WriteSmallSet(Compression compression = Compression::kGzip) {
  const std::string dir = MakeTestDir();
  WriteIdx(dir, "train-images-idx3-ubyte", Images(6, 4, 4), compression);
  WriteIdx(dir, "train-labels-idx1-ubyte", Labels({0, 1, 2, 0, 1, 2}), compression);
  WriteIdx(dir, "t10k-images-idx3-ubyte", Images(3, 4, 4), compression);
  WriteIdx(dir, "t10k-labels-idx1-ubyte", Labels({2, 1, 0}), compression);
  return dir;
}

TEST(LoadIdxDirectoryTest, LoadsGzipFiles) {
  const std::string dir = WriteSmallSet();
  ASSERT_OK_AND_ASSIGN(DataSplits splits, LoadIdxDirectory(dir, {}, {}));
  EXPECT_EQ(splits.train.size(), 6);
  EXPECT_EQ(splits.test.size(), 3);
  EXPECT_EQ(splits.train.channels, 1);
  EXPECT_EQ(splits.train.height, 4);
  EXPECT_EQ(splits.train.width, 4);
  EXPECT_EQ(splits.train.num_classes, 3);  // inferred
  EXPECT_EQ(splits.test.num_classes, 3);
  EXPECT_EQ(splits.train.pixels, PatternBytes(6 * 16));
  EXPECT_THAT(splits.test.labels, ElementsAre(2, 1, 0));
  EXPECT_EQ(splits.train.name, "idx/train");
  // Statistics are the training set's, shared by the test split.
  const Normalization expected = ComputeNormalization(PatternBytes(6 * 16), 1, 16);
  EXPECT_THAT(splits.train.normalization.mean, ElementsAre(FloatEq(expected.mean[0])));
  EXPECT_THAT(splits.test.normalization.mean, ElementsAre(FloatEq(expected.mean[0])));
}

TEST(LoadIdxDirectoryTest, LoadsUncompressedFiles) {
  const std::string dir = WriteSmallSet(Compression::kPlain);
  ASSERT_OK_AND_ASSIGN(DataSplits splits, LoadIdxDirectory(dir, {}, {}));
  EXPECT_EQ(splits.train.size(), 6);
}

TEST(LoadIdxDirectoryTest, CapsKeepThePrefix) {
  const std::string dir = WriteSmallSet();
  LoadOptions load;
  load.max_train = 4;
  load.max_test = 1;
  ASSERT_OK_AND_ASSIGN(DataSplits splits, LoadIdxDirectory(dir, {}, load));
  EXPECT_EQ(splits.train.size(), 4);
  EXPECT_EQ(splits.train.pixels, PatternBytes(4 * 16));
  EXPECT_THAT(splits.test.labels, ElementsAre(2));
  EXPECT_EQ(splits.train.num_classes, 3);  // inferred from the whole file
}

TEST(LoadIdxDirectoryTest, ExplicitClassesAndNormalization) {
  const std::string dir = WriteSmallSet();
  IdxDirectoryOptions options;
  options.num_classes = 10;
  options.normalization = Normalization{{0.5f}, {0.25f}};
  ASSERT_OK_AND_ASSIGN(DataSplits splits, LoadIdxDirectory(dir, options, {}));
  EXPECT_EQ(splits.train.num_classes, 10);
  EXPECT_THAT(splits.train.normalization.stddev, ElementsAre(0.25f));
}

TEST(LoadIdxDirectoryTest, MissingFileIsNotFound) {
  const std::string dir = WriteSmallSet();
  std::filesystem::remove(dir + "/t10k-labels-idx1-ubyte.gz");
  EXPECT_THAT(LoadIdxDirectory(dir, {}, {}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("t10k-labels-idx1-ubyte")));
  EXPECT_THAT(LoadIdxDirectory(dir + "/no-such-dir", {}, {}),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(LoadIdxDirectoryTest, CountMismatchIsInvalidArgument) {
  const std::string dir = WriteSmallSet();
  WriteIdx(dir, "train-labels-idx1-ubyte", Labels({0, 1, 2, 0, 1}), Compression::kGzip);
  EXPECT_THAT(LoadIdxDirectory(dir, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("6 images but")));
}

TEST(LoadIdxDirectoryTest, LabelOutOfRangeIsInvalidArgument) {
  const std::string dir = WriteSmallSet();
  IdxDirectoryOptions options;
  options.num_classes = 2;
  EXPECT_THAT(LoadIdxDirectory(dir, options, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("label 2 at index 2")));
  // With inferred classes (3), a test label of 3 is out of range.
  WriteIdx(dir, "t10k-labels-idx1-ubyte", Labels({2, 3, 0}), Compression::kGzip);
  EXPECT_THAT(LoadIdxDirectory(dir, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("inferred")));
}

TEST(LoadIdxDirectoryTest, ImageSizeMismatchIsInvalidArgument) {
  const std::string dir = WriteSmallSet();
  WriteIdx(dir, "t10k-images-idx3-ubyte", Images(3, 5, 4), Compression::kGzip);
  EXPECT_THAT(LoadIdxDirectory(dir, {}, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("test images are 5x4")));
}

TEST(LoadIdxDirectoryTest, CorruptGzipIsDataLossNamingTheFile) {
  const std::string dir = WriteSmallSet();
  std::vector<uint8_t> gz = Gzip(Images(6, 4, 4));
  for (size_t i = 12; i < gz.size() - 8; ++i) gz[i] ^= 0x5a;
  WriteFile(dir + "/train-images-idx3-ubyte.gz", gz);
  EXPECT_THAT(LoadIdxDirectory(dir, {}, {}),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("train-images-idx3-ubyte.gz")));
}

TEST(LoadIdxDirectoryTest, TruncatedGzipIsDataLoss) {
  const std::string dir = WriteSmallSet();
  const std::vector<uint8_t> gz = Gzip(Images(6, 4, 4));
  WriteFile(dir + "/train-images-idx3-ubyte.gz", std::span<const uint8_t>(gz).first(gz.size() - 5));
  EXPECT_THAT(LoadIdxDirectory(dir, {}, {}),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("truncated gzip stream")));
}

TEST(LoadIdxDirectoryTest, TruncatedIdxInsideValidGzipIsDataLoss) {
  const std::string dir = WriteSmallSet();
  std::vector<uint8_t> images = Images(6, 4, 4);
  images.resize(images.size() - 16);
  WriteIdx(dir, "train-images-idx3-ubyte", images, Compression::kGzip);
  EXPECT_THAT(LoadIdxDirectory(dir, {}, {}),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("expected 96 bytes, got 80")));
}

TEST(LoadIdxDirectoryTest, FileCapIsEnforced) {
  const std::string dir = WriteSmallSet();
  LoadOptions load;
  load.max_file_bytes = 50;  // the train images inflate to 16 + 96 bytes
  EXPECT_THAT(LoadIdxDirectory(dir, {}, load), StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST(LoadIdxDirectoryTest, BadOptionsAreInvalidArgument) {
  const std::string dir = WriteSmallSet();
  LoadOptions load;
  load.max_train = -1;
  EXPECT_THAT(LoadIdxDirectory(dir, {}, load), StatusIs(absl::StatusCode::kInvalidArgument));
  IdxDirectoryOptions options;
  options.num_classes = 300;
  EXPECT_THAT(LoadIdxDirectory(dir, options, {}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(LoadFashionMnistTest, UsesPublishedStatistics) {
  // A fake "Fashion-MNIST" in a temp dir: labels must be < 10, statistics are the constants.
  const std::string dir = WriteSmallSet();
  ASSERT_OK_AND_ASSIGN(DataSplits splits, LoadFashionMnist(dir, {}));
  EXPECT_EQ(splits.train.num_classes, 10);
  EXPECT_EQ(splits.train.name, "fashion-mnist/train");
  EXPECT_THAT(splits.train.normalization.mean, ElementsAre(kFashionMnistMean));
  EXPECT_THAT(splits.test.normalization.stddev, ElementsAre(kFashionMnistStd));
}

}  // namespace
}  // namespace qtrain::data
