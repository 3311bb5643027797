// Training-step throughput: images/s of one full SGD step (forward, softmax cross-entropy,
// backward, SGD with momentum and weight decay) of each model at batch 128 on 1x28x28 inputs
// (Fashion-MNIST's shape), with a thread pool of `threads` (the second argument).
//
//   BM_TrainStep/<model>/<batch>/<threads>   counter images_per_second
//
//   BM_GuidedStep/<model>/<batch>/<threads>/<quant>   the same step of guided training (Zhuang et
//   al. 2018: the low-bit network and its full-precision twin, forward, backward and SGD of both,
//   with the guidance loss at the default points); its yardstick is BM_TrainStep of the same
//   quantization, in the same run (issue target: at most 2.2x its step time).
//
// The yardstick is worker/bench/pytorch_train_step.py (the same architectures in PyTorch),
// run pinned to the same cores: taskset -c 0,1 for 2 threads. Before timing, each model's loss
// must fall over a few steps on the fixed batch (a broken step would otherwise time fine).
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/loss.h"
#include "worker/nn/model.h"
#include "worker/quant/quant_factory.h"
#include "worker/train/guided.h"
#include "worker/train/optimizer.h"

namespace qtrain::nn {
namespace {

const char* const kModels[] = {"mlp", "cnn", "resnet20"};
// --quant specs (quant::ParseQuantSpec) or --wq/--aq pairs separated by a space.
const char* const kQuant[] = {"none", "sawb:bits=2 pact:bits=2", "dorefa:w=2,a=2", "qil:w=2,a=2",
                              "binary none"};

absl::StatusOr<quant::QuantConfig> QuantFor(int index) {
  const std::string spec = kQuant[index];
  const size_t space = spec.find(' ');
  if (space == std::string::npos) return quant::MakeQuantConfig(spec, "none", "none", true, true);
  return quant::MakeQuantConfig("none", spec.substr(0, space), spec.substr(space + 1), true, true);
}

void BM_TrainStep(benchmark::State& state) {
  const std::string name = kModels[state.range(0)];
  const int64_t batch = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  kernels::ThreadPool pool(threads);
  RunContext ctx;
  ctx.cpu.pool = &pool;
  ctx.mode = Mode::kTrain;
  absl::StatusOr<quant::QuantConfig> config = QuantFor(static_cast<int>(state.range(3)));
  absl::StatusOr<std::unique_ptr<quant::QuantLayerFactory>> factory =
      config.ok() ? quant::QuantLayerFactory::Create(*config) : config.status();
  if (!factory.ok()) {
    state.SkipWithError(std::string(factory.status().message()).c_str());
    return;
  }
  state.SetLabel(name + " " + config->ToString());
  ModelSpec spec{name, {1, 28, 28}, 10, 1};
  spec.factory = factory->get();
  auto model = BuildModel(spec);
  if (!model.ok()) {
    state.SkipWithError(std::string(model.status().message()).c_str());
    return;
  }
  std::vector<Parameter*> params;
  (*model)->CollectParameters(&params);
  train::Sgd sgd(params, train::SgdOptions{});
  Tensor x({batch, 1, 28, 28}), logits, dlogits;
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  for (int64_t i = 0; i < x.size(); ++i) x[i] = dist(gen);
  std::vector<int32_t> labels(static_cast<size_t>(batch));
  for (auto& l : labels) l = static_cast<int32_t>(gen() % 10);

  auto step = [&]() -> double {
    (*model)->Forward(ctx, x, &logits);
    auto r = SoftmaxCrossEntropyLoss(ctx, logits, labels, &dlogits);
    (*model)->Backward(ctx, dlogits, nullptr);
    sgd.Step(ctx.cpu, 0.01f);
    return r.ok() ? r->mean_loss : NAN;
  };
  const double first = step();
  double last = first;
  for (int i = 0; i < 4; ++i) last = step();
  if (!(last < first)) {
    state.SkipWithError("loss did not fall on a fixed batch: the step is broken");
    return;
  }
  for (auto _ : state) {
    benchmark::DoNotOptimize(step());
  }
  state.counters["images_per_second"] =
      benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_TrainStep)
    ->ArgNames({"model", "batch", "threads", "quant"})
    ->ArgsProduct({{0, 1, 2}, {128}, {1, 2}, {0}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

BENCHMARK(BM_TrainStep)
    ->ArgNames({"model", "batch", "threads", "quant"})
    ->ArgsProduct({{1, 2}, {128}, {2}, {1, 2, 3, 4}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

void BM_GuidedStep(benchmark::State& state) {
  const std::string name = kModels[state.range(0)];
  const int64_t batch = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  kernels::ThreadPool pool(threads);
  RunContext ctx;
  ctx.cpu.pool = &pool;
  ctx.mode = Mode::kTrain;
  absl::StatusOr<quant::QuantConfig> config = QuantFor(static_cast<int>(state.range(3)));
  absl::StatusOr<std::unique_ptr<quant::QuantLayerFactory>> factory =
      config.ok() ? quant::QuantLayerFactory::Create(*config) : config.status();
  if (!factory.ok()) {
    state.SkipWithError(std::string(factory.status().message()).c_str());
    return;
  }
  state.SetLabel(name + " guided " + config->ToString());
  ModelSpec spec{name, {1, 28, 28}, 10, 1};
  spec.factory = factory->get();
  auto model = BuildModel(spec);
  ModelSpec fp_spec{name, {1, 28, 28}, 10, 1};
  auto fp_model = BuildModel(fp_spec);
  if (!model.ok() || !fp_model.ok()) {
    state.SkipWithError("cannot build the models");
    return;
  }
  train::GuideOptions options;
  options.layers = train::DefaultGuideLayers(name);
  auto guide = train::Guide::Create(options, *std::move(fp_model));
  absl::Status bound = guide.ok() ? (*guide)->Bind(model->get(), config->activation)
                                  : guide.status();
  if (!bound.ok()) {
    state.SkipWithError(std::string(bound.message()).c_str());
    return;
  }
  std::vector<Parameter*> params;
  (*model)->CollectParameters(&params);
  train::Sgd sgd(params, train::SgdOptions{});
  Tensor x({batch, 1, 28, 28});
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  for (int64_t i = 0; i < x.size(); ++i) x[i] = dist(gen);
  std::vector<int32_t> labels(static_cast<size_t>(batch));
  for (auto& l : labels) l = static_cast<int32_t>(gen() % 10);

  auto step = [&]() -> double {
    auto r = (*guide)->ForwardBackward(ctx, x, labels);
    sgd.Step(ctx.cpu, 0.01f);
    (*guide)->StepFp(ctx.cpu, 0.01f);
    return r.ok() ? r->lowbit.mean_loss + r->fp.mean_loss : NAN;
  };
  const double first = step();
  double last = first;
  for (int i = 0; i < 4; ++i) last = step();
  if (!(last < first)) {
    state.SkipWithError("loss did not fall on a fixed batch: the step is broken");
    return;
  }
  for (auto _ : state) {
    benchmark::DoNotOptimize(step());
  }
  state.counters["images_per_second"] =
      benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
}

// DoReFa 2/2 (the paper's base quantizer) and PACT+SAWB 2/2; compare with BM_TrainStep's rows of
// the same quant index.
BENCHMARK(BM_GuidedStep)
    ->ArgNames({"model", "batch", "threads", "quant"})
    ->ArgsProduct({{1, 2}, {128}, {2}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

}  // namespace
}  // namespace qtrain::nn
