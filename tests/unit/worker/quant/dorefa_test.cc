#include "worker/quant/dorefa.h"

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

TEST(DorefaWeightTest, ValuesLieOnCodebook) {
  std::mt19937_64 rng(1);
  const nn::Tensor w = RandomTensor({16, 3, 3, 3}, rng, -0.5f, 0.5f);
  for (int bits = 1; bits <= 8; ++bits) {
    DorefaWeightQuantizer q(bits);
    nn::RunContext ctx = SingleThreadContext();
    nn::Tensor wq;
    q.Forward(ctx, w, &wq);
    const std::vector<float> levels = q.Levels();
    EXPECT_EQ(levels.size(), static_cast<size_t>(1 << bits));
    EXPECT_EQ(levels.front(), -1.0f);
    EXPECT_EQ(levels.back(), 1.0f);
    ExpectOnCodebook(wq, levels);
  }
}

TEST(DorefaWeightTest, MatchesFormula) {
  // 2 bits: u = tanh(w) / (2 max|tanh w|) + 1/2 rounded to thirds, mapped to [-1, 1].
  const nn::Tensor w({4}, {-1.0f, 0.0f, 0.3f, 1.0f});
  DorefaWeightQuantizer q(2);
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor wq;
  q.Forward(ctx, w, &wq);
  EXPECT_EQ(wq[0], -1.0f);
  EXPECT_EQ(wq[3], 1.0f);
  // u(0) = 0.5 -> 1.5 rounds up to level 2/3 -> 1/3.
  EXPECT_FLOAT_EQ(wq[1], 1.0f / 3.0f);
  // u(0.3) = tanh(.3)/(2 tanh 1) + .5 = 0.6522 -> 1.957 -> 2/3 -> 1/3.
  EXPECT_FLOAT_EQ(wq[2], 1.0f / 3.0f);
}

// Discretize::kOff leaves wq = tanh(w) / max|tanh(w)|; the analytic gradient (including the path
// through the max) must match central differences. |w| >= 0.05 apart from the maximum keeps the
// argmax fixed under eps = 1e-3 perturbations; the float rounding of 48 outputs ~1 is ~1e-5 in
// L, over 2e-3 that is ~5e-3 at worst, hence abs_tol 1e-2 on slopes of order 1.
TEST(DorefaWeightTest, GradientMatchesFiniteDifferences) {
  std::mt19937_64 rng(2);
  nn::Tensor w = RandomTensor({4, 12}, rng, -0.8f, 0.8f);
  w[7] = 1.2f;  // a clear maximum
  DorefaWeightQuantizer q(3, Discretize::kOff);
  CheckWeightGradients(q, w, GradCheckOptions{.epsilon = 1e-3f, .abs_tol = 1e-2, .rel_tol = 1e-2});
}

TEST(DorefaActivationTest, CodebookAndStraightThroughInsideClipRange) {
  std::mt19937_64 rng(3);
  const nn::Tensor x = RandomTensor({8, 50}, rng, -0.5f, 1.5f);
  DorefaActivationQuantizer aq("aq", 2);
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor y, dx;
  aq.Forward(ctx, x, &y);
  ExpectOnCodebook(y, aq.Levels());
  EXPECT_EQ(aq.Levels(), (std::vector<float>{0.0f, 1.0f / 3, 2.0f / 3, 1.0f}));
  const nn::Tensor dy = RandomTensor(x.shape(), rng);
  aq.Backward(ctx, dy, &dx);
  int inside = 0, outside = 0;
  for (int64_t i = 0; i < x.size(); ++i) {
    if (x[i] >= 0.0f && x[i] <= 1.0f) {
      EXPECT_EQ(dx[i], dy[i]);
      ++inside;
    } else {
      EXPECT_EQ(dx[i], 0.0f);
      ++outside;
    }
  }
  EXPECT_GT(inside, 0);
  EXPECT_GT(outside, 0);
}

TEST(DorefaActivationTest, UnroundedGradientMatchesFiniteDifferences) {
  std::mt19937_64 rng(4);
  DorefaActivationQuantizer aq("aq", 4, Discretize::kOff);
  CheckGradients(aq, RandomAvoiding({2, 40}, rng, -0.5f, 1.5f, {0.0f, 1.0f}, 0.05f),
                 GradCheckOptions{.epsilon = 1e-2f, .abs_tol = 1e-4, .rel_tol = 1e-3});
}

}  // namespace
}  // namespace qtrain::quant
