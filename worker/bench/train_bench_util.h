// What the training-step benchmarks (kernel_bench_train.cc, kernel_bench_cuda_train.cc) share:
// building a (quantized) model, a fixed random batch, and the timing loop that first checks the
// step works (its loss must fall on the fixed batch: a broken step would otherwise time fine).
#ifndef QTRAIN_WORKER_BENCH_TRAIN_BENCH_UTIL_H_
#define QTRAIN_WORKER_BENCH_TRAIN_BENCH_UTIL_H_

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "benchmark/benchmark.h"
#include "common/status_macros.h"
#include "worker/nn/model.h"
#include "worker/quant/quant_factory.h"

namespace qtrain::nn {

struct BenchModel {
  std::unique_ptr<quant::QuantLayerFactory> factory;  // used while the model is built
  std::unique_ptr<Sequential> model;
};

// `name` on 1x28x28 inputs, 10 classes, seed 1, quantized as `config` says.
inline absl::StatusOr<BenchModel> BuildBenchModel(const std::string& name,
                                                  const quant::QuantConfig& config) {
  BenchModel m;
  ASSIGN_OR_RETURN(m.factory, quant::QuantLayerFactory::Create(config));
  ModelSpec spec{name, {1, 28, 28}, 10, 1};
  spec.factory = m.factory.get();
  ASSIGN_OR_RETURN(m.model, BuildModel(spec));
  return m;
}

// A fixed batch of normal inputs and uniform labels (seed 3).
inline void FillBenchBatch(int64_t batch, Tensor* x, std::vector<int32_t>* labels) {
  *x = Tensor({batch, 1, 28, 28});
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  for (int64_t i = 0; i < x->size(); ++i) (*x)[i] = dist(gen);
  labels->assign(static_cast<size_t>(batch), 0);
  for (auto& l : *labels) l = static_cast<int32_t>(gen() % 10);
}

// Runs `step` (returns the batch's loss) 1 + `warmup` times and skips the benchmark unless the
// loss fell, then times it; counter images_per_second.
template <typename Step>
void TimeTrainStep(benchmark::State& state, int64_t batch, int warmup, Step step) {
  const double first = step();
  double last = first;
  for (int i = 0; i < warmup; ++i) last = step();
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

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_BENCH_TRAIN_BENCH_UTIL_H_
