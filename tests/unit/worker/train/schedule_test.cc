#include "worker/train/schedule.h"

#include <filesystem>
#include <map>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/local_communicator.h"
#include "worker/data/data_spec.h"
#include "worker/data/load_dataset.h"
#include "worker/nn/model.h"
#include "worker/quant/quant_factory.h"
#include "worker/train/trainer.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using quant::Method;

quant::QuantConfig Target(const std::string& quant) {
  auto c = quant::MakeQuantConfig(quant, "none", "none", true, true);
  EXPECT_THAT(c, IsOk());
  return *c;
}

TEST(ScheduleTest, TwoStage) {
  ScheduleOptions o{ScheduleKind::kTwoStage, {3, 4}, {}, 32};
  auto phases = MakeSchedule(o, Target("dorefa:w=2,a=2"));
  ASSERT_THAT(phases, IsOk());
  ASSERT_EQ(phases->size(), 2u);
  EXPECT_EQ((*phases)[0].name, "ts1");
  EXPECT_EQ((*phases)[0].epochs, 3);
  EXPECT_EQ((*phases)[0].quant.weight.method, Method::kDorefa);
  EXPECT_EQ((*phases)[0].quant.weight.bits, 2);
  EXPECT_EQ((*phases)[0].quant.activation.method, Method::kNone);
  EXPECT_EQ((*phases)[1].quant.ToString(), Target("dorefa:w=2,a=2").ToString());
  EXPECT_EQ((*phases)[1].epochs, 4);

  o.ts_act_bits = 8;  // stage 1 at K = 8 bits
  phases = MakeSchedule(o, Target("dorefa:w=2,a=2"));
  ASSERT_THAT(phases, IsOk());
  EXPECT_EQ((*phases)[0].quant.activation.method, Method::kDorefa);
  EXPECT_EQ((*phases)[0].quant.activation.bits, 8);

  o.ts_act_bits = 2;  // not above the target
  EXPECT_THAT(MakeSchedule(o, Target("dorefa:w=2,a=2")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--ts_act_bits")));
  o.ts_act_bits = 32;
  o.stage_epochs = {3};
  EXPECT_THAT(MakeSchedule(o, Target("dorefa:w=2,a=2")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--stage_epochs")));
  o.stage_epochs = {1, 1};
  EXPECT_THAT(MakeSchedule(o, Target("none")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--schedule=ts")));
}

TEST(ScheduleTest, Progressive) {
  ScheduleOptions o{ScheduleKind::kProgressive, {1, 1, 1, 1}, {32, 8, 4, 2}, 32};
  auto phases = MakeSchedule(o, Target("dorefa:w=2,a=2"));
  ASSERT_THAT(phases, IsOk());
  std::vector<std::string> names;
  for (const auto& p : *phases) names.push_back(p.name);
  EXPECT_THAT(names, ElementsAre("pq32", "pq8", "pq4", "pq2"));
  EXPECT_FALSE((*phases)[0].quant.quantizes());
  EXPECT_EQ((*phases)[1].quant.weight.bits, 8);
  EXPECT_EQ((*phases)[1].quant.activation.bits, 8);
  EXPECT_EQ((*phases)[3].quant.ToString(), Target("dorefa:w=2,a=2").ToString());
  // The paper's base quantizer when no target is given.
  phases = MakeSchedule(o, Target("none"));
  ASSERT_THAT(phases, IsOk());
  EXPECT_EQ((*phases)[3].quant.weight.method, Method::kDorefa);
  EXPECT_EQ((*phases)[3].quant.activation.bits, 2);

  o.bits = {32, 4, 8};
  EXPECT_THAT(MakeSchedule(o, Target("dorefa:w=2,a=2")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("decrease")));
  o.bits = {32, 8, 4};
  o.stage_epochs = {1, 1, 1};
  EXPECT_THAT(MakeSchedule(o, Target("dorefa:w=2,a=2")),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("last --bits")));
}

TEST(ScheduleTest, ProgressiveTwoStage) {
  ScheduleOptions o{ScheduleKind::kProgressiveTwoStage, {1, 1, 1, 1, 1}, {32, 4, 2}, 32};
  auto phases = MakeSchedule(o, Target("dorefa:w=2,a=2"));
  ASSERT_THAT(phases, IsOk());
  std::vector<std::string> names;
  for (const auto& p : *phases) names.push_back(p.name);
  EXPECT_THAT(names, ElementsAre("pq32", "pq4.ts1", "pq4.ts2", "pq2.ts1", "pq2.ts2"));
  EXPECT_EQ((*phases)[1].quant.weight.bits, 4);
  EXPECT_EQ((*phases)[1].quant.activation.method, Method::kNone);
  EXPECT_EQ((*phases)[2].quant.activation.bits, 4);
  EXPECT_THAT(ParseScheduleKind("pq+ts"), IsOk());
  EXPECT_THAT(ParseScheduleKind("tss"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseIntList("bits", "32,x"), StatusIs(absl::StatusCode::kInvalidArgument));
}

std::unique_ptr<nn::Layer> Build(const std::string& model, const quant::QuantConfig& q,
                                 uint64_t seed) {
  auto factory = quant::QuantLayerFactory::Create(q);
  EXPECT_THAT(factory, IsOk());
  nn::ModelSpec spec{model, {1, 8, 8}, 4, seed};
  spec.factory = factory->get();
  auto m = nn::BuildModel(spec);
  EXPECT_THAT(m, IsOk());
  return std::move(*m);
}

TEST(ScheduleTest, CopyStateByNameCopiesExactly) {
  for (const std::string model : {"cnn", "resnet20", "mlp"}) {
    SCOPED_TRACE(model);
    auto from = Build(model, Target("none"), 7);
    // Make the buffers distinguishable from a fresh model's.
    std::vector<nn::Buffer*> fb;
    from->CollectBuffers(&fb);
    for (nn::Buffer* b : fb) b->value.Fill(0.375f);
    auto to = Build(model, quant::QuantConfig{{Method::kDorefa, 2}, {Method::kPact, 2}}, 8);
    CopyCounts c = CopyStateByName(*from, *to);
    std::vector<nn::Parameter*> fp, tp;
    from->CollectParameters(&fp);
    to->CollectParameters(&tp);
    std::map<std::string, const nn::Parameter*> by_name;
    for (auto* p : fp) by_name[p->name] = p;
    int quantizer_params = 0;
    for (auto* p : tp) {
      auto it = by_name.find(p->name);
      if (it == by_name.end()) {
        EXPECT_EQ(p->kind, nn::ParamKind::kQuantizer) << p->name;
        ++quantizer_params;
        continue;
      }
      ASSERT_EQ(p->value.size(), it->second->value.size());
      for (int64_t i = 0; i < p->value.size(); ++i) {
        ASSERT_EQ(p->value.data()[i], it->second->value.data()[i]) << p->name;
      }
    }
    EXPECT_EQ(c.parameters, static_cast<int>(fp.size()));
    EXPECT_EQ(c.parameters_total, static_cast<int>(fp.size()) + quantizer_params);
    std::vector<nn::Buffer*> tb;
    to->CollectBuffers(&tb);
    EXPECT_EQ(c.buffers, static_cast<int>(tb.size()));
    for (nn::Buffer* b : tb) {
      for (int64_t i = 0; i < b->value.size(); ++i) ASSERT_EQ(b->value.data()[i], 0.375f);
    }
  }
}

class ScheduledTrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto spec = data::ParseDataSpec("synthetic:n=512,test=256,classes=4,shape=1x8x8,seed=3");
    ASSERT_THAT(spec, IsOk());
    auto splits = data::LoadDataset(*spec, {});
    ASSERT_THAT(splits, IsOk());
    data_ = std::move(*splits);
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
  }

  PhasePlan Plan(const std::vector<SchedulePhase>& phases, const std::string& model) {
    PhasePlan plan;
    for (const SchedulePhase& p : phases) {
      plan.names.push_back(p.name);
      plan.epochs.push_back(p.epochs);
      plan.activation.push_back(p.quant.activation);
    }
    plan.description = ScheduleToString(phases);
    plan.build = [phases, model](int i) -> absl::StatusOr<std::unique_ptr<nn::Layer>> {
      return Build(model, phases[static_cast<size_t>(i)].quant, 11);
    };
    return plan;
  }

  TrainerOptions Options(int64_t epochs) {
    TrainerOptions o;
    o.epochs = epochs;
    o.batch_size = 32;
    o.max_steps_per_epoch = 4;
    o.lr.base_lr = 0.05f;
    o.seed = 5;
    o.progress = false;
    return o;
  }

  struct Result {
    absl::StatusOr<TrainSummary> summary;
    std::vector<float> weights;
    std::string describe;
  };

  Result Train(PhasePlan plan, const TrainerOptions& options, std::unique_ptr<Guide> guide = nullptr) {
    Result out;
    auto comm = comm::LocalCommunicator::Create({});
    EXPECT_THAT(comm, IsOk());
    kernels::CpuContext cpu;
    auto t = Trainer::CreatePhased(std::move(plan), std::move(guide),
                                   ModelInfo{"cnn", {1, 8, 8}, 4}, &data_, data::AugmentOptions{},
                                   options, cpu, comm->get());
    if (!t.ok()) {
      out.summary = t.status();
      return out;
    }
    out.summary = (*t)->Run();
    std::vector<nn::Parameter*> params;
    (*t)->model()->CollectParameters(&params);
    for (auto* p : params) {
      out.weights.insert(out.weights.end(), p->value.data(), p->value.data() + p->value.size());
    }
    std::vector<nn::Buffer*> buffers;
    (*t)->model()->CollectBuffers(&buffers);
    for (auto* b : buffers) {
      out.weights.insert(out.weights.end(), b->value.data(), b->value.data() + b->value.size());
    }
    out.describe = nn::Summary(*(*t)->model(), {1, 8, 8});
    return out;
  }

  data::DataSplits data_;
  std::filesystem::path dir_;
};

TEST_F(ScheduledTrainerTest, TwoStageChangesPhaseAtTheEpochBoundary) {
  auto phases = MakeSchedule({ScheduleKind::kTwoStage, {2, 1}, {}, 32}, Target("dorefa:w=2,a=2"));
  ASSERT_THAT(phases, IsOk());
  Result r = Train(Plan(*phases, "cnn"), Options(3));
  ASSERT_THAT(r.summary, IsOk());
  EXPECT_THAT(r.summary->phase_change_steps, ElementsAre(8));  // 2 epochs x 4 steps
  EXPECT_EQ(r.summary->final_phase, 1);
  EXPECT_EQ(r.summary->steps, 12);
  EXPECT_THAT(r.describe, HasSubstr("dorefa"));  // stage 2 quantizes the activations
  EXPECT_GT(r.summary->final_test_accuracy, 0.3);

  auto pq = MakeSchedule({ScheduleKind::kProgressive, {1, 1, 1}, {32, 4, 2}, 32},
                         Target("dorefa:w=2,a=2"));
  ASSERT_THAT(pq, IsOk());
  r = Train(Plan(*pq, "cnn"), Options(3));
  ASSERT_THAT(r.summary, IsOk());
  EXPECT_THAT(r.summary->phase_change_steps, ElementsAre(4, 8));
  EXPECT_EQ(r.summary->final_phase, 2);

  // The epochs must add up.
  EXPECT_THAT(Train(Plan(*pq, "cnn"), Options(4)).summary,
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("sum to 3")));
}

TEST_F(ScheduledTrainerTest, ResumeMidScheduleContinuesIdentically) {
  auto phases = MakeSchedule({ScheduleKind::kTwoStage, {1, 2}, {}, 32}, Target("dorefa:w=2,a=2"));
  ASSERT_THAT(phases, IsOk());
  TrainerOptions o = Options(3);
  o.checkpoint_dir = (dir_ / "full").string();
  Result full = Train(Plan(*phases, "cnn"), o);
  ASSERT_THAT(full.summary, IsOk());
  // Killed after epoch 1 (the checkpoint holds phase 0; the next epoch starts phase 1) and after
  // epoch 2 (mid phase 1).
  for (int64_t stop : {1, 2}) {
    SCOPED_TRACE(stop);
    TrainerOptions p = Options(3);
    p.checkpoint_dir = (dir_ / absl::StrCat("stop", stop)).string();
    p.stop_after_epochs_for_testing = stop;
    Result first = Train(Plan(*phases, "cnn"), p);
    ASSERT_THAT(first.summary, IsOk());
    p.stop_after_epochs_for_testing = 0;
    p.resume = true;
    Result rest = Train(Plan(*phases, "cnn"), p);
    ASSERT_THAT(rest.summary, IsOk());
    EXPECT_EQ(rest.summary->epochs_run, 3 - stop);
    EXPECT_EQ(rest.summary->final_phase, 1);
    EXPECT_EQ(rest.summary->weights_hash, full.summary->weights_hash);
    EXPECT_EQ(rest.weights, full.weights);
  }
  // A different schedule may not resume it.
  auto other = MakeSchedule({ScheduleKind::kTwoStage, {2, 1}, {}, 32}, Target("dorefa:w=2,a=2"));
  ASSERT_THAT(other, IsOk());
  TrainerOptions p = Options(3);
  p.checkpoint_dir = (dir_ / "stop1").string();
  p.resume = true;
  EXPECT_THAT(Train(Plan(*other, "cnn"), p).summary,
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("schedule")));
}

}  // namespace
}  // namespace qtrain::train
