#include "worker/kernels/cuda/conv.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/cuda/cuda_util.h"
#include "common/testing/cuda_testing.h"
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "worker/kernels/cpu/conv.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/kernels/cuda/fast_divmod.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::cuda::DeviceArray;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::RandomVector;
using testing::SumErrorBound;

Conv2dShape MakeShape(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t kernel,
                      int64_t stride, int64_t pad) {
  Conv2dShape s;
  s.batch = n;
  s.in_channels = c;
  s.in_height = h;
  s.in_width = w;
  s.out_channels = k;
  s.kernel_h = s.kernel_w = kernel;
  s.stride_h = s.stride_w = stride;
  s.pad_h = s.pad_w = pad;
  return s;
}

std::string Describe(const Conv2dShape& s) {
  std::ostringstream os;
  os << s.batch << "x" << s.in_channels << "x" << s.in_height << "x" << s.in_width << " -> "
     << s.out_channels << " k" << s.kernel_h << "x" << s.kernel_w << " s" << s.stride_h << "x"
     << s.stride_w << " p" << s.pad_h << "x" << s.pad_w;
  return os.str();
}

// The layers of the two reference nets (batch reduced; the GPU kernels do not special-case the
// batch) and odd shapes that exercise every edge of the loaders.
std::vector<Conv2dShape> Shapes() {
  std::vector<Conv2dShape> shapes = {
      // cnn: conv3x3 32-32-pool-64-64 on 28x28
      MakeShape(2, 1, 28, 28, 32, 3, 1, 1),    // C = 1
      MakeShape(2, 32, 28, 28, 32, 3, 1, 1),   // backward weights split into slices
      MakeShape(2, 32, 14, 14, 64, 3, 1, 1),   // 64-row tiles
      MakeShape(2, 64, 14, 14, 64, 3, 1, 1),
      // resnet20: 16/32/64 channels at 32/16/8, stride-2 3x3 and 1x1 shortcuts
      MakeShape(2, 3, 32, 32, 16, 3, 1, 1),
      MakeShape(2, 16, 32, 32, 16, 3, 1, 1),
      MakeShape(2, 16, 32, 32, 32, 3, 2, 1),
      MakeShape(2, 32, 16, 16, 32, 3, 1, 1),
      MakeShape(2, 32, 16, 16, 64, 3, 2, 1),
      MakeShape(2, 64, 8, 8, 64, 3, 1, 1),
      MakeShape(2, 16, 32, 32, 32, 1, 2, 0),
      MakeShape(2, 32, 16, 16, 64, 1, 2, 0),
      // odd ones
      MakeShape(3, 2, 9, 8, 5, 3, 2, 0),      // stride 2, no padding
      MakeShape(2, 4, 5, 5, 3, 1, 1, 0),      // pointwise
      MakeShape(3, 1, 5, 5, 2, 5, 1, 2),      // 5x5, C = 1
      MakeShape(2, 2, 3, 3, 3, 3, 1, 3),      // padding wider than the image
      MakeShape(4, 5, 4, 4, 6, 3, 1, 0),      // valid convolution
      MakeShape(1, 3, 6, 6, 4, 3, 1, 1),      // batch 1
      MakeShape(2, 70, 6, 9, 33, 3, 1, 1),    // C = 70: two row tiles in backward data; K = 33
      MakeShape(2, 5, 7, 7, 130, 3, 2, 1),    // K = 130: three 64-row tiles, strided
      MakeShape(2, 40, 11, 13, 24, 3, 3, 2),  // stride 3
  };
  Conv2dShape rect = MakeShape(3, 2, 6, 7, 3, 1, 1, 0);  // non-square kernel and strides
  rect.kernel_h = 2;
  rect.kernel_w = 3;
  rect.stride_h = 2;
  rect.pad_w = 1;
  shapes.push_back(rect);
  Conv2dShape tall = MakeShape(2, 3, 17, 5, 4, 3, 1, 1);  // vertical stride only
  tall.stride_h = 2;
  shapes.push_back(tall);
  return shapes;
}

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

DeviceArray<float> ToDevice(const std::vector<float>& host) {
  absl::StatusOr<DeviceArray<float>> d = DeviceArray<float>::Create(host.size());
  QTRAIN_CHECK(d.ok()) << d.status();
  QTRAIN_CHECK(d->CopyFromHost(host).ok());
  return std::move(*d);
}

DeviceArray<float> NanDevice(size_t n) {
  return ToDevice(std::vector<float>(n, std::nanf("")));
}

std::vector<float> ToHost(const DeviceArray<float>& d) {
  std::vector<float> host(d.size());
  QTRAIN_CHECK(d.CopyToHost(host).ok());
  return host;
}

// got and the CPU result are each within SumErrorBound(terms, abs) / 2 of the exact value, abs
// being the same computation on absolute values (CPU); allow their sum plus the 2x margin.
void ExpectClose(const char* what, const std::vector<float>& got, const std::vector<float>& want,
                 const std::vector<float>& abs, int64_t terms) {
  ASSERT_EQ(got.size(), want.size());
  int failures = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = 2.0 * SumErrorBound(terms, abs[i]);
    if (!(std::fabs(static_cast<double>(got[i]) - want[i]) <= bound) && ++failures <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", CPU " << want[i] << " +- "
                    << bound;
    }
  }
  EXPECT_EQ(failures, 0) << what;
}

// A workspace of exactly Conv2dWorkspaceBytes, between two guard zones that must survive.
class GuardedWorkspace {
 public:
  static constexpr size_t kGuard = 256;
  static constexpr unsigned char kPattern = 0xA5;
  explicit GuardedWorkspace(uint64_t bytes) : bytes_(bytes) {
    absl::StatusOr<DeviceArray<unsigned char>> d =
        DeviceArray<unsigned char>::Create(bytes + 2 * kGuard);
    QTRAIN_CHECK(d.ok()) << d.status();
    buffer_ = std::move(*d);
    QTRAIN_CUDA_CHECK(cudaMemset(buffer_.data(), kPattern, buffer_.size()));
  }
  void* data() { return buffer_.data() + kGuard; }
  uint64_t bytes() const { return bytes_; }
  bool GuardsIntact() const {
    std::vector<unsigned char> host(buffer_.size());
    QTRAIN_CHECK(buffer_.CopyToHost(host).ok());
    for (size_t i = 0; i < kGuard; ++i) {
      if (host[i] != kPattern || host[host.size() - 1 - i] != kPattern) return false;
    }
    return true;
  }

 private:
  uint64_t bytes_;
  DeviceArray<unsigned char> buffer_;
};

struct HostTensors {
  std::vector<float> x, w, bias, dy;
};

HostTensors MakeTensors(const Conv2dShape& s, uint32_t seed) {
  const int64_t x_size = s.batch * s.in_channels * s.in_height * s.in_width;
  const int64_t y_size = s.batch * s.out_channels * s.out_height() * s.out_width();
  return HostTensors{RandomVector(x_size, seed),
                     RandomVector(s.out_channels * s.col_rows(), seed + 1),
                     RandomVector(s.out_channels, seed + 2), RandomVector(y_size, seed + 3)};
}

// Runs all three passes on the GPU with a workspace of exactly the advertised size and compares
// each result with the CPU kernels.
void CheckAgainstCpu(const Conv2dShape& s, uint32_t seed) {
  SCOPED_TRACE(Describe(s));
  const CpuContext& cpu = ReferenceContext();
  const HostTensors t = MakeTensors(s, seed);
  const std::vector<float> abs_x = Abs(t.x), abs_w = Abs(t.w), abs_bias = Abs(t.bias),
                           abs_dy = Abs(t.dy);
  const DeviceArray<float> x = ToDevice(t.x), w = ToDevice(t.w), bias = ToDevice(t.bias),
                           dy = ToDevice(t.dy);
  GuardedWorkspace ws(Conv2dWorkspaceBytes(s));
  const CudaContext ctx{};

  // Forward, with and without bias: C*KH*KW products plus the bias.
  for (bool with_bias : {true, false}) {
    SCOPED_TRACE(with_bias ? "forward with bias" : "forward without bias");
    std::vector<float> want(t.dy.size()), abs(t.dy.size());
    Conv2dForward(cpu, s, t.x.data(), t.w.data(), with_bias ? t.bias.data() : nullptr,
                  want.data());
    Conv2dForward(cpu, s, abs_x.data(), abs_w.data(), with_bias ? abs_bias.data() : nullptr,
                  abs.data());
    DeviceArray<float> y = NanDevice(t.dy.size());
    ASSERT_THAT(Conv2dForward(ctx, s, x.data(), w.data(), with_bias ? bias.data() : nullptr,
                              y.data(), ws.data(), ws.bytes()),
                IsOk());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ExpectClose("y", ToHost(y), want, abs, s.col_rows() + 2);
  }

  // Backward data: the GPU sums K*KH*KW products per input pixel; the CPU a GEMM over K, then
  // col2im over KH*KW.
  {
    std::vector<float> want(t.x.size()), abs(t.x.size());
    Conv2dBackwardData(cpu, s, t.dy.data(), t.w.data(), want.data());
    Conv2dBackwardData(cpu, s, abs_dy.data(), abs_w.data(), abs.data());
    DeviceArray<float> dx = NanDevice(t.x.size());
    ASSERT_THAT(Conv2dBackwardData(ctx, s, dy.data(), w.data(), dx.data(), ws.data(), ws.bytes()),
                IsOk());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ExpectClose("dx", ToHost(dx), want, abs,
                s.out_channels * s.kernel_h * s.kernel_w + s.kernel_h * s.kernel_w + 2);
  }

  // Backward weights (+ bias): sums over N*OH*OW positions, on the GPU in slices then across
  // slices, on the CPU per image chunk then across chunks.
  {
    const int64_t positions = s.batch * s.out_height() * s.out_width();
    const int64_t slices = Conv2dBackwardWeightsSplit(s).slices;
    std::vector<float> want(t.w.size()), abs(t.w.size());
    std::vector<float> want_bias(s.out_channels), abs_dbias(s.out_channels);
    Conv2dBackwardWeights(cpu, s, t.x.data(), t.dy.data(), want.data(), want_bias.data());
    Conv2dBackwardWeights(cpu, s, abs_x.data(), abs_dy.data(), abs.data(), abs_dbias.data());
    DeviceArray<float> dw = NanDevice(t.w.size());
    DeviceArray<float> dbias = NanDevice(s.out_channels);
    ASSERT_THAT(Conv2dBackwardWeights(ctx, s, x.data(), dy.data(), dw.data(), dbias.data(),
                                      ws.data(), ws.bytes()),
                IsOk());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> got_dw = ToHost(dw);
    ExpectClose("dw", got_dw, want, abs, positions + slices + s.batch + 2);
    // Both accumulate in double and round once (the CPU's float sums per image are exact enough
    // for this bound: a double sum of floats).
    ExpectClose("dbias", ToHost(dbias), want_bias, abs_dbias, 2);
    // Without dbias: the same dw, bit for bit.
    DeviceArray<float> dw_only = NanDevice(t.w.size());
    ASSERT_THAT(Conv2dBackwardWeights(ctx, s, x.data(), dy.data(), dw_only.data(), nullptr,
                                      ws.data(), ws.bytes()),
                IsOk());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> got_only = ToHost(dw_only);
    EXPECT_EQ(std::memcmp(got_only.data(), got_dw.data(), got_dw.size() * sizeof(float)), 0);
  }
  EXPECT_TRUE(ws.GuardsIntact()) << "a pass wrote outside its workspace";
}

// ---- Host-only -----------------------------------------------------------------------------

TEST(FastDivmodTest, MatchesIntegerDivision) {
  std::mt19937 rng(3);
  for (int64_t d = 1; d <= 5000; ++d) {
    const FastDivmod f = FastDivmod::Make(d);
    for (int n = 0; n < 2000; ++n) {
      int r = -1;
      ASSERT_EQ(f.DivMod(n, &r), n / d) << n << " / " << d;
      ASSERT_EQ(r, n % d) << n << " % " << d;
    }
    for (int t = 0; t < 50; ++t) {
      const int n = static_cast<int>(rng() & 0x7fffffffu);
      ASSERT_EQ(f.Div(n), n / d) << n << " / " << d;
    }
    for (int n : {0x7fffffff, 0x7ffffffe, 0x40000000, 0x3fffffff}) {
      ASSERT_EQ(f.Div(n), n / d) << n << " / " << d;
    }
  }
  for (int64_t d : {int64_t{0x7fffffff}, int64_t{0x40000001}, int64_t{0x40000000},
                    int64_t{123456789}, int64_t{65536}, int64_t{100352}}) {
    const FastDivmod f = FastDivmod::Make(d);
    for (int t = 0; t < 10000; ++t) {
      const int n = static_cast<int>(rng() & 0x7fffffffu);
      ASSERT_EQ(f.Div(n), n / d) << n << " / " << d;
    }
  }
}

TEST(ConvWorkspaceTest, SplitCoversEveryPositionOnceAndSizesTheWorkspace) {
  std::vector<Conv2dShape> shapes = Shapes();
  shapes.push_back(MakeShape(128, 32, 28, 28, 32, 3, 1, 1));
  shapes.push_back(MakeShape(128, 64, 8, 8, 64, 3, 1, 1));
  shapes.push_back(MakeShape(1, 1, 1, 1, 1, 1, 1, 0));
  for (const Conv2dShape& s : shapes) {
    SCOPED_TRACE(Describe(s));
    const int64_t positions = s.batch * s.out_height() * s.out_width();
    const Conv2dWeightsSplit split = Conv2dBackwardWeightsSplit(s);
    ASSERT_GE(split.slices, 1);
    EXPECT_LE(split.slices, 256);
    EXPECT_EQ(split.slice_len % 16, 0);
    EXPECT_GE(split.slices * split.slice_len, positions);       // covers every position
    EXPECT_LT((split.slices - 1) * split.slice_len, positions);  // and no slice is empty
    const uint64_t expected =
        split.slices == 1 ? 0
                          : static_cast<uint64_t>(split.slices * s.out_channels * s.col_rows()) *
                                sizeof(float);
    EXPECT_EQ(Conv2dWorkspaceBytes(s), expected);
  }
  // A real batch splits the long reduction; a single output position cannot be split.
  EXPECT_GT(Conv2dBackwardWeightsSplit(MakeShape(128, 32, 28, 28, 32, 3, 1, 1)).slices, 1);
  EXPECT_EQ(Conv2dBackwardWeightsSplit(MakeShape(1, 1, 1, 1, 1, 1, 1, 0)).slices, 1);
  EXPECT_EQ(Conv2dWorkspaceBytes(MakeShape(0, 1, 4, 4, 1, 3, 1, 1)), 0u);  // invalid
}

TEST(ConvArgsTest, RejectsBadArgumentsBeforeLaunching) {
  // Never dereferenced: every call below fails its checks first.
  float* const p = reinterpret_cast<float*>(uintptr_t{256});
  const CudaContext ctx{};
  const Conv2dShape bad = MakeShape(1, 1, 2, 2, 1, 5, 1, 1);  // kernel larger than padded input
  EXPECT_THAT(Conv2dForward(ctx, bad, p, p, p, p, nullptr, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Conv2dBackwardData(ctx, bad, p, p, p, nullptr, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Conv2dBackwardWeights(ctx, bad, p, p, p, p, nullptr, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));

  const Conv2dShape s = MakeShape(2, 3, 8, 8, 4, 3, 1, 1);
  EXPECT_THAT(Conv2dForward(ctx, s, nullptr, p, p, p, nullptr, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Conv2dForward(ctx, s, p, p, p, nullptr, nullptr, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Conv2dBackwardData(ctx, s, p, nullptr, p, nullptr, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Conv2dBackwardWeights(ctx, s, p, p, nullptr, p, nullptr, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));

  // A short or missing workspace where one is needed.
  const Conv2dShape big = MakeShape(128, 32, 28, 28, 32, 3, 1, 1);
  const uint64_t need = Conv2dWorkspaceBytes(big);
  ASSERT_GT(need, 0u);
  EXPECT_THAT(Conv2dBackwardWeights(ctx, big, p, p, p, p, p, need - 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Conv2dBackwardWeights(ctx, big, p, p, p, p, nullptr, need),
              StatusIs(absl::StatusCode::kInvalidArgument));

  // Tensors past the kernels' 32-bit indexing.
  const Conv2dShape huge = MakeShape(1024, 64, 256, 256, 64, 3, 1, 1);  // 2^32 input elements
  EXPECT_THAT(Conv2dForward(ctx, huge, p, p, p, p, nullptr, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(Conv2dWorkspaceBytes(huge), 0u);
}

// ---- GPU ---------------------------------------------------------------------------------------

TEST(CudaConvTest, AllPassesMatchCpuOnNetAndOddShapes) {
  QTRAIN_REQUIRE_GPU();
  uint32_t seed = 100;
  for (const Conv2dShape& s : Shapes()) CheckAgainstCpu(s, seed += 4);
}

TEST(CudaConvTest, CnnLayerAtTrainingBatch) {
  QTRAIN_REQUIRE_GPU();
  const Conv2dShape s = MakeShape(128, 32, 28, 28, 32, 3, 1, 1);
  ASSERT_GT(Conv2dBackwardWeightsSplit(s).slices, 1);
  CheckAgainstCpu(s, 7);
  CheckAgainstCpu(MakeShape(128, 64, 8, 8, 64, 3, 1, 1), 9);  // resnet20 stage 3
}

TEST(CudaConvTest, BitwiseReproducibleAndCapturableInAGraph) {
  QTRAIN_REQUIRE_GPU();
  const Conv2dShape s = MakeShape(8, 16, 16, 16, 32, 3, 2, 1);
  const HostTensors t = MakeTensors(s, 77);
  const DeviceArray<float> x = ToDevice(t.x), w = ToDevice(t.w), bias = ToDevice(t.bias),
                           dy = ToDevice(t.dy);
  GuardedWorkspace ws(Conv2dWorkspaceBytes(s));
  ASSERT_GT(Conv2dBackwardWeightsSplit(s).slices, 1);
  absl::StatusOr<qtrain::cuda::Stream> stream = qtrain::cuda::Stream::Create();
  ASSERT_TRUE(stream.ok()) << stream.status();
  const CudaContext ctx{stream->get()};

  struct Outputs {
    DeviceArray<float> y, dx, dw, dbias;
  };
  auto make_outputs = [&] {
    return Outputs{NanDevice(t.dy.size()), NanDevice(t.x.size()), NanDevice(t.w.size()),
                   NanDevice(s.out_channels)};
  };
  auto run = [&](Outputs& o) -> absl::Status {
    absl::Status st =
        Conv2dForward(ctx, s, x.data(), w.data(), bias.data(), o.y.data(), ws.data(), ws.bytes());
    if (!st.ok()) return st;
    st = Conv2dBackwardData(ctx, s, dy.data(), w.data(), o.dx.data(), ws.data(), ws.bytes());
    if (!st.ok()) return st;
    return Conv2dBackwardWeights(ctx, s, x.data(), dy.data(), o.dw.data(), o.dbias.data(),
                                 ws.data(), ws.bytes());
  };
  Outputs first = make_outputs(), second = make_outputs(), graphed = make_outputs();
  ASSERT_THAT(run(first), IsOk());
  ASSERT_THAT(run(second), IsOk());
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  const absl::Status captured = run(graphed);
  ASSERT_EQ(cudaStreamEndCapture(ctx.stream, &graph), cudaSuccess);
  ASSERT_THAT(captured, IsOk());
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, ctx.stream), cudaSuccess);
  ASSERT_THAT(stream->Synchronize(), IsOk());
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);

  auto same = [](const DeviceArray<float>& a, const DeviceArray<float>& b) {
    const std::vector<float> ha = ToHost(a), hb = ToHost(b);
    return std::memcmp(ha.data(), hb.data(), ha.size() * sizeof(float)) == 0 &&
           !std::isnan(ha[0]);
  };
  for (const Outputs* o : {&second, &graphed}) {
    EXPECT_TRUE(same(first.y, o->y));
    EXPECT_TRUE(same(first.dx, o->dx));
    EXPECT_TRUE(same(first.dw, o->dw));
    EXPECT_TRUE(same(first.dbias, o->dbias));
  }
  EXPECT_TRUE(ws.GuardsIntact());
}

}  // namespace
}  // namespace qtrain::kernels::cuda
