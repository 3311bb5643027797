// The trainer's StepEngine hooks, checked with an engine that runs the CPU layers on a private
// copy of the state. After every step it overwrites the host model with NaN, so a trainer that
// reads host state without PullState (checkpoints, buffer averaging, the weights hash, a phase
// change) or that forgets PushState after changing it fails these tests.
#include "worker/train/step_engine.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/local_communicator.h"
#include "worker/data/data_spec.h"
#include "worker/data/load_dataset.h"
#include "worker/nn/model.h"
#include "worker/train/trainer.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

struct EngineCounts {
  int created = 0, pushes = 0, pulls = 0, steps = 0, evals = 0;
};

class ShadowCpuEngine : public StepEngine {
 public:
  ShadowCpuEngine(const StepEngineInputs& in, EngineCounts* counts) : in_(in), counts_(counts) {
    ++counts_->created;
    Snapshot(&shadow_);
  }
  std::string Describe() const override { return "shadow-cpu"; }
  absl::Status PushState() override {
    ++counts_->pushes;
    Snapshot(&shadow_);
    return absl::OkStatus();
  }
  absl::Status PullState() override {
    ++counts_->pulls;
    Restore(shadow_);
    return absl::OkStatus();
  }
  absl::StatusOr<kernels::SoftmaxXentResult> TrainStep(const nn::Tensor& x,
                                                       std::span<const int32_t> labels, float lr,
                                                       comm::StepStats* stats,
                                                       double* wait_seconds) override {
    ++counts_->steps;
    Restore(shadow_);
    ctx_.mode = nn::Mode::kTrain;
    in_.model->Forward(ctx_, x, &logits_);
    dlogits_.Resize(logits_.shape());
    ASSIGN_OR_RETURN(kernels::SoftmaxXentResult r,
                     kernels::SoftmaxCrossEntropy(ctx_.cpu, x.dim(0), logits_.dim(1),
                                                  logits_.data(), labels.data(), dlogits_.data()));
    in_.model->Backward(ctx_, dlogits_, nullptr);
    for (const GradientBucket& b : in_.buckets) {  // the plan's buckets, under their keys
      std::vector<float> flat(static_cast<size_t>(b.elements));
      for (size_t k = 0; k < b.params.size(); ++k) {
        const nn::Tensor& g = in_.params[b.params[k]]->grad;
        std::copy(g.data(), g.data() + g.size(), flat.data() + b.offsets[k]);
      }
      RETURN_IF_ERROR(in_.comm->AllReduceMean(b.key, flat, stats));
      for (size_t k = 0; k < b.params.size(); ++k) {
        nn::Tensor& g = in_.params[b.params[k]]->grad;
        std::copy(flat.data() + b.offsets[k], flat.data() + b.offsets[k] + g.size(), g.data());
      }
    }
    in_.sgd->Step(ctx_.cpu, lr);
    Snapshot(&shadow_);
    Scribble();
    return r;
  }
  absl::StatusOr<kernels::SoftmaxXentResult> EvalBatch(const nn::Tensor& x,
                                                       std::span<const int32_t> labels) override {
    ++counts_->evals;
    std::vector<float> host;
    Snapshot(&host);
    Restore(shadow_);
    ctx_.mode = nn::Mode::kEval;
    in_.model->Forward(ctx_, x, &logits_);
    auto r = kernels::SoftmaxCrossEntropy(ctx_.cpu, x.dim(0), logits_.dim(1), logits_.data(),
                                          labels.data(), nullptr);
    Restore(host);
    return r;
  }

 private:
  template <class F>
  void ForEachTensor(F f) {
    for (nn::Parameter* p : in_.params) f(p->value);
    for (nn::Buffer* b : in_.buffers) f(b->value);
    for (nn::Tensor& m : in_.sgd->momentum()) f(m);
  }
  void Snapshot(std::vector<float>* out) {
    out->clear();
    ForEachTensor([out](nn::Tensor& t) { out->insert(out->end(), t.data(), t.data() + t.size()); });
  }
  void Restore(const std::vector<float>& in) {
    size_t at = 0;
    ForEachTensor([&](nn::Tensor& t) {
      std::copy(in.begin() + at, in.begin() + at + t.size(), t.data());
      at += t.size();
    });
  }
  void Scribble() {
    ForEachTensor([](nn::Tensor& t) { t.Fill(std::numeric_limits<float>::quiet_NaN()); });
  }

  StepEngineInputs in_;
  EngineCounts* counts_;
  nn::RunContext ctx_;
  nn::Tensor logits_, dlogits_;
  std::vector<float> shadow_;
};

class StepEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto spec = data::ParseDataSpec("synthetic:n=512,test=256,classes=4,shape=1x8x8,seed=3");
    ASSERT_THAT(spec, IsOk());
    auto splits = data::LoadDataset(*spec, {});
    ASSERT_THAT(splits, IsOk());
    data_ = std::move(*splits);
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("step_engine_" +
            std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    std::filesystem::remove_all(dir_);
  }

  struct Result {
    absl::StatusOr<TrainSummary> summary;
    std::vector<float> weights;
    size_t buckets = 0;  // Trainer::Buckets().size() after Create
  };

  // Trains `model_name` with the CPU layers (engine == false) or the shadow engine.
  Result Train(const std::string& model_name, TrainerOptions options, bool engine,
               const std::string& codec = "") {
    Result result;
    nn::ModelSpec spec{model_name, {1, 8, 8}, 4, 11};
    auto model = nn::BuildModel(spec);
    EXPECT_THAT(model, IsOk());
    options.progress = false;
    if (engine) {
      options.engine = [this](const StepEngineInputs& in)
          -> absl::StatusOr<std::unique_ptr<StepEngine>> {
        return std::make_unique<ShadowCpuEngine>(in, &counts_);
      };
    }
    comm::LocalOptions copts;
    copts.codec_spec = codec;
    auto comm = comm::LocalCommunicator::Create(copts);
    EXPECT_THAT(comm, IsOk());
    auto trainer = Trainer::Create(model->get(), ModelInfo{model_name, {1, 8, 8}, 4}, &data_,
                                   data::AugmentOptions{}, options, kernels::CpuContext{},
                                   comm->get());
    if (!trainer.ok()) {
      result.summary = trainer.status();
      return result;
    }
    result.buckets = (*trainer)->Buckets().size();
    result.summary = (*trainer)->Run();
    std::vector<nn::Parameter*> params;
    (*model)->CollectParameters(&params);
    for (auto* p : params) {
      result.weights.insert(result.weights.end(), p->value.data(), p->value.data() + p->value.size());
    }
    return result;
  }

  TrainerOptions Options(int64_t epochs) {
    TrainerOptions o;
    o.epochs = epochs;
    o.batch_size = 32;
    o.lr.base_lr = 0.05f;
    o.seed = 5;
    return o;
  }

  static void ExpectSameRun(const Result& a, const Result& b) {
    ASSERT_THAT(a.summary, IsOk());
    ASSERT_THAT(b.summary, IsOk());
    EXPECT_EQ(a.summary->weights_hash, b.summary->weights_hash);
    EXPECT_EQ(a.summary->final_test_accuracy, b.summary->final_test_accuracy);
    EXPECT_EQ(a.summary->final_test_loss, b.summary->final_test_loss);
    ASSERT_EQ(a.weights.size(), b.weights.size());
    EXPECT_EQ(0, std::memcmp(a.weights.data(), b.weights.data(), 4 * a.weights.size()));
  }

  data::DataSplits data_;
  std::filesystem::path dir_;
  EngineCounts counts_;
};

TEST_F(StepEngineTest, EngineRunEqualsCpuRunBitForBit) {
  TrainerOptions o = Options(2);
  o.checkpoint_dir = (dir_ / "cpu").string();
  Result cpu = Train("cnn", o, false);
  o.checkpoint_dir = (dir_ / "engine").string();
  Result engine = Train("cnn", o, true);
  ExpectSameRun(cpu, engine);
  EXPECT_EQ(counts_.created, 1);
  EXPECT_EQ(counts_.steps, 2 * 16);
  EXPECT_GE(counts_.pushes, 1);  // after the initial state is settled
  EXPECT_EQ(counts_.pulls, 2);   // once per epoch end
  EXPECT_GT(counts_.evals, 0);   // evaluation ran on the engine
}

TEST_F(StepEngineTest, CompressedGradientsGoThroughTheCommunicatorsBuckets) {
  // A codec makes the communicator non-identity: the engine must average every bucket under the
  // plan's keys, so error-feedback residuals and results match the CPU bucketer's.
  TrainerOptions o = Options(1);
  o.bucket_bytes = 16 << 10;  // several buckets
  Result cpu = Train("cnn", o, false, "onebit");
  Result engine = Train("cnn", o, true, "onebit");
  ExpectSameRun(cpu, engine);
  EXPECT_GT(cpu.buckets, 1u);
  EXPECT_EQ(engine.buckets, cpu.buckets);  // the engine's plan is the trainer's Buckets()
  // And the codec really acted (the uncompressed run ends elsewhere).
  Result plain = Train("cnn", o, true);
  ASSERT_THAT(plain.summary, IsOk());
  EXPECT_NE(plain.summary->weights_hash, engine.summary->weights_hash);
}

TEST_F(StepEngineTest, ResumeThroughTheEngineIsExact) {
  TrainerOptions two = Options(2);
  two.lr.decay = LrDecay::kConstant;
  two.checkpoint_dir = (dir_ / "straight").string();
  Result straight = Train("cnn", two, true);
  TrainerOptions one = two;
  one.checkpoint_dir = (dir_ / "resumed").string();
  one.stop_after_epochs_for_testing = 1;
  ASSERT_THAT(Train("cnn", one, true).summary, IsOk());
  TrainerOptions rest = two;
  rest.checkpoint_dir = one.checkpoint_dir;
  rest.resume = true;
  Result resumed = Train("cnn", rest, true);
  ExpectSameRun(straight, resumed);
}

TEST_F(StepEngineTest, AFailingEngineFactoryStopsTheTrainer) {
  TrainerOptions o = Options(1);
  o.engine = [](const StepEngineInputs&) -> absl::StatusOr<std::unique_ptr<StepEngine>> {
    return absl::UnimplementedError("layer 'x' (foo) has no CUDA implementation");
  };
  o.progress = false;
  auto model = nn::BuildModel(nn::ModelSpec{"mlp", {1, 8, 8}, 4, 11});
  ASSERT_THAT(model, IsOk());
  auto comm = comm::LocalCommunicator::Create({});
  ASSERT_THAT(comm, IsOk());
  auto trainer = Trainer::Create(model->get(), ModelInfo{"mlp", {1, 8, 8}, 4}, &data_,
                                 data::AugmentOptions{}, o, kernels::CpuContext{}, comm->get());
  EXPECT_THAT(trainer.status(), StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("layer 'x'")));
}

}  // namespace
}  // namespace qtrain::train
