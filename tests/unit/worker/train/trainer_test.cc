#include "worker/train/trainer.h"

#include <cstring>
#include <filesystem>
#include <fstream>

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

  Run Train(const std::string& model_name, TrainerOptions options) {
    Run run;
    nn::ModelSpec spec{model_name, {1, 8, 8}, 4, 11};
    auto model = nn::BuildModel(spec);
    EXPECT_THAT(model, IsOk());
    run.model = std::move(*model);
    options.progress = false;
    kernels::CpuContext cpu;  // single-threaded: bit-reproducible
    auto comm = comm::LocalCommunicator::Create({});
    EXPECT_THAT(comm, IsOk());
    auto trainer = Trainer::Create(run.model.get(), ModelInfo{model_name, {1, 8, 8}, 4}, &data_,
                                   data::AugmentOptions{}, options, cpu, comm->get());
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
