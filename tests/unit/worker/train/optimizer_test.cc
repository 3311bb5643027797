#include "worker/train/optimizer.h"

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;

nn::Parameter MakeParam(nn::ParamKind kind, float w, float g) {
  nn::Parameter p;
  p.name = "p";
  p.kind = kind;
  p.value = nn::Tensor({1}, {w});
  p.grad = nn::Tensor({1}, {g});
  return p;
}

TEST(SgdTest, MomentumAndWeightDecayByHand) {
  nn::Parameter w = MakeParam(nn::ParamKind::kWeight, 1.0f, 0.5f);
  nn::Parameter b = MakeParam(nn::ParamKind::kBias, 1.0f, 0.5f);
  SgdOptions o;
  o.momentum = 0.5f;
  o.weight_decay = 0.1f;
  Sgd sgd({&w, &b}, o);
  kernels::CpuContext ctx;
  sgd.Step(ctx, 0.1f);
  // weight: g' = 0.5 + 0.1*1 = 0.6, v = 0.6, w = 1 - 0.06 = 0.94. bias: no decay: 1 - 0.05.
  EXPECT_FLOAT_EQ(w.value[0], 0.94f);
  EXPECT_FLOAT_EQ(b.value[0], 0.95f);
  sgd.Step(ctx, 0.1f);
  // weight: g' = 0.5 + 0.094 = 0.594, v = 0.3 + 0.594 = 0.894, w = 0.94 - 0.0894.
  EXPECT_FLOAT_EQ(w.value[0], 0.94f - 0.0894f);
  // bias: v = 0.25 + 0.5 = 0.75, b = 0.95 - 0.075.
  EXPECT_FLOAT_EQ(b.value[0], 0.875f);
}

TEST(SgdTest, NesterovAndQuantizerScale) {
  nn::Parameter q = MakeParam(nn::ParamKind::kQuantizer, 2.0f, 1.0f);
  SgdOptions o;
  o.momentum = 0.5f;
  o.weight_decay = 0.0f;
  o.nesterov = true;
  o.quantizer_lr_scale = 0.01f;
  Sgd sgd({&q}, o);
  sgd.Step(kernels::CpuContext{}, 1.0f);
  // v = 1, update = g + mu*v = 1.5, lr = 0.01.
  EXPECT_FLOAT_EQ(q.value[0], 2.0f - 0.015f);
}

TEST(SgdTest, PerParameterLrScale) {
  nn::Parameter w = MakeParam(nn::ParamKind::kWeight, 1.0f, 1.0f);
  nn::Parameter q = MakeParam(nn::ParamKind::kQuantizer, 1.0f, 1.0f);
  w.lr_scale = 0.5f;
  q.lr_scale = 0.01f;
  SgdOptions o;
  o.momentum = 0.0f;
  o.weight_decay = 0.0f;
  o.quantizer_lr_scale = 2.0f;
  Sgd sgd({&w, &q}, o);
  sgd.Step(kernels::CpuContext{}, 1.0f);
  EXPECT_FLOAT_EQ(w.value[0], 1.0f - 0.5f);
  EXPECT_FLOAT_EQ(q.value[0], 1.0f - 0.02f);  // lr * lr_scale * quantizer_lr_scale
}

TEST(SgdTest, OptionsAreValidated) {
  SgdOptions o;
  EXPECT_THAT(ValidateSgdOptions(o), IsOk());
  o.momentum = 1.0f;
  EXPECT_THAT(ValidateSgdOptions(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = SgdOptions{};
  o.weight_decay = -1;
  EXPECT_THAT(ValidateSgdOptions(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o = SgdOptions{};
  o.momentum = 0;
  o.nesterov = true;
  EXPECT_THAT(ValidateSgdOptions(o), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::train
