// End-to-end packed inference: the cnn at 1x28x28 (Fashion-MNIST's shape), 10 classes, batch 128,
// run from an exported packed file on the low-bit kernels (quant::PackedModel::Predict) beside the
// fake-quantized model's FP32 forward in eval mode (the yardstick) at the same batch, threads and
// SIMD level, in one run.
//
//   BM_PackedCnn/config/threads   config 0: W1A1 (dorefa:w=1,a=1, popcount kernel),
//                                 1: W2A2 (sawb:bits=2 + pact:bits=2, popcount),
//                                 2: W4A4 (dorefa:w=4,a=4, integer kernel)
// Weights are the seeded initialisation (export needs no training); inputs are random normal.
// Before timing, the packed predictions are checked against the fake-quantized model's on the
// batch; any difference is reported as an error instead of a time. Counters: "img/s" (images per
// second of Predict), "x_fp32" (that over the fake-quantized forward's images/s, best of 5 after a
// warm-up, timed inside the same benchmark), and "bytes_ratio" (FP32 model bytes / packed file).
// The first and last layers stay FP32 in both (the papers' default), as do batch norm and pooling.
//
//   build/bin/kernel_bench --benchmark_filter=PackedCnn
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/model.h"
#include "worker/quant/export.h"
#include "worker/quant/packed_model.h"

namespace qtrain::quant {
namespace {

constexpr int64_t kBatch = 128;
constexpr int kClasses = 10;

struct Config {
  const char* quant;
  const char* wq;
  const char* aq;
};
constexpr Config kConfigs[] = {
    {"dorefa:w=1,a=1", "none", "none"},
    {"none", "sawb:bits=2", "pact:bits=2,alpha=3"},
    {"dorefa:w=4,a=4", "none", "none"},
};

void BM_PackedCnn(benchmark::State& state) {
  const Config& cfg = kConfigs[state.range(0)];
  const int threads = static_cast<int>(state.range(1));
  std::unique_ptr<kernels::ThreadPool> pool =
      threads > 1 ? std::make_unique<kernels::ThreadPool>(threads) : nullptr;
  kernels::CpuContext cpu;
  cpu.pool = pool.get();
  auto config = MakeQuantConfig(cfg.quant, cfg.wq, cfg.aq, true, true);
  if (!config.ok()) return state.SkipWithError(config.status().ToString().c_str());
  auto factory = QuantLayerFactory::Create(*config);
  if (!factory.ok()) return state.SkipWithError(factory.status().ToString().c_str());
  const nn::Shape input = {1, 28, 28};
  auto model = nn::BuildModel(
      {.name = "cnn", .input = input, .num_classes = kClasses, .seed = 1, .factory = factory->get()});
  if (!model.ok()) return state.SkipWithError(model.status().ToString().c_str());

  nn::Tensor x({kBatch, 1, 28, 28});
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < x.size(); ++i) x[i] = normal(rng);
  SettleQuantizers(**model, cpu, x);
  const std::string path =
      (std::filesystem::temp_directory_path() /
       ("qtrain_bench_packed_" + std::to_string(::getpid()) + ".qpack"))
          .string();
  ExportStats stats;
  absl::Status st = ExportPackedModel(
      **model, {"cnn", input, kClasses, nn::ShortcutKind::kZeroPad, *config, "bench"}, path, &stats);
  if (!st.ok()) return state.SkipWithError(st.ToString().c_str());
  auto packed = LoadPackedModel(path);
  std::filesystem::remove(path);
  if (!packed.ok()) return state.SkipWithError(packed.status().ToString().c_str());

  // Check before timing: the same predictions as the fake-quantized model.
  nn::RunContext ctx;
  ctx.cpu = cpu;
  ctx.mode = nn::Mode::kEval;
  nn::Tensor fake;
  auto run_fake = [&] { (*model)->Forward(ctx, x, &fake); };
  run_fake();
  std::vector<float> logits(kBatch * kClasses);
  (*packed)->Predict(cpu, x.data(), kBatch, logits.data());
  int64_t differ = 0;
  for (int64_t i = 0; i < kBatch; ++i) {
    const float* a = fake.data() + i * kClasses;
    const float* b = logits.data() + i * kClasses;
    differ += std::max_element(a, a + kClasses) - a != std::max_element(b, b + kClasses) - b;
  }
  if (differ != 0) {
    return state.SkipWithError(
        (std::to_string(differ) + " predictions differ from the fake-quantized model").c_str());
  }

  double fake_best = 1e30;
  for (int rep = 0; rep < 6; ++rep) {  // the first is a warm-up
    const auto start = std::chrono::steady_clock::now();
    run_fake();
    benchmark::DoNotOptimize(fake.data());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (rep > 0) fake_best = std::min(fake_best, s);
  }
  const auto begin = std::chrono::steady_clock::now();
  for (auto _ : state) {
    (*packed)->Predict(cpu, x.data(), kBatch, logits.data());
    benchmark::DoNotOptimize(logits.data());
  }
  const double per_iter =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count() /
      std::max<int64_t>(1, state.iterations());
  state.counters["img/s"] =
      benchmark::Counter(static_cast<double>(kBatch), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["fp32_img/s"] = kBatch / fake_best;
  state.counters["x_fp32"] = fake_best / per_iter;
  state.counters["bytes_ratio"] = stats.ratio();
  state.SetLabel(config->ToString());
}

BENCHMARK(BM_PackedCnn)
    ->ArgsProduct({{0, 1, 2}, {1, 2}})
    ->ArgNames({"config", "threads"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace qtrain::quant
