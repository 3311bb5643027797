#include "worker/quant/qil.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "tests/unit/worker/quant/quant_test_util.h"

namespace qtrain::quant {
namespace {

using nn::testing::CheckGradients;
using nn::testing::GradCheckOptions;
using nn::testing::RandomTensor;
using nn::testing::SingleThreadContext;
using testing::CheckWeightGradients;
using testing::ExpectOnCodebook;
using testing::RandomAvoiding;

void SetScalar(nn::Parameter& p, float v) { p.value[0] = v; }

TEST(QilWeightTest, ParametersAndInitialisationFromStatistics) {
  QilWeightQuantizer q({.bits = 3});
  std::vector<nn::Parameter*> params;
  q.CollectParameters(&params);
  ASSERT_EQ(params.size(), 3u);
  EXPECT_EQ(params[0]->name, "wq.c");
  EXPECT_EQ(params[1]->name, "wq.d");
  EXPECT_EQ(params[2]->name, "wq.gamma");
  for (nn::Parameter* p : params) EXPECT_EQ(p->kind, nn::ParamKind::kQuantizer);
  // max|w| = 0.4 < 3 rms, so c + d = 0.4 and c - d = 0.
  const nn::Tensor w({1, 4}, {0.4f, -0.3f, 0.3f, -0.3f});
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor wq;
  q.Forward(ctx, w, &wq);
  EXPECT_FLOAT_EQ(q.c().value[0], 0.2f);
  EXPECT_FLOAT_EQ(q.d().value[0], 0.2f);
  // Restored (non-zero) values are kept.
  SetScalar(q.c(), 0.5f);
  q.Forward(ctx, w, &wq);
  EXPECT_EQ(q.c().value[0], 0.5f);
}

TEST(QilWeightTest, ValuesLieOnCodebookWithPruningAndClipping) {
  std::mt19937_64 rng(1);
  const nn::Tensor w = RandomTensor({8, 3, 3, 3}, rng, -1.0f, 1.0f);
  for (int bits = 2; bits <= 5; ++bits) {
    QilWeightQuantizer q({.bits = bits, .gamma_init = 0.7f});
    SetScalar(q.c(), 0.5f);
    SetScalar(q.d(), 0.3f);
    nn::RunContext ctx = SingleThreadContext();
    nn::Tensor wq;
    q.Forward(ctx, w, &wq);
    const std::vector<float> levels = q.Levels();
    EXPECT_EQ(levels.size(), static_cast<size_t>((1 << bits) - 1));
    ExpectOnCodebook(wq, levels);
    for (int64_t i = 0; i < w.size(); ++i) {
      if (std::fabs(w[i]) < 0.2f) {
        ASSERT_EQ(wq[i], 0.0f);  // pruned
      }
      if (std::fabs(w[i]) > 0.8f) {
        ASSERT_EQ(wq[i], w[i] > 0 ? 1.0f : -1.0f);  // clipped
      }
    }
  }
}

// With Discretize::kOff the output is the transformer sign(w) u^gamma: check dw, dc, dd and
// dgamma against central differences. |w| stays 0.03 away from the interval ends (0.2, 0.8) and
// from 0, so eps = 2e-3 on w, c or d never moves a weight across an end. A small eps because
// u^gamma with gamma < 1 is strongly curved just inside the lower end (u ~ 0.05): at eps = 1e-2
// the central difference's O(eps^2) truncation error reached 1.5%. Float rounding of L (64 terms
// of order 1, ~1e-6) over 4e-3 stays below 1e-3.
TEST(QilWeightTest, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(2);
  const nn::Tensor w =
      RandomAvoiding({4, 16}, rng, -1.0f, 1.0f, {-0.8f, -0.2f, 0.0f, 0.2f, 0.8f}, 0.03f);
  for (float gamma : {1.0f, 0.6f, 1.7f}) {
    QilWeightQuantizer q({.bits = 3, .gamma_init = gamma, .discretize = Discretize::kOff});
    SetScalar(q.c(), 0.5f);
    SetScalar(q.d(), 0.3f);
    CheckWeightGradients(q, w,
                         GradCheckOptions{.epsilon = 2e-3f, .abs_tol = 2e-3, .rel_tol = 1e-2});
  }
}

TEST(QilActivationTest, CodebookAndInitialisation) {
  std::mt19937_64 rng(3);
  const nn::Tensor x = RandomTensor({4, 64}, rng, -1.0f, 2.0f);
  QilActivationQuantizer aq("aq", {.bits = 2});
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor y;
  aq.Forward(ctx, x, &y);
  EXPECT_GT(aq.d().value[0], 0.0f);
  EXPECT_EQ(aq.c().value[0], aq.d().value[0]);  // c - d = 0
  EXPECT_EQ(aq.Levels(), (std::vector<float>{0.0f, 1.0f / 3, 2.0f / 3, 1.0f}));
  ExpectOnCodebook(y, aq.Levels());
  std::vector<nn::Parameter*> params;
  aq.CollectParameters(&params);
  ASSERT_EQ(params.size(), 2u);
  EXPECT_EQ(params[0]->name, "c");
  EXPECT_EQ(params[1]->name, "d");
}

TEST(QilActivationTest, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(4);
  QilActivationQuantizer aq("aq", {.bits = 3, .discretize = Discretize::kOff});
  aq.c().value[0] = 0.8f;
  aq.d().value[0] = 0.5f;
  CheckGradients(aq, RandomAvoiding({3, 30}, rng, -0.5f, 2.0f, {0.3f, 1.3f}, 0.03f),
                 GradCheckOptions{.epsilon = 1e-2f, .abs_tol = 1e-3, .rel_tol = 1e-2});
}

TEST(QilActivationTest, GradientsZeroOutsideInterval) {
  QilActivationQuantizer aq("aq", {.bits = 2});
  aq.c().value[0] = 1.0f;
  aq.d().value[0] = 0.5f;
  const nn::Tensor x({1, 3}, {0.2f, 1.0f, 2.0f});
  const nn::Tensor dy({1, 3}, {1.0f, 1.0f, 1.0f});
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor y, dx;
  aq.Forward(ctx, x, &y);
  aq.Backward(ctx, dy, &dx);
  EXPECT_EQ(dx[0], 0.0f);
  EXPECT_FLOAT_EQ(dx[1], 1.0f);  // 1 / (2d)
  EXPECT_EQ(dx[2], 0.0f);
  EXPECT_FLOAT_EQ(aq.c().grad[0], -1.0f);
  EXPECT_FLOAT_EQ(aq.d().grad[0], 0.0f);  // x = c: the interval's width does not move it
}

}  // namespace
}  // namespace qtrain::quant
