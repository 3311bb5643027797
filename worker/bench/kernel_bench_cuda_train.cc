// Training-step throughput on one GPU: images/s of `qtrain --device=cuda`'s whole step (the CUDA
// engine of worker/nn/cuda/cuda_engine.h: copy the batch in from host memory, forward, softmax
// cross-entropy, backward, SGD with momentum and weight decay, copy the loss back, with CUDA
// graphs on) for each model at batch 128 on 1x28x28 inputs, full precision and 2/2-bit quantized.
//
//   BM_CudaTrainStep/<model>/<batch>/<quant>   counter images_per_second
//
// The yardstick is worker/bench/pytorch_train_step.py --device=cuda (the same architectures,
// cuDNN, eager, the same per-step host copy and loss read-back), run on the same GPU. Before
// timing, the loss must fall over a few steps on the fixed batch (a broken step would time fine).
// Skipped (with the reason) where there is no GPU.
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "common/cuda/cuda_util.h"
#include "worker/comm/local_communicator.h"
#include "worker/nn/cuda/cuda_engine.h"
#include "worker/nn/model.h"
#include "worker/quant/quant_factory.h"
#include "worker/train/optimizer.h"

namespace qtrain::nn {
namespace {

const char* const kCudaModels[] = {"mlp", "cnn", "resnet20"};
// --wq / --aq pairs (quant::MakeQuantConfig), or "none".
const char* const kCudaQuant[][2] = {{"none", "none"},
                                     {"sawb:bits=2", "pact:bits=2"},
                                     {"dorefa:bits=2", "dorefa:bits=2"}};

void BM_CudaTrainStep(benchmark::State& state) {
  if (::qtrain::cuda::DeviceCount() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const std::string name = kCudaModels[state.range(0)];
  const int64_t batch = state.range(1);
  const auto& q = kCudaQuant[state.range(2)];
  absl::StatusOr<quant::QuantConfig> config =
      quant::MakeQuantConfig("none", q[0], q[1], true, true);
  absl::StatusOr<std::unique_ptr<quant::QuantLayerFactory>> factory =
      config.ok() ? quant::QuantLayerFactory::Create(*config) : config.status();
  if (!factory.ok()) {
    state.SkipWithError(std::string(factory.status().message()).c_str());
    return;
  }
  state.SetLabel(name + " " + config->ToString());
  ModelSpec spec{name, {1, 28, 28}, 10, 1};
  spec.factory = factory->get();
  absl::StatusOr<std::unique_ptr<Layer>> model = BuildModel(spec);
  absl::StatusOr<std::unique_ptr<comm::LocalCommunicator>> local =
      comm::LocalCommunicator::Create({});
  if (!model.ok() || !local.ok()) {
    state.SkipWithError("cannot build the model or the communicator");
    return;
  }
  std::vector<Parameter*> params;
  std::vector<Buffer*> buffers;
  (*model)->CollectParameters(&params);
  (*model)->CollectBuffers(&buffers);
  train::SgdOptions sgd_options;
  train::Sgd sgd(params, sgd_options);
  train::StepEngineInputs in{model->get(), params, buffers, &sgd, sgd_options, local->get(), {},
                             {1, 28, 28}, 10, batch};
  cuda::CudaEngineOptions options;
  options.graphs = true;
  absl::StatusOr<std::unique_ptr<train::StepEngine>> engine = cuda::CudaEngineFactory(options)(in);
  if (!engine.ok()) {
    state.SkipWithError(std::string(engine.status().message()).c_str());
    return;
  }
  Tensor x({batch, 1, 28, 28});
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  for (int64_t i = 0; i < x.size(); ++i) x[i] = dist(gen);
  std::vector<int32_t> labels(static_cast<size_t>(batch));
  for (auto& l : labels) l = static_cast<int32_t>(gen() % 10);

  auto step = [&]() -> double {
    comm::StepStats stats;
    double wait = 0;
    absl::StatusOr<kernels::SoftmaxXentResult> r =
        (*engine)->TrainStep(x, labels, 0.01f, &stats, &wait);
    return r.ok() ? r->mean_loss : NAN;
  };
  const double first = step();
  double last = first;
  for (int i = 0; i < 5; ++i) last = step();  // also captures the graphs
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

BENCHMARK(BM_CudaTrainStep)
    ->ArgNames({"model", "batch", "quant"})
    ->ArgsProduct({{0, 1, 2}, {128}, {0, 1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

}  // namespace
}  // namespace qtrain::nn
