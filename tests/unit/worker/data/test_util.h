// Helpers shared by the qtrain::data tests: per-test temp directories, writing files, gzip.
#ifndef QTRAIN_TESTS_UNIT_WORKER_DATA_TEST_UTIL_H_
#define QTRAIN_TESTS_UNIT_WORKER_DATA_TEST_UTIL_H_

#include <unistd.h>
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace qtrain::data::test_util {

// A fresh, empty directory under ::testing::TempDir() named after the running test and process.
inline std::string MakeTestDir() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string("qtrain_data_") + info->test_suite_name() + "_" + info->name() +
                     "_" + std::to_string(getpid());
  for (char& c : name) {
    if (c == '/') c = '_';
  }
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

inline void WriteFile(const std::string& path, std::span<const uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  ASSERT_TRUE(out.good()) << path;
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// One gzip member holding `bytes` (zlib's deflate with gzip framing).
inline std::vector<uint8_t> Gzip(std::span<const uint8_t> bytes) {
  z_stream strm{};
  EXPECT_EQ(deflateInit2(&strm, Z_BEST_SPEED, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::vector<uint8_t> out(deflateBound(&strm, bytes.size()) + 32);
  strm.next_in = const_cast<Bytef*>(bytes.data());
  strm.avail_in = static_cast<uInt>(bytes.size());
  strm.next_out = out.data();
  strm.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&strm, Z_FINISH), Z_STREAM_END);
  out.resize(strm.total_out);
  deflateEnd(&strm);
  return out;
}

// Bytes 0, 1, 2, ... (mod 251, so no short period lines up with image sizes).
inline std::vector<uint8_t> PatternBytes(size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(i % 251);
  return v;
}

}  // namespace qtrain::data::test_util

#endif  // QTRAIN_TESTS_UNIT_WORKER_DATA_TEST_UTIL_H_
