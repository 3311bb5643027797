#include "worker/quant/quant_factory.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"
#include "tests/unit/worker/quant/quant_test_util.h"
#include "worker/nn/model.h"
#include "worker/nn/relu.h"
#include "worker/nn/residual.h"
#include "worker/quant/dorefa.h"
#include "worker/quant/pact.h"
#include "worker/quant/qil.h"
#include "worker/quant/quantized_layers.h"
#include "worker/quant/sawb.h"

namespace qtrain::quant {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;
using nn::testing::CheckGradients;
using nn::testing::GradCheckOptions;
using nn::testing::RandomTensor;
using nn::testing::SingleThreadContext;

std::map<std::string, nn::Parameter*> ParamsByName(nn::Layer& layer) {
  std::vector<nn::Parameter*> params;
  layer.CollectParameters(&params);
  std::map<std::string, nn::Parameter*> out;
  for (nn::Parameter* p : params) {
    EXPECT_TRUE(out.emplace(p->name, p).second) << "duplicate parameter " << p->name;
  }
  return out;
}

std::unique_ptr<nn::Sequential> Build(const std::string& model, const std::string& quant,
                                      const std::string& wq, const std::string& aq,
                                      bool fp_first_last = true, bool fpsc = true) {
  absl::StatusOr<QuantConfig> config = MakeQuantConfig(quant, wq, aq, fp_first_last, fpsc);
  EXPECT_THAT(config.status(), IsOk());
  absl::StatusOr<std::unique_ptr<QuantLayerFactory>> factory = QuantLayerFactory::Create(*config);
  EXPECT_THAT(factory.status(), IsOk());
  nn::ModelSpec spec{.name = model, .input = {1, 28, 28}, .num_classes = 10, .seed = 5};
  spec.factory = factory->get();
  absl::StatusOr<std::unique_ptr<nn::Sequential>> net = nn::BuildModel(spec);
  EXPECT_THAT(net.status(), IsOk());
  return *std::move(net);
}

nn::Layer* Child(nn::Sequential& net, const std::string& name) {
  for (int i = 0; i < net.num_children(); ++i) {
    if (net.child(i).name() == name) return &net.child(i);
  }
  ADD_FAILURE() << "no child " << name;
  return nullptr;
}

// Places every QIL weight interval at [0, 1.2 max|w|]: no weight sits on a clipping edge, where
// the finite differences of c and d would straddle a kink (the lower edge at 0 is smooth for
// gamma > 1). Clipping and pruning gradients are covered by qil_test.
void PinQilIntervals(nn::Layer& layer) {
  auto params = ParamsByName(layer);
  for (auto& [name, p] : params) {
    if (!name.ends_with("wq.c")) continue;
    const std::string prefix = name.substr(0, name.size() - 4);
    nn::Parameter* w = params.at(prefix + "weight");
    float max_abs = 0.0f;
    for (int64_t i = 0; i < w->value.size(); ++i) max_abs = std::max(max_abs, std::abs(w->value[i]));
    p->value[0] = 0.6f * max_abs;
    params.at(prefix + "wq.d")->value[0] = 0.6f * max_abs;
  }
}

TEST(QuantConfigTest, CombinesFlags) {
  ASSERT_OK_AND_ASSIGN(QuantConfig c, MakeQuantConfig("none", "sawb:bits=2", "pact:bits=2",
                                                      true, true));
  EXPECT_EQ(c.weight.method, Method::kSawb);
  EXPECT_EQ(c.activation.method, Method::kPact);
  EXPECT_TRUE(c.quantizes());
  ASSERT_OK_AND_ASSIGN(c, MakeQuantConfig("qil:w=3,a=3", "none", "none", true, true));
  EXPECT_EQ(c.weight.method, Method::kQil);
  EXPECT_EQ(c.activation.bits, 3);
  ASSERT_OK_AND_ASSIGN(c, MakeQuantConfig("none", "none", "none", true, true));
  EXPECT_FALSE(c.quantizes());
  EXPECT_EQ(c.ToString(), "fp32");
}

TEST(QuantConfigTest, RejectsBadFlags) {
  EXPECT_THAT(MakeQuantConfig("qil:w=3,a=3", "sawb:bits=2", "none", true, true),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--quant")));
  EXPECT_THAT(MakeQuantConfig("none", "pact:bits=2", "none", true, true),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("pact:bits=2")));
  EXPECT_THAT(MakeQuantConfig("none", "none", "sawb:bits=2", true, true),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("sawb:bits=2")));
  EXPECT_THAT(MakeQuantConfig("none", "dorefa:bits=9", "none", true, true),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(MakeQuantConfig("none", "sawb", "none", true, true),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(QuantFactoryTest, CnnKeepsFirstAndLastLayersFullPrecision) {
  auto net = Build("cnn", "none", "sawb:bits=2", "pact:bits=2");
  EXPECT_EQ(dynamic_cast<QuantizedConv2d*>(Child(*net, "conv1")), nullptr);
  for (const char* name : {"conv2", "conv3", "conv4"}) {
    EXPECT_NE(dynamic_cast<QuantizedConv2d*>(Child(*net, name)), nullptr) << name;
  }
  EXPECT_NE(dynamic_cast<QuantizedLinear*>(Child(*net, "fc1")), nullptr);
  EXPECT_EQ(dynamic_cast<QuantizedLinear*>(Child(*net, "fc2")), nullptr);
  for (const char* name : {"relu1", "relu2", "relu3", "relu4"}) {
    EXPECT_NE(dynamic_cast<PactActivationQuantizer*>(Child(*net, name)), nullptr) << name;
  }
  EXPECT_NE(dynamic_cast<nn::Relu*>(Child(*net, "relu5")), nullptr);
  auto params = ParamsByName(*net);
  EXPECT_TRUE(params.count("relu1.alpha"));
  EXPECT_FALSE(params.count("relu5.alpha"));
}

TEST(QuantFactoryTest, QuantizesEverythingWithoutFpFirstLast) {
  auto net = Build("cnn", "dorefa:w=2,a=2", "none", "none", /*fp_first_last=*/false);
  EXPECT_NE(dynamic_cast<QuantizedConv2d*>(Child(*net, "conv1")), nullptr);
  EXPECT_NE(dynamic_cast<QuantizedLinear*>(Child(*net, "fc2")), nullptr);
  EXPECT_EQ(dynamic_cast<nn::Relu*>(Child(*net, "relu5")), nullptr);
}

TEST(QuantFactoryTest, QilParametersCarryTheirLearningRate) {
  auto net = Build("mlp", "qil:w=3,a=3", "none", "none");
  auto params = ParamsByName(*net);
  ASSERT_TRUE(params.count("fc2.wq.c"));
  ASSERT_TRUE(params.count("relu1.aq.d"));  // QIL follows a ReLU
  EXPECT_EQ(params["fc2.wq.gamma"]->lr_scale, kQilLrScale);
  EXPECT_EQ(params["relu1.aq.c"]->lr_scale, kQilLrScale);
  EXPECT_EQ(params["fc2.weight"]->lr_scale, 1.0f);
  EXPECT_FALSE(params.count("fc1.wq.c"));
  EXPECT_FALSE(params.count("fc3.wq.c"));
}

TEST(QuantFactoryTest, QuantizedModelStartsFromTheFp32Weights) {
  for (const char* model : {"mlp", "cnn", "resnet20"}) {
    auto fp = Build(model, "none", "none", "none");
    auto q = Build(model, "none", "dorefa:bits=2", "pact:bits=2");
    auto fp_params = ParamsByName(*fp);
    int shared = 0;
    for (auto& [name, p] : ParamsByName(*q)) {
      if (p->kind == nn::ParamKind::kQuantizer) continue;
      ASSERT_TRUE(fp_params.count(name)) << model << " " << name;
      ASSERT_EQ(p->value.shape(), fp_params[name]->value.shape());
      for (int64_t i = 0; i < p->value.size(); ++i) {
        ASSERT_EQ(p->value[i], fp_params[name]->value[i]) << model << " " << name;
      }
      ++shared;
    }
    EXPECT_EQ(shared, static_cast<int>(fp_params.size())) << model;
  }
}

TEST(QuantFactoryTest, ResnetShortcutPlacement) {
  auto fpsc = ParamsByName(*Build("resnet20", "none", "sawb:bits=2", "pact:bits=2", true, true));
  EXPECT_TRUE(fpsc.count("layer1.0.aq_in.alpha"));
  EXPECT_TRUE(fpsc.count("layer3.2.relu1.alpha"));
  EXPECT_FALSE(fpsc.count("relu1.alpha"));  // the stem's ReLU feeds the shortcut too
  EXPECT_FALSE(fpsc.count("layer1.0.out_aq.alpha"));

  auto shared = ParamsByName(*Build("resnet20", "none", "sawb:bits=2", "pact:bits=2", true, false));
  EXPECT_FALSE(shared.count("layer1.0.aq_in.alpha"));
  EXPECT_TRUE(shared.count("relu1.alpha"));
  EXPECT_TRUE(shared.count("layer3.1.out_aq.alpha"));
  EXPECT_FALSE(shared.count("layer3.2.out_aq.alpha"));  // feeds the full-precision classifier
}

TEST(QuantizedLayersTest, ConvUsesQuantizedWeightAndMapsGradientBack) {
  std::mt19937_64 rng(3), rng_copy(3);
  const nn::Conv2dOptions o{.in_channels = 3, .out_channels = 4, .kernel = 3, .padding = 1};
  QuantizedConv2d q("c", o, rng, std::make_unique<SawbWeightQuantizer>(2));
  nn::Conv2d plain("c", o, rng_copy);
  nn::RunContext ctx = SingleThreadContext();
  SawbWeightQuantizer reference(2);
  reference.Forward(ctx, plain.weight().value, &plain.weight().value);

  const nn::Tensor x = RandomTensor({2, 3, 5, 5}, rng);
  nn::Tensor yq, yp;
  q.Forward(ctx, x, &yq);
  plain.Forward(ctx, x, &yp);
  ASSERT_EQ(yq.shape(), yp.shape());
  for (int64_t i = 0; i < yq.size(); ++i) ASSERT_EQ(yq[i], yp[i]) << i;
  testing::ExpectOnCodebook(q.quantized_weight(), q.quantizer().Levels());

  const nn::Tensor dy = RandomTensor(yq.shape(), rng);
  nn::Tensor dxq, dxp;
  q.Backward(ctx, dy, &dxq);
  plain.Backward(ctx, dy, &dxp);
  for (int64_t i = 0; i < dxq.size(); ++i) ASSERT_EQ(dxq[i], dxp[i]) << i;
  // SAWB's straight-through gradient passes inside the clipping range and stops outside it.
  nn::Tensor expected;
  reference.Forward(ctx, q.weight().value, &expected);
  reference.Backward(ctx, q.weight().value, plain.weight().grad, &expected);
  for (int64_t i = 0; i < expected.size(); ++i) ASSERT_EQ(q.weight().grad[i], expected[i]) << i;
}

TEST(QuantizedLayersTest, UnitRangeMethodsAreScaledByTheHeStd) {
  std::mt19937_64 rng(5);
  QuantizedLinear layer("fc", {.in_features = 50, .out_features = 4}, rng,
                        std::make_unique<DorefaWeightQuantizer>(2));
  EXPECT_FLOAT_EQ(layer.weight_scale(), std::sqrt(2.0f / 50));
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor y;
  layer.Forward(ctx, RandomTensor({2, 50}, rng), &y);
  std::vector<float> levels = layer.quantizer().Levels();
  for (float& v : levels) v *= layer.weight_scale();
  testing::ExpectOnCodebook(layer.quantized_weight(), levels);

  QuantizedLinear sawb("fc", {.in_features = 50, .out_features = 4}, rng,
                       std::make_unique<SawbWeightQuantizer>(2));
  EXPECT_EQ(sawb.weight_scale(), 1.0f);
}

// The chain rule through a quantized layer (weight_scale() included), checked numerically with QIL's continuous transform
// (Discretize::kOff): dx, the weight and c, d, gamma.
TEST(QuantizedLayersTest, LinearGradientsThroughQil) {
  std::mt19937_64 rng(11);
  QuantizedLinear layer(
      "fc", {.in_features = 6, .out_features = 5}, rng,
      std::make_unique<QilWeightQuantizer>(
          QilOptions{.bits = 3, .gamma_init = 1.5f, .discretize = Discretize::kOff}));
  PinQilIntervals(layer);
  CheckGradients(layer, RandomTensor({3, 6}, rng),
                 GradCheckOptions{.epsilon = 1e-3f, .abs_tol = 2e-3, .rel_tol = 1e-2,
                                  .skip_kinks = true});
}

// A factory of continuous (kOff) quantizers so the whole quantized residual block, with its
// activation quantizer and full-precision-shortcut input quantizer, can be checked numerically.
class ContinuousFactory : public nn::LayerFactory {
 public:
  std::unique_ptr<nn::Conv2d> MakeConv2d(std::string name, const nn::Conv2dOptions& options,
                                         std::mt19937_64& rng,
                                         nn::WeightLayerRole) const override {
    return std::make_unique<QuantizedConv2d>(
        std::move(name), options, rng,
        std::make_unique<QilWeightQuantizer>(
            QilOptions{.bits = 4, .gamma_init = 1.2f, .discretize = Discretize::kOff}));
  }
  std::unique_ptr<nn::Layer> MakeActivation(std::string name,
                                            nn::WeightLayerRole) const override {
    return Pact(std::move(name));
  }
  std::unique_ptr<nn::Layer> MakeInputQuantizer(std::string name,
                                                nn::WeightLayerRole) const override {
    return Pact(std::move(name));
  }

 private:
  static std::unique_ptr<nn::Layer> Pact(std::string name) {
    return std::make_unique<PactActivationQuantizer>(
        std::move(name),
        PactOptions{.bits = 2, .alpha_init = 1.0f, .discretize = Discretize::kOff});
  }
};

TEST(QuantizedLayersTest, ResidualBlockGradientsWithQuantizers) {
  ContinuousFactory factory;
  for (int64_t stride : {1, 2}) {
    std::mt19937_64 rng(17 + stride);
    nn::Residual block("b",
                       {.in_channels = 2,
                        .out_channels = stride == 1 ? 2 : 4,
                        .stride = stride,
                        .factory = &factory},
                       rng);
    auto params = ParamsByName(block);
    ASSERT_TRUE(params.count("aq_in.alpha"));
    ASSERT_TRUE(params.count("relu1.alpha"));
    ASSERT_TRUE(params.count("conv2.wq.gamma"));
    PinQilIntervals(block);
    // Inputs in [0, 1.5]: the block input is a ReLU output and straddles PACT's alpha = 1 (but
    // not within the probe's reach of it). c and d move every weight of a convolution, so their
    // probes would cross the block's output ReLU kink somewhere unless small: eps = 2e-4, with
    // float rounding (~1e-6 / eps) covered by abs_tol = 1e-2.
    CheckGradients(block, testing::RandomAvoiding({2, 2, 4, 4}, rng, 0.0f, 1.5f, {1.0f}, 0.01f),
                   GradCheckOptions{.epsilon = 2e-4f, .abs_tol = 1e-2, .rel_tol = 1e-2,
                                    .skip_kinks = true, .max_skipped_fraction = 0.1});
  }
}

}  // namespace
}  // namespace qtrain::quant
