#include "worker/kernels/cpu/activation.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "worker/kernels/cpu/elementwise.h"

namespace qtrain::kernels {
namespace {

using testing::KernelTest;
using testing::RandomVector;
using testing::SameBits;

class ActivationTest : public KernelTest {};

TEST_P(ActivationTest, ReluMatchesReferenceExactly) {
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{9}, int64_t{1001}, 2 * kElementwiseGrain + 3}) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const std::vector<float> x = RandomVector(n, 11);
    const std::vector<float> dy = RandomVector(n, 12);
    std::vector<float> y(n), dx(n);
    ReluForward(ctx_, n, x.data(), y.data());
    ReluBackward(ctx_, n, x.data(), dy.data(), dx.data());
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_TRUE(SameBits(y[i], x[i] > 0.0f ? x[i] : 0.0f)) << i;
      ASSERT_TRUE(SameBits(dx[i], x[i] > 0.0f ? dy[i] : 0.0f)) << i;
    }
  }
}

TEST_P(ActivationTest, SpecialValues) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  // Nine values so both the 8-wide body and the scalar tail see specials.
  const std::vector<float> x = {nan, -0.0f, 0.0f, inf, -inf, 1e-45f, -1e-45f, 2.5f, nan};
  std::vector<float> y(x.size());
  ReluForward(ctx_, x.size(), x.data(), y.data());
  const std::vector<float> want = {0.0f, 0.0f, 0.0f, inf, 0.0f, 1e-45f, 0.0f, 2.5f, 0.0f};
  for (size_t i = 0; i < x.size(); ++i) EXPECT_TRUE(SameBits(y[i], want[i])) << i << " " << y[i];

  const std::vector<float> dy(x.size(), 3.0f);
  std::vector<float> dx(x.size());
  ReluBackward(ctx_, x.size(), x.data(), dy.data(), dx.data());
  const std::vector<float> want_dx = {0.0f, 0.0f, 0.0f, 3.0f, 0.0f, 3.0f, 0.0f, 3.0f, 0.0f};
  for (size_t i = 0; i < x.size(); ++i) EXPECT_TRUE(SameBits(dx[i], want_dx[i])) << i;
}

TEST_P(ActivationTest, InPlace) {
  std::vector<float> x = RandomVector(37, 13);
  const std::vector<float> original = x;
  ReluForward(ctx_, x.size(), x.data(), x.data());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(x[i], original[i] > 0 ? original[i] : 0.0f);
}

QTRAIN_INSTANTIATE_KERNEL_TEST(ActivationTest);

}  // namespace
}  // namespace qtrain::kernels
