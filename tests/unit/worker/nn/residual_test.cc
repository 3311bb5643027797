#include "worker/nn/residual.h"

#include <random>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"
#include "worker/nn/model.h"
#include "worker/nn/sequential.h"

namespace qtrain::nn {
namespace {

using ::qtrain::testing::StatusIs;
using testing::CheckGradients;
using ::testing::ElementsAre;
using testing::GradCheckOptions;
using testing::RandomTensor;
using testing::SingleThreadContext;

Parameter* FindParam(Layer& layer, const std::string& name) {
  std::vector<Parameter*> params;
  layer.CollectParameters(&params);
  for (Parameter* p : params) {
    if (p->name == name) return p;
  }
  return nullptr;
}

TEST(ResidualTest, StructureNamesAndCounts) {
  std::mt19937_64 rng(1);
  Residual same("b", {.in_channels = 4, .out_channels = 4, .stride = 1}, rng);
  EXPECT_TRUE(same.has_identity_shortcut());
  EXPECT_EQ(same.Describe(), "residual 4->4 s1 shortcut=identity");
  Residual down("b", {.in_channels = 4, .out_channels = 8, .stride = 2}, rng);
  EXPECT_FALSE(down.has_identity_shortcut());
  EXPECT_EQ(down.Describe(), "residual 4->8 s2 shortcut=zero-pad");
  // conv1 8*4*9 + bn1 2*8 + conv2 8*8*9 + bn2 2*8; option A adds nothing.
  EXPECT_EQ(CountParameters(down), 288 + 16 + 576 + 16);
  std::vector<Parameter*> params;
  down.CollectParameters(&params);
  std::vector<std::string> names;
  for (Parameter* p : params) names.push_back(p->name);
  EXPECT_THAT(names, ElementsAre("conv1.weight", "bn1.gamma", "bn1.beta", "conv2.weight",
                                 "bn2.gamma", "bn2.beta"));
  std::vector<Buffer*> buffers;
  down.CollectBuffers(&buffers);
  ASSERT_EQ(buffers.size(), 4u);
  EXPECT_EQ(buffers[0]->name, "bn1.running_mean");
  EXPECT_EQ(buffers[3]->name, "bn2.running_var");

  Residual proj(
      "b",
      {.in_channels = 4, .out_channels = 8, .stride = 2, .shortcut = ShortcutKind::kProjection},
      rng);
  EXPECT_EQ(proj.Describe(), "residual 4->8 s2 shortcut=projection");
  EXPECT_EQ(CountParameters(proj), 288 + 16 + 576 + 16 + 32 + 16);
  EXPECT_NE(FindParam(proj, "shortcut_conv.weight"), nullptr);
  EXPECT_NE(FindParam(proj, "shortcut_bn.gamma"), nullptr);
}

TEST(ResidualTest, OutputShape) {
  std::mt19937_64 rng(1);
  Residual down("b", {.in_channels = 4, .out_channels = 8, .stride = 2}, rng);
  EXPECT_EQ(*down.OutputShape({2, 4, 8, 8}), (Shape{2, 8, 4, 4}));
  EXPECT_EQ(*down.OutputShape({2, 4, 7, 7}), (Shape{2, 8, 4, 4}));
  EXPECT_THAT(down.OutputShape({2, 3, 8, 8}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("'b'")));
}

// With conv2's weights zero, bn2 sees a constant zero input and outputs beta2 = 0, so the block
// reduces to relu(shortcut(x)): this pins down option A's subsampling and channel placement
// ((8 - 4) / 2 = 2 zero channels in front, 2 behind).
TEST(ResidualTest, ZeroPadShortcutLayout) {
  std::mt19937_64 rng(2);
  Residual down("b", {.in_channels = 4, .out_channels = 8, .stride = 2}, rng);
  FindParam(down, "conv2.weight")->value.Fill(0.0f);
  const Tensor x = RandomTensor({2, 4, 5, 5}, rng);
  Tensor y;
  RunContext ctx = SingleThreadContext();
  down.Forward(ctx, x, &y);
  ASSERT_EQ(y.shape(), (Shape{2, 8, 3, 3}));
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t c = 0; c < 8; ++c)
      for (int64_t h = 0; h < 3; ++h)
        for (int64_t w = 0; w < 3; ++w) {
          float expected = 0.0f;
          if (c >= 2 && c < 6) {
            expected = std::max(0.0f, x[((n * 4 + c - 2) * 5 + 2 * h) * 5 + 2 * w]);
          }
          EXPECT_EQ(y[((n * 8 + c) * 3 + h) * 3 + w], expected) << n << c << h << w;
        }
}

// The block contains ReLUs: probes straddling a kink are skipped (skip_kinks). eps = 1e-3 keeps
// the batch-norm curvature (~eps * |L''|) and float rounding (~1e-7 / eps) under the 3e-3
// tolerance.
GradCheckOptions BlockCheckOptions(Mode mode) {
  return GradCheckOptions{
      .epsilon = 1e-3f, .abs_tol = 3e-3, .rel_tol = 1e-2, .mode = mode, .skip_kinks = true};
}

TEST(ResidualTest, IdentityShortcutGradients) {
  std::mt19937_64 rng(3);
  Residual block("b", {.in_channels = 3, .out_channels = 3, .stride = 1}, rng);
  CheckGradients(block, RandomTensor({2, 3, 4, 4}, rng), BlockCheckOptions(Mode::kTrain));
}

TEST(ResidualTest, ZeroPadShortcutGradients) {
  std::mt19937_64 rng(4);
  Residual block("b", {.in_channels = 2, .out_channels = 4, .stride = 2}, rng);
  CheckGradients(block, RandomTensor({2, 2, 5, 5}, rng), BlockCheckOptions(Mode::kTrain));
}

TEST(ResidualTest, ProjectionShortcutGradients) {
  std::mt19937_64 rng(5);
  Residual block(
      "b",
      {.in_channels = 2, .out_channels = 4, .stride = 2, .shortcut = ShortcutKind::kProjection},
      rng);
  CheckGradients(block, RandomTensor({2, 2, 4, 4}, rng), BlockCheckOptions(Mode::kTrain));
}

TEST(ResidualTest, EvalModeGradients) {
  std::mt19937_64 rng(6);
  Residual block("b", {.in_channels = 2, .out_channels = 4, .stride = 2}, rng);
  // Give the running statistics non-trivial values with a few training forwards.
  RunContext ctx = SingleThreadContext(Mode::kTrain);
  Tensor y;
  for (int i = 0; i < 3; ++i) {
    const Tensor x = RandomTensor({2, 2, 4, 4}, rng);
    block.Forward(ctx, x, &y);
  }
  CheckGradients(block, RandomTensor({2, 2, 4, 4}, rng), BlockCheckOptions(Mode::kEval));
}

TEST(ResidualTest, ReportsEachChildOnceWhenRunDirectly) {
  std::mt19937_64 rng(7);
  Residual block(
      "b",
      {.in_channels = 2, .out_channels = 4, .stride = 2, .shortcut = ShortcutKind::kProjection},
      rng);
  RunContext ctx = SingleThreadContext();
  std::vector<std::string> order;
  ctx.on_grads_ready = [&](std::span<Parameter* const> ready) {
    for (Parameter* p : ready) order.push_back(p->name);
  };
  Tensor y;
  const Tensor x = RandomTensor({2, 2, 4, 4}, rng);
  block.Forward(ctx, x, &y);
  block.Backward(ctx, RandomTensor(y.shape(), rng), nullptr);
  EXPECT_THAT(order, ElementsAre("bn2.gamma", "bn2.beta", "conv2.weight", "bn1.gamma", "bn1.beta",
                                 "conv1.weight", "shortcut_bn.gamma", "shortcut_bn.beta",
                                 "shortcut_conv.weight"));
}

}  // namespace
}  // namespace qtrain::nn
