#include "worker/kernels/cpu/lowbit_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"

namespace qtrain::kernels {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::KernelTest;

std::vector<uint8_t> RandomCodes(int bits, int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(0, (1 << bits) - 1);
  std::vector<uint8_t> codes(count);
  for (uint8_t& c : codes) c = static_cast<uint8_t>(dist(rng));
  return codes;
}

PackedCodes Pack(int bits, int64_t rows, int64_t cols, const std::vector<uint8_t>& codes,
                 CodeLayout layout) {
  PackedCodes packed;
  const absl::Status status = PackCodes(bits, rows, cols, codes.data(), layout, &packed);
  EXPECT_TRUE(status.ok()) << status;
  return packed;
}

// D[n, m] = sum_k w[m, k] * a[n, k] in int64.
std::vector<int64_t> NaiveGemm(const std::vector<uint8_t>& w, const std::vector<uint8_t>& a,
                               int64_t m, int64_t n, int64_t k) {
  std::vector<int64_t> d(n * m, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      int64_t sum = 0;
      for (int64_t p = 0; p < k; ++p) sum += int64_t{w[j * k + p]} * a[i * k + p];
      d[i * m + j] = sum;
    }
  }
  return d;
}

struct Shape {
  int64_t m, n, k;
};

// Odd shapes: K around the 64-bit word and 4-byte group edges, single rows and columns, rows
// straddling the 8/16-row blocks and every tile size, and a deep K.
const std::vector<Shape>& Shapes() {
  static const std::vector<Shape> shapes = {
      {1, 1, 1},    {1, 5, 3},     {7, 1, 64},  {3, 4, 65},    {9, 13, 63},
      {17, 3, 127}, {33, 14, 130}, {16, 12, 4}, {40, 25, 200}, {21, 19, 1000}};
  return shapes;
}

// Packs random codes in `w_layout` / `a_layout`, runs LowbitGemm and compares every element of
// D with the naive product; also checks LowbitRowSums.
void CheckGemm(const CpuContext& ctx, int wbits, int abits, const Shape& s, CodeLayout w_layout,
               CodeLayout a_layout) {
  SCOPED_TRACE(::testing::Message() << "W" << wbits << "A" << abits << " m=" << s.m << " n=" << s.n
                                    << " k=" << s.k << " w_layout=" << static_cast<int>(w_layout)
                                    << " a_layout=" << static_cast<int>(a_layout));
  const uint32_t seed = static_cast<uint32_t>(wbits * 131 + abits * 17 + s.m * 7 + s.n * 3 + s.k);
  const std::vector<uint8_t> w = RandomCodes(wbits, s.m * s.k, seed);
  const std::vector<uint8_t> a = RandomCodes(abits, s.n * s.k, seed + 1);
  const PackedCodes pw = Pack(wbits, s.m, s.k, w, w_layout);
  const PackedCodes pa = Pack(abits, s.n, s.k, a, a_layout);
  std::vector<int32_t> d(s.n * s.m, -12345);
  LowbitGemm(ctx, pw, pa, d.data());
  const std::vector<int64_t> want = NaiveGemm(w, a, s.m, s.n, s.k);
  int failures = 0;
  for (size_t i = 0; i < d.size(); ++i) {
    if (d[i] != want[i] && ++failures <= 5) {
      ADD_FAILURE() << "D(" << i / s.m << "," << i % s.m << ") = " << d[i] << ", want " << want[i];
    }
  }
  EXPECT_EQ(failures, 0);

  std::vector<int32_t> sums(s.n);
  LowbitRowSums(pa, sums.data());
  for (int64_t r = 0; r < s.n; ++r) {
    int64_t want_sum = 0;
    for (int64_t p = 0; p < s.k; ++p) want_sum += a[r * s.k + p];
    EXPECT_EQ(sums[r], want_sum) << "row " << r;
  }
}

class LowbitGemmTest : public KernelTest {};

TEST_P(LowbitGemmTest, EveryBitPairMatchesNaiveProductInDefaultLayouts) {
  for (int wbits = 1; wbits <= 8; ++wbits) {
    for (int abits = 1; abits <= 8; ++abits) {
      for (const Shape& s : Shapes()) {
        CheckGemm(ctx_, wbits, abits, s, DefaultCodeLayout(wbits), DefaultCodeLayout(abits));
      }
    }
  }
}

TEST_P(LowbitGemmTest, LowBitCodesMatchInEveryLayoutCombination) {
  for (int wbits = 1; wbits <= 2; ++wbits) {
    for (int abits = 1; abits <= 2; ++abits) {
      for (CodeLayout wl : {CodeLayout::kBitPlanes, CodeLayout::kBytes}) {
        for (CodeLayout al : {CodeLayout::kBitPlanes, CodeLayout::kBytes}) {
          for (const Shape& s : Shapes()) CheckGemm(ctx_, wbits, abits, s, wl, al);
        }
      }
    }
  }
}

TEST_P(LowbitGemmTest, LargestCodesAtMaximumDepthDoNotOverflow) {
  // All-ones codes make every D equal K * (2^wbits - 1) * (2^abits - 1), the int32 limit's edge.
  for (auto [wbits, abits] : {std::pair{8, 8}, {8, 1}, {1, 8}, {2, 2}, {1, 1}}) {
    const int64_t k = std::min<int64_t>(LowbitMaxDepth(wbits, abits), 40000);
    const int64_t m = 33;
    const int64_t n = 13;
    const PackedCodes w =
        Pack(wbits, m, k, std::vector<uint8_t>(m * k, (1 << wbits) - 1), DefaultCodeLayout(wbits));
    const PackedCodes a =
        Pack(abits, n, k, std::vector<uint8_t>(n * k, (1 << abits) - 1), DefaultCodeLayout(abits));
    std::vector<int32_t> d(m * n);
    LowbitGemm(ctx_, w, a, d.data());
    const int64_t want = k * ((1 << wbits) - 1) * ((1 << abits) - 1);
    for (int32_t v : d) ASSERT_EQ(v, want) << "W" << wbits << "A" << abits << " k=" << k;
  }
}

TEST_P(LowbitGemmTest, ZeroSizesAreNoOps) {
  const std::vector<uint8_t> codes(30, 1);
  std::vector<int32_t> d(10, 7);
  // K = 0: D is all zeros.
  LowbitGemm(ctx_, Pack(1, 2, 0, {}, CodeLayout::kBitPlanes), Pack(4, 5, 0, {}, CodeLayout::kBytes),
             d.data());
  EXPECT_EQ(d, std::vector<int32_t>(10, 0));
  // M = 0 or N = 0: nothing is written.
  LowbitGemm(ctx_, Pack(1, 0, 3, {}, CodeLayout::kBitPlanes),
             Pack(1, 5, 3, codes, CodeLayout::kBitPlanes), nullptr);
  LowbitGemm(ctx_, Pack(3, 4, 3, codes, CodeLayout::kBytes), Pack(3, 0, 3, {}, CodeLayout::kBytes),
             nullptr);
}

TEST_P(LowbitGemmTest, LinearForwardMatchesDoubleReference) {
  const int64_t m = 37;
  const int64_t n = 29;
  const int64_t k = 300;
  for (auto [wbits, abits] : {std::pair{1, 1}, {1, 2}, {2, 2}, {2, 4}, {4, 4}, {8, 8}, {3, 8}}) {
    SCOPED_TRACE(::testing::Message() << "W" << wbits << "A" << abits);
    const std::vector<uint8_t> w = RandomCodes(wbits, m * k, 5 + wbits);
    const std::vector<uint8_t> a = RandomCodes(abits, n * k, 9 + abits);
    const std::vector<float> wscale = testing::RandomVector(m, 11, 0.01f, 0.2f);
    const std::vector<float> wzero = testing::RandomVector(m, 12, -0.5f, 0.5f);
    const std::vector<float> bias = testing::RandomVector(m, 13);
    const float ascale = 0.037f;
    const PackedCodes pw = Pack(wbits, m, k, w, DefaultCodeLayout(wbits));
    const PackedCodes pa = Pack(abits, n, k, a, DefaultCodeLayout(abits));
    for (const float* bias_ptr : {static_cast<const float*>(nullptr), bias.data()}) {
      std::vector<float> y(n * m);
      LowbitLinearForward(ctx_, pw, pa,
                          LowbitLinearParams{wscale.data(), wzero.data(), bias_ptr, ascale},
                          y.data());
      // The float model: y = sum_k (ascale * a) * (wscale * w + wzero) + bias, in double.
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < m; ++j) {
          double dot = 0.0;
          double magnitude = 0.0;
          for (int64_t p = 0; p < k; ++p) {
            const double wv = double{wscale[j]} * w[j * k + p] + wzero[j];
            const double term = double{ascale} * a[i * k + p] * wv;
            dot += term;
            magnitude += std::fabs(term);
          }
          if (bias_ptr != nullptr) {
            dot += bias[j];
            magnitude += std::fabs(bias[j]);
          }
          ASSERT_LE(std::fabs(y[i * m + j] - dot), 1e-5 * magnitude + 1e-30)
              << "y(" << i << "," << j << ") = " << y[i * m + j] << ", want " << dot;
        }
      }
    }
  }
}

QTRAIN_INSTANTIATE_KERNEL_TEST(LowbitGemmTest);

TEST(LowbitGemmThreadsTest, ResultsDoNotDependOnThreadCountOrSimdLevel) {
  // Shapes big enough for the parallel split along n (N >= M) and along m (M > N).
  for (const Shape& s : {Shape{64, 300, 576}, Shape{300, 40, 576}}) {
    for (auto [wbits, abits] : {std::pair{1, 1}, {2, 2}, {4, 4}, {8, 8}, {1, 4}}) {
      const std::vector<uint8_t> w = RandomCodes(wbits, s.m * s.k, 21);
      const std::vector<uint8_t> a = RandomCodes(abits, s.n * s.k, 22);
      const PackedCodes pw = Pack(wbits, s.m, s.k, w, DefaultCodeLayout(wbits));
      const PackedCodes pa = Pack(abits, s.n, s.k, a, DefaultCodeLayout(abits));
      std::vector<int32_t> serial(s.n * s.m);
      LowbitGemm(CpuContext{nullptr, SimdLevel::kScalar}, pw, pa, serial.data());
      for (int threads : {2, 3, 5}) {
        ThreadPool pool(threads);
        std::vector<int32_t> parallel(s.n * s.m);
        LowbitGemm(CpuContext{&pool, DetectSimdLevel()}, pw, pa, parallel.data());
        EXPECT_EQ(parallel, serial)
            << "W" << wbits << "A" << abits << " m=" << s.m << " threads=" << threads;
      }
    }
  }
}

TEST(PackCodesTest, RoundTripsEveryBitWidthAndLayout) {
  for (int bits = 1; bits <= 8; ++bits) {
    for (CodeLayout layout : {CodeLayout::kBitPlanes, CodeLayout::kBytes}) {
      if (layout == CodeLayout::kBitPlanes && bits > 2) continue;
      const int64_t rows = 19;
      const int64_t cols = 131;
      const std::vector<uint8_t> codes = RandomCodes(bits, rows * cols, bits);
      const PackedCodes packed = Pack(bits, rows, cols, codes, layout);
      EXPECT_EQ(static_cast<int64_t>(packed.storage.size()),
                PackedStorageWords(layout, bits, rows, cols));
      std::vector<uint8_t> back(rows * cols, 0xff);
      UnpackCodes(packed, back.data());
      EXPECT_EQ(back, codes) << "bits=" << bits << " layout=" << static_cast<int>(layout);
    }
  }
}

TEST(PackCodesTest, DefaultLayoutIsBitPlanesUpToTwoBits) {
  EXPECT_EQ(DefaultCodeLayout(1), CodeLayout::kBitPlanes);
  EXPECT_EQ(DefaultCodeLayout(2), CodeLayout::kBitPlanes);
  EXPECT_EQ(DefaultCodeLayout(3), CodeLayout::kBytes);
  EXPECT_EQ(DefaultCodeLayout(8), CodeLayout::kBytes);
  PackedCodes packed;
  ASSERT_THAT(PackCodes(2, 1, 1, std::vector<uint8_t>{3}.data(), &packed), IsOk());
  EXPECT_EQ(packed.layout, CodeLayout::kBitPlanes);
}

TEST(PackCodesTest, RejectsBadArgumentsAndLeavesOutputUntouched) {
  const std::vector<uint8_t> codes = {0, 1, 2, 3, 4, 5, 6, 7};
  PackedCodes out;
  ASSERT_THAT(PackCodes(3, 2, 4, codes.data(), &out), IsOk());
  const std::vector<uint64_t> before = out.storage;

  for (int bits : {0, -1, 9, 100}) {
    EXPECT_THAT(PackCodes(bits, 2, 4, codes.data(), &out),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << "bits=" << bits;
  }
  // A code too large for the width, in either layout.
  EXPECT_THAT(PackCodes(2, 2, 4, codes.data(), &out), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(PackCodes(2, 2, 4, codes.data(), CodeLayout::kBytes, &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const std::vector<uint8_t> one_bad = {1, 0, 1, 2};
  EXPECT_THAT(PackCodes(1, 1, 4, one_bad.data(), &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const std::vector<uint8_t> byte_bad = {255};
  EXPECT_THAT(PackCodes(7, 1, 1, byte_bad.data(), &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // Bit planes hold only 1- and 2-bit codes.
  EXPECT_THAT(PackCodes(3, 2, 4, codes.data(), CodeLayout::kBitPlanes, &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // Sizes.
  EXPECT_THAT(PackCodes(3, -1, 4, codes.data(), &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(PackCodes(3, 2, -4, codes.data(), &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(PackCodes(3, kMaxPackedDim + 1, 1, codes.data(), &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(PackCodes(3, kMaxPackedDim, kMaxPackedDim, codes.data(), &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(PackCodes(3, 2, 4, nullptr, &out), StatusIs(absl::StatusCode::kInvalidArgument));

  EXPECT_EQ(out.bits, 3);
  EXPECT_EQ(out.rows, 2);
  EXPECT_EQ(out.storage, before);
}

TEST(LowbitMaxDepthTest, IsTheInt32Limit) {
  EXPECT_EQ(LowbitMaxDepth(8, 8), 33025);
  EXPECT_EQ(LowbitMaxDepth(1, 1), 2147483647);
  EXPECT_EQ(LowbitMaxDepth(2, 1), 715827882);
}

TEST(LowbitGemmDeathTest, MismatchedDepthOrOverflowingDepthAborts) {
  const PackedCodes w = Pack(8, 1, 3, {1, 2, 3}, CodeLayout::kBytes);
  const PackedCodes a = Pack(8, 1, 2, {1, 2}, CodeLayout::kBytes);
  int32_t d = 0;
  EXPECT_DEATH(LowbitGemm(CpuContext{}, w, a, &d), "w.cols == a.cols");
  const int64_t k = LowbitMaxDepth(8, 8) + 1;
  const PackedCodes deep_w = Pack(8, 1, k, std::vector<uint8_t>(k), CodeLayout::kBytes);
  const PackedCodes deep_a = Pack(8, 1, k, std::vector<uint8_t>(k), CodeLayout::kBytes);
  EXPECT_DEATH(LowbitGemm(CpuContext{}, deep_w, deep_a, &d), "overflow");
  PackedCodes corrupt = w;
  corrupt.storage.pop_back();
  EXPECT_DEATH(LowbitGemm(CpuContext{}, corrupt, w, &d), "storage");
}

}  // namespace
}  // namespace qtrain::kernels
