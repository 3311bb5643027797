// Low-bit GEMM benchmarks: LowbitGemm on packed codes beside qtrain's own FP32 Sgemm (the
// yardstick) at the same shape, thread count and SIMD level, in one run.
//
//   BM_LowbitGemm/m/n/k/wbits/abits/threads: D[N,M] = codes w[M,K] . codes a[N,K], operands packed
//     in their default layouts before timing (popcount kernel for W1A1 and W2A2, integer kernel
//     for W4A4 and W8A8).
//   BM_LowbitSgemm/m/n/k/threads: the FP32 layer the codes replace, C[M,N] = W[M,K] * X[K,N] as
//     an im2col convolution issues it.
// Shapes: a 3x3 convolution 64 -> 64 channels over a batch of 128 7x7 maps (M=64, K=576,
// N=6272), and square 1024.
//
// Each LowbitGemm benchmark first checks sampled rows of D against a naive int64 product and
// reports an error instead of a time on any mismatch. Counters: "GMAC" (10^9 multiply-adds per
// second, M*N*K per iteration), and "x_sgemm", that rate over Sgemm's at the same shape and
// threads, timed (best of 5 after a warm-up) inside the same benchmark.
//
//   build/bin/kernel_bench --benchmark_filter=Lowbit
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "benchmark/benchmark.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/kernels/cpu/lowbit_gemm.h"
#include "worker/kernels/cpu/sgemm.h"

namespace qtrain::kernels {
namespace {

struct Shape {
  int64_t m, n, k;
  int threads;
};

std::vector<float> RandomFloats(int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(count);
  for (float& x : v) x = dist(rng);
  return v;
}

std::vector<uint8_t> RandomCodes(int bits, int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(0, (1 << bits) - 1);
  std::vector<uint8_t> codes(count);
  for (uint8_t& c : codes) c = static_cast<uint8_t>(dist(rng));
  return codes;
}

// A context with `threads` threads (the caller included) at the best SIMD level.
struct Context {
  explicit Context(int threads)
      : pool(threads > 1 ? std::make_unique<ThreadPool>(threads) : nullptr),
        ctx{pool.get(), DetectSimdLevel()} {}
  std::unique_ptr<ThreadPool> pool;
  CpuContext ctx;
};

// The FP32 layer: C[M,N] = W[M,K] * X[K,N].
struct SgemmProblem {
  explicit SgemmProblem(const Shape& s)
      : shape(s), w(RandomFloats(s.m * s.k, 1)), x(RandomFloats(s.k * s.n, 2)), c(s.m * s.n) {}
  void Run(const CpuContext& ctx) {
    Sgemm(ctx, Transpose::kNo, Transpose::kNo, shape.m, shape.n, shape.k, 1.0f, w.data(), shape.k,
          x.data(), shape.n, 0.0f, c.data(), shape.n);
  }
  Shape shape;
  std::vector<float> w, x, c;
};

// Sgemm's GMAC/s at `s`, measured once per shape and thread count (best of 5 after a warm-up).
double SgemmGmacs(const Shape& s) {
  static auto* cache = new std::map<std::tuple<int64_t, int64_t, int64_t, int>, double>();
  const auto key = std::make_tuple(s.m, s.n, s.k, s.threads);
  if (auto it = cache->find(key); it != cache->end()) return it->second;
  Context context(s.threads);
  SgemmProblem problem(s);
  problem.Run(context.ctx);
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    problem.Run(context.ctx);
    benchmark::DoNotOptimize(problem.c.data());
    best = std::min(
        best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  const double gmacs = 1e-9 * static_cast<double>(s.m) * s.n * s.k / best;
  (*cache)[key] = gmacs;
  return gmacs;
}

void SetMacCounter(benchmark::State& state, const Shape& s) {
  state.counters["GMAC"] = benchmark::Counter(1e-9 * static_cast<double>(s.m) * s.n * s.k,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

// Compares D with a naive int64 product on every 97th row of a and the last; returns the number
// of wrong elements.
int64_t CountWrongSampledRows(const std::vector<uint8_t>& w, const std::vector<uint8_t>& a,
                              const std::vector<int32_t>& d, const Shape& s) {
  std::vector<int64_t> rows;
  for (int64_t n = 0; n < s.n; n += 97) rows.push_back(n);
  rows.push_back(s.n - 1);
  int64_t wrong = 0;
  for (int64_t n : rows) {
    for (int64_t m = 0; m < s.m; ++m) {
      int64_t want = 0;
      for (int64_t k = 0; k < s.k; ++k) want += int64_t{w[m * s.k + k]} * a[n * s.k + k];
      wrong += d[n * s.m + m] != want;
    }
  }
  return wrong;
}

void BM_LowbitGemm(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(2), static_cast<int>(state.range(5))};
  const int wbits = static_cast<int>(state.range(3));
  const int abits = static_cast<int>(state.range(4));
  const std::vector<uint8_t> w = RandomCodes(wbits, s.m * s.k, 3);
  const std::vector<uint8_t> a = RandomCodes(abits, s.n * s.k, 4);
  PackedCodes pw;
  PackedCodes pa;
  const absl::Status status = [&] {
    absl::Status st = PackCodes(wbits, s.m, s.k, w.data(), &pw);
    if (st.ok()) st = PackCodes(abits, s.n, s.k, a.data(), &pa);
    return st;
  }();
  if (!status.ok()) {
    state.SkipWithError(status.ToString().c_str());
    return;
  }
  Context context(s.threads);
  std::vector<int32_t> d(s.n * s.m, -1);
  LowbitGemm(context.ctx, pw, pa, d.data());
  if (const int64_t wrong = CountWrongSampledRows(w, a, d, s); wrong != 0) {
    state.SkipWithError(("LowbitGemm differs from the naive product in " + std::to_string(wrong) +
                         " sampled elements")
                            .c_str());
    return;
  }
  const double sgemm_gmacs = SgemmGmacs(s);
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    LowbitGemm(context.ctx, pw, pa, d.data());
    benchmark::DoNotOptimize(d.data());
    benchmark::ClobberMemory();
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  SetMacCounter(state, s);
  const double gmacs = 1e-9 * static_cast<double>(s.m) * s.n * s.k * state.iterations() / seconds;
  state.counters["x_sgemm"] = gmacs / sgemm_gmacs;
  state.SetLabel(std::string(SimdLevelName(DetectSimdLevel())) +
                 (wbits <= 2 && abits <= 2 ? " popcount" : " integer") + ", sgemm " +
                 std::to_string(static_cast<int>(sgemm_gmacs)) + " GMAC/s");
}

void BM_LowbitSgemm(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(2), static_cast<int>(state.range(3))};
  Context context(s.threads);
  SgemmProblem problem(s);
  for (auto _ : state) {
    problem.Run(context.ctx);
    benchmark::DoNotOptimize(problem.c.data());
    benchmark::ClobberMemory();
  }
  SetMacCounter(state, s);
  state.SetLabel(SimdLevelName(DetectSimdLevel()));
}

constexpr int64_t kThreads = 1;

void LowbitArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "n", "k", "wbits", "abits", "threads"});
  for (auto [m, n, k] :
       {std::tuple<int64_t, int64_t, int64_t>{64, 6272, 576}, {1024, 1024, 1024}}) {
    for (int64_t bits : {1, 2, 4, 8}) b->Args({m, n, k, bits, bits, kThreads});
  }
  b->Unit(benchmark::kMillisecond);
}

void SgemmArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "n", "k", "threads"});
  b->Args({64, 6272, 576, kThreads});
  b->Args({1024, 1024, 1024, kThreads});
  b->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_LowbitSgemm)->Apply(SgemmArgs);
BENCHMARK(BM_LowbitGemm)->Apply(LowbitArgs);

}  // namespace
}  // namespace qtrain::kernels
