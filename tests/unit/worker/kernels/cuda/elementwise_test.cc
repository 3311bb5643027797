#include "worker/kernels/cuda/elementwise.h"

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "tests/unit/worker/kernels/cuda/gpu_test_util.h"
#include "worker/kernels/cpu/elementwise.h"
#include "worker/kernels/cuda/launch_util.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::kernels::testing::RandomVector;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::Download;
using testing::DownloadOne;
using testing::ElementwiseSizes;
using testing::ExpectBitsEqual;
using testing::GpuTest;
using testing::Poisoned;
using testing::ReductionSizes;
using testing::Upload;

// The CPU reference: one thread, best SIMD level (the element-wise results are the same bits at
// every level).
const CpuContext kCpu{};

// A double sum of `terms` values computed in two different orders differs by at most
// 2 * gamma(terms) * sum |term| with gamma(t) = t u / (1 - t u), u = 2^-53; doubled for margin.
double DoubleSumBound(int64_t terms, double abs_sum) {
  const double t = static_cast<double>(terms + 1) * std::ldexp(1.0, -53);
  return 4.0 * t / (1.0 - t) * abs_sum + 1e-300;
}

class ElementwiseGpuTest : public GpuTest {};

TEST_F(ElementwiseGpuTest, BinaryOpsMatchCpuExactly) {
  struct Case {
    const char* name;
    std::function<void(const CpuContext&, int64_t, const float*, const float*, float*)> cpu;
    std::function<absl::Status(const CudaContext&, int64_t, const float*, const float*, float*)>
        gpu;
  };
  const std::vector<Case> cases = {
      {"Add", kernels::Add, cuda::Add},
      {"Sub", kernels::Sub, cuda::Sub},
      {"Mul", kernels::Mul, cuda::Mul},
  };
  for (const Case& c : cases) {
    for (int64_t n : ElementwiseSizes()) {
      SCOPED_TRACE(::testing::Message() << c.name << " n=" << n);
      const std::vector<float> a = RandomVector(n, 1, -3.0f, 3.0f);
      const std::vector<float> b = RandomVector(n, 2, -3.0f, 3.0f);
      std::vector<float> want(n);
      c.cpu(kCpu, n, a.data(), b.data(), want.data());
      auto da = Upload(a);
      auto db = Upload(b);
      auto out = Poisoned(n);
      ASSERT_THAT(c.gpu(ctx_, n, da.data(), db.data(), out.data()), IsOk());
      Sync();
      ExpectBitsEqual(want, Download(out), std::string(c.name));
      // out aliasing the first input.
      ASSERT_THAT(c.gpu(ctx_, n, da.data(), db.data(), da.data()), IsOk());
      Sync();
      ExpectBitsEqual(want, Download(da), std::string(c.name) + " in place");
    }
  }
}

TEST_F(ElementwiseGpuTest, ScalarParameterOpsMatchCpuExactly) {
  const float alpha = 0.37f;
  const float beta = -1.3f;
  for (int64_t n : ElementwiseSizes()) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const std::vector<float> x = RandomVector(n, 3, -2.0f, 2.0f);
    const std::vector<float> y0 = RandomVector(n, 4, -2.0f, 2.0f);
    auto dx = Upload(x);
    std::vector<float> want(n);

    kernels::Scale(kCpu, n, alpha, x.data(), want.data());
    auto out = Poisoned(n);
    ASSERT_THAT(cuda::Scale(ctx_, n, alpha, dx.data(), out.data()), IsOk());
    Sync();
    ExpectBitsEqual(want, Download(out), "Scale");

    kernels::AddScalar(kCpu, n, alpha, x.data(), want.data());
    ASSERT_THAT(cuda::AddScalar(ctx_, n, alpha, dx.data(), out.data()), IsOk());
    Sync();
    ExpectBitsEqual(want, Download(out), "AddScalar");

    ASSERT_THAT(cuda::Copy(ctx_, n, dx.data(), out.data()), IsOk());
    Sync();
    ExpectBitsEqual(x, Download(out), "Copy");

    ASSERT_THAT(cuda::Fill(ctx_, n, beta, out.data()), IsOk());
    Sync();
    ExpectBitsEqual(std::vector<float>(n, beta), Download(out), "Fill");

    want = y0;
    kernels::Axpy(kCpu, n, alpha, x.data(), want.data());
    auto dy = Upload(y0);
    ASSERT_THAT(cuda::Axpy(ctx_, n, alpha, dx.data(), dy.data()), IsOk());
    Sync();
    ExpectBitsEqual(want, Download(dy), "Axpy");

    want = y0;
    kernels::Axpby(kCpu, n, alpha, x.data(), beta, want.data());
    dy = Upload(y0);
    ASSERT_THAT(cuda::Axpby(ctx_, n, alpha, dx.data(), beta, dy.data()), IsOk());
    Sync();
    ExpectBitsEqual(want, Download(dy), "Axpby");
  }
}

TEST_F(ElementwiseGpuTest, AxpbyWithZeroBetaStillReadsY) {
  // 0 * NaN is NaN, as on the CPU: beta == 0 is not a shortcut.
  const std::vector<float> x = {1.0f, 2.0f, 3.0f};
  const std::vector<float> y0 = {std::numeric_limits<float>::quiet_NaN(), 1.0f,
                                 std::numeric_limits<float>::infinity()};
  std::vector<float> want = y0;
  kernels::Axpby(kCpu, 3, 2.0f, x.data(), 0.0f, want.data());
  auto dx = Upload(x);
  auto dy = Upload(y0);
  ASSERT_THAT(cuda::Axpby(ctx_, 3, 2.0f, dx.data(), 0.0f, dy.data()), IsOk());
  Sync();
  const std::vector<float> got = Download(dy);
  EXPECT_TRUE(std::isnan(got[0]));
  EXPECT_EQ(got[1], want[1]);
  EXPECT_TRUE(std::isnan(got[2]));
}

TEST_F(ElementwiseGpuTest, ReductionsMatchCpuWithinDoubleRoundoff) {
  auto f64 = Upload(std::vector<double>(3, -1.0));
  auto f32 = Poisoned(3);
  for (int64_t n : ReductionSizes()) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    // An offset so the sums do not cancel to nothing and the bound is meaningful.
    const std::vector<float> a = RandomVector(n, 5, -1.0f, 3.0f);
    const std::vector<float> b = RandomVector(n, 6, -2.0f, 2.0f);
    auto da = Upload(a);
    auto db = Upload(b);
    ASSERT_THAT(cuda::Sum(ctx_, n, da.data(), {f64.data(), f32.data()}, workspace_.data()),
                IsOk());
    ASSERT_THAT(
        cuda::Dot(ctx_, n, da.data(), db.data(), {f64.data() + 1, f32.data() + 1}, workspace_.data()),
        IsOk());
    ASSERT_THAT(
        cuda::SumSquares(ctx_, n, db.data(), {f64.data() + 2, f32.data() + 2}, workspace_.data()),
        IsOk());
    Sync();
    const std::vector<double> got = Download(f64);
    const std::vector<float> got32 = Download(f32);

    double abs_sum = 0, abs_dot = 0, squares = 0;
    for (int64_t i = 0; i < n; ++i) {
      abs_sum += std::fabs(a[i]);
      abs_dot += std::fabs(static_cast<double>(a[i]) * b[i]);
      squares += static_cast<double>(b[i]) * b[i];
    }
    EXPECT_NEAR(got[0], kernels::Sum(kCpu, n, a.data()), DoubleSumBound(n, abs_sum));
    EXPECT_NEAR(got[1], kernels::Dot(kCpu, n, a.data(), b.data()), DoubleSumBound(n, abs_dot));
    EXPECT_NEAR(got[2], kernels::Dot(kCpu, n, b.data(), b.data()), DoubleSumBound(n, squares));
    for (int k = 0; k < 3; ++k) EXPECT_EQ(got32[k], static_cast<float>(got[k])) << "output " << k;
  }
}

TEST_F(ElementwiseGpuTest, DiffScaledSumSquaresWritesBothGradientsAndAccumulates) {
  for (int64_t n : ReductionSizes()) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const std::vector<float> a = RandomVector(n, 7, -1.0f, 2.0f);
    const std::vector<float> b = RandomVector(n, 8, -1.0f, 1.0f);
    auto da = Upload(a);
    auto db = Upload(b);
    auto pos = Poisoned(n);
    auto neg = Poisoned(n);
    auto sum = Upload(std::vector<double>{0.5});  // accumulated into, not overwritten
    const float scale = 0.25f;
    ASSERT_THAT(cuda::DiffScaledSumSquares(ctx_, n, da.data(), db.data(), scale, pos.data(),
                                           neg.data(), sum.data(), workspace_.data()),
                IsOk());
    // Without outputs it only sums: a second pass doubles the sum of squares.
    ASSERT_THAT(cuda::DiffScaledSumSquares(ctx_, n, da.data(), db.data(), scale, nullptr,
                                           nullptr, sum.data(), workspace_.data()),
                IsOk());
    Sync();
    const std::vector<float> got_pos = Download(pos);
    const std::vector<float> got_neg = Download(neg);
    double squares = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float e = a[i] - b[i];
      squares += static_cast<double>(e) * e;
      ASSERT_EQ(got_pos[i], scale * e) << i;
      ASSERT_EQ(got_neg[i], -scale * e) << i;
    }
    EXPECT_NEAR(Download(sum)[0], 0.5 + 2 * squares, 2 * DoubleSumBound(n, squares) + 1e-12);
  }
}

TEST_F(ElementwiseGpuTest, ReductionOfNothingIsZeroAndSingleOutputsWork) {
  auto f64 = Upload(std::vector<double>{-1.0});
  ASSERT_THAT(cuda::Sum(ctx_, 0, nullptr, {f64.data(), nullptr}, workspace_.data()), IsOk());
  Sync();
  EXPECT_EQ(Download(f64)[0], 0.0);
  auto f32 = Poisoned(1);
  const std::vector<float> x = {1.5f, -0.25f};
  auto dx = Upload(x);
  ASSERT_THAT(cuda::Sum(ctx_, 2, dx.data(), {nullptr, f32.data()}, workspace_.data()), IsOk());
  Sync();
  EXPECT_EQ(Download(f32)[0], 1.25f);
}

TEST_F(ElementwiseGpuTest, ReductionsAreDeterministic) {
  const int64_t n = kThreads * kElementwiseMaxBlocks + 999;
  const std::vector<float> a = RandomVector(n, 7, -1.0f, 1.0f);
  const std::vector<float> b = RandomVector(n, 8, -1.0f, 1.0f);
  auto da = Upload(a);
  auto db = Upload(b);
  auto out = Upload(std::vector<double>(6, 0.0));
  for (int run = 0; run < 2; ++run) {
    ASSERT_THAT(cuda::Sum(ctx_, n, da.data(), {out.data() + 3 * run}, workspace_.data()), IsOk());
    ASSERT_THAT(
        cuda::Dot(ctx_, n, da.data(), db.data(), {out.data() + 3 * run + 1}, workspace_.data()),
        IsOk());
    ASSERT_THAT(cuda::SumSquares(ctx_, n, db.data(), {out.data() + 3 * run + 2}, workspace_.data()),
                IsOk());
  }
  Sync();
  const std::vector<double> got = Download(out);
  for (int k = 0; k < 3; ++k) {
    EXPECT_TRUE(testing::SameBits(got[k], got[3 + k])) << k << ": " << got[k] << " vs " << got[3 + k];
  }
}

// ---- Host-side checks (run without a GPU: they fail before anything is enqueued) -------------

TEST(ElementwiseArgumentsTest, BadArgumentsAreInvalidArgument) {
  const CudaContext ctx;
  float dummy = 0.0f;
  double out = 0.0;
  EXPECT_THAT(cuda::Fill(ctx, -1, 0.0f, &dummy), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(cuda::Add(ctx, 4, &dummy, nullptr, &dummy),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("b is null")));
  EXPECT_THAT(cuda::Copy(ctx, 0, nullptr, nullptr), IsOk());  // nothing to do
  EXPECT_THAT(cuda::Sum(ctx, 4, &dummy, {&out}, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("workspace")));
  alignas(16) unsigned char bytes[32];
  EXPECT_THAT(cuda::Sum(ctx, 4, &dummy, {&out}, bytes + 4),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("aligned")));
  EXPECT_THAT(cuda::Dot(ctx, 4, &dummy, &dummy, {}, bytes),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("outputs")));
  EXPECT_THAT(cuda::DiffScaledSumSquares(ctx, 4, &dummy, &dummy, 1.0f, nullptr, nullptr, nullptr,
                                         bytes),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("sum_sq")));
  EXPECT_THAT(cuda::DiffScaledSumSquares(ctx, 4, &dummy, &dummy, 1.0f, nullptr, nullptr, &out,
                                         nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("workspace")));
}

TEST(LaunchUtilTest, ReductionShapesDependOnlyOnTheSize) {
  EXPECT_EQ(ReduceBlocks(0), 1);
  EXPECT_EQ(ReduceBlocks(1), 1);
  EXPECT_EQ(ReduceBlocks(kThreads), 1);
  EXPECT_EQ(ReduceBlocks(kThreads + 1), 2);
  EXPECT_EQ(ReduceBlocks(int64_t{1} << 40), kReduceMaxBlocks);
  EXPECT_EQ(SegmentSplit(1), 1);
  EXPECT_EQ(SegmentSplit(2 * kSegmentElementsPerBlock), 2);
  EXPECT_EQ(SegmentSplit(int64_t{1} << 40), kMaxSegmentSplit);
  EXPECT_EQ(AlignUp(0), 0u);
  EXPECT_EQ(AlignUp(1), 16u);
  EXPECT_EQ(AlignUp(16), 16u);
  EXPECT_EQ(SegmentPartialBytes(3, 2 * kSegmentElementsPerBlock, 8), 48u);
  // The partials of the largest accumulator fit in front of the scalar scratch.
  EXPECT_EQ(kReductionWorkspaceBytes, kReduceMaxBlocks * kMaxReduceAccBytes + kReduceScalarBytes);
}

}  // namespace
}  // namespace qtrain::kernels::cuda
