#include "worker/nn/sequential.h"

#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"
#include "worker/nn/batch_norm.h"
#include "worker/nn/conv2d.h"
#include "worker/nn/flatten.h"
#include "worker/nn/linear.h"
#include "worker/nn/max_pool.h"
#include "worker/nn/relu.h"

namespace qtrain::nn {
namespace {

using ::qtrain::testing::StatusIs;
using testing::CheckGradients;
using ::testing::ElementsAre;
using testing::GradCheckOptions;
using testing::RandomTensor;
using testing::SingleThreadContext;

std::vector<std::string> ParamNames(Layer& layer) {
  std::vector<Parameter*> params;
  layer.CollectParameters(&params);
  std::vector<std::string> names;
  for (const Parameter* p : params) names.push_back(p->name);
  return names;
}

// conv - bn - relu - maxpool - flatten - linear on a [N, 2, 4, 4] input.
std::unique_ptr<Sequential> SmallNet(std::mt19937_64& rng) {
  auto net = std::make_unique<Sequential>("net");
  net->Emplace<Conv2d>(
      "conv",
      Conv2dOptions{.in_channels = 2, .out_channels = 3, .kernel = 3, .stride = 1, .padding = 1},
      rng);
  net->Emplace<BatchNorm2d>("bn", BatchNormOptions{.channels = 3});
  net->Emplace<Relu>("relu");
  net->Emplace<MaxPool2d>("pool", MaxPoolOptions{.kernel = 2, .stride = 2});
  net->Emplace<Flatten>("flatten");
  net->Emplace<Linear>("fc", LinearOptions{.in_features = 12, .out_features = 3}, rng);
  return net;
}

TEST(SequentialTest, NamesArePrefixed) {
  std::mt19937_64 rng(1);
  auto net = SmallNet(rng);
  EXPECT_THAT(ParamNames(*net),
              ElementsAre("conv.weight", "bn.gamma", "bn.beta", "fc.weight", "fc.bias"));
  std::vector<Buffer*> buffers;
  net->CollectBuffers(&buffers);
  ASSERT_EQ(buffers.size(), 2u);
  EXPECT_EQ(buffers[0]->name, "bn.running_mean");
  EXPECT_EQ(buffers[1]->name, "bn.running_var");

  Sequential outer("outer");
  outer.Add(std::move(net));
  EXPECT_EQ(ParamNames(outer)[0], "net.conv.weight");
  EXPECT_EQ(outer.num_children(), 1);
  EXPECT_EQ(outer.child(0).name(), "net");
}

TEST(SequentialDeathTest, DuplicateChildNameAborts) {
  Sequential net("net");
  net.Emplace<Relu>("relu");
  EXPECT_DEATH(net.Emplace<Relu>("relu"), "duplicate child name 'relu'");
}

TEST(SequentialTest, OutputShapeThreadsThroughChildren) {
  std::mt19937_64 rng(1);
  auto net = SmallNet(rng);
  EXPECT_EQ(*net->OutputShape({5, 2, 4, 4}), (Shape{5, 3}));
  // 6x6 pools to 3x3 = 27 features, which the linear layer rejects.
  EXPECT_THAT(net->OutputShape({5, 2, 6, 6}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("'fc'")));
  Sequential empty("empty");
  EXPECT_FALSE(empty.OutputShape({1, 2}).ok());
}

// Contains ReLU and max-pool kinks, so probes that straddle one are skipped (see
// GradCheckOptions::skip_kinks). eps = 1e-3 keeps batch-norm's curvature term (~eps * |L''|)
// and the rounding term (~1e-7 / eps) both well under the 3e-3 tolerance (observed max ~1e-3).
TEST(SequentialTest, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(2);
  auto net = SmallNet(rng);
  CheckGradients(
      *net, RandomTensor({3, 2, 4, 4}, rng),
      GradCheckOptions{.epsilon = 1e-3f, .abs_tol = 3e-3, .rel_tol = 1e-2, .skip_kinks = true});
}

TEST(SequentialTest, GradsReadyInReverseOrderEachParameterOnce) {
  std::mt19937_64 rng(3);
  auto net = SmallNet(rng);
  const Tensor x = RandomTensor({2, 2, 4, 4}, rng);
  RunContext ctx = SingleThreadContext();
  std::vector<std::vector<std::string>> calls;
  std::map<std::string, Tensor> grads_at_report;
  ctx.on_grads_ready = [&](std::span<Parameter* const> ready) {
    std::vector<std::string> names;
    for (Parameter* p : ready) {
      names.push_back(p->name);
      grads_at_report[p->name] = p->grad;
    }
    calls.push_back(names);
  };
  Tensor y;
  net->Forward(ctx, x, &y);
  net->Backward(ctx, RandomTensor(y.shape(), rng), nullptr);
  ASSERT_EQ(calls.size(), 3u);  // layers without parameters are not reported
  EXPECT_THAT(calls[0], ElementsAre("fc.weight", "fc.bias"));
  EXPECT_THAT(calls[1], ElementsAre("bn.gamma", "bn.beta"));
  EXPECT_THAT(calls[2], ElementsAre("conv.weight"));
  EXPECT_TRUE(ctx.on_grads_ready);  // restored after Backward
  // Reported gradients were already final.
  std::vector<Parameter*> params;
  net->CollectParameters(&params);
  for (Parameter* p : params) {
    const Tensor& reported = grads_at_report.at(p->name);
    for (int64_t i = 0; i < p->grad.size(); ++i) ASSERT_EQ(reported[i], p->grad[i]) << p->name;
  }
}

TEST(SequentialTest, NestedContainerReportsItsSubtreeOnce) {
  std::mt19937_64 rng(4);
  Sequential outer("outer");
  auto inner = std::make_unique<Sequential>("inner");
  inner->Emplace<Linear>("fc1", LinearOptions{.in_features = 3, .out_features = 4}, rng);
  inner->Emplace<Relu>("relu");
  inner->Emplace<Linear>("fc2", LinearOptions{.in_features = 4, .out_features = 4}, rng);
  outer.Emplace<Linear>("first", LinearOptions{.in_features = 5, .out_features = 3}, rng);
  outer.Add(std::move(inner));
  outer.Emplace<Linear>("last", LinearOptions{.in_features = 4, .out_features = 2}, rng);
  RunContext ctx = SingleThreadContext();
  std::vector<std::vector<std::string>> calls;
  ctx.on_grads_ready = [&](std::span<Parameter* const> ready) {
    std::vector<std::string> names;
    for (Parameter* p : ready) names.push_back(p->name);
    calls.push_back(names);
  };
  Tensor y, dx;
  const Tensor x = RandomTensor({2, 5}, rng);
  outer.Forward(ctx, x, &y);
  outer.Backward(ctx, RandomTensor(y.shape(), rng), &dx);
  ASSERT_EQ(calls.size(), 3u);
  EXPECT_THAT(calls[0], ElementsAre("last.weight", "last.bias"));
  EXPECT_THAT(calls[1], ElementsAre("inner.fc1.weight", "inner.fc1.bias", "inner.fc2.weight",
                                    "inner.fc2.bias"));
  EXPECT_THAT(calls[2], ElementsAre("first.weight", "first.bias"));
  EXPECT_EQ(dx.shape(), x.shape());
}

TEST(SequentialTest, SteadyStateReusesBuffers) {
  std::mt19937_64 rng(5);
  auto net = SmallNet(rng);
  const Tensor x = RandomTensor({2, 2, 4, 4}, rng);
  RunContext ctx = SingleThreadContext();
  Tensor y, dx;
  net->Forward(ctx, x, &y);
  net->Backward(ctx, y, &dx);
  const float* y_data = y.data();
  const float* dx_data = dx.data();
  const Tensor first = y;
  net->Forward(ctx, x, &y);
  net->Backward(ctx, y, &dx);
  EXPECT_EQ(y.data(), y_data);
  EXPECT_EQ(dx.data(), dx_data);
  // Same input, same output (batch-norm in train mode uses batch statistics only).
  for (int64_t i = 0; i < y.size(); ++i) EXPECT_EQ(y[i], first[i]);
}

}  // namespace
}  // namespace qtrain::nn
