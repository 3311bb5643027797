// CUDA SGEMM and convolution benchmarks (built when CUDA is found). The SGEMM yardstick is
// cuBLAS in FP32: cublasSgemm with CUBLAS_PEDANTIC_MATH, the math mode whose documented contract
// is "the prescribed precision and standardized arithmetic for all phases" (no TF32, no
// BF16x9 emulation, whatever NVIDIA_TF32_OVERRIDE or the cuBLAS emulation settings say).
// cuBLAS's CUBLAS_DEFAULT_MATH runs beside it for information.
//
//   BM_CudaSgemm/<n>               own Sgemm, square row-major C = A * B (NN), n = 512 .. 4096;
//                                  counter vs_cublas = cuBLAS time / own time, measured in
//                                  the same run (the target: >= 0.7 at n = 4096)
//   BM_CublasSgemm/<n>             cublasSgemm, CUBLAS_PEDANTIC_MATH (the yardstick)
//   BM_CublasSgemmDefaultMath/<n>  cublasSgemm, CUBLAS_DEFAULT_MATH
//   BM_CudaConvForward/<layer>, BM_CudaConvBackwardData/<layer>,
//   BM_CudaConvBackwardWeights/<layer>: the implicit-GEMM convolutions on the conv layers of
//                                  cnn and resnet20 at batch 128 (the label names the layer).
//                                  No cuDNN yardstick is linked (the project keeps vendor
//                                  libraries out of its build); the PyTorch/cuDNN comparison is
//                                  the whole training step, worker/bench/pytorch_train_step.py.
//
// Every benchmark checks its result before timing it and reports an error instead of a time when
// the check fails: SGEMM against cuBLAS (max |difference| relative to max |C|, bound from k);
// convolutions element-wise against the CPU kernels with the float-sum bound of the unit tests.
// Times are GPU times between CUDA events around `reps` back-to-back launches (manual time, per
// launch); throughput is the GFLOPS counter. Without a CUDA device every benchmark reports
// "no CUDA device".
//
//   build/bin/kernel_bench --benchmark_filter='Cuda|Cublas'
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "benchmark/benchmark.h"
#include "common/cuda/cuda_util.h"
#include "worker/kernels/cpu/conv.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/kernels/cuda/conv.h"
#include "worker/kernels/cuda/sgemm.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::cuda::DeviceArray;

std::vector<float> Uniform(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Device copy of host data; an empty array (and `error` set) if CUDA fails.
DeviceArray<float> Upload(const std::vector<float>& host, std::string* error) {
  absl::StatusOr<DeviceArray<float>> d = DeviceArray<float>::Create(host.size());
  if (!d.ok()) {
    *error = d.status().ToString();
    return {};
  }
  if (absl::Status s = d->CopyFromHost(host); !s.ok()) *error = s.ToString();
  return std::move(*d);
}

std::vector<float> Download(const DeviceArray<float>& d) {
  std::vector<float> host(d.size());
  if (!d.CopyToHost(host).ok()) std::fill(host.begin(), host.end(), std::nanf(""));
  return host;
}

// GPU seconds per call of `launch` (enqueued on the legacy default stream), averaged over reps
// back-to-back calls between two events. Negative on a CUDA error.
double SecondsPerLaunch(const std::function<bool()>& launch, int reps) {
  cudaEvent_t start = nullptr, stop = nullptr;
  if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) return -1;
  bool ok = cudaEventRecord(start, nullptr) == cudaSuccess;
  for (int r = 0; ok && r < reps; ++r) ok = launch();
  ok = ok && cudaEventRecord(stop, nullptr) == cudaSuccess &&
       cudaEventSynchronize(stop) == cudaSuccess;
  float ms = 0.0f;
  ok = ok && cudaEventElapsedTime(&ms, start, stop) == cudaSuccess;
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ok ? 1e-3 * ms / reps : -1.0;
}

// Launches per timed iteration: enough for ~2 ms of GPU work (launch gaps then do not count).
int RepsFor(const std::function<bool()>& launch) {
  launch();  // warm-up (module load, caches)
  const double once = SecondsPerLaunch(launch, 1);
  if (once <= 0) return 1;
  return static_cast<int>(std::clamp(2e-3 / once, 1.0, 200.0));
}

// Runs the benchmark loop with manual time per launch, and sets the GFLOPS counter.
void TimeLaunches(benchmark::State& state, const std::function<bool()>& launch, double flops) {
  const int reps = RepsFor(launch);
  for (auto _ : state) {
    const double seconds = SecondsPerLaunch(launch, reps);
    if (seconds < 0) {
      state.SkipWithError("CUDA error while timing");
      return;
    }
    state.SetIterationTime(seconds);
  }
  state.counters["GFLOPS"] =
      benchmark::Counter(1e-9 * flops, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- SGEMM -------------------------------------------------------------------------------------

class Cublas {
 public:
  explicit Cublas(cublasMath_t mode) {
    ok_ = cublasCreate(&handle_) == CUBLAS_STATUS_SUCCESS &&
          cublasSetMathMode(handle_, mode) == CUBLAS_STATUS_SUCCESS;
  }
  ~Cublas() {
    if (handle_ != nullptr) cublasDestroy(handle_);
  }
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;
  bool ok() const { return ok_; }
  // Row-major C (m x n) = A (m x k) * B (k x n): column-major C^T = B^T A^T.
  bool Sgemm(int n_square, const float* a, const float* b, float* c) const {
    const float alpha = 1.0f, beta = 0.0f;
    const int n = n_square;
    return cublasSgemm(handle_, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, b, n, a, n, &beta, c,
                       n) == CUBLAS_STATUS_SUCCESS;
  }

 private:
  cublasHandle_t handle_ = nullptr;
  bool ok_ = false;
};

enum class GemmLibrary { kQtrain, kCublasPedantic, kCublasDefault };

struct SquareProblem {
  int n = 0;
  DeviceArray<float> a, b, c;
  std::string error;
};

SquareProblem MakeSquare(int n) {
  SquareProblem p;
  p.n = n;
  p.a = Upload(Uniform(int64_t{n} * n, 1), &p.error);
  p.b = Upload(Uniform(int64_t{n} * n, 2), &p.error);
  p.c = Upload(std::vector<float>(int64_t{n} * n, 0.0f), &p.error);
  return p;
}

bool OwnSgemm(SquareProblem& p) {
  return Sgemm(CudaContext{}, Transpose::kNo, Transpose::kNo, p.n, p.n, p.n, 1.0f, p.a.data(),
               p.n, p.b.data(), p.n, 0.0f, p.c.data(), p.n)
      .ok();
}

void BenchSgemm(benchmark::State& state, GemmLibrary library) {
  if (::qtrain::cuda::DeviceCount() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const int n = static_cast<int>(state.range(0));
  SquareProblem p = MakeSquare(n);
  Cublas pedantic(CUBLAS_PEDANTIC_MATH);
  Cublas default_math(CUBLAS_DEFAULT_MATH);
  if (!p.error.empty() || !pedantic.ok() || !default_math.ok()) {
    state.SkipWithError(p.error.empty() ? "cuBLAS initialisation failed" : p.error.c_str());
    return;
  }
  auto own = [&] { return OwnSgemm(p); };
  auto cublas = [&] { return pedantic.Sgemm(n, p.a.data(), p.b.data(), p.c.data()); };
  auto cublas_default = [&] { return default_math.Sgemm(n, p.a.data(), p.b.data(), p.c.data()); };

  // Check: own result against cuBLAS's, relative to max |C|. Entries are sums of n products of
  // U(-1,1) values: max |C| >~ sqrt(n)/3, each result within ~n * 2^-24 * (n/4) of exact.
  if (!cublas() || cudaDeviceSynchronize() != cudaSuccess) {
    state.SkipWithError("cuBLAS failed");
    return;
  }
  const std::vector<float> yardstick = Download(p.c);
  if (!OwnSgemm(p) || cudaDeviceSynchronize() != cudaSuccess) {
    state.SkipWithError("own Sgemm failed");
    return;
  }
  const std::vector<float> mine = Download(p.c);
  double max_diff = 0.0, max_abs = 0.0;
  for (size_t i = 0; i < mine.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(mine[i]) - yardstick[i]);
    max_diff = std::isnan(diff) ? INFINITY : std::max(max_diff, diff);
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(yardstick[i])));
  }
  const double rel_err = max_diff / std::max(max_abs, 1e-30);
  const double k = n;
  const double bound = 4.0 * k * std::ldexp(1.0, -24) * (k / 4.0) / (std::sqrt(k) / 3.0);
  if (!(rel_err <= bound)) {
    state.SkipWithError(("own Sgemm differs from cuBLAS: max rel error " +
                         std::to_string(rel_err) + " > " + std::to_string(bound))
                            .c_str());
    return;
  }

  const double flops = 2.0 * k * k * k;
  switch (library) {
    case GemmLibrary::kQtrain: {
      TimeLaunches(state, own, flops);
      // The ratio, measured here in the same process and on the same data.
      const double t_own = SecondsPerLaunch(own, RepsFor(own));
      const double t_cublas = SecondsPerLaunch(cublas, RepsFor(cublas));
      if (t_own > 0 && t_cublas > 0) state.counters["vs_cublas"] = t_cublas / t_own;
      state.SetLabel(SgemmTileFor(n, n) == SgemmTile::k128x128 ? "tile 128x128" : "tile 64x64");
      break;
    }
    case GemmLibrary::kCublasPedantic:
      TimeLaunches(state, cublas, flops);
      state.SetLabel("cuBLAS FP32 pedantic");
      break;
    case GemmLibrary::kCublasDefault:
      TimeLaunches(state, cublas_default, flops);
      state.SetLabel("cuBLAS FP32 default math");
      break;
  }
  state.counters["max_rel_err"] = rel_err;
}

void BM_CudaSgemm(benchmark::State& state) { BenchSgemm(state, GemmLibrary::kQtrain); }
void BM_CublasSgemm(benchmark::State& state) { BenchSgemm(state, GemmLibrary::kCublasPedantic); }
void BM_CublasSgemmDefaultMath(benchmark::State& state) {
  BenchSgemm(state, GemmLibrary::kCublasDefault);
}

void SquareSizes(benchmark::internal::Benchmark* b) {
  for (int64_t n : {512, 1024, 2048, 4096}) b->Arg(n);
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_CudaSgemm)->Apply(SquareSizes);
BENCHMARK(BM_CublasSgemm)->Apply(SquareSizes);
BENCHMARK(BM_CublasSgemmDefaultMath)->Apply(SquareSizes);

// ---- Convolutions ------------------------------------------------------------------------------

struct ConvLayer {
  const char* name;
  int64_t c, h, k, kernel, stride, pad;
};
constexpr int64_t kConvBatch = 128;
// cnn: conv3x3 32-32-pool-64-64 on 28x28; resnet20: 16/32/64 channels at 32/16/8.
const ConvLayer kConvLayers[] = {
    {"cnn conv1 1->32 28x28", 1, 28, 32, 3, 1, 1},
    {"cnn conv2 32->32 28x28", 32, 28, 32, 3, 1, 1},
    {"cnn conv3 32->64 14x14", 32, 14, 64, 3, 1, 1},
    {"cnn conv4 64->64 14x14", 64, 14, 64, 3, 1, 1},
    {"resnet20 stem 3->16 32x32", 3, 32, 16, 3, 1, 1},
    {"resnet20 stage1 16->16 32x32", 16, 32, 16, 3, 1, 1},
    {"resnet20 down 16->32 s2", 16, 32, 32, 3, 2, 1},
    {"resnet20 stage2 32->32 16x16", 32, 16, 32, 3, 1, 1},
    {"resnet20 down 32->64 s2", 32, 16, 64, 3, 2, 1},
    {"resnet20 stage3 64->64 8x8", 64, 8, 64, 3, 1, 1},
    {"resnet20 shortcut 1x1 16->32 s2", 16, 32, 32, 1, 2, 0},
};

Conv2dShape ShapeOf(const ConvLayer& l) {
  Conv2dShape s;
  s.batch = kConvBatch;
  s.in_channels = l.c;
  s.in_height = s.in_width = l.h;
  s.out_channels = l.k;
  s.kernel_h = s.kernel_w = l.kernel;
  s.stride_h = s.stride_w = l.stride;
  s.pad_h = s.pad_w = l.pad;
  return s;
}

enum class ConvPass { kForward, kBackwardData, kBackwardWeights };

const CpuContext& ReferenceContext() {
  static ThreadPool* pool =
      new ThreadPool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  static const CpuContext ctx{pool};
  return ctx;
}

std::vector<float> Abs(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = std::fabs(v[i]);
  return out;
}

// CPU result and the same computation on absolute values (for the element-wise error bound).
void CpuPass(ConvPass pass, const Conv2dShape& s, const std::vector<float>& x,
             const std::vector<float>& w, const std::vector<float>& dy, std::vector<float>* out,
             std::vector<float>* abs_out) {
  const CpuContext& cpu = ReferenceContext();
  const std::vector<float> ax = Abs(x), aw = Abs(w), ady = Abs(dy);
  switch (pass) {
    case ConvPass::kForward:
      Conv2dForward(cpu, s, x.data(), w.data(), nullptr, out->data());
      Conv2dForward(cpu, s, ax.data(), aw.data(), nullptr, abs_out->data());
      break;
    case ConvPass::kBackwardData:
      Conv2dBackwardData(cpu, s, dy.data(), w.data(), out->data());
      Conv2dBackwardData(cpu, s, ady.data(), aw.data(), abs_out->data());
      break;
    case ConvPass::kBackwardWeights:
      Conv2dBackwardWeights(cpu, s, x.data(), dy.data(), out->data(), nullptr);
      Conv2dBackwardWeights(cpu, s, ax.data(), ady.data(), abs_out->data(), nullptr);
      break;
  }
}

void BenchConv(benchmark::State& state, ConvPass pass) {
  if (::qtrain::cuda::DeviceCount() == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const ConvLayer& layer = kConvLayers[state.range(0)];
  const Conv2dShape s = ShapeOf(layer);
  const int64_t x_size = s.batch * s.in_channels * s.in_height * s.in_width;
  const int64_t y_size = s.batch * s.out_channels * s.out_height() * s.out_width();
  const int64_t w_size = s.out_channels * s.col_rows();
  const std::vector<float> hx = Uniform(x_size, 3), hw = Uniform(w_size, 4),
                           hdy = Uniform(y_size, 5);
  std::string error;
  DeviceArray<float> x = Upload(hx, &error), w = Upload(hw, &error), dy = Upload(hdy, &error);
  const int64_t out_size = pass == ConvPass::kForward        ? y_size
                           : pass == ConvPass::kBackwardData ? x_size
                                                             : w_size;
  DeviceArray<float> out = Upload(std::vector<float>(out_size, 0.0f), &error);
  absl::StatusOr<DeviceArray<unsigned char>> ws =
      DeviceArray<unsigned char>::Create(Conv2dWorkspaceBytes(s));
  if (!ws.ok()) error = ws.status().ToString();
  if (!error.empty()) {
    state.SkipWithError(error.c_str());
    return;
  }
  auto launch = [&] {
    const CudaContext ctx{};
    switch (pass) {
      case ConvPass::kForward:
        return Conv2dForward(ctx, s, x.data(), w.data(), nullptr, out.data(), ws->data(),
                             ws->bytes())
            .ok();
      case ConvPass::kBackwardData:
        return Conv2dBackwardData(ctx, s, dy.data(), w.data(), out.data(), ws->data(),
                                  ws->bytes())
            .ok();
      case ConvPass::kBackwardWeights:
        return Conv2dBackwardWeights(ctx, s, x.data(), dy.data(), out.data(), nullptr,
                                     ws->data(), ws->bytes())
            .ok();
    }
    return false;
  };

  // Check against the CPU kernels, element-wise: both within SumErrorBound of the exact sum.
  if (!launch() || cudaDeviceSynchronize() != cudaSuccess) {
    state.SkipWithError("CUDA convolution failed");
    return;
  }
  const std::vector<float> got = Download(out);
  std::vector<float> want(out_size), abs_want(out_size);
  CpuPass(pass, s, hx, hw, hdy, &want, &abs_want);
  const int64_t terms = pass == ConvPass::kForward ? s.col_rows() + 2
                        : pass == ConvPass::kBackwardData
                            ? s.out_channels * s.kernel_h * s.kernel_w + s.kernel_h * s.kernel_w + 2
                            : s.batch * s.out_height() * s.out_width() + 300;
  const double gamma = 2.0 * 2.0 * (terms + 1) * std::ldexp(1.0, -24);
  int64_t bad = 0;
  double max_err = 0.0;  // in units of the bound
  for (int64_t i = 0; i < out_size; ++i) {
    const double bound = gamma * abs_want[i] + 1e-30;
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]) / bound;
    if (!(err <= 1.0)) ++bad;
    max_err = std::isnan(err) ? INFINITY : std::max(max_err, err);
  }
  if (bad > 0) {
    state.SkipWithError(("CUDA convolution differs from the CPU kernel at " +
                         std::to_string(bad) + " elements")
                            .c_str());
    return;
  }

  const double flops = 2.0 * static_cast<double>(s.batch) * s.out_channels * s.col_rows() *
                       s.out_height() * s.out_width();
  TimeLaunches(state, launch, flops);
  state.counters["err_vs_bound"] = max_err;
  state.SetLabel(std::string(layer.name) + ", batch 128; no cuDNN yardstick");
}

void BM_CudaConvForward(benchmark::State& state) { BenchConv(state, ConvPass::kForward); }
void BM_CudaConvBackwardData(benchmark::State& state) {
  BenchConv(state, ConvPass::kBackwardData);
}
void BM_CudaConvBackwardWeights(benchmark::State& state) {
  BenchConv(state, ConvPass::kBackwardWeights);
}

void ConvLayers(benchmark::internal::Benchmark* b) {
  b->ArgName("layer");
  for (int64_t i = 0; i < static_cast<int64_t>(std::size(kConvLayers)); ++i) b->Arg(i);
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_CudaConvForward)->Apply(ConvLayers);
BENCHMARK(BM_CudaConvBackwardData)->Apply(ConvLayers);
BENCHMARK(BM_CudaConvBackwardWeights)->Apply(ConvLayers);

}  // namespace
}  // namespace qtrain::kernels::cuda
