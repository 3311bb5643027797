#include "worker/train/guided.h"

#include <cmath>
#include <random>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/local_communicator.h"
#include "worker/data/data_spec.h"
#include "worker/data/load_dataset.h"
#include "worker/nn/model.h"
#include "worker/quant/dorefa.h"
#include "worker/quant/pact.h"
#include "worker/quant/quant_factory.h"
#include "worker/train/schedule.h"
#include "worker/train/trainer.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

// Maps with values spread over [-0.5, 1.5], kept at least 0.02 from DoReFa's clip points 0 and 1
// so the central differences (eps 1e-3) never straddle a kink.
nn::Tensor RandomMap(std::mt19937_64& rng) {
  nn::Tensor t({3, 2, 4, 4});
  std::uniform_real_distribution<float> u(-0.5f, 1.5f);
  for (int64_t i = 0; i < t.size(); ++i) {
    float v = u(rng);
    while (std::abs(v) < 0.02f || std::abs(v - 1) < 0.02f) v = u(rng);
    t.data()[i] = v;
  }
  return t;
}

// R's gradients against central differences in double-checked float. Q without rounding
// (Discretize::kOff: clip(x, 0, 1)) is differentiable away from its clip points; with rounding
// the straight-through rule is the definition, so the smooth version is what FD can check.
void CheckGradients(nn::Layer* q) {
  std::mt19937_64 rng(42);
  nn::Tensor mu = RandomMap(rng), nu = RandomMap(rng);
  nn::RunContext ctx;
  nn::Tensor dmu, dnu;
  GuidanceLoss(ctx, q, mu, nu, &dmu, &dnu);
  const float eps = 1e-3f;
  for (nn::Tensor* x : {&mu, &nu}) {
    const nn::Tensor& analytic = x == &mu ? dmu : dnu;
    for (int64_t i = 0; i < x->size(); i += 7) {
      const float saved = x->data()[i];
      x->data()[i] = saved + eps;
      const double up = GuidanceLoss(ctx, q, mu, nu, nullptr, nullptr);
      x->data()[i] = saved - eps;
      const double down = GuidanceLoss(ctx, q, mu, nu, nullptr, nullptr);
      x->data()[i] = saved;
      const double fd = (up - down) / (2.0 * eps);
      EXPECT_NEAR(analytic.data()[i], fd, 2e-3 * std::max(1.0, std::abs(fd)))
          << (x == &mu ? "mu" : "nu") << "[" << i << "]";
    }
  }
}

TEST(GuidanceLossTest, ValueIsHalfSquaredDistanceOverBatch) {
  nn::Tensor mu({2, 2}, {0.5f, 2.0f, -1.0f, 0.25f});
  nn::Tensor nu({2, 2}, {0.0f, 1.0f, 0.0f, 0.0f});
  nn::RunContext ctx;
  // Identity Q: ((0.5)^2 + 1 + 1 + 0.25^2) / 2 / 2.
  EXPECT_DOUBLE_EQ(GuidanceLoss(ctx, nullptr, mu, nu, nullptr, nullptr),
                   (0.25 + 1 + 1 + 0.0625) / 4);
  // DoReFa 2-bit: Q(mu) = {2/3, 1, 0, 1/3}.
  quant::DorefaActivationQuantizer q("q", 2);
  const double e0 = 2.0 / 3, e3 = 1.0 / 3;
  EXPECT_NEAR(GuidanceLoss(ctx, &q, mu, nu, nullptr, nullptr), (e0 * e0 + 0 + 0 + e3 * e3) / 4,
              1e-6);
}

TEST(GuidanceLossTest, GradientsMatchFiniteDifferences) {
  CheckGradients(nullptr);
  quant::DorefaActivationQuantizer dorefa("q", 2, quant::Discretize::kOff);
  CheckGradients(&dorefa);
}

TEST(TapRunnerTest, MatchesSequentialAndAddsTapGradients) {
  nn::ModelSpec spec{"cnn", {1, 8, 8}, 4, 3};
  auto a = nn::BuildModel(spec);
  auto b = nn::BuildModel(spec);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  auto runner = TapRunner::Create(b->get(), {"relu4", "relu5"});
  ASSERT_THAT(runner, IsOk());
  EXPECT_THAT(TapRunner::Create(b->get(), {"nope"}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("relu4")));
  std::mt19937_64 rng(1);
  std::normal_distribution<float> n;
  nn::Tensor x({5, 1, 8, 8}), ya, yb;
  for (int64_t i = 0; i < x.size(); ++i) x.data()[i] = n(rng);
  nn::RunContext ctx;
  (*a)->Forward(ctx, x, &ya);
  (*runner)->Forward(ctx, x, &yb);
  ASSERT_EQ(ya.shape(), yb.shape());
  for (int64_t i = 0; i < ya.size(); ++i) ASSERT_EQ(ya.data()[i], yb.data()[i]);
  nn::Tensor dy(ya.shape());
  for (int64_t i = 0; i < dy.size(); ++i) dy.data()[i] = n(rng);
  for (int k = 0; k < 2; ++k) {
    (*runner)->tap_grad(k).Resize((*runner)->tap(k).shape());
    (*runner)->tap_grad(k).Fill(0.0f);
  }
  int reports = 0;
  ctx.on_grads_ready = [&reports](std::span<nn::Parameter* const>) { ++reports; };
  (*a)->Backward(ctx, dy, nullptr);
  const int sequential_reports = reports;
  reports = 0;
  (*runner)->Backward(ctx, dy);
  EXPECT_EQ(reports, sequential_reports);
  std::vector<nn::Parameter*> pa, pb;
  (*a)->CollectParameters(&pa);
  (*b)->CollectParameters(&pb);
  for (size_t i = 0; i < pa.size(); ++i) {
    for (int64_t j = 0; j < pa[i]->grad.size(); ++j) {
      ASSERT_EQ(pa[i]->grad.data()[j], pb[i]->grad.data()[j]) << pa[i]->name;
    }
  }
  // A tap gradient at relu5 changes fc1's gradients but not fc2's.
  std::vector<float> fc2(pb.back()->grad.data(), pb.back()->grad.data() + pb.back()->grad.size());
  (*runner)->tap_grad(1).Fill(0.5f);
  ctx.on_grads_ready = nullptr;
  (*runner)->Backward(ctx, dy);
  for (size_t j = 0; j < fc2.size(); ++j) ASSERT_EQ(pb.back()->grad.data()[j], fc2[j]);
  bool fc1_changed = false;
  for (size_t i = 0; i < pa.size(); ++i) {
    if (pa[i]->name != "fc1.weight") continue;
    for (int64_t j = 0; j < pa[i]->grad.size(); ++j) {
      fc1_changed |= pa[i]->grad.data()[j] != pb[i]->grad.data()[j];
    }
  }
  EXPECT_TRUE(fc1_changed);
}

std::unique_ptr<nn::Layer> Build(const quant::QuantConfig& q, uint64_t seed) {
  auto factory = quant::QuantLayerFactory::Create(q);
  EXPECT_THAT(factory, IsOk());
  nn::ModelSpec spec{"cnn", {1, 8, 8}, 4, seed};
  spec.factory = factory->get();
  auto m = nn::BuildModel(spec);
  EXPECT_THAT(m, IsOk());
  return std::move(*m);
}

TEST(GuidedTrainerTest, GuidedRunTrainsBothNetworks) {
  auto spec = data::ParseDataSpec("synthetic:n=512,test=256,classes=4,shape=1x8x8,seed=3");
  ASSERT_THAT(spec, IsOk());
  auto splits = data::LoadDataset(*spec, {});
  ASSERT_THAT(splits, IsOk());
  const quant::QuantConfig q{{quant::Method::kDorefa, 2}, {quant::Method::kDorefa, 2}};
  PhasePlan plan;
  plan.names = {"guided"};
  plan.epochs = {3};
  plan.activation = {q.activation};
  plan.description = "guided";
  plan.build = [q](int) -> absl::StatusOr<std::unique_ptr<nn::Layer>> { return Build(q, 11); };
  GuideOptions g;
  g.lambda = 0.01f;
  g.layers = DefaultGuideLayers("cnn");
  auto guide = Guide::Create(g, Build(quant::QuantConfig{}, 11));
  ASSERT_THAT(guide, IsOk());
  TrainerOptions o;
  o.epochs = 3;
  o.batch_size = 32;
  o.lr.base_lr = 0.05f;
  o.progress = false;
  auto comm = comm::LocalCommunicator::Create({});
  ASSERT_THAT(comm, IsOk());
  auto t = Trainer::CreatePhased(std::move(plan), std::move(*guide), ModelInfo{"cnn", {1, 8, 8}, 4},
                                 &*splits, data::AugmentOptions{}, o, kernels::CpuContext{},
                                 comm->get());
  ASSERT_THAT(t, IsOk());
  auto s = (*t)->Run();
  ASSERT_THAT(s, IsOk());
  EXPECT_GT(s->final_test_accuracy, 0.5);
  EXPECT_GT(s->fp_test_accuracy, 0.5);
  EXPECT_GT(s->guidance_loss, 0.0);
  EXPECT_TRUE(std::isfinite(s->guidance_loss));
}

}  // namespace
}  // namespace qtrain::train
