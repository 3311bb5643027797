// The CUDA engine against the CPU layers: the same model (same seed), the same batches and the same
// SGD settings must give the same losses and weights up to floating-point noise, for every model;
// CUDA graphs must not change the results; a model the GPU cannot run is refused by name. Guided
// training on the engine (a twin) against train::Guide on the CPU: both networks' losses, R and
// weights.
#include "worker/nn/cuda/cuda_engine.h"

#include <cctype>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/testing/cuda_testing.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/local_communicator.h"
#include "worker/kernels/cpu/softmax_xent.h"
#include "worker/nn/model.h"
#include "worker/quant/quant_factory.h"
#include "worker/train/guided.h"
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

// ||a - b|| / ||a||.
double RelativeDistance(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * double(a[i] - b[i]);
    norm += double(a[i]) * a[i];
  }
  return std::sqrt(diff / norm);
}

void ExpectClose(const TrainRun& cpu, const TrainRun& gpu, double loss_tol, double weight_tol) {
  ASSERT_EQ(cpu.losses.size(), gpu.losses.size());
  for (size_t i = 0; i < cpu.losses.size(); ++i) {
    EXPECT_NEAR(cpu.losses[i], gpu.losses[i], loss_tol * std::max(1.0, std::abs(cpu.losses[i])))
        << "step " << i;
  }
  EXPECT_NEAR(cpu.eval_loss, gpu.eval_loss, loss_tol * std::max(1.0, std::abs(cpu.eval_loss)));
  ASSERT_EQ(cpu.weights.size(), gpu.weights.size());
  EXPECT_LT(RelativeDistance(cpu.weights, gpu.weights), weight_tol);
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

struct GuidedRun {
  std::vector<double> losses, fp_losses, guidance;
  std::vector<float> weights, fp_weights;
  double fp_eval_loss = 0;
};

// Guided training of `name` (weights SAWB, activations PACT at `bits`; its full-precision twin
// from the same seed) on
// `batches`: train::Guide on the CPU layers (graphs == nullopt) or the CUDA engine with a twin.
absl::StatusOr<GuidedRun> TrainGuided(const std::string& name, int bits, float lambda,
                                      const std::vector<Batch>& batches,
                                      std::optional<bool> graphs) {
  const Shape chw = {batches[0].x.dim(1), batches[0].x.dim(2), batches[0].x.dim(3)};
  ASSIGN_OR_RETURN(quant::QuantConfig config,
                   quant::MakeQuantConfig("none", absl::StrCat("sawb:bits=", bits),
                                          absl::StrCat("pact:bits=", bits), true, true));
  ASSIGN_OR_RETURN(auto factory, quant::QuantLayerFactory::Create(config));
  ModelSpec spec{name, chw, 10, 3};
  ASSIGN_OR_RETURN(std::unique_ptr<Layer> twin_model, BuildModel(spec));
  spec.factory = factory.get();
  ASSIGN_OR_RETURN(std::unique_ptr<Layer> model, BuildModel(spec));
  std::vector<Parameter*> params;
  std::vector<Buffer*> buffers;
  model->CollectParameters(&params);
  model->CollectBuffers(&buffers);
  train::SgdOptions sgd_options;
  train::Sgd sgd(params, sgd_options);
  train::GuideOptions g;
  g.lambda = lambda;
  g.layers = train::DefaultGuideLayers(name);
  g.sgd = sgd_options;
  ASSIGN_OR_RETURN(std::unique_ptr<train::Guide> guide, train::Guide::Create(g, std::move(twin_model)));
  ASSIGN_OR_RETURN(auto comm, comm::LocalCommunicator::Create({}));
  const float lr = 0.02f;
  const int64_t m = batches[0].x.dim(0);
  GuidedRun run;
  if (!graphs.has_value()) {
    RETURN_IF_ERROR(guide->Bind(model.get(), config.activation));
    RunContext ctx;
    for (const Batch& b : batches) {
      ASSIGN_OR_RETURN(train::GuidedStepResult r, guide->ForwardBackward(ctx, b.x, b.labels));
      sgd.Step(ctx.cpu, lr);
      guide->StepFp(ctx.cpu, lr);
      run.losses.push_back(r.lowbit.mean_loss);
      run.fp_losses.push_back(r.fp.mean_loss);
      run.guidance.push_back(r.guidance);
    }
    ctx.mode = Mode::kEval;
    Tensor logits;
    guide->fp_model()->Forward(ctx, batches[0].x, &logits);
    ASSIGN_OR_RETURN(auto r, kernels::SoftmaxCrossEntropy(ctx.cpu, m, 10, logits.data(),
                                                          batches[0].labels.data(), nullptr));
    run.fp_eval_loss = r.mean_loss;
  } else {
    train::TwinInputs twin{guide->fp_model(), guide->fp_params(), guide->fp_buffers(),
                           &guide->fp_sgd(), {}, g.layers, g.lambda};
    train::StepEngineInputs in{model.get(), params, buffers, &sgd, sgd_options, comm.get(), {},
                               chw, 10, m, &twin};
    CudaEngineOptions options;
    options.device = 0;
    options.graphs = *graphs;
    ASSIGN_OR_RETURN(std::unique_ptr<train::StepEngine> engine, CudaEngineFactory(options)(in));
    for (const Batch& b : batches) {
      comm::StepStats stats;
      double wait = 0;
      ASSIGN_OR_RETURN(auto r, engine->TrainStep(b.x, b.labels, lr, &stats, &wait));
      const train::GuidedStepResult gr = engine->LastGuidedStep();
      EXPECT_EQ(gr.lowbit.mean_loss, r.mean_loss);
      run.losses.push_back(r.mean_loss);
      run.fp_losses.push_back(gr.fp.mean_loss);
      run.guidance.push_back(gr.guidance);
    }
    ASSIGN_OR_RETURN(auto r, engine->EvalTwinBatch(batches[0].x, batches[0].labels));
    run.fp_eval_loss = r.mean_loss;
    RETURN_IF_ERROR(engine->PullState());
  }
  run.weights = Flatten(*model);
  run.fp_weights = Flatten(*guide->fp_model());
  return run;
}

// cnn: relu4 is PACT's quantizer (Q active, alpha shared), relu5 the ReLU before the
// full-precision classifier (Q the identity); resnet20: residual group outputs.
class CudaGuidedTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaGuidedTest, MatchesTheCpuGuide) {
  QTRAIN_REQUIRE_GPU();
  const std::string name = GetParam();
  const Shape chw = name == "resnet20" ? Shape{3, 16, 16} : Shape{1, 28, 28};
  const std::vector<Batch> batches = MakeBatches(chw, 10, 16, 4);
  const int bits = 4;
  const float lambda = 0.002f;  // larger values make these random-data steps chaotic
  absl::StatusOr<GuidedRun> cpu = TrainGuided(name, bits, lambda, batches, std::nullopt);
  ASSERT_THAT(cpu, IsOk());
  absl::StatusOr<GuidedRun> gpu = TrainGuided(name, bits, lambda, batches, false);
  ASSERT_THAT(gpu, IsOk());
  ASSERT_EQ(cpu->losses.size(), gpu->losses.size());
  for (size_t i = 0; i < cpu->losses.size(); ++i) {
    EXPECT_NEAR(cpu->losses[i], gpu->losses[i], 2e-3 * std::max(1.0, cpu->losses[i])) << i;
    EXPECT_NEAR(cpu->fp_losses[i], gpu->fp_losses[i], 2e-3 * std::max(1.0, cpu->fp_losses[i]))
        << i;
    EXPECT_GT(cpu->guidance[i], 0.0);
    EXPECT_NEAR(cpu->guidance[i], gpu->guidance[i], 5e-3 * cpu->guidance[i]) << i;
  }
  EXPECT_NEAR(cpu->fp_eval_loss, gpu->fp_eval_loss, 2e-3 * std::max(1.0, cpu->fp_eval_loss));
  ASSERT_EQ(cpu->weights.size(), gpu->weights.size());
  ASSERT_EQ(cpu->fp_weights.size(), gpu->fp_weights.size());
  EXPECT_LT(RelativeDistance(cpu->weights, gpu->weights), 2e-3);
  EXPECT_LT(RelativeDistance(cpu->fp_weights, gpu->fp_weights), 2e-3);

  // The guidance moved the twin away from a plain full-precision run on the same batches.
  absl::StatusOr<TrainRun> plain = Train(name, "", batches, false);
  ASSERT_THAT(plain, IsOk());
  ASSERT_EQ(plain->weights.size(), gpu->fp_weights.size());
  EXPECT_GT(RelativeDistance(plain->weights, gpu->fp_weights), 1e-5);

  absl::StatusOr<GuidedRun> graph = TrainGuided(name, bits, lambda, batches, true);
  ASSERT_THAT(graph, IsOk());
  EXPECT_EQ(gpu->losses, graph->losses);
  EXPECT_EQ(gpu->guidance, graph->guidance);
  EXPECT_EQ(gpu->fp_weights, graph->fp_weights);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaGuidedTest, ::testing::Values("cnn", "resnet20"));

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
