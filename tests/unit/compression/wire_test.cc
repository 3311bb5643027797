#include "compression/wire.h"

#include <string>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::compression {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

EncodedTensor Sample() {
  EncodedTensor t;
  t.codec = CodecId::kQsgd;
  t.format_version = 1;
  t.num_elements = 6;
  t.shape = {2, 3};
  t.scales = {1.5f, -2.0f};
  t.params = {16, 512};
  t.payload = {1, 2, 3, 4, 5};
  return t;
}

TEST(WireTest, RoundTripKeepsEveryField) {
  std::string bytes = Serialize(Sample(), Checksum::kCrc32);
  ASSERT_OK_AND_ASSIGN(EncodedTensor t, Parse(std::span<const uint8_t>(
                                                  reinterpret_cast<const uint8_t*>(bytes.data()),
                                                  bytes.size()),
                                              1024));
  EncodedTensor s = Sample();
  EXPECT_EQ(t.codec, s.codec);
  EXPECT_EQ(t.format_version, s.format_version);
  EXPECT_EQ(t.num_elements, s.num_elements);
  EXPECT_EQ(t.shape, s.shape);
  EXPECT_EQ(t.scales, s.scales);
  EXPECT_EQ(t.params, s.params);
  EXPECT_EQ(t.payload, s.payload);
}

TEST(WireTest, Crc32MatchesZlibKnownValue) {
  const std::string text = "123456789";
  EXPECT_EQ(PayloadCrc32(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()),
                                                  text.size())),
            0xCBF43926u);
}

TEST(WireTest, ChecksumMismatchIsDataLoss) {
  pb::EncodedTensor proto = ToProto(Sample(), Checksum::kCrc32);
  proto.set_checksum(proto.checksum() ^ 1);
  EXPECT_THAT(FromProto(proto), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("checksum")));
  proto = ToProto(Sample(), Checksum::kNone);
  EXPECT_FALSE(proto.has_checksum());
  EXPECT_THAT(FromProto(proto), IsOk());
}

TEST(WireTest, UnknownCodecAndHugeCountsAreRejected) {
  pb::EncodedTensor proto = ToProto(Sample(), Checksum::kNone);
  proto.set_codec(static_cast<pb::CodecId>(42));
  EXPECT_THAT(FromProto(proto), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("codec id 42")));
  proto.set_codec(pb::CODEC_UNSPECIFIED);
  EXPECT_THAT(FromProto(proto), StatusIs(absl::StatusCode::kInvalidArgument));
  proto = ToProto(Sample(), Checksum::kNone);
  proto.set_num_elements(uint64_t{1} << 50);
  EXPECT_THAT(FromProto(proto), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("limit")));
}

TEST(WireTest, GarbageAndOversizedMessagesAreRejected) {
  const uint8_t garbage[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0x07, 0x12};
  EXPECT_THAT(Parse(garbage, 1024), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("does not parse")));
  std::string bytes = Serialize(Sample(), Checksum::kNone);
  EXPECT_THAT(Parse(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()),
                                             bytes.size()),
                    4),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("exceeds the limit")));
}

}  // namespace
}  // namespace qtrain::compression
