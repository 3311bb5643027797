#include "worker/data/gzip_file.h"

#include <algorithm>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

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
using test_util::PatternBytes;
using test_util::WriteFile;
using ::testing::HasSubstr;

TEST(InflateGzipTest, RoundTrip) {
  const std::vector<uint8_t> data = PatternBytes(100000);
  ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> out, InflateGzip(Gzip(data), "mem", 1 << 20));
  EXPECT_EQ(out, data);
}

TEST(InflateGzipTest, EmptyPayload) {
  ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> out, InflateGzip(Gzip({}), "mem", 1));
  EXPECT_TRUE(out.empty());
}

TEST(InflateGzipTest, ConcatenatedMembersAreJoined) {
  const std::vector<uint8_t> a = PatternBytes(1000);
  const std::vector<uint8_t> b(500, 7);
  std::vector<uint8_t> both = Gzip(a);
  const std::vector<uint8_t> gb = Gzip(b);
  both.insert(both.end(), gb.begin(), gb.end());
  ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> out, InflateGzip(both, "mem", 1 << 20));
  std::vector<uint8_t> expected(a.size() + b.size());
  std::copy(b.begin(), b.end(), std::copy(a.begin(), a.end(), expected.begin()));
  EXPECT_EQ(out, expected);
}

TEST(InflateGzipTest, NotGzipIsDataLoss) {
  const std::vector<uint8_t> data = {1, 2, 3, 4};
  EXPECT_THAT(InflateGzip(data, "mem", 100), StatusIs(absl::StatusCode::kDataLoss));
}

TEST(InflateGzipTest, TruncatedStreamIsDataLoss) {
  const std::vector<uint8_t> gz = Gzip(PatternBytes(50000));
  for (size_t cut : {gz.size() - 1, gz.size() - 8, gz.size() / 2, size_t{12}}) {
    std::vector<uint8_t> truncated(gz.begin(), gz.begin() + cut);
    EXPECT_THAT(InflateGzip(truncated, "x.gz", 1 << 20),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr("x.gz: truncated")))
        << "cut at " << cut << " of " << gz.size();
  }
}

TEST(InflateGzipTest, CorruptDeflateDataIsDataLoss) {
  std::vector<uint8_t> gz = Gzip(PatternBytes(50000));
  for (size_t i = 20; i < 40; ++i) gz[i] ^= 0xff;
  EXPECT_THAT(InflateGzip(gz, "x.gz", 1 << 20),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("x.gz: corrupt gzip data")));
}

TEST(InflateGzipTest, CrcMismatchIsDataLoss) {
  std::vector<uint8_t> gz = Gzip(PatternBytes(1000));
  gz[gz.size() - 8] ^= 0x01;  // first CRC32 byte of the trailer
  EXPECT_THAT(InflateGzip(gz, "x.gz", 1 << 20),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("incorrect data check")));
}

TEST(InflateGzipTest, LengthTrailerLieIsDataLossAndDoesNotOverAllocate) {
  std::vector<uint8_t> gz = Gzip(PatternBytes(1000));
  // ISIZE claims 4 GiB - 1; the output reservation is bounded by the cap, and zlib checks it.
  for (size_t i = gz.size() - 4; i < gz.size(); ++i) gz[i] = 0xff;
  EXPECT_THAT(InflateGzip(gz, "x.gz", 4096),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("incorrect length check")));
}

TEST(InflateGzipTest, TrailingGarbageIsDataLoss) {
  std::vector<uint8_t> gz = Gzip(PatternBytes(1000));
  gz.push_back(0);
  gz.push_back(1);
  EXPECT_THAT(InflateGzip(gz, "x.gz", 1 << 20),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("2 unexpected bytes")));
}

TEST(InflateGzipTest, OutputCapIsEnforced) {
  const std::vector<uint8_t> zeros(1 << 20, 0);  // compresses ~1000:1, a small "bomb"
  const std::vector<uint8_t> gz = Gzip(zeros);
  EXPECT_THAT(InflateGzip(gz, "bomb.gz", 1000),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("bomb.gz")));
  EXPECT_THAT(InflateGzip(gz, "bomb.gz", (1 << 20) - 1),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(InflateGzip(gz, "bomb.gz", 1 << 20), IsOk());  // exactly at the cap is fine
}

// Random corruptions of a valid stream either inflate or return an error, within the cap.
TEST(InflateGzipTest, MutatedStreamsReturnStatusesWithoutCrashing) {
  std::mt19937_64 rng(99);
  const std::vector<uint8_t> gz = Gzip(PatternBytes(5000));
  for (int iter = 0; iter < 1000; ++iter) {
    std::vector<uint8_t> bytes = gz;
    for (int e = 0; e < 3; ++e) bytes[2 + rng() % (bytes.size() - 2)] ^= 1 << (rng() % 8);
    if (rng() % 4 == 0) bytes.resize(2 + rng() % (bytes.size() - 1));
    const absl::StatusOr<std::vector<uint8_t>> out = InflateGzip(bytes, "m", 8192);
    if (out.ok()) {
      EXPECT_LE(out->size(), 8192u);
    } else {
      EXPECT_THAT(out.status().code(), ::testing::AnyOf(absl::StatusCode::kDataLoss,
                                                        absl::StatusCode::kResourceExhausted));
    }
  }
}

TEST(ReadMaybeGzipFileTest, PlainFileIsReturnedAsIs) {
  const std::string path = MakeTestDir() + "/plain.bin";
  const std::vector<uint8_t> data = PatternBytes(3000);
  WriteFile(path, data);
  ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> out, ReadMaybeGzipFile(path));
  EXPECT_EQ(out, data);
}

TEST(ReadMaybeGzipFileTest, EmptyFile) {
  const std::string path = MakeTestDir() + "/empty";
  WriteFile(path, {});
  ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> out, ReadMaybeGzipFile(path));
  EXPECT_TRUE(out.empty());
}

TEST(ReadMaybeGzipFileTest, GzipFileIsInflated) {
  const std::string path = MakeTestDir() + "/data.gz";
  const std::vector<uint8_t> data = PatternBytes(3 << 20);  // larger than one read chunk
  WriteFile(path, Gzip(data));
  ASSERT_OK_AND_ASSIGN(std::vector<uint8_t> out, ReadMaybeGzipFile(path));
  EXPECT_EQ(out, data);
}

TEST(ReadMaybeGzipFileTest, MissingFileIsNotFound) {
  EXPECT_THAT(ReadMaybeGzipFile(MakeTestDir() + "/nope.gz"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("nope.gz")));
}

TEST(ReadMaybeGzipFileTest, DirectoryIsAnError) {
  EXPECT_THAT(ReadMaybeGzipFile(MakeTestDir()), ::testing::Not(IsOk()));
}

TEST(ReadMaybeGzipFileTest, TruncatedGzipFileNamesTheFile) {
  const std::string path = MakeTestDir() + "/cut.gz";
  const std::vector<uint8_t> gz = Gzip(PatternBytes(20000));
  WriteFile(path, std::span<const uint8_t>(gz).first(gz.size() / 2));
  EXPECT_THAT(ReadMaybeGzipFile(path),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr(path + ": truncated")));
}

TEST(ReadMaybeGzipFileTest, FileSizeCapIsEnforced) {
  const std::string path = MakeTestDir() + "/big.bin";
  WriteFile(path, PatternBytes(5000));
  EXPECT_THAT(ReadMaybeGzipFile(path, 4999),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("big.bin")));
  EXPECT_THAT(ReadMaybeGzipFile(path, 5000), IsOk());
}

}  // namespace
}  // namespace qtrain::data
