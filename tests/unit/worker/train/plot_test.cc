// qtrain_plot's pieces: metrics parsing (and its errors), seed averaging, and a PNG that decodes
// to the picture drawn (signature, chunk CRCs, IDAT inflating to filter-0 rows with the curves'
// colours on a white ground).
#include "worker/train/plot.h"

#include <zlib.h>

#include <cmath>
#include <string>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kMetrics[] =
    "{\"type\":\"step\",\"epoch\":0,\"step\":10,\"loss\":2.1,\"accuracy\":0.3}\n"
    "{\"type\":\"epoch\",\"epoch\":0,\"step\":20,\"train_loss\":1.5,\"train_accuracy\":0.5,"
    "\"test_loss\":1.2,\"test_accuracy\":0.61,\"seconds\":1,\"images_per_second\":100}\n"
    "{\"type\":\"epoch\",\"epoch\":1,\"step\":40,\"train_loss\":1.0,\"train_accuracy\":0.7,"
    "\"test_loss\":0.9,\"test_accuracy\":0.75,\"seconds\":1,\"images_per_second\":100}\n";

TEST(PlotTest, ParsesEpochRecordsInPercent) {
  absl::StatusOr<Curve> c = ParseCurve(kMetrics, "m.jsonl");
  ASSERT_THAT(c, IsOk());
  ASSERT_EQ(c->size(), 2u);
  EXPECT_DOUBLE_EQ((*c)[0], 61.0);
  EXPECT_DOUBLE_EQ((*c)[1], 75.0);
}

TEST(PlotTest, BadMetricsAreNamed) {
  EXPECT_THAT(ParseCurve("{\"type\":\"step\",\"epoch\":0}\n", "a.jsonl"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("a.jsonl: no epoch records")));
  EXPECT_THAT(ParseCurve("\n{\"type\":\"epoch\",\"epoch\":0,\"test_accuracy\":nope}\n", "b.jsonl"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("b.jsonl:2")));
  EXPECT_THAT(ParseCurve("{\"type\":\"epoch\",\"epoch\":1,\"test_accuracy\":0.5}\n", "c.jsonl"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("epoch 0 was expected")));
}

TEST(PlotTest, AveragesSeeds) {
  absl::StatusOr<MeanCurve> m = AverageCurves({{60, 70}, {62, 74}, {64, 72}});
  ASSERT_THAT(m, IsOk());
  EXPECT_THAT(m->mean, ElementsAre(62, 72));
  EXPECT_DOUBLE_EQ(m->stddev[0], 2.0);
  EXPECT_DOUBLE_EQ(m->stddev[1], 2.0);
  EXPECT_EQ(m->runs, 3);
  EXPECT_THAT(AverageCurves({{1, 2}, {1}}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(AverageCurves({}), StatusIs(absl::StatusCode::kInvalidArgument));
}

uint32_t BigEndian(const std::string& s, size_t at) {
  return (uint32_t{static_cast<uint8_t>(s[at])} << 24) |
         (uint32_t{static_cast<uint8_t>(s[at + 1])} << 16) |
         (uint32_t{static_cast<uint8_t>(s[at + 2])} << 8) | uint32_t{static_cast<uint8_t>(s[at + 3])};
}

TEST(PlotTest, RendersADecodablePngWithTheCurves) {
  Series a{"Baseline", *AverageCurves({{60, 70, 75, 78}})};
  Series b{"Stage 2+Guided", *AverageCurves({{65, 74, 80, 84}})};
  PlotOptions o;
  o.title = "cnn 2/2";
  o.marks = {2.5};
  o.mark_label = "stage 2";
  absl::StatusOr<std::string> png = RenderPlot({a, b}, o);
  ASSERT_THAT(png, IsOk());
  ASSERT_EQ(png->substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
  // Walk the chunks, checking every CRC; collect IDAT.
  std::string idat;
  size_t at = 8;
  int width = 0, height = 0;
  std::string last;
  while (at + 12 <= png->size()) {
    const uint32_t len = BigEndian(*png, at);
    const std::string type = png->substr(at + 4, 4);
    ASSERT_LE(at + 12 + len, png->size());
    const std::string body = png->substr(at + 4, 4 + len);
    EXPECT_EQ(BigEndian(*png, at + 8 + len),
              crc32(0L, reinterpret_cast<const Bytef*>(body.data()), body.size()))
        << type;
    if (type == "IHDR") {
      width = static_cast<int>(BigEndian(*png, at + 8));
      height = static_cast<int>(BigEndian(*png, at + 12));
    }
    if (type == "IDAT") idat += png->substr(at + 8, len);
    last = type;
    at += 12 + len;
  }
  EXPECT_EQ(last, "IEND");
  ASSERT_EQ(width, o.width);
  ASSERT_EQ(height, o.height);
  std::string raw(static_cast<size_t>(height) * (1 + 3 * width), '\0');
  uLongf raw_size = raw.size();
  ASSERT_EQ(uncompress(reinterpret_cast<Bytef*>(raw.data()), &raw_size,
                       reinterpret_cast<const Bytef*>(idat.data()), idat.size()),
            Z_OK);
  ASSERT_EQ(raw_size, raw.size());
  int white = 0, blue = 0, red = 0;
  for (int y = 0; y < height; ++y) {
    const size_t row = static_cast<size_t>(y) * (1 + 3 * width);
    ASSERT_EQ(raw[row], '\0');
    for (int x = 0; x < width; ++x) {
      const auto* p = reinterpret_cast<const uint8_t*>(&raw[row + 1 + 3 * x]);
      if (p[0] == 255 && p[1] == 255 && p[2] == 255) ++white;
      if (p[0] == 31 && p[1] == 119 && p[2] == 180) ++blue;  // the first series
      if (p[0] == 214 && p[1] == 39 && p[2] == 40) ++red;    // the second
    }
  }
  EXPECT_GT(white, width * height / 2);
  EXPECT_GT(blue, 200);
  EXPECT_GT(red, 200);
}

TEST(PlotTest, RefusesNothingToDraw) {
  EXPECT_THAT(RenderPlot({}, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  PlotOptions tiny;
  tiny.width = 10;
  EXPECT_THAT(RenderPlot({Series{"a", *AverageCurves({{1, 2}})}}, tiny),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::train
