#include "worker/data/batch.h"

#include <random>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/data/rng.h"

namespace qtrain::data {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::FloatEq;
using ::testing::HasSubstr;

// 4 examples of 2x2x3; example i, channel c, pixel p has byte 10*i + 5*c + p; label i % 3.
Dataset TinyDataset() {
  Dataset d;
  d.name = "tiny";
  d.channels = 2;
  d.height = 2;
  d.width = 3;
  d.num_classes = 3;
  for (int i = 0; i < 4; ++i) {
    d.labels.push_back(i % 3);
    for (int c = 0; c < 2; ++c) {
      for (int p = 0; p < 6; ++p) d.pixels.push_back(static_cast<uint8_t>(10 * i + 5 * c + p));
    }
  }
  d.normalization = Normalization{{0.0f, 0.1f}, {1.0f, 0.5f}};
  return d;
}

float Expected(int byte, int channel) {
  return channel == 0 ? byte / 255.0f : (byte / 255.0f - 0.1f) / 0.5f;
}

TEST(GatherBatchTest, NormalizesAndGathersInIndexOrder) {
  const Dataset d = TinyDataset();
  ASSERT_THAT(ValidateDataset(d), IsOk());
  const std::vector<int64_t> idx = {3, 0, 3};
  std::vector<float> images(3 * 12, -99.0f);
  std::vector<int32_t> labels(3, -1);
  ASSERT_THAT(GatherBatch(d, idx, images, labels), IsOk());
  EXPECT_THAT(labels, ElementsAre(0, 0, 0));
  for (int k = 0; k < 3; ++k) {
    for (int c = 0; c < 2; ++c) {
      for (int p = 0; p < 6; ++p) {
        EXPECT_THAT(images[k * 12 + c * 6 + p], FloatEq(Expected(10 * idx[k] + 5 * c + p, c)))
            << k << " " << c << " " << p;
      }
    }
  }
}

TEST(GatherBatchTest, WritesOnlyTheBatchPrefixOfLargerBuffers) {
  const Dataset d = TinyDataset();
  std::vector<float> images(4 * 12, -99.0f);
  std::vector<int32_t> labels(4, -1);
  const std::vector<int64_t> idx = {1};
  ASSERT_THAT(GatherBatch(d, idx, images, labels), IsOk());
  EXPECT_THAT(labels, ElementsAre(1, -1, -1, -1));
  EXPECT_EQ(images[12], -99.0f);
}

TEST(GatherBatchTest, AugmentationIsDeterministicAndPadsWithNormalizedZero) {
  const Dataset d = TinyDataset();
  const std::vector<int64_t> idx = {0, 1, 2, 3, 0, 1, 2, 3};
  const AugmentOptions augment{.crop_padding = 1, .random_horizontal_flip = true};
  std::vector<float> a(idx.size() * 12), b(idx.size() * 12), plain(idx.size() * 12);
  std::vector<int32_t> la(idx.size()), lb(idx.size()), lp(idx.size());
  std::mt19937_64 rng_a(DeriveSeed(1, 2));
  std::mt19937_64 rng_b(DeriveSeed(1, 2));
  ASSERT_THAT(GatherBatch(d, idx, augment, rng_a, a, la), IsOk());
  ASSERT_THAT(GatherBatch(d, idx, augment, rng_b, b, lb), IsOk());
  ASSERT_THAT(GatherBatch(d, idx, plain, lp), IsOk());
  EXPECT_EQ(a, b);
  EXPECT_EQ(la, lp);  // labels are not changed by augmentation
  EXPECT_NE(a, plain);
  // Replaying the transforms by hand gives the same floats.
  std::mt19937_64 replay(DeriveSeed(1, 2));
  for (size_t k = 0; k < idx.size(); ++k) {
    const ImageTransform t = SampleTransform(augment, replay);
    std::vector<uint8_t> shifted(12);
    ApplyTransform(t, 2, 2, 3, d.example(idx[k]), shifted);
    for (int c = 0; c < 2; ++c) {
      for (int p = 0; p < 6; ++p) {
        EXPECT_THAT(a[k * 12 + c * 6 + p], FloatEq(Expected(shifted[c * 6 + p], c)));
      }
    }
  }
}

TEST(GatherBatchTest, BadIndexIsInvalidArgument) {
  const Dataset d = TinyDataset();
  std::vector<float> images(24);
  std::vector<int32_t> labels(2);
  const std::vector<int64_t> high = {0, 4};
  EXPECT_THAT(GatherBatch(d, high, images, labels),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("index 4 at position 1 is outside [0, 4)")));
  const std::vector<int64_t> negative = {-1};
  EXPECT_THAT(GatherBatch(d, negative, images, labels),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(GatherBatchTest, SmallBuffersAreInvalidArgument) {
  const Dataset d = TinyDataset();
  const std::vector<int64_t> idx = {0, 1};
  std::vector<float> images(23);
  std::vector<int32_t> labels(2);
  EXPECT_THAT(GatherBatch(d, idx, images, labels), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<float> images_ok(24);
  std::vector<int32_t> labels_short(1);
  EXPECT_THAT(GatherBatch(d, idx, images_ok, labels_short),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(GatherBatchTest, BadCropPaddingIsInvalidArgument) {
  const Dataset d = TinyDataset();
  const std::vector<int64_t> idx = {0};
  std::vector<float> images(12);
  std::vector<int32_t> labels(1);
  std::mt19937_64 rng(1);
  for (int pad : {-1, kMaxCropPadding + 1}) {
    EXPECT_THAT(GatherBatch(d, idx, AugmentOptions{.crop_padding = pad}, rng, images, labels),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("crop_padding")));
  }
}

TEST(GatherBatchTest, EmptyBatchIsFine) {
  const Dataset d = TinyDataset();
  EXPECT_THAT(GatherBatch(d, {}, {}, {}), IsOk());
}

}  // namespace
}  // namespace qtrain::data
