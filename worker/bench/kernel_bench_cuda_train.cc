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
#include "worker/bench/train_bench_util.h"
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
  absl::StatusOr<BenchModel> m = config.ok() ? BuildBenchModel(name, *config) : config.status();
  if (!m.ok()) {
    state.SkipWithError(std::string(m.status().message()).c_str());
    return;
  }
  state.SetLabel(name + " " + config->ToString());
  Sequential* model = m->model.get();
  absl::StatusOr<std::unique_ptr<comm::LocalCommunicator>> local =
      comm::LocalCommunicator::Create({});
  if (!local.ok()) {
    state.SkipWithError("cannot build the communicator");
    return;
  }
  std::vector<Parameter*> params;
  std::vector<Buffer*> buffers;
  model->CollectParameters(&params);
  model->CollectBuffers(&buffers);
  train::SgdOptions sgd_options;
  train::Sgd sgd(params, sgd_options);
  train::StepEngineInputs in{model, params, buffers, &sgd, sgd_options, local->get(), {},
                             {1, 28, 28}, 10, batch};
  cuda::CudaEngineOptions options;
  options.graphs = true;
  absl::StatusOr<std::unique_ptr<train::StepEngine>> engine = cuda::CudaEngineFactory(options)(in);
  if (!engine.ok()) {
    state.SkipWithError(std::string(engine.status().message()).c_str());
    return;
  }
  Tensor x;
  std::vector<int32_t> labels;
  FillBenchBatch(batch, &x, &labels);
  // Five warm-up steps: they also capture the graphs.
  TimeTrainStep(state, batch, 5, [&]() -> double {
    comm::StepStats stats;
    double wait = 0;
    absl::StatusOr<kernels::SoftmaxXentResult> r =
        (*engine)->TrainStep(x, labels, 0.01f, &stats, &wait);
    return r.ok() ? r->mean_loss : NAN;
  });
}

BENCHMARK(BM_CudaTrainStep)
    ->ArgNames({"model", "batch", "quant"})
    ->ArgsProduct({{0, 1, 2}, {128}, {0, 1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

}  // namespace
}  // namespace qtrain::nn
