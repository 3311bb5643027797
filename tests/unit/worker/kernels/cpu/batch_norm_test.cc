#include "worker/kernels/cpu/batch_norm.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"

namespace qtrain::kernels {
namespace {

using testing::KernelTest;
using testing::RandomVector;
using testing::SameBits;

// Element (n, c, i) of an N x C x spatial tensor.
int64_t At(const BatchNormShape& s, int64_t n, int64_t c, int64_t i) {
  return (n * s.channels + c) * s.spatial + i;
}

struct Stats {
  std::vector<double> mean, var;  // biased variance
};

Stats ReferenceStats(const BatchNormShape& s, const std::vector<float>& x) {
  Stats st{std::vector<double>(s.channels), std::vector<double>(s.channels)};
  const double count = static_cast<double>(s.batch * s.spatial);
  for (int64_t c = 0; c < s.channels; ++c) {
    double sum = 0.0;
    for (int64_t n = 0; n < s.batch; ++n) {
      for (int64_t i = 0; i < s.spatial; ++i) sum += x[At(s, n, c, i)];
    }
    st.mean[c] = sum / count;
    double sq = 0.0;
    for (int64_t n = 0; n < s.batch; ++n) {
      for (int64_t i = 0; i < s.spatial; ++i) {
        const double d = x[At(s, n, c, i)] - st.mean[c];
        sq += d * d;
      }
    }
    st.var[c] = sq / count;
  }
  return st;
}

struct Problem {
  BatchNormShape shape;
  std::vector<float> x, gamma, beta, dy;
};

Problem MakeProblem(BatchNormShape s, float x_offset, uint32_t seed) {
  Problem p{s,
            RandomVector(s.batch * s.channels * s.spatial, seed, x_offset - 2.0f, x_offset + 2.0f),
            RandomVector(s.channels, seed + 1, 0.5f, 1.5f),
            RandomVector(s.channels, seed + 2, -0.5f, 0.5f),
            RandomVector(s.batch * s.channels * s.spatial, seed + 3)};
  return p;
}

struct TrainOutputs {
  std::vector<float> y, mean, inv_std, running_mean, running_var;
};

TrainOutputs RunTrain(const CpuContext& ctx, const Problem& p, const BatchNormOptions& options) {
  const BatchNormShape& s = p.shape;
  TrainOutputs out{std::vector<float>(p.x.size()), std::vector<float>(s.channels),
                   std::vector<float>(s.channels), std::vector<float>(s.channels, 0.25f),
                   std::vector<float>(s.channels, 2.0f)};
  BatchNormTrainForward(ctx, s, options, p.x.data(), p.gamma.data(), p.beta.data(), out.y.data(),
                        out.mean.data(), out.inv_std.data(), out.running_mean.data(),
                        out.running_var.data());
  return out;
}

std::vector<BatchNormShape> Shapes() { return {{4, 3, 10}, {3, 5, 1}, {2, 4, 49}, {16, 2, 33}}; }

class BatchNormTest : public KernelTest {};

TEST_P(BatchNormTest, TrainForwardMatchesReference) {
  const BatchNormOptions options{.momentum = 0.1f, .epsilon = 1e-5f};
  for (const BatchNormShape& s : Shapes()) {
    // The offset of 100 checks the variance does not cancel catastrophically.
    for (float offset : {0.0f, 100.0f}) {
      SCOPED_TRACE(::testing::Message()
                   << s.batch << "x" << s.channels << "x" << s.spatial << " offset " << offset);
      const Problem p = MakeProblem(s, offset, 41);
      const TrainOutputs got = RunTrain(ctx_, p, options);
      const Stats st = ReferenceStats(s, p.x);
      const double count = static_cast<double>(s.batch * s.spatial);
      for (int64_t c = 0; c < s.channels; ++c) {
        const double inv_std = 1.0 / std::sqrt(st.var[c] + options.epsilon);
        // Statistics are computed in double and rounded once to float.
        EXPECT_NEAR(got.mean[c], st.mean[c], 4 * testing::kU * std::fabs(st.mean[c]) + 1e-6);
        EXPECT_NEAR(got.inv_std[c], inv_std, 4 * testing::kU * inv_std);
        EXPECT_NEAR(got.running_mean[c], 0.9 * 0.25 + 0.1 * st.mean[c], 1e-5 * (1 + offset));
        const double unbiased = st.var[c] * count / (count - 1);
        EXPECT_NEAR(got.running_var[c], 0.9 * 2.0 + 0.1 * unbiased, 1e-5);
        for (int64_t n = 0; n < s.batch; ++n) {
          for (int64_t i = 0; i < s.spatial; ++i) {
            const int64_t e = At(s, n, c, i);
            const double want = (p.x[e] - st.mean[c]) * inv_std * p.gamma[c] + p.beta[c];
            // (x - mean) loses up to |mean| * u in float; the rest is a few roundings of O(1).
            const double tol = 8 * testing::kU * (std::fabs(want) + 1.0) +
                               2 * testing::kU * std::fabs(st.mean[c]) * inv_std * p.gamma[c];
            ASSERT_NEAR(got.y[e], want, tol) << "element " << e;
          }
        }
      }
    }
  }
}

TEST_P(BatchNormTest, SingleValuePerChannel) {
  const Problem p = MakeProblem({1, 3, 1}, 0.0f, 42);
  const TrainOutputs got = RunTrain(ctx_, p, BatchNormOptions{});
  for (int64_t c = 0; c < 3; ++c) {
    EXPECT_EQ(got.y[c], p.beta[c]);  // x - mean == 0 exactly
    EXPECT_TRUE(std::isfinite(got.running_var[c]));
    EXPECT_NEAR(got.running_var[c], 0.9 * 2.0, 1e-6);  // biased variance 0, not 0/0
  }
}

TEST_P(BatchNormTest, EvalForwardUsesRunningStats) {
  const BatchNormShape s{3, 4, 7};
  const Problem p = MakeProblem(s, 1.0f, 43);
  const std::vector<float> running_mean = RandomVector(s.channels, 44);
  const std::vector<float> running_var = RandomVector(s.channels, 45, 0.5f, 2.0f);
  const BatchNormOptions options{.momentum = 0.3f, .epsilon = 1e-3f};
  std::vector<float> y(p.x.size());
  BatchNormEvalForward(ctx_, s, options, p.x.data(), p.gamma.data(), p.beta.data(),
                       running_mean.data(), running_var.data(), y.data());
  for (int64_t n = 0; n < s.batch; ++n) {
    for (int64_t c = 0; c < s.channels; ++c) {
      for (int64_t i = 0; i < s.spatial; ++i) {
        const int64_t e = At(s, n, c, i);
        const double want = (p.x[e] - static_cast<double>(running_mean[c])) /
                                std::sqrt(static_cast<double>(running_var[c]) + 1e-3) * p.gamma[c] +
                            p.beta[c];
        ASSERT_NEAR(y[e], want, 16 * testing::kU * (std::fabs(want) + 4.0)) << e;
      }
    }
  }
}

TEST_P(BatchNormTest, BackwardMatchesReference) {
  for (const BatchNormShape& s : Shapes()) {
    SCOPED_TRACE(::testing::Message() << s.batch << "x" << s.channels << "x" << s.spatial);
    const Problem p = MakeProblem(s, 0.5f, 46);
    const TrainOutputs fwd = RunTrain(ctx_, p, BatchNormOptions{});
    std::vector<float> dx(p.x.size()), dgamma(s.channels), dbeta(s.channels);
    BatchNormBackward(ctx_, s, p.x.data(), p.dy.data(), p.gamma.data(), fwd.mean.data(),
                      fwd.inv_std.data(), dx.data(), dgamma.data(), dbeta.data());
    const double count = static_cast<double>(s.batch * s.spatial);
    for (int64_t c = 0; c < s.channels; ++c) {
      // Reference in double from the saved statistics.
      const double mean = fwd.mean[c];
      const double inv_std = fwd.inv_std[c];
      double sum_dy = 0.0, sum_dy_xhat = 0.0, abs_dy = 0.0;
      for (int64_t n = 0; n < s.batch; ++n) {
        for (int64_t i = 0; i < s.spatial; ++i) {
          const int64_t e = At(s, n, c, i);
          sum_dy += p.dy[e];
          sum_dy_xhat += p.dy[e] * (p.x[e] - mean) * inv_std;
          abs_dy += std::fabs(p.dy[e]);
        }
      }
      EXPECT_NEAR(dbeta[c], sum_dy, 2 * testing::kU * std::fabs(sum_dy) + 1e-12);
      EXPECT_NEAR(dgamma[c], sum_dy_xhat, 1e-6 * (1 + abs_dy));
      for (int64_t n = 0; n < s.batch; ++n) {
        for (int64_t i = 0; i < s.spatial; ++i) {
          const int64_t e = At(s, n, c, i);
          const double xhat = (p.x[e] - mean) * inv_std;
          const double want =
              p.gamma[c] * inv_std / count * (count * p.dy[e] - sum_dy - xhat * sum_dy_xhat);
          const double scale = p.gamma[c] * inv_std * (std::fabs(p.dy[e]) + 1.0);
          ASSERT_NEAR(dx[e], want, 16 * testing::kU * scale) << "element " << e;
        }
      }
    }
  }
}

// Differentiates L = sum(r * y) of the kernel's own float forward numerically.
TEST_P(BatchNormTest, BackwardMatchesFiniteDifferences) {
  const BatchNormShape s{3, 2, 4};
  Problem p = MakeProblem(s, 0.3f, 47);
  const std::vector<float> r = RandomVector(p.x.size(), 48);
  auto loss = [&]() {
    const TrainOutputs out = RunTrain(ctx_, p, BatchNormOptions{});
    double l = 0.0;
    for (size_t i = 0; i < r.size(); ++i) l += static_cast<double>(r[i]) * out.y[i];
    return l;
  };
  const TrainOutputs fwd = RunTrain(ctx_, p, BatchNormOptions{});
  std::vector<float> dx(p.x.size()), dgamma(s.channels), dbeta(s.channels);
  BatchNormBackward(ctx_, s, p.x.data(), r.data(), p.gamma.data(), fwd.mean.data(),
                    fwd.inv_std.data(), dx.data(), dgamma.data(), dbeta.data());
  // y is nonlinear in x: h = 1e-2 balances truncation (~h^2) against float rounding of L
  // (~1e-6 / h). L is linear in gamma and beta, so there a large h is exact.
  auto central = [&](float* v, float h) {
    const float saved = *v;
    *v = saved + h;
    const double plus = loss();
    *v = saved - h;
    const double minus = loss();
    *v = saved;
    return (plus - minus) / (2.0 * h);
  };
  for (size_t i = 0; i < p.x.size(); ++i) {
    EXPECT_NEAR(dx[i], central(&p.x[i], 1e-2f), 2e-3) << "x " << i;
  }
  for (int64_t c = 0; c < s.channels; ++c) {
    EXPECT_NEAR(dgamma[c], central(&p.gamma[c], 0.25f), 1e-4) << "gamma " << c;
    EXPECT_NEAR(dbeta[c], central(&p.beta[c], 0.25f), 1e-4) << "beta " << c;
  }
}

TEST_P(BatchNormTest, ResultsIndependentOfThreadCount) {
  // Each channel is reduced by one thread in a fixed order: 1 and N threads agree bit for bit.
  const BatchNormShape s{8, 16, 49};
  const Problem p = MakeProblem(s, 0.0f, 49);
  const CpuContext single{nullptr, ctx_.simd};
  const TrainOutputs a = RunTrain(single, p, BatchNormOptions{});
  const TrainOutputs b = RunTrain(ctx_, p, BatchNormOptions{});
  for (size_t i = 0; i < a.y.size(); ++i) ASSERT_TRUE(SameBits(a.y[i], b.y[i])) << i;
  std::vector<float> dx_a(p.x.size()), dx_b(p.x.size()), dg_a(16), dg_b(16), db_a(16), db_b(16);
  BatchNormBackward(single, s, p.x.data(), p.dy.data(), p.gamma.data(), a.mean.data(),
                    a.inv_std.data(), dx_a.data(), dg_a.data(), db_a.data());
  BatchNormBackward(ctx_, s, p.x.data(), p.dy.data(), p.gamma.data(), a.mean.data(),
                    a.inv_std.data(), dx_b.data(), dg_b.data(), db_b.data());
  EXPECT_EQ(dx_a, dx_b);
  EXPECT_EQ(dg_a, dg_b);
  EXPECT_EQ(db_a, db_b);
}

QTRAIN_INSTANTIATE_KERNEL_TEST(BatchNormTest);

}  // namespace
}  // namespace qtrain::kernels
