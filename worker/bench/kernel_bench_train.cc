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
#include "worker/bench/train_bench_util.h"
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
  kernels::ThreadPool pool(static_cast<int>(state.range(2)));
  RunContext ctx;
  ctx.cpu.pool = &pool;
  ctx.mode = Mode::kTrain;
  absl::StatusOr<quant::QuantConfig> config = QuantFor(static_cast<int>(state.range(3)));
  absl::StatusOr<BenchModel> m = config.ok() ? BuildBenchModel(name, *config) : config.status();
  if (!m.ok()) {
    state.SkipWithError(std::string(m.status().message()).c_str());
    return;
  }
  state.SetLabel(name + " " + config->ToString());
  std::vector<Parameter*> params;
  m->model->CollectParameters(&params);
  train::Sgd sgd(params, train::SgdOptions{});
  Tensor x, logits, dlogits;
  std::vector<int32_t> labels;
  FillBenchBatch(batch, &x, &labels);
  TimeTrainStep(state, batch, 4, [&]() -> double {
    m->model->Forward(ctx, x, &logits);
    auto r = SoftmaxCrossEntropyLoss(ctx, logits, labels, &dlogits);
    m->model->Backward(ctx, dlogits, nullptr);
    sgd.Step(ctx.cpu, 0.01f);
    return r.ok() ? r->mean_loss : NAN;
  });
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
  kernels::ThreadPool pool(static_cast<int>(state.range(2)));
  RunContext ctx;
  ctx.cpu.pool = &pool;
  ctx.mode = Mode::kTrain;
  absl::StatusOr<quant::QuantConfig> config = QuantFor(static_cast<int>(state.range(3)));
  absl::StatusOr<BenchModel> m = config.ok() ? BuildBenchModel(name, *config) : config.status();
  absl::StatusOr<BenchModel> fp = BuildBenchModel(name, quant::QuantConfig{});
  if (!m.ok() || !fp.ok()) {
    state.SkipWithError(std::string((m.ok() ? fp : m).status().message()).c_str());
    return;
  }
  state.SetLabel(name + " guided " + config->ToString());
  train::GuideOptions options;
  options.layers = train::DefaultGuideLayers(name);
  auto guide = train::Guide::Create(options, std::move(fp->model));
  absl::Status bound = guide.ok() ? (*guide)->Bind(m->model.get(), config->activation)
                                  : guide.status();
  if (!bound.ok()) {
    state.SkipWithError(std::string(bound.message()).c_str());
    return;
  }
  std::vector<Parameter*> params;
  m->model->CollectParameters(&params);
  train::Sgd sgd(params, train::SgdOptions{});
  Tensor x;
  std::vector<int32_t> labels;
  FillBenchBatch(batch, &x, &labels);
  TimeTrainStep(state, batch, 4, [&]() -> double {
    auto r = (*guide)->ForwardBackward(ctx, x, labels);
    sgd.Step(ctx.cpu, 0.01f);
    (*guide)->StepFp(ctx.cpu, 0.01f);
    return r.ok() ? r->lowbit.mean_loss + r->fp.mean_loss : NAN;
  });
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
