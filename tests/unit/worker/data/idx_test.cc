#include "worker/data/idx.h"

#include <algorithm>
#include <random>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/data/largest_allocation.h"
#include "tests/unit/worker/data/test_util.h"

namespace qtrain::data {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using test_util::LargestAllocation;
using test_util::PatternBytes;
using test_util::ResetLargestAllocation;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<uint8_t> ImagesFile(int64_t n, int64_t rows, int64_t cols) {
  const std::vector<int64_t> dims = {n, rows, cols};
  return EncodeIdx(dims, PatternBytes(n * rows * cols));
}

std::vector<uint8_t> LabelsFile(const std::vector<uint8_t>& labels) {
  const std::vector<int64_t> dims = {static_cast<int64_t>(labels.size())};
  return EncodeIdx(dims, labels);
}

// A raw header: magic bytes then big-endian dims, with no body.
std::vector<uint8_t> Header(uint8_t type, std::vector<uint32_t> dims) {
  std::vector<uint8_t> out = {0, 0, type, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims) {
    out.insert(out.end(), {static_cast<uint8_t>(d >> 24), static_cast<uint8_t>(d >> 16),
                           static_cast<uint8_t>(d >> 8), static_cast<uint8_t>(d)});
  }
  return out;
}

TEST(IdxTest, EncodeWritesTheDocumentedLayout) {
  const std::vector<int64_t> dims = {2, 1, 3};
  const std::vector<uint8_t> data = {1, 2, 3, 4, 5, 6};
  EXPECT_THAT(EncodeIdx(dims, data),
              ElementsAre(0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6));
}

TEST(IdxTest, ImagesRoundTrip) {
  ASSERT_OK_AND_ASSIGN(IdxImages images, ParseIdxImages(ImagesFile(5, 4, 3), "img"));
  EXPECT_EQ(images.count, 5);
  EXPECT_EQ(images.rows, 4);
  EXPECT_EQ(images.cols, 3);
  EXPECT_EQ(images.pixels, PatternBytes(5 * 4 * 3));
}

TEST(IdxTest, LabelsRoundTrip) {
  ASSERT_OK_AND_ASSIGN(std::vector<int32_t> labels,
                       ParseIdxLabels(LabelsFile({0, 9, 3, 3}), "lbl", 10));
  EXPECT_THAT(labels, ElementsAre(0, 9, 3, 3));
}

TEST(IdxTest, ZeroImagesIsValid) {
  ASSERT_OK_AND_ASSIGN(IdxImages images, ParseIdxImages(ImagesFile(0, 28, 28), "img"));
  EXPECT_EQ(images.count, 0);
  EXPECT_TRUE(images.pixels.empty());
}

TEST(IdxTest, GenericRank4) {
  const std::vector<int64_t> dims = {2, 3, 2, 2};
  ASSERT_OK_AND_ASSIGN(IdxArray a, ParseIdx(EncodeIdx(dims, PatternBytes(24)), "a"));
  EXPECT_THAT(a.dims, ElementsAre(2, 3, 2, 2));
  EXPECT_EQ(a.data, PatternBytes(24));
}

TEST(IdxTest, BadMagicIsDataLoss) {
  std::vector<uint8_t> bytes = ImagesFile(1, 2, 2);
  bytes[0] = 0x1f;  // e.g. a gzip file that was not inflated
  EXPECT_THAT(ParseIdxImages(bytes, "img"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("img: not an IDX file")));
  bytes = ImagesFile(1, 2, 2);
  bytes[1] = 0x01;
  EXPECT_THAT(ParseIdx(bytes, "img"), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(IdxTest, UnsupportedTypeIsInvalidArgument) {
  std::vector<uint8_t> bytes = ImagesFile(1, 2, 2);
  bytes[2] = 0x0d;  // float
  EXPECT_THAT(ParseIdxImages(bytes, "img"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("element type 0x0d")));
}

TEST(IdxTest, WrongKindOfFileIsInvalidArgument) {
  EXPECT_THAT(ParseIdxImages(LabelsFile({1, 2}), "img"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not an IDX image file")));
  EXPECT_THAT(ParseIdxLabels(ImagesFile(1, 2, 2), "lbl", 10),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not an IDX label file")));
  EXPECT_THAT(ParseIdx(Header(8, {}), "a"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("rank 0")));
}

TEST(IdxTest, TruncatedHeaderIsDataLoss) {
  const std::vector<uint8_t> full = ImagesFile(2, 2, 2);
  EXPECT_THAT(ParseIdxImages(std::span<const uint8_t>(full).first(3), "img"),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("truncated IDX header: expected at least 4 bytes, got 3")));
  EXPECT_THAT(ParseIdxImages(std::span<const uint8_t>(full).first(10), "img"),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("truncated IDX header: expected 16 bytes for rank 3, got 10")));
  EXPECT_THAT(ParseIdxImages({}, "img"), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(IdxTest, TruncatedBodyIsDataLoss) {
  std::vector<uint8_t> bytes = ImagesFile(10, 28, 28);
  bytes.pop_back();
  EXPECT_THAT(ParseIdxImages(bytes, "train-images"),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("train-images: truncated IDX body: dimensions 10x28x28 "
                                 "expected 7840 bytes, got 7839")));
  std::vector<uint8_t> labels = LabelsFile({1, 2, 3});
  labels.pop_back();
  EXPECT_THAT(ParseIdxLabels(labels, "lbl", 10),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("expected 3 bytes, got 2")));
}

TEST(IdxTest, TrailingBytesAreDataLoss) {
  std::vector<uint8_t> bytes = ImagesFile(2, 2, 2);
  bytes.push_back(0);
  EXPECT_THAT(ParseIdxImages(bytes, "img"),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("longer than its dimensions 2x2x2: expected 8 bytes, got 9")));
}

TEST(IdxTest, DimensionOverflowIsDataLoss) {
  const std::vector<uint8_t> bytes = Header(8, {0xffffffff, 0xffffffff, 0xffffffff});
  EXPECT_THAT(ParseIdx(bytes, "img"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("overflow a 64-bit size")));
  const std::vector<uint8_t> rank4 = Header(8, {0xffffffff, 0xffffffff, 0xffffffff, 2});
  EXPECT_THAT(ParseIdx(rank4, "img"), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(IdxTest, HugeDeclaredSizeIsRejectedBeforeAllocating) {
  // 1e9 images of 28x28 = 784 GB declared, 100 bytes present.
  std::vector<uint8_t> bytes = Header(8, {1000000000, 28, 28});
  bytes.resize(bytes.size() + 100);
  ResetLargestAllocation();
  const absl::StatusOr<IdxImages> images = ParseIdxImages(bytes, "img");
  const size_t largest = LargestAllocation();
  EXPECT_THAT(images, StatusIs(absl::StatusCode::kDataLoss,
                               HasSubstr("expected 784000000000 bytes, got 100")));
  EXPECT_LT(largest, size_t{4096});
}

TEST(IdxTest, ZeroSizedImagesAreInvalidArgument) {
  std::vector<uint8_t> bytes = Header(8, {5, 0, 28});
  EXPECT_THAT(ParseIdxImages(bytes, "img"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("image size 0x28")));
}

TEST(IdxTest, LabelOutOfRangeIsInvalidArgument) {
  EXPECT_THAT(ParseIdxLabels(LabelsFile({0, 1, 10, 2}), "lbl", 10),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("lbl: label 10 at index 2 is outside [0, 10)")));
  EXPECT_THAT(ParseIdxLabels(LabelsFile({255}), "lbl", 256), IsOk());
}

// Random byte flips, truncations and extensions of valid files either parse or return an error;
// run under ASan/UBSan this checks that no input reads out of bounds.
TEST(IdxTest, MutatedInputsReturnStatusesWithoutCrashing) {
  std::mt19937_64 rng(2024);
  const std::vector<uint8_t> images = ImagesFile(3, 4, 5);
  const std::vector<uint8_t> labels = LabelsFile({1, 2, 3});
  int ok = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::vector<uint8_t> bytes = (iter % 2 == 0) ? images : labels;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      switch (rng() % 3) {
        case 0:  // flip a byte, biased towards the header
          if (!bytes.empty()) bytes[rng() % std::min<size_t>(bytes.size(), 20)] ^= rng() & 0xff;
          break;
        case 1:
          bytes.resize(rng() % (bytes.size() + 1));
          break;
        case 2:
          bytes.push_back(static_cast<uint8_t>(rng()));
          break;
      }
    }
    ok += ParseIdxImages(bytes, "m").ok();
    ok += ParseIdxLabels(bytes, "m", 10).ok();
    ok += ParseIdx(bytes, "m").ok();
  }
  EXPECT_GT(ok, 0);  // some mutations leave a valid file (e.g. a flipped pixel)
}

}  // namespace
}  // namespace qtrain::data
