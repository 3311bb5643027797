#include "worker/kernels/cpu/elementwise.h"

#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"

namespace qtrain::kernels {
namespace {

using testing::KernelTest;
using testing::RandomVector;
using testing::SameBits;

// Sizes around the 8-lane vector width and above the parallel grain (two chunks at 2 threads).
const std::vector<int64_t> kSizes = {0, 1, 7, 8, 9, 31, 1000, 2 * kElementwiseGrain + 5};

void ExpectSameBits(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(SameBits(got[i], want[i])) << "i=" << i << " got " << got[i] << " want " << want[i];
  }
}

class ElementwiseTest : public KernelTest {};

// The element-wise ops must match a plain scalar loop bit for bit at every SIMD level.
TEST_P(ElementwiseTest, BinaryOpsMatchScalarLoopExactly) {
  struct Case {
    const char* name;
    std::function<void(const CpuContext&, int64_t, const float*, const float*, float*)> op;
    std::function<float(float, float)> ref;
  };
  const std::vector<Case> cases = {
      {"Add", Add, [](float a, float b) { return a + b; }},
      {"Sub", Sub, [](float a, float b) { return a - b; }},
      {"Mul", Mul, [](float a, float b) { return a * b; }},
  };
  for (const Case& c : cases) {
    for (int64_t n : kSizes) {
      SCOPED_TRACE(::testing::Message() << c.name << " n=" << n);
      const std::vector<float> a = RandomVector(n, 1, -3.0f, 3.0f);
      const std::vector<float> b = RandomVector(n, 2, -3.0f, 3.0f);
      std::vector<float> want(n);
      for (int64_t i = 0; i < n; ++i) want[i] = c.ref(a[i], b[i]);
      std::vector<float> out(n, -1.0f);
      c.op(ctx_, n, a.data(), b.data(), out.data());
      ExpectSameBits(out, want);
      std::vector<float> aliased = a;  // out aliases the first input
      c.op(ctx_, n, aliased.data(), b.data(), aliased.data());
      ExpectSameBits(aliased, want);
    }
  }
}

TEST_P(ElementwiseTest, ScalarParameterOpsMatchScalarLoopExactly) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    const std::vector<float> x = RandomVector(n, 3, -2.0f, 2.0f);
    const std::vector<float> y0 = RandomVector(n, 4, -2.0f, 2.0f);
    const float alpha = 0.37f;
    const float beta = -1.3f;
    std::vector<float> want(n);
    std::vector<float> out(n);

    for (int64_t i = 0; i < n; ++i) want[i] = alpha * x[i];
    Scale(ctx_, n, alpha, x.data(), out.data());
    ExpectSameBits(out, want);

    for (int64_t i = 0; i < n; ++i) want[i] = x[i] + alpha;
    AddScalar(ctx_, n, alpha, x.data(), out.data());
    ExpectSameBits(out, want);

    Copy(ctx_, n, x.data(), out.data());
    ExpectSameBits(out, x);

    Fill(ctx_, n, beta, out.data());
    ExpectSameBits(out, std::vector<float>(n, beta));

    std::vector<float> y = y0;
    for (int64_t i = 0; i < n; ++i) want[i] = alpha * x[i] + y0[i];
    Axpy(ctx_, n, alpha, x.data(), y.data());
    ExpectSameBits(y, want);

    y = y0;
    for (int64_t i = 0; i < n; ++i) want[i] = alpha * x[i] + beta * y0[i];
    Axpby(ctx_, n, alpha, x.data(), beta, y.data());
    ExpectSameBits(y, want);
  }
}

TEST_P(ElementwiseTest, NonFiniteValuesPropagate) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> a = {inf, -inf, nan, 1.0f, 0.0f, -0.0f, 3.0f, 2.0f, inf};
  std::vector<float> b = {1.0f, inf, 1.0f, nan, -0.0f, -0.0f, 1e38f, 1e38f, -inf};
  std::vector<float> out(a.size());
  Add(ctx_, a.size(), a.data(), b.data(), out.data());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(SameBits(out[i], a[i] + b[i]) || (std::isnan(out[i]) && std::isnan(a[i] + b[i])))
        << i;
  }
}

TEST_P(ElementwiseTest, ReductionsMatchDoubleReference) {
  for (int64_t n : kSizes) {
    SCOPED_TRACE(::testing::Message() << "n=" << n);
    // An offset mean makes the deviation sum sensitive to how the centre is subtracted.
    const std::vector<float> x = RandomVector(n, 5, 99.0f, 101.0f);
    const std::vector<float> y = RandomVector(n, 6, -1.0f, 1.0f);
    double sum = 0.0, abs_sum = 0.0, dot = 0.0, abs_dot = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      sum += x[i];
      abs_sum += std::fabs(x[i]);
      dot += static_cast<double>(x[i]) * y[i];
      abs_dot += std::fabs(static_cast<double>(x[i]) * y[i]);
    }
    const double center = n > 0 ? sum / n : 0.0;
    double ssd = 0.0;
    for (int64_t i = 0; i < n; ++i) ssd += (x[i] - center) * (x[i] - center);
    // Double accumulation: error <= ~n * 2^-53 * sum |terms|.
    const double eps = (n + 2) * std::ldexp(1.0, -52);
    EXPECT_NEAR(Sum(ctx_, n, x.data()), sum, eps * abs_sum);
    EXPECT_NEAR(Dot(ctx_, n, x.data(), y.data()), dot, eps * abs_dot);
    EXPECT_NEAR(SumSquaredDeviation(ctx_, n, x.data(), center), ssd, eps * ssd + 1e-300);
  }
}

TEST_P(ElementwiseTest, ReductionsAreDeterministic) {
  const int64_t n = 3 * kElementwiseGrain + 11;
  const std::vector<float> x = RandomVector(n, 7);
  const double first = Sum(ctx_, n, x.data());
  for (int rep = 0; rep < 5; ++rep) EXPECT_EQ(Sum(ctx_, n, x.data()), first);
}

QTRAIN_INSTANTIATE_KERNEL_TEST(ElementwiseTest);

}  // namespace
}  // namespace qtrain::kernels
