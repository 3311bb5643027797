#include "worker/train/trainer.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/local_communicator.h"
#include "worker/data/data_spec.h"
#include "worker/data/load_dataset.h"
#include "worker/nn/model.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

// A LocalCommunicator that also plays the parameter server's part in joining a running job:
// HandoverRequested is true at the top of step `handover_step` of a run from step 0 (the trainer
// asks once per step), Handover keeps the state, and JoinRunningJob returns `join`.
class JoiningCommunicator final : public comm::Communicator {
 public:
  comm::Communicator* inner = nullptr;
  int64_t handover_step = -1;
  std::optional<comm::JoinState> join;
  std::optional<comm::JoinState> handed;

  int rank() const override { return inner->rank(); }
  int world_size() const override { return inner->world_size(); }
  std::string Describe() const override { return inner->Describe(); }
  void SetStep(int64_t step) override { inner->SetStep(step); }
  bool IsIdentity() const override { return inner->IsIdentity(); }
  absl::Status AllReduceMean(std::string_view key, std::span<float> data,
                             comm::StepStats* stats) override {
    return inner->AllReduceMean(key, data, stats);
  }
  absl::Status Broadcast(std::span<float> data, int root) override {
    return inner->Broadcast(data, root);
  }
  absl::Status AllReduceSum(std::span<double> values) override { return inner->AllReduceSum(values); }
  absl::StatusOr<std::vector<uint64_t>> AllGatherU64(uint64_t value) override {
    return inner->AllGatherU64(value);
  }
  absl::Status Barrier() override { return inner->Barrier(); }
  std::vector<std::string> ResidualKeys() const override { return inner->ResidualKeys(); }
  std::span<const float> Residual(std::string_view key) const override {
    return inner->Residual(key);
  }
  absl::Status SetResidual(std::string_view key, std::span<const float> values) override {
    return inner->SetResidual(key, values);
  }
  absl::StatusOr<std::optional<comm::JoinState>> JoinRunningJob() override { return join; }
  bool HandoverRequested() const override { return asked_++ == handover_step; }
  absl::Status Handover(const comm::JoinState& state) override {
    handed = state;
    return absl::OkStatus();
  }

 private:
  mutable int64_t asked_ = 0;
};

class TrainerTest : public ::testing::Test {
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

  struct Run {
    std::unique_ptr<nn::Layer> model;
    absl::StatusOr<TrainSummary> summary;
    std::vector<float> weights;
  };

  Run Train(const std::string& model_name, TrainerOptions options,
            JoiningCommunicator* joining = nullptr) {
    Run run;
    nn::ModelSpec spec{model_name, {1, 8, 8}, 4, 11};
    auto model = nn::BuildModel(spec);
    EXPECT_THAT(model, IsOk());
    run.model = std::move(*model);
    options.progress = false;
    kernels::CpuContext cpu;  // single-threaded: bit-reproducible
    auto comm = comm::LocalCommunicator::Create({});
    EXPECT_THAT(comm, IsOk());
    comm::Communicator* communicator = comm->get();
    if (joining != nullptr) {
      joining->inner = communicator;
      communicator = joining;
    }
    auto trainer = Trainer::Create(run.model.get(), ModelInfo{model_name, {1, 8, 8}, 4}, &data_,
                                   data::AugmentOptions{}, options, cpu, communicator);
    if (!trainer.ok()) {  // some tests expect this
      run.summary = trainer.status();
      return run;
    }
    run.summary = (*trainer)->Run();
    std::vector<nn::Parameter*> params;
    run.model->CollectParameters(&params);
    for (auto* p : params) run.weights.insert(run.weights.end(), p->value.data(), p->value.data() + p->value.size());
    return run;
  }

  TrainerOptions Options(int64_t epochs) {
    TrainerOptions o;
    o.epochs = epochs;
    o.batch_size = 32;
    o.lr.base_lr = 0.05f;
    o.seed = 5;
    return o;
  }

  data::DataSplits data_;
  std::filesystem::path dir_;
};

TEST_F(TrainerTest, LearnsSyntheticDataAndWritesMetrics) {
  TrainerOptions o = Options(3);
  o.metrics_path = (dir_.string() + "-metrics.jsonl");
  std::filesystem::remove(o.metrics_path);
  o.log_every = 4;
  Run r = Train("mlp", o);
  ASSERT_THAT(r.summary, IsOk());
  EXPECT_EQ(r.summary->epochs_run, 3);
  EXPECT_EQ(r.summary->steps, 3 * 16);
  // Four classes: chance is 25%. The synthetic classes are separable by construction.
  EXPECT_GT(r.summary->final_test_accuracy, 0.8);
  std::ifstream in(o.metrics_path);
  int steps = 0, epochs = 0;
  for (std::string line; std::getline(in, line);) {
    steps += line.find("\"type\":\"step\"") != std::string::npos;
    epochs += line.find("\"type\":\"epoch\"") != std::string::npos;
  }
  EXPECT_EQ(steps, 3 * 4);
  EXPECT_EQ(epochs, 3);
}

TEST_F(TrainerTest, SameSeedSameWeights) {
  Run a = Train("cnn", Options(1));
  Run b = Train("cnn", Options(1));
  ASSERT_THAT(a.summary, IsOk());
  ASSERT_EQ(a.weights.size(), b.weights.size());
  EXPECT_EQ(0, std::memcmp(a.weights.data(), b.weights.data(), 4 * a.weights.size()));
}

// With a constant learning rate, a 1-epoch run followed by --resume to 2 epochs must equal a
// straight 2-epoch run bit for bit (same data order, same optimizer state).
TEST_F(TrainerTest, ResumeContinuesExactlyWhereTheRunStopped) {
  TrainerOptions two = Options(2);
  two.lr.decay = LrDecay::kConstant;
  Run straight = Train("mlp", two);
  ASSERT_THAT(straight.summary, IsOk());

  TrainerOptions one = two;
  one.epochs = 1;
  one.checkpoint_dir = dir_.string();
  ASSERT_THAT(Train("mlp", one).summary, IsOk());

  TrainerOptions resume = two;
  resume.checkpoint_dir = dir_.string();
  resume.resume = true;
  Run resumed = Train("mlp", resume);
  ASSERT_THAT(resumed.summary, IsOk());
  EXPECT_EQ(resumed.summary->epochs_run, 1);
  EXPECT_EQ(resumed.summary->steps, straight.summary->steps);
  ASSERT_EQ(resumed.weights.size(), straight.weights.size());
  EXPECT_EQ(0, std::memcmp(resumed.weights.data(), straight.weights.data(),
                           4 * resumed.weights.size()));
}

// A worker that joins a running job mid-epoch (Communicator::JoinRunningJob) with a peer's
// state at a step boundary continues exactly as the peer: same batches (sampler position),
// same learning rate, same momentum, so one process here ends with the peer's weights bit for
// bit (with world size 1 the "peer" is the first run; the learning rate decays by default, so
// the step's position within the run matters).
TEST_F(TrainerTest, JoiningAtAPeersStepBoundaryEndsWithThePeersWeights) {
  JoiningCommunicator donor;
  donor.handover_step = 20;  // 16 steps an epoch: epoch 1, batch 4
  Run full = Train("cnn", Options(2), &donor);
  ASSERT_THAT(full.summary, IsOk());
  ASSERT_TRUE(donor.handed.has_value());
  EXPECT_EQ(donor.handed->epoch, 1);
  EXPECT_EQ(donor.handed->step, 20);
  EXPECT_EQ(donor.handed->step_in_epoch, 4);
  EXPECT_EQ(donor.handed->donor, 0);

  JoiningCommunicator joiner;
  joiner.join = donor.handed;
  Run joined = Train("cnn", Options(2), &joiner);
  ASSERT_THAT(joined.summary, IsOk());
  EXPECT_EQ(joined.summary->steps, full.summary->steps);
  EXPECT_EQ(joined.summary->epochs_run, 1);
  EXPECT_EQ(joined.summary->weights_hash, full.summary->weights_hash);  // buffers too
  ASSERT_EQ(joined.weights.size(), full.weights.size());
  EXPECT_EQ(0, std::memcmp(joined.weights.data(), full.weights.data(), 4 * full.weights.size()));
}

TEST_F(TrainerTest, JoiningRefusesAPositionOrStateThatDoesNotFitThisRun) {
  JoiningCommunicator donor;
  donor.handover_step = 3;
  ASSERT_THAT(Train("mlp", Options(1), &donor).summary, IsOk());
  ASSERT_TRUE(donor.handed.has_value());

  JoiningCommunicator inconsistent;  // step is not epoch * steps_per_epoch + batch
  inconsistent.join = donor.handed;
  inconsistent.join->step = 7;
  EXPECT_THAT(Train("mlp", Options(1), &inconsistent).summary,
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("same flags")));
  JoiningCommunicator past_the_end;  // the job has more epochs than this run
  past_the_end.join = donor.handed;
  past_the_end.join->epoch = 1;
  past_the_end.join->step = 16 + 3;
  EXPECT_THAT(Train("mlp", Options(1), &past_the_end).summary,
              StatusIs(absl::StatusCode::kFailedPrecondition));
  JoiningCommunicator other_model;  // the state of another model
  other_model.join = donor.handed;
  EXPECT_THAT(Train("cnn", Options(1), &other_model).summary,
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("floats")));
}

TEST_F(TrainerTest, ResumeRefusesAnotherModelAndCorruptFiles) {
  TrainerOptions o = Options(1);
  o.checkpoint_dir = dir_.string();
  ASSERT_THAT(Train("mlp", o).summary, IsOk());
  o.resume = true;
  EXPECT_THAT(Train("cnn", o).summary,
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("holds model 'mlp'")));
  const std::string path = (dir_ / "checkpoint.qtrn").string();
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(40);
    f.put('\x5a');
  }
  EXPECT_THAT(Train("mlp", o).summary, StatusIs(absl::StatusCode::kDataLoss));
}

// --init_from: a fresh run starts from another run's weights. With a learning rate too small to
// move a float, the weights after the run are exactly the source run's final weights.
TEST_F(TrainerTest, InitFromStartsFromAnotherRunsWeights) {
  TrainerOptions source = Options(1);
  source.checkpoint_dir = (dir_ / "source").string();
  Run trained = Train("mlp", source);
  ASSERT_THAT(trained.summary, IsOk());

  TrainerOptions tune = Options(1);
  tune.lr.base_lr = 1e-30f;
  tune.sgd.weight_decay = 0;
  tune.init_from = source.checkpoint_dir;
  Run tuned = Train("mlp", tune);
  ASSERT_THAT(tuned.summary, IsOk());
  ASSERT_EQ(tuned.weights.size(), trained.weights.size());
  EXPECT_EQ(0, std::memcmp(tuned.weights.data(), trained.weights.data(),
                           4 * tuned.weights.size()));
  EXPECT_NEAR(tuned.summary->final_test_accuracy, trained.summary->final_test_accuracy, 1e-9);

  // Without it, the same settings stay at the random initialisation.
  tune.init_from.clear();
  Run fresh = Train("mlp", tune);
  ASSERT_THAT(fresh.summary, IsOk());
  EXPECT_NE(0, std::memcmp(fresh.weights.data(), trained.weights.data(),
                           4 * fresh.weights.size()));
}

TEST_F(TrainerTest, InitFromRefusesAnotherModelAndMissingFiles) {
  TrainerOptions source = Options(1);
  source.checkpoint_dir = (dir_ / "source").string();
  ASSERT_THAT(Train("mlp", source).summary, IsOk());
  TrainerOptions o = Options(1);
  o.init_from = source.checkpoint_dir;
  EXPECT_THAT(Train("cnn", o).summary,
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("holds model 'mlp'")));
  o.init_from = (dir_ / "nowhere").string();
  EXPECT_THAT(Train("mlp", o).summary,
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("--init_from")));
  // A checkpoint to resume from wins: --init_from is then not read at all.
  o.checkpoint_dir = source.checkpoint_dir;
  o.resume = true;
  o.epochs = 2;
  EXPECT_THAT(Train("mlp", o).summary, IsOk());
}

TEST_F(TrainerTest, BadOptionsAreRejected) {
  TrainerOptions o = Options(0);
  EXPECT_THAT(Train("mlp", o).summary, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--epochs")));
  o = Options(1);
  o.resume = true;
  EXPECT_THAT(Train("mlp", o).summary,
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--checkpoint_dir")));
}

TEST_F(TrainerTest, DivergenceIsReportedNotSilent) {
  TrainerOptions o = Options(1);
  o.lr.base_lr = 1e30f;
  o.sgd.weight_decay = 0;
  EXPECT_THAT(Train("mlp", o).summary,
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("diverged")));
}

}  // namespace
}  // namespace qtrain::train
