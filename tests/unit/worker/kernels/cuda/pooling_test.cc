#include "worker/kernels/cuda/pooling.h"

#include <cmath>
#include <limits>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "tests/unit/worker/kernels/cuda/gpu_test_util.h"
#include "worker/kernels/cpu/pooling.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::kernels::testing::RandomVector;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::Download;
using testing::ExpectBitsEqual;
using testing::GpuTest;
using testing::Poisoned;
using testing::Upload;

const CpuContext kCpu{};

Pool2dShape MakeShape(int64_t n, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                      int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  Pool2dShape s;
  s.batch = n;
  s.channels = c;
  s.in_height = h;
  s.in_width = w;
  s.kernel_h = kh;
  s.kernel_w = kw;
  s.stride_h = sh;
  s.stride_w = sw;
  s.pad_h = ph;
  s.pad_w = pw;
  return s;
}

// The CNN 2x2 pool (the CPU's AVX2 path), padded and overlapping windows (backward sums several
// outputs into one input), asymmetric kernels, a 1x1 identity, and two shapes above one
// grid-stride round (2^20 elements) of inputs and of outputs.
std::vector<Pool2dShape> Shapes() {
  return {MakeShape(2, 3, 8, 8, 2, 2, 2, 2, 0, 0),      MakeShape(3, 5, 7, 9, 3, 3, 2, 2, 1, 1),
          MakeShape(2, 4, 10, 10, 3, 3, 1, 1, 1, 1),    MakeShape(1, 2, 11, 6, 5, 3, 2, 1, 2, 1),
          MakeShape(1, 1, 1, 1, 1, 1, 1, 1, 0, 0),      MakeShape(2, 3, 9, 7, 2, 2, 2, 2, 0, 0),
          MakeShape(32, 64, 24, 24, 2, 2, 2, 2, 0, 0),  MakeShape(16, 40, 40, 41, 3, 3, 1, 1, 1, 1)};
}

std::string Describe(const Pool2dShape& s) {
  return ::testing::PrintToString(std::vector<int64_t>{s.batch, s.channels, s.in_height,
                                                       s.in_width, s.kernel_h, s.kernel_w,
                                                       s.stride_h, s.stride_w, s.pad_h, s.pad_w});
}

// Inputs on a coarse grid (many exact ties, so the first-maximum rule matters), optionally with
// NaNs (which must win once and propagate).
std::vector<float> PoolInput(int64_t n, uint32_t seed, bool with_nans) {
  std::vector<float> x = RandomVector(n, seed, -2.0f, 2.0f);
  for (float& v : x) v = std::round(v * 4.0f) / 4.0f;
  if (with_nans) {
    for (int64_t i = 5; i < n; i += 101) x[i] = std::numeric_limits<float>::quiet_NaN();
  }
  return x;
}

class PoolingGpuTest : public GpuTest {};

TEST_F(PoolingGpuTest, MaxPoolMatchesCpuExactlyIncludingTiesAndNans) {
  for (const Pool2dShape& s : Shapes()) {
    for (bool with_nans : {false, true}) {
      SCOPED_TRACE(Describe(s) + (with_nans ? " with NaNs" : ""));
      const int64_t in_n = s.batch * s.channels * s.in_plane();
      const int64_t out_n = s.batch * s.channels * s.out_plane();
      const std::vector<float> x = PoolInput(in_n, 21, with_nans);
      const std::vector<float> dy = RandomVector(out_n, 22, -1.0f, 1.0f);
      std::vector<float> y_cpu(out_n), dx_cpu(in_n);
      std::vector<int32_t> argmax_cpu(out_n);
      kernels::MaxPool2dForward(kCpu, s, x.data(), y_cpu.data(), argmax_cpu.data());
      kernels::MaxPool2dBackward(kCpu, s, dy.data(), argmax_cpu.data(), dx_cpu.data());

      auto dx_in = Upload(x);
      auto y = Poisoned(out_n);
      auto argmax = Upload(std::vector<int32_t>(out_n, -7));
      ASSERT_THAT(cuda::MaxPool2dForward(ctx_, s, dx_in.data(), y.data(), argmax.data()), IsOk());
      Sync();
      ExpectBitsEqual(y_cpu, Download(y), "max pool y");
      EXPECT_EQ(argmax_cpu, Download(argmax));

      // Backward from the CPU's indices, so it is checked on its own.
      auto dargmax = Upload(argmax_cpu);
      auto ddy = Upload(dy);
      auto dx = Poisoned(in_n);
      ASSERT_THAT(cuda::MaxPool2dBackward(ctx_, s, ddy.data(), dargmax.data(), dx.data()), IsOk());
      Sync();
      ExpectBitsEqual(dx_cpu, Download(dx), "max pool dx");
    }
  }
}

TEST_F(PoolingGpuTest, AvgPoolMatchesCpuExactly) {
  for (const Pool2dShape& s : Shapes()) {
    for (AvgPoolDivisor divisor : {AvgPoolDivisor::kWindowSize, AvgPoolDivisor::kValidCount}) {
      SCOPED_TRACE(Describe(s) + (divisor == AvgPoolDivisor::kWindowSize ? " window" : " valid"));
      const int64_t in_n = s.batch * s.channels * s.in_plane();
      const int64_t out_n = s.batch * s.channels * s.out_plane();
      const std::vector<float> x = RandomVector(in_n, 23, -2.0f, 2.0f);
      const std::vector<float> dy = RandomVector(out_n, 24, -1.0f, 1.0f);
      std::vector<float> y_cpu(out_n), dx_cpu(in_n);
      kernels::AvgPool2dForward(kCpu, s, divisor, x.data(), y_cpu.data());
      kernels::AvgPool2dBackward(kCpu, s, divisor, dy.data(), dx_cpu.data());

      auto dx_in = Upload(x);
      auto ddy = Upload(dy);
      auto y = Poisoned(out_n);
      auto dx = Poisoned(in_n);
      ASSERT_THAT(cuda::AvgPool2dForward(ctx_, s, divisor, dx_in.data(), y.data()), IsOk());
      ASSERT_THAT(cuda::AvgPool2dBackward(ctx_, s, divisor, ddy.data(), dx.data()), IsOk());
      Sync();
      ExpectBitsEqual(y_cpu, Download(y), "avg pool y");
      ExpectBitsEqual(dx_cpu, Download(dx), "avg pool dx");
    }
  }
}

TEST_F(PoolingGpuTest, GlobalAvgPoolMatchesCpu) {
  struct Case {
    int64_t batch, channels, spatial;
  };
  for (const Case& c : {Case{1, 1, 1}, Case{2, 3, 49}, Case{4, 5, 1000}, Case{3, 2, 65537},
                        Case{128, 512, 16}, Case{0, 4, 9}}) {
    SCOPED_TRACE(::testing::Message() << c.batch << "x" << c.channels << "x" << c.spatial);
    const int64_t planes = c.batch * c.channels;
    // Positive mean: the plane sums do not cancel, so the double sums (CPU and GPU orders differ
    // by <= spatial * 2^-53 relative) round to the same float or to neighbours.
    const std::vector<float> x = RandomVector(planes * c.spatial, 25, -1.0f, 3.0f);
    const std::vector<float> dy = RandomVector(planes, 26, -1.0f, 1.0f);
    std::vector<float> y_cpu(planes), dx_cpu(planes * c.spatial);
    kernels::GlobalAvgPoolForward(kCpu, c.batch, c.channels, c.spatial, x.data(), y_cpu.data());
    kernels::GlobalAvgPoolBackward(kCpu, c.batch, c.channels, c.spatial, dy.data(),
                                   dx_cpu.data());

    auto dx_in = Upload(x);
    auto ddy = Upload(dy);
    auto y = Poisoned(planes);
    auto dx = Poisoned(planes * c.spatial);
    ASSERT_THAT(cuda::GlobalAvgPoolForward(ctx_, c.batch, c.channels, c.spatial, dx_in.data(),
                                           y.data()),
                IsOk());
    ASSERT_THAT(cuda::GlobalAvgPoolBackward(ctx_, c.batch, c.channels, c.spatial, ddy.data(),
                                            dx.data()),
                IsOk());
    Sync();
    const std::vector<float> y_gpu = Download(y);
    int64_t off_by_one = 0;
    for (int64_t p = 0; p < planes; ++p) {
      const int64_t ulps = testing::UlpDistance(y_cpu[p], y_gpu[p]);
      ASSERT_LE(ulps, 1) << "plane " << p << ": " << y_cpu[p] << " vs " << y_gpu[p];
      off_by_one += ulps;
    }
    // A 1-ulp difference needs the double mean within ~1e-16 relative of a float rounding
    // boundary (probability ~1e-8 per plane): more than a handful means a real error.
    EXPECT_LE(off_by_one, 2);
    ExpectBitsEqual(dx_cpu, Download(dx), "global avg pool dx");
  }
}

TEST_F(PoolingGpuTest, GlobalAvgPoolIsDeterministic) {
  const int64_t batch = 64, channels = 256, spatial = 64;
  const std::vector<float> x = RandomVector(batch * channels * spatial, 27, -1.0f, 1.0f);
  auto dx_in = Upload(x);
  auto y1 = Poisoned(batch * channels);
  auto y2 = Poisoned(batch * channels);
  ASSERT_THAT(cuda::GlobalAvgPoolForward(ctx_, batch, channels, spatial, dx_in.data(), y1.data()),
              IsOk());
  ASSERT_THAT(cuda::GlobalAvgPoolForward(ctx_, batch, channels, spatial, dx_in.data(), y2.data()),
              IsOk());
  Sync();
  ExpectBitsEqual(Download(y1), Download(y2), "two runs");
}

TEST(PoolingArgumentsTest, InvalidShapesAndPointersAreInvalidArgument) {
  const CudaContext ctx;
  float v = 0.0f;
  int32_t index = 0;
  Pool2dShape padded = MakeShape(1, 1, 4, 4, 2, 2, 2, 2, 2, 0);  // pad >= kernel
  EXPECT_THAT(cuda::MaxPool2dForward(ctx, padded, &v, &v, &index),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("padding")));
  Pool2dShape ok = MakeShape(1, 1, 4, 4, 2, 2, 2, 2, 0, 0);
  EXPECT_THAT(cuda::MaxPool2dForward(ctx, ok, &v, &v, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("argmax")));
  EXPECT_THAT(cuda::AvgPool2dBackward(ctx, ok, AvgPoolDivisor::kValidCount, nullptr, &v),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(cuda::GlobalAvgPoolForward(ctx, 1, 1, 0, &v, &v),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("spatial")));
  EXPECT_THAT(cuda::GlobalAvgPoolBackward(ctx, 0, 3, 4, nullptr, nullptr), IsOk());
}

}  // namespace
}  // namespace qtrain::kernels::cuda
