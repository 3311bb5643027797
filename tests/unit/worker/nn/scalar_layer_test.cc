#include "worker/nn/scalar_layer.h"

#include <random>

#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"

namespace qtrain::nn {
namespace {

using testing::CheckGradients;
using testing::GradCheckOptions;
using testing::RandomTensor;
using testing::SingleThreadContext;

TEST(ScalarLayerTest, ForwardScalesByTheTrainableScalar) {
  ScalarLayer layer("scalar", ScalarLayer::kPaperInit);
  std::vector<Parameter*> params;
  layer.CollectParameters(&params);
  ASSERT_EQ(params.size(), 1u);
  EXPECT_EQ(params[0]->name, "scalar.scale");
  EXPECT_EQ(params[0]->kind, ParamKind::kNormScale);  // no weight decay
  EXPECT_EQ(params[0]->value[0], 0.01f);
  const Tensor x({2, 2}, {100.0f, -50.0f, 0.0f, 3.0f});
  Tensor y;
  RunContext ctx = SingleThreadContext();
  layer.Forward(ctx, x, &y);
  EXPECT_EQ(y.shape(), x.shape());
  EXPECT_FLOAT_EQ(y[0], 1.0f);
  EXPECT_FLOAT_EQ(y[1], -0.5f);
  EXPECT_FLOAT_EQ(y[2], 0.0f);
  EXPECT_FLOAT_EQ(y[3], 0.03f);
  EXPECT_EQ(*layer.OutputShape({4, 10}), (Shape{4, 10}));
  EXPECT_FALSE(layer.OutputShape({}).ok());
}

// y is linear in x and in s, so central differences are exact up to rounding.
TEST(ScalarLayerTest, GradientsMatchFiniteDifferences) {
  ScalarLayer layer("scalar", 0.7f);
  std::mt19937_64 rng(3);
  CheckGradients(layer, RandomTensor({4, 10}, rng),
                 GradCheckOptions{.epsilon = 1e-2f, .abs_tol = 1e-4, .rel_tol = 1e-3});
}

}  // namespace
}  // namespace qtrain::nn
