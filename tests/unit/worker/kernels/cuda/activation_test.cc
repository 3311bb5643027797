#include "worker/kernels/cuda/activation.h"

#include <cmath>
#include <limits>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "tests/unit/worker/kernels/cuda/gpu_test_util.h"
#include "worker/kernels/cpu/activation.h"
#include "worker/kernels/cpu/elementwise.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::kernels::testing::RandomVector;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::Download;
using testing::ElementwiseSizes;
using testing::ExpectBitsEqual;
using testing::GpuTest;
using testing::Poisoned;
using testing::Upload;

const CpuContext kCpu{};

// Random values with the special cases sprinkled in: NaN, +-0, +-inf.
std::vector<float> WithSpecials(std::vector<float> v) {
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), 0.0f, -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()};
  for (size_t i = 0; i < v.size(); i += 97) v[i] = specials[(i / 97) % 5];
  return v;
}

class ActivationGpuTest : public GpuTest {};

TEST_F(ActivationGpuTest, ReluForwardAndBackwardMatchCpuExactly) {
  for (int64_t n : ElementwiseSizes()) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const std::vector<float> x = WithSpecials(RandomVector(n, 11, -2.0f, 2.0f));
    const std::vector<float> dy = RandomVector(n, 12, -1.0f, 1.0f);
    std::vector<float> y_cpu(n), dx_cpu(n);
    kernels::ReluForward(kCpu, n, x.data(), y_cpu.data());
    kernels::ReluBackward(kCpu, n, x.data(), dy.data(), dx_cpu.data());

    auto dx_in = Upload(x);
    auto ddy = Upload(dy);
    auto y = Poisoned(n);
    auto dx = Poisoned(n);
    ASSERT_THAT(cuda::ReluForward(ctx_, n, dx_in.data(), y.data()), IsOk());
    ASSERT_THAT(cuda::ReluBackward(ctx_, n, dx_in.data(), ddy.data(), dx.data()), IsOk());
    Sync();
    ExpectBitsEqual(y_cpu, Download(y), "ReluForward");
    ExpectBitsEqual(dx_cpu, Download(dx), "ReluBackward");

    // In place: y aliases x, dx aliases dy.
    ASSERT_THAT(cuda::ReluBackward(ctx_, n, dx_in.data(), ddy.data(), ddy.data()), IsOk());
    ASSERT_THAT(cuda::ReluForward(ctx_, n, dx_in.data(), dx_in.data()), IsOk());
    Sync();
    ExpectBitsEqual(y_cpu, Download(dx_in), "ReluForward in place");
    ExpectBitsEqual(dx_cpu, Download(ddy), "ReluBackward in place");
  }
}

TEST_F(ActivationGpuTest, BiasReluMatchesCpuAddThenRelu) {
  struct Shape {
    int64_t batch, channels, spatial;
  };
  // NCHW conv outputs, a fully-connected output (spatial 1), and one above a grid-stride round.
  for (const Shape& s : {Shape{1, 1, 1}, Shape{2, 3, 5}, Shape{4, 16, 64}, Shape{128, 10, 1},
                         Shape{8, 37, 64 * 64 + 3}}) {
    SCOPED_TRACE(::testing::Message() << s.batch << "x" << s.channels << "x" << s.spatial);
    const int64_t n = s.batch * s.channels * s.spatial;
    const std::vector<float> x = RandomVector(n, 13, -2.0f, 2.0f);
    const std::vector<float> bias = RandomVector(s.channels, 14, -1.0f, 1.0f);
    std::vector<float> broadcast(n);
    for (int64_t i = 0; i < n; ++i) broadcast[i] = bias[(i / s.spatial) % s.channels];
    std::vector<float> want(n);
    kernels::Add(kCpu, n, x.data(), broadcast.data(), want.data());
    kernels::ReluForward(kCpu, n, want.data(), want.data());

    auto dx = Upload(x);
    auto db = Upload(bias);
    auto y = Poisoned(n);
    ASSERT_THAT(cuda::BiasReluForward(ctx_, s.batch, s.channels, s.spatial, dx.data(), db.data(),
                                      y.data()),
                IsOk());
    Sync();
    ExpectBitsEqual(want, Download(y), "BiasReluForward");
  }
}

TEST(ActivationArgumentsTest, BadArgumentsAreInvalidArgument) {
  const CudaContext ctx;
  float v = 0.0f;
  EXPECT_THAT(cuda::ReluForward(ctx, -1, &v, &v), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(cuda::ReluBackward(ctx, 3, &v, nullptr, &v),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("dy")));
  EXPECT_THAT(cuda::BiasReluForward(ctx, 1, 0, 1, &v, &v, &v),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("channels")));
  EXPECT_THAT(cuda::BiasReluForward(ctx, 2, 3, 4, &v, nullptr, &v),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("bias")));
  EXPECT_THAT(cuda::ReluForward(ctx, 0, nullptr, nullptr), IsOk());
}

}  // namespace
}  // namespace qtrain::kernels::cuda
