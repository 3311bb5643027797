#include "worker/data/cifar10.h"

#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/data/test_util.h"

namespace qtrain::data {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using test_util::Gzip;
using test_util::MakeTestDir;
using test_util::WriteFile;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Record r of a file: label (file + r) % 10; every pixel byte of channel c is 10*file + c + r.
std::vector<uint8_t> BatchBytes(int file, int records) {
  std::vector<uint8_t> bytes;
  for (int r = 0; r < records; ++r) {
    bytes.push_back(static_cast<uint8_t>((file + r) % 10));
    for (int c = 0; c < 3; ++c)
      bytes.insert(bytes.end(), 1024, static_cast<uint8_t>(10 * file + c + r));
  }
  return bytes;
}

// Files 1..5 hold 3 records each; test_batch (file 0) holds 2.
std::string WriteCifar(const std::string& dir) {
  for (int b = 1; b <= 5; ++b)
    WriteFile(absl::StrCat(dir, "/data_batch_", b, ".bin"), BatchBytes(b, 3));
  WriteFile(dir + "/test_batch.bin", BatchBytes(0, 2));
  return dir;
}

TEST(Cifar10Test, LoadsAllBatchesInOrder) {
  const std::string dir = WriteCifar(MakeTestDir());
  ASSERT_OK_AND_ASSIGN(DataSplits splits, LoadCifar10(dir, {}));
  const Dataset& train = splits.train;
  ASSERT_EQ(train.size(), 15);
  EXPECT_EQ(splits.test.size(), 2);
  EXPECT_EQ(train.channels, 3);
  EXPECT_EQ(train.height, 32);
  EXPECT_EQ(train.width, 32);
  EXPECT_EQ(train.num_classes, 10);
  EXPECT_EQ(train.labels[0], 1);   // file 1, record 0
  EXPECT_EQ(train.labels[14], 7);  // file 5, record 2
  // Example 4 is file 2, record 1: channel c bytes are 21 + c.
  std::span<const uint8_t> ex = train.example(4);
  EXPECT_EQ(ex[0], 21);
  EXPECT_EQ(ex[1023], 21);
  EXPECT_EQ(ex[1024], 22);
  EXPECT_EQ(ex[3071], 23);
  EXPECT_THAT(splits.test.labels, ElementsAre(0, 1));
  // Per-channel statistics differ by channel (channel c is offset by c / 255).
  ASSERT_EQ(train.normalization.mean.size(), 3u);
  EXPECT_NEAR(train.normalization.mean[1] - train.normalization.mean[0], 1.0 / 255, 1e-6);
  EXPECT_EQ(splits.test.normalization.mean, train.normalization.mean);
}

TEST(Cifar10Test, FindsTheTarballFolder) {
  const std::string dir = MakeTestDir();
  std::filesystem::create_directory(dir + "/cifar-10-batches-bin");
  WriteCifar(dir + "/cifar-10-batches-bin");
  ASSERT_OK_AND_ASSIGN(DataSplits splits, LoadCifar10(dir, {}));
  EXPECT_EQ(splits.train.size(), 15);
}

TEST(Cifar10Test, GzipBatchesAreAccepted) {
  const std::string dir = WriteCifar(MakeTestDir());
  WriteFile(dir + "/test_batch.bin", Gzip(BatchBytes(0, 2)));
  ASSERT_OK_AND_ASSIGN(DataSplits splits, LoadCifar10(dir, {}));
  EXPECT_EQ(splits.test.size(), 2);
}

TEST(Cifar10Test, CapStopsReadingEarly) {
  const std::string dir = WriteCifar(MakeTestDir());
  // With max_train = 4, only batches 1 and 2 are needed; 3..5 are never opened.
  for (int b = 3; b <= 5; ++b)
    std::filesystem::remove(absl::StrCat(dir, "/data_batch_", b, ".bin"));
  LoadOptions load;
  load.max_train = 4;
  load.max_test = 1;
  ASSERT_OK_AND_ASSIGN(DataSplits splits, LoadCifar10(dir, load));
  EXPECT_THAT(splits.train.labels, ElementsAre(1, 2, 3, 2));
  EXPECT_THAT(splits.test.labels, ElementsAre(0));
}

TEST(Cifar10Test, SizeNotMultipleOfRecordIsDataLoss) {
  const std::string dir = WriteCifar(MakeTestDir());
  std::vector<uint8_t> bytes = BatchBytes(3, 3);
  bytes.resize(bytes.size() - 100);
  WriteFile(dir + "/data_batch_3.bin", bytes);
  EXPECT_THAT(LoadCifar10(dir, {}),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("data_batch_3.bin: size 9119 is not a multiple of the 3073")));
}

TEST(Cifar10Test, MissingFileIsNotFound) {
  const std::string dir = WriteCifar(MakeTestDir());
  std::filesystem::remove(dir + "/data_batch_5.bin");
  EXPECT_THAT(LoadCifar10(dir, {}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("data_batch_5.bin")));
  std::filesystem::remove(dir + "/test_batch.bin");
  WriteFile(dir + "/data_batch_5.bin", BatchBytes(5, 3));
  EXPECT_THAT(LoadCifar10(dir, {}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("test_batch.bin")));
  EXPECT_THAT(LoadCifar10(dir + "/absent", {}), StatusIs(absl::StatusCode::kNotFound));
}

TEST(Cifar10Test, LabelAboveNineIsInvalidArgument) {
  std::vector<uint8_t> bytes = BatchBytes(1, 3);
  bytes[2 * kCifar10RecordBytes] = 10;
  Dataset d;
  EXPECT_THAT(AppendCifar10Batch(bytes, "b", 0, d),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("b: record 2 has label 10")));
  EXPECT_EQ(d.size(), 0);  // nothing appended from an invalid file
}

TEST(Cifar10Test, AppendValidatesWholeFileEvenWhenCapped) {
  std::vector<uint8_t> bytes = BatchBytes(1, 3);
  bytes[2 * kCifar10RecordBytes] = 200;
  Dataset d;
  EXPECT_THAT(AppendCifar10Batch(bytes, "b", 1, d), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(AppendCifar10Batch(BatchBytes(1, 3), "b", 1, d), IsOk());
  EXPECT_EQ(d.size(), 1);
  EXPECT_EQ(d.pixels.size(), 3072u);
}

TEST(Cifar10Test, EmptyFileIsValidButEmptyTrainingSetIsNot) {
  const std::string dir = MakeTestDir();
  for (int b = 1; b <= 5; ++b) WriteFile(absl::StrCat(dir, "/data_batch_", b, ".bin"), {});
  WriteFile(dir + "/test_batch.bin", {});
  EXPECT_THAT(LoadCifar10(dir, {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("training set is empty")));
}

}  // namespace
}  // namespace qtrain::data
