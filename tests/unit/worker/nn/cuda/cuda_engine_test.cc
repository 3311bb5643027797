// The CUDA engine against the CPU layers: the same model (same seed), the same batches and the same
// SGD settings must give the same losses and weights up to floating-point noise, for every model;
// CUDA graphs must not change the results; a model the GPU cannot run is refused by name.
#include "worker/nn/cuda/cuda_engine.h"

#include <cctype>
#include <cmath>
#include <random>

#include "common/status_macros.h"
#include "common/testing/cuda_testing.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/local_communicator.h"
#include "worker/kernels/cpu/softmax_xent.h"
#include "worker/nn/model.h"
#include "worker/quant/quant_factory.h"
#include "worker/train/optimizer.h"

namespace qtrain::nn::cuda {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

struct Batch {
  Tensor x;
  std::vector<int32_t> labels;
};

std::vector<Batch> MakeBatches(const Shape& chw, int classes, int64_t m, int count) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Batch> out;
  for (int b = 0; b < count; ++b) {
    Batch batch;
    batch.x = Tensor({m, chw[0], chw[1], chw[2]});
    for (int64_t i = 0; i < batch.x.size(); ++i) batch.x[i] = normal(rng);
    for (int64_t i = 0; i < m; ++i) batch.labels.push_back(static_cast<int32_t>(rng() % classes));
    out.push_back(std::move(batch));
  }
  return out;
}

struct TrainRun {
  std::vector<double> losses;
  std::vector<int64_t> correct;
  std::vector<float> weights;  // parameters then buffers, after the steps
  double eval_loss = 0;
};

std::vector<float> Flatten(Layer& model) {
  std::vector<Parameter*> params;
  std::vector<Buffer*> buffers;
  model.CollectParameters(&params);
  model.CollectBuffers(&buffers);
  std::vector<float> out;
  for (auto* p : params) out.insert(out.end(), p->value.data(), p->value.data() + p->value.size());
  for (auto* b : buffers) out.insert(out.end(), b->value.data(), b->value.data() + b->value.size());
  return out;
}

// Trains `name` on `batches` with the CPU layers (engine == nullopt) or the CUDA engine. A name
// ending in "+scalar" appends the scalar layer (initialised at 0.5, so it matters).
absl::StatusOr<TrainRun> Train(const std::string& name, const std::string& quant,
                          const std::vector<Batch>& batches, std::optional<bool> graphs) {
  const Shape chw = {batches[0].x.dim(1), batches[0].x.dim(2), batches[0].x.dim(3)};
  std::unique_ptr<quant::QuantLayerFactory> factory;
  const std::string suffix = "+scalar";
  const bool scalar = name.size() > suffix.size() && name.ends_with(suffix);
  ModelSpec spec{scalar ? name.substr(0, name.size() - suffix.size()) : name, chw, 10, 3};
  if (scalar) spec.scalar_layer = 0.5f;
  if (!quant.empty()) {
    ASSIGN_OR_RETURN(quant::QuantConfig config,
                     quant::MakeQuantConfig(quant, "none", "none", true, true));
    ASSIGN_OR_RETURN(factory, quant::QuantLayerFactory::Create(config));
    spec.factory = factory.get();
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Layer> model, BuildModel(spec));
  std::vector<Parameter*> params;
  std::vector<Buffer*> buffers;
  model->CollectParameters(&params);
  model->CollectBuffers(&buffers);
  train::SgdOptions sgd_options;
  train::Sgd sgd(params, sgd_options);
  ASSIGN_OR_RETURN(auto comm, comm::LocalCommunicator::Create({}));
  const float lr = 0.02f;
  TrainRun run;
  RunContext ctx;
  const int64_t m = batches[0].x.dim(0);
  if (!graphs.has_value()) {
    Tensor logits, dlogits;
    for (const Batch& b : batches) {
      ctx.mode = Mode::kTrain;
      model->Forward(ctx, b.x, &logits);
      dlogits.Resize(logits.shape());
      ASSIGN_OR_RETURN(auto r, kernels::SoftmaxCrossEntropy(ctx.cpu, m, 10, logits.data(),
                                                            b.labels.data(), dlogits.data()));
      model->Backward(ctx, dlogits, nullptr);
      sgd.Step(ctx.cpu, lr);
      run.losses.push_back(r.mean_loss);
      run.correct.push_back(r.correct);
    }
    ctx.mode = Mode::kEval;
    model->Forward(ctx, batches[0].x, &logits);
    ASSIGN_OR_RETURN(auto r, kernels::SoftmaxCrossEntropy(ctx.cpu, m, 10, logits.data(),
                                                          batches[0].labels.data(), nullptr));
    run.eval_loss = r.mean_loss;
  } else {
    CudaEngineOptions options;
    options.device = 0;
    options.graphs = *graphs;
    train::StepEngineInputs in{model.get(), params, buffers, &sgd, sgd_options, comm.get(), {},
                               chw, 10, m};
    ASSIGN_OR_RETURN(std::unique_ptr<train::StepEngine> engine, CudaEngineFactory(options)(in));
    for (const Batch& b : batches) {
      comm::StepStats stats;
      double wait = 0;
      ASSIGN_OR_RETURN(auto r, engine->TrainStep(b.x, b.labels, lr, &stats, &wait));
      run.losses.push_back(r.mean_loss);
      run.correct.push_back(r.correct);
    }
    ASSIGN_OR_RETURN(auto r, engine->EvalBatch(batches[0].x, batches[0].labels));
    run.eval_loss = r.mean_loss;
    RETURN_IF_ERROR(engine->PullState());
  }
  run.weights = Flatten(*model);
  return run;
}

void ExpectClose(const TrainRun& cpu, const TrainRun& gpu, double loss_tol, double weight_tol) {
  ASSERT_EQ(cpu.losses.size(), gpu.losses.size());
  for (size_t i = 0; i < cpu.losses.size(); ++i) {
    EXPECT_NEAR(cpu.losses[i], gpu.losses[i], loss_tol * std::max(1.0, std::abs(cpu.losses[i])))
        << "step " << i;
  }
  EXPECT_NEAR(cpu.eval_loss, gpu.eval_loss, loss_tol * std::max(1.0, std::abs(cpu.eval_loss)));
  ASSERT_EQ(cpu.weights.size(), gpu.weights.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < cpu.weights.size(); ++i) {
    diff += (cpu.weights[i] - gpu.weights[i]) * double(cpu.weights[i] - gpu.weights[i]);
    norm += double(cpu.weights[i]) * cpu.weights[i];
  }
  EXPECT_LT(std::sqrt(diff / norm), weight_tol);
}

class CudaEngineModelTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaEngineModelTest, MatchesTheCpuLayers) {
  QTRAIN_REQUIRE_GPU();
  const std::string name = GetParam();
  const Shape chw = name == "resnet20" ? Shape{3, 16, 16} : Shape{1, 28, 28};
  const std::vector<Batch> batches = MakeBatches(chw, 10, 32, 6);
  absl::StatusOr<TrainRun> cpu = Train(name, "", batches, std::nullopt);
  ASSERT_THAT(cpu, IsOk());
  absl::StatusOr<TrainRun> gpu = Train(name, "", batches, false);
  ASSERT_THAT(gpu, IsOk());
  ExpectClose(*cpu, *gpu, 1e-3, 1e-3);
}

TEST_P(CudaEngineModelTest, GraphsGiveTheSameBitsAsEagerSteps) {
  QTRAIN_REQUIRE_GPU();
  const std::string name = GetParam();
  const Shape chw = name == "resnet20" ? Shape{3, 16, 16} : Shape{1, 28, 28};
  const std::vector<Batch> batches = MakeBatches(chw, 10, 16, 5);
  absl::StatusOr<TrainRun> eager = Train(name, "", batches, false);
  absl::StatusOr<TrainRun> graph = Train(name, "", batches, true);
  ASSERT_THAT(eager, IsOk());
  ASSERT_THAT(graph, IsOk());
  EXPECT_EQ(eager->losses, graph->losses);
  EXPECT_EQ(eager->weights, graph->weights);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaEngineModelTest,
                         ::testing::Values("mlp", "cnn", "resnet20", "cnn+scalar"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string n = info.param;
                           for (char& c : n) c = std::isalnum(static_cast<unsigned char>(c)) ? c : '_';
                           return n;
                         });

TEST(CudaEngineTest, WrongBatchIsRejected) {
  QTRAIN_REQUIRE_GPU();
  std::vector<Batch> batches = MakeBatches({1, 28, 28}, 10, 8, 1);
  ModelSpec spec{"mlp", {1, 28, 28}, 10, 3};
  auto model = BuildModel(spec);
  ASSERT_THAT(model, IsOk());
  std::vector<Parameter*> params;
  (*model)->CollectParameters(&params);
  train::Sgd sgd(params, {});
  auto comm = comm::LocalCommunicator::Create({});
  ASSERT_THAT(comm, IsOk());
  train::StepEngineInputs in{model->get(), params, {}, &sgd, {}, comm->get(), {}, {1, 28, 28},
                             10, 4};
  auto engine = CudaEngineFactory({})(in);
  ASSERT_THAT(engine, IsOk());
  comm::StepStats stats;
  double wait = 0;
  EXPECT_THAT((*engine)->TrainStep(batches[0].x, batches[0].labels, 0.1f, &stats, &wait).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("does not fit")));
}

}  // namespace
}  // namespace qtrain::nn::cuda
