// SGEMM benchmarks: qtrain's Sgemm against OpenBLAS's cblas_sgemm (the yardstick), both on one
// thread, in one run.
//
//   BM_Sgemm/<n>, BM_OpenBlasSgemm/<n>: square row-major C = A * B, n = 256 .. 2048.
//   BM_SgemmShape/<m>/<n>/<k>/<ta>/<tb>, BM_OpenBlasSgemmShape/...: the GEMMs that im2col
//     convolutions of the small CNN and ResNet-20 issue per image (small m or k), e.g. forward
//     32x784x288 NN, backward data 288x784x32 TN, backward weights 32x288x784 NT.
//
// Each benchmark first computes the product with both libraries and checks the largest
// element-wise difference, relative to the largest |C|, against a bound derived from k (float
// rounding grows like k * 2^-24); on failure it reports an error instead of a time. Throughput is
// the "GFLOPS" counter (2 m n k flops per iteration).
//
//   build/bin/kernel_bench --benchmark_filter=Sgemm
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/kernels/cpu/sgemm.h"

namespace qtrain::kernels {
namespace {

enum class Library { kQtrain, kOpenBlas };

struct Problem {
  int64_t m, n, k;
  Transpose ta, tb;
  int64_t lda, ldb, ldc;
  std::vector<float> a, b, c;
};

Problem MakeProblem(int64_t m, int64_t n, int64_t k, Transpose ta, Transpose tb) {
  Problem p{m,
            n,
            k,
            ta,
            tb,
            ta == Transpose::kNo ? k : m,
            tb == Transpose::kNo ? n : k,
            n,
            std::vector<float>(m * k),
            std::vector<float>(k * n),
            std::vector<float>(m * n)};
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (float& x : p.a) x = dist(rng);
  for (float& x : p.b) x = dist(rng);
  return p;
}

void Run(Library library, Problem& p) {
  if (library == Library::kQtrain) {
    const CpuContext ctx{};  // one thread, best SIMD level
    Sgemm(ctx, p.ta, p.tb, p.m, p.n, p.k, 1.0f, p.a.data(), p.lda, p.b.data(), p.ldb, 0.0f,
          p.c.data(), p.ldc);
    return;
  }
  cblas_sgemm(CblasRowMajor, p.ta == Transpose::kNo ? CblasNoTrans : CblasTrans,
              p.tb == Transpose::kNo ? CblasNoTrans : CblasTrans, static_cast<int>(p.m),
              static_cast<int>(p.n), static_cast<int>(p.k), 1.0f, p.a.data(),
              static_cast<int>(p.lda), p.b.data(), static_cast<int>(p.ldb), 0.0f, p.c.data(),
              static_cast<int>(p.ldc));
}

// Runs both libraries and returns max |qtrain - openblas| / max |openblas|.
double CrossCheck(Problem& p) {
  Run(Library::kOpenBlas, p);
  const std::vector<float> yardstick = p.c;
  std::fill(p.c.begin(), p.c.end(), std::nanf(""));  // beta = 0 must overwrite
  Run(Library::kQtrain, p);
  double max_diff = 0.0;
  double max_abs = 0.0;
  for (size_t i = 0; i < p.c.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(p.c[i]) - yardstick[i]);
    max_diff = std::isnan(diff) ? INFINITY : std::max(max_diff, diff);
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(yardstick[i])));
  }
  return max_diff / std::max(max_abs, 1e-30);
}

void BenchSgemm(benchmark::State& state, Library library, Problem p) {
  openblas_set_num_threads(1);
  const double rel_err = CrossCheck(p);
  // Entries of C are sums of k products of U(-1,1) values: max |C| >~ sqrt(k)/3, while each
  // result may be off by ~k * 2^-24 * sum |a||b| (~k/4): allow 4x that, relative to max |C|.
  const double k = static_cast<double>(p.k);
  const double bound = 4.0 * k * std::ldexp(1.0, -24) * (k / 4.0) / (std::sqrt(k) / 3.0);
  if (!(rel_err <= bound)) {
    state.SkipWithError(("results differ: max rel error " + std::to_string(rel_err) + " > bound " +
                         std::to_string(bound))
                            .c_str());
    return;
  }
  for (auto _ : state) {
    Run(library, p);
    benchmark::DoNotOptimize(p.c.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOPS"] = benchmark::Counter(2e-9 * static_cast<double>(p.m) * p.n * p.k,
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.counters["max_rel_err"] = rel_err;
  state.SetLabel(library == Library::kQtrain ? SimdLevelName(DetectSimdLevel())
                                             : "openblas 1 thread");
}

Problem SquareProblem(const benchmark::State& state) {
  const int64_t n = state.range(0);
  return MakeProblem(n, n, n, Transpose::kNo, Transpose::kNo);
}

Problem ShapeProblem(const benchmark::State& state) {
  auto trans = [](int64_t t) { return t != 0 ? Transpose::kYes : Transpose::kNo; };
  return MakeProblem(state.range(0), state.range(1), state.range(2), trans(state.range(3)),
                     trans(state.range(4)));
}

void BM_Sgemm(benchmark::State& state) {
  BenchSgemm(state, Library::kQtrain, SquareProblem(state));
}
void BM_OpenBlasSgemm(benchmark::State& state) {
  BenchSgemm(state, Library::kOpenBlas, SquareProblem(state));
}
void BM_SgemmShape(benchmark::State& state) {
  BenchSgemm(state, Library::kQtrain, ShapeProblem(state));
}
void BM_OpenBlasSgemmShape(benchmark::State& state) {
  BenchSgemm(state, Library::kOpenBlas, ShapeProblem(state));
}

void SquareSizes(benchmark::internal::Benchmark* b) {
  for (int64_t n : {256, 512, 1024, 2048}) b->Arg(n);
  b->Unit(benchmark::kMillisecond);
}

// {m, n, k, trans_a, trans_b} of per-image convolution GEMMs.
void ConvShapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "n", "k", "ta", "tb"});
  b->Args({32, 784, 288, 0, 0});   // CNN conv 32->32 at 28x28, forward
  b->Args({288, 784, 32, 1, 0});   // ... backward data (w^T * dy)
  b->Args({32, 288, 784, 0, 1});   // ... backward weights (dy * col^T)
  b->Args({64, 196, 576, 0, 0});   // CNN conv 64->64 at 14x14, forward
  b->Args({16, 1024, 144, 0, 0});  // ResNet-20 stage 1 (16 channels at 32x32), forward
  b->Args({64, 64, 576, 0, 0});    // ResNet-20 stage 3 (64 channels at 8x8), forward
  b->Args({128, 512, 784, 0, 1});  // MLP 784->512 forward, batch 128 (x * W^T)
  b->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_Sgemm)->Apply(SquareSizes);
BENCHMARK(BM_OpenBlasSgemm)->Apply(SquareSizes);
BENCHMARK(BM_SgemmShape)->Apply(ConvShapes);
BENCHMARK(BM_OpenBlasSgemmShape)->Apply(ConvShapes);

}  // namespace
}  // namespace qtrain::kernels
