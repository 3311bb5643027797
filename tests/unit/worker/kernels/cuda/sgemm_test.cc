#include "worker/kernels/cuda/sgemm.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "common/cuda/cuda_util.h"
#include "common/testing/cuda_testing.h"
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/kernels/cpu/sgemm.h"
#include "worker/kernels/cpu/thread_pool.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::cuda::DeviceArray;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::RandomVector;
using testing::SameBits;
using testing::SumErrorBound;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The CPU reference runs on every core (its result does not depend on the thread count).
const CpuContext& ReferenceContext() {
  static ThreadPool* pool =
      new ThreadPool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  static const CpuContext ctx{pool};
  return ctx;
}

struct GemmCase {
  Transpose ta;
  Transpose tb;
  int64_t m, n, k;
  float alpha, beta;
  // Leading dimensions: the stored columns plus `pad`, or, with round_ld, rounded up to a
  // multiple of 4 (the float4 path with ragged edges).
  int64_t pad = 0;
  bool round_ld = false;
  int64_t misalign = 0;  // device pointers offset by this many floats (breaks 16-byte alignment)
  bool nan_c = false;    // C starts as NaN (beta must be 0)
};

std::string Describe(const GemmCase& g) {
  std::ostringstream os;
  os << "m=" << g.m << " n=" << g.n << " k=" << g.k << " ta=" << (g.ta == Transpose::kYes)
     << " tb=" << (g.tb == Transpose::kYes) << " alpha=" << g.alpha << " beta=" << g.beta
     << " pad=" << g.pad << " round_ld=" << g.round_ld << " misalign=" << g.misalign
     << " nan_c=" << g.nan_c;
  return os.str();
}

int64_t LeadingDim(const GemmCase& g, int64_t cols) {
  const int64_t c = std::max<int64_t>(1, cols);
  return g.round_ld ? (c + 3) / 4 * 4 : c + g.pad;
}

// A host matrix and its device copy, placed `misalign` floats past the allocation's start.
struct Operand {
  std::vector<float> host;
  DeviceArray<float> device;
  int64_t misalign = 0;
  float* ptr() { return device.data() + misalign; }
};

Operand MakeOperand(std::vector<float> host, int64_t misalign) {
  Operand o;
  o.host = std::move(host);
  o.misalign = misalign;
  absl::StatusOr<DeviceArray<float>> d = DeviceArray<float>::Create(o.host.size() + 4);
  QTRAIN_CHECK(d.ok()) << d.status();
  o.device = std::move(*d);
  QTRAIN_CUDA_CHECK(cudaMemcpy(o.ptr(), o.host.data(), o.host.size() * sizeof(float),
                               cudaMemcpyHostToDevice));
  return o;
}

std::vector<float> ToHost(Operand& o) {
  std::vector<float> out(o.host.size());
  QTRAIN_CUDA_CHECK(
      cudaMemcpy(out.data(), o.ptr(), out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  return out;
}

std::vector<float> Abs(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = std::fabs(v[i]);
  return out;
}

// Runs the CUDA Sgemm and compares C with the CPU Sgemm. Both are within gamma * S of the exact
// result, S = |alpha| |op(A)| |op(B)| + |beta C| (computed on the CPU from absolute values), so
// they differ by at most twice SumErrorBound (which has its own 2x margin). Columns of C past n
// (the padding of ldc) must keep their bits.
void CheckAgainstCpu(const GemmCase& g) {
  SCOPED_TRACE(Describe(g));
  const int64_t a_rows = g.ta == Transpose::kNo ? g.m : g.k;
  const int64_t a_cols = g.ta == Transpose::kNo ? g.k : g.m;
  const int64_t b_rows = g.tb == Transpose::kNo ? g.k : g.n;
  const int64_t b_cols = g.tb == Transpose::kNo ? g.n : g.k;
  const int64_t lda = LeadingDim(g, a_cols);
  const int64_t ldb = LeadingDim(g, b_cols);
  const int64_t ldc = LeadingDim(g, g.n);
  const uint32_t seed = static_cast<uint32_t>(7 + g.m * 3 + g.n * 5 + g.k * 7);
  Operand a = MakeOperand(RandomVector(a_rows * lda, seed), g.misalign);
  Operand b = MakeOperand(RandomVector(b_rows * ldb, seed + 1), g.misalign);
  Operand c = MakeOperand(g.nan_c ? std::vector<float>(g.m * ldc, kNaN)
                                  : RandomVector(g.m * ldc, seed + 2),
                          g.misalign);

  std::vector<float> want = c.host;
  Sgemm(ReferenceContext(), g.ta, g.tb, g.m, g.n, g.k, g.alpha, a.host.data(), lda, b.host.data(),
        ldb, g.beta, want.data(), ldc);
  const std::vector<float> abs_a = Abs(a.host);
  const std::vector<float> abs_b = Abs(b.host);
  std::vector<float> abs_ab(g.m * ldc, 0.0f);
  Sgemm(ReferenceContext(), g.ta, g.tb, g.m, g.n, g.k, 1.0f, abs_a.data(), lda, abs_b.data(), ldb,
        0.0f, abs_ab.data(), ldc);

  ASSERT_THAT(Sgemm(CudaContext{}, g.ta, g.tb, g.m, g.n, g.k, g.alpha, a.ptr(), lda, b.ptr(), ldb,
                    g.beta, c.ptr(), ldc),
              IsOk());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = ToHost(c);

  int failures = 0;
  for (int64_t i = 0; i < g.m; ++i) {
    for (int64_t j = 0; j < ldc; ++j) {
      const int64_t e = i * ldc + j;
      if (j >= g.n) {
        if (!SameBits(got[e], c.host[e]) && ++failures <= 5) {
          ADD_FAILURE() << "padding C(" << i << "," << j << ") changed to " << got[e];
        }
        continue;
      }
      const double c_old = g.beta == 0.0f ? 0.0 : c.host[e];
      const double bound =
          2.0 * SumErrorBound(g.k + 2, std::fabs(g.alpha) * static_cast<double>(abs_ab[e]) +
                                           std::fabs(g.beta * c_old));
      if (!(std::fabs(static_cast<double>(got[e]) - want[e]) <= bound) && ++failures <= 5) {
        ADD_FAILURE() << "C(" << i << "," << j << ") = " << got[e] << ", CPU " << want[e]
                      << " +- " << bound;
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

const Transpose kBoth[] = {Transpose::kNo, Transpose::kYes};

// ---- Host-only: argument checks happen before anything touches the device. -----------------

TEST(CudaSgemmArgsTest, RejectsBadArgumentsBeforeLaunching) {
  float* const p = reinterpret_cast<float*>(uintptr_t{256});  // never dereferenced
  const CudaContext ctx{};
  const auto kNo = Transpose::kNo;
  const auto kYes = Transpose::kYes;
  EXPECT_THAT(Sgemm(ctx, kNo, kNo, -1, 4, 4, 1.0f, p, 4, p, 4, 0.0f, p, 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Sgemm(ctx, kNo, kNo, 4, 4, int64_t{1} << 30, 1.0f, p, int64_t{1} << 30, p, 4, 0.0f,
                    p, 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // lda: A stored 4 x 5 (k = 5) untransposed, 5 x 4 transposed.
  EXPECT_THAT(Sgemm(ctx, kNo, kNo, 4, 3, 5, 1.0f, p, 4, p, 3, 0.0f, p, 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Sgemm(ctx, kYes, kNo, 4, 3, 5, 1.0f, p, 3, p, 3, 0.0f, p, 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // ldb: B stored 5 x 3 untransposed, 3 x 5 transposed.
  EXPECT_THAT(Sgemm(ctx, kNo, kNo, 4, 3, 5, 1.0f, p, 5, p, 2, 0.0f, p, 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Sgemm(ctx, kNo, kYes, 4, 3, 5, 1.0f, p, 5, p, 4, 0.0f, p, 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Sgemm(ctx, kNo, kNo, 4, 3, 5, 1.0f, p, 5, p, 3, 0.0f, p, 2),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Sgemm(ctx, kNo, kNo, 4, 3, 5, 1.0f, p, 5, p, 3, 0.0f, nullptr, 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Sgemm(ctx, kNo, kNo, 4, 3, 5, 1.0f, nullptr, 5, p, 3, 0.0f, p, 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Sgemm(ctx, kNo, kNo, 4, 3, 5, 1.0f, p, 5, nullptr, 3, 0.0f, p, 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(CudaSgemmArgsTest, EmptyOutputIsANoOpWithoutADevice) {
  EXPECT_THAT(Sgemm(CudaContext{}, Transpose::kNo, Transpose::kNo, 0, 5, 3, 1.0f, nullptr, 3,
                    nullptr, 5, 0.0f, nullptr, 5),
              IsOk());
  EXPECT_THAT(Sgemm(CudaContext{}, Transpose::kYes, Transpose::kYes, 5, 0, 3, 1.0f, nullptr, 5,
                    nullptr, 3, 0.0f, nullptr, 1),
              IsOk());
}

TEST(CudaSgemmTileTest, LargeSquareOutputsUseTheBigTileSkinnyOnesTheSmall) {
  EXPECT_EQ(SgemmTileFor(4096, 4096), SgemmTile::k128x128);
  EXPECT_EQ(SgemmTileFor(2048, 2048), SgemmTile::k128x128);
  EXPECT_EQ(SgemmTileFor(1024, 1024), SgemmTile::k64x64);
  EXPECT_EQ(SgemmTileFor(64, 100352), SgemmTile::k64x64);
  EXPECT_EQ(SgemmTileFor(100352, 32), SgemmTile::k64x64);
  EXPECT_EQ(SgemmTileFor(1, 1), SgemmTile::k64x64);
}

// ---- GPU ---------------------------------------------------------------------------------------

TEST(CudaSgemmTest, OddSizesAllTransposesAgainstCpu) {
  QTRAIN_REQUIRE_GPU();
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> sizes = {
      {1, 1, 1},     {3, 17, 127},   {17, 127, 3},  {127, 129, 255}, {129, 255, 17},
      {255, 513, 129}, {513, 3, 255}, {513, 513, 513}, {1, 513, 17},  {129, 1, 513}};
  for (auto [m, n, k] : sizes) {
    for (Transpose ta : kBoth) {
      for (Transpose tb : kBoth) {
        CheckAgainstCpu(GemmCase{ta, tb, m, n, k, 1.0f, 0.0f});
        CheckAgainstCpu(GemmCase{ta, tb, m, n, k, -1.5f, 0.5f});
      }
    }
  }
}

TEST(CudaSgemmTest, MultiplesOfFourUseVectorLoads) {
  QTRAIN_REQUIRE_GPU();
  for (Transpose ta : kBoth) {
    for (Transpose tb : kBoth) {
      CheckAgainstCpu(GemmCase{ta, tb, 64, 128, 32, 1.0f, 0.0f});
      CheckAgainstCpu(GemmCase{ta, tb, 256, 192, 96, 0.5f, 1.0f});
    }
  }
}

TEST(CudaSgemmTest, LeadingDimensionsLargerThanTheMatrix) {
  QTRAIN_REQUIRE_GPU();
  for (Transpose ta : kBoth) {
    for (Transpose tb : kBoth) {
      // Odd padding: element loads; C's padding must stay untouched.
      CheckAgainstCpu(GemmCase{ta, tb, 129, 127, 33, 0.75f, 0.5f, /*pad=*/5});
      // Rounded to a multiple of 4: float4 loads, with groups straddling the ragged edges.
      CheckAgainstCpu(GemmCase{ta, tb, 130, 133, 19, 0.5f, 2.0f, 0, /*round_ld=*/true});
      CheckAgainstCpu(GemmCase{ta, tb, 255, 257, 513, 1.0f, 0.0f, 0, /*round_ld=*/true});
      CheckAgainstCpu(GemmCase{ta, tb, 17, 3, 1, 1.0f, 0.0f, 0, /*round_ld=*/true});
    }
  }
}

TEST(CudaSgemmTest, MisalignedPointersUseElementLoads) {
  QTRAIN_REQUIRE_GPU();
  for (Transpose ta : kBoth) {
    for (Transpose tb : kBoth) {
      CheckAgainstCpu(GemmCase{ta, tb, 68, 72, 36, 1.0f, 1.0f, 0, false, /*misalign=*/1});
    }
  }
}

TEST(CudaSgemmTest, BetaZeroOverwritesNanFilledC) {
  QTRAIN_REQUIRE_GPU();
  for (Transpose ta : kBoth) {
    for (Transpose tb : kBoth) {
      CheckAgainstCpu(GemmCase{ta, tb, 23, 37, 41, 1.0f, 0.0f, 0, false, 0, /*nan_c=*/true});
      CheckAgainstCpu(GemmCase{ta, tb, 64, 64, 16, -2.0f, 0.0f, 0, false, 0, /*nan_c=*/true});
    }
  }
}

TEST(CudaSgemmTest, LargeOutputsUseTheBigTile) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_EQ(SgemmTileFor(2048, 2048), SgemmTile::k128x128);
  ASSERT_EQ(SgemmTileFor(2050, 2051), SgemmTile::k128x128);
  CheckAgainstCpu(GemmCase{Transpose::kNo, Transpose::kNo, 2048, 2048, 300, 1.0f, 0.0f});
  for (Transpose ta : kBoth) {
    for (Transpose tb : kBoth) {
      CheckAgainstCpu(GemmCase{ta, tb, 2050, 2051, 129, -0.5f, 0.25f});
    }
  }
  CheckAgainstCpu(
      GemmCase{Transpose::kNo, Transpose::kYes, 2050, 2051, 67, 1.0f, 0.0f, 0, /*round_ld=*/true});
}

TEST(CudaSgemmTest, ZeroDepthScalesCWithoutReadingAOrB) {
  QTRAIN_REQUIRE_GPU();
  Operand c = MakeOperand({1.0f, -2.0f, 3.0f, 4.0f, 5.0f, 6.0f}, 0);
  ASSERT_THAT(Sgemm(CudaContext{}, Transpose::kNo, Transpose::kNo, 2, 3, 0, 1.0f, nullptr, 1,
                    nullptr, 3, 0.5f, c.ptr(), 3),
              IsOk());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(ToHost(c), (std::vector<float>{0.5f, -1.0f, 1.5f, 2.0f, 2.5f, 3.0f}));
  Operand nan_c = MakeOperand(std::vector<float>(6, kNaN), 0);
  ASSERT_THAT(Sgemm(CudaContext{}, Transpose::kNo, Transpose::kNo, 2, 3, 0, 1.0f, nullptr, 1,
                    nullptr, 3, 0.0f, nan_c.ptr(), 3),
              IsOk());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(ToHost(nan_c), std::vector<float>(6, 0.0f));
}

TEST(CudaSgemmTest, AlphaZeroDoesNotReadAOrB) {
  QTRAIN_REQUIRE_GPU();
  Operand a = MakeOperand(std::vector<float>(4 * 5, kNaN), 0);
  Operand b = MakeOperand(std::vector<float>(5 * 3, kNaN), 0);
  Operand c = MakeOperand(std::vector<float>(4 * 3, 2.0f), 0);
  ASSERT_THAT(Sgemm(CudaContext{}, Transpose::kNo, Transpose::kNo, 4, 3, 5, 0.0f, a.ptr(), 5,
                    b.ptr(), 3, 1.5f, c.ptr(), 3),
              IsOk());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(ToHost(c), std::vector<float>(12, 3.0f));
}

TEST(CudaSgemmTest, BitwiseReproducibleAndCapturableInAGraph) {
  QTRAIN_REQUIRE_GPU();
  const int64_t m = 300, n = 200, k = 170;
  Operand a = MakeOperand(RandomVector(m * k, 1), 0);
  Operand b = MakeOperand(RandomVector(n * k, 2), 0);
  Operand c1 = MakeOperand(std::vector<float>(m * n, kNaN), 0);
  Operand c2 = MakeOperand(std::vector<float>(m * n, kNaN), 0);
  Operand c3 = MakeOperand(std::vector<float>(m * n, kNaN), 0);
  absl::StatusOr<qtrain::cuda::Stream> stream = qtrain::cuda::Stream::Create();
  ASSERT_TRUE(stream.ok()) << stream.status();
  const CudaContext ctx{stream->get()};
  auto run = [&](Operand& c) {
    return Sgemm(ctx, Transpose::kNo, Transpose::kYes, m, n, k, 1.0f, a.ptr(), k, b.ptr(), k, 0.0f,
                 c.ptr(), n);
  };
  ASSERT_THAT(run(c1), IsOk());
  ASSERT_THAT(run(c2), IsOk());
  // Captured into a graph: no synchronization or allocation inside the call.
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(ctx.stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  const absl::Status captured = run(c3);
  ASSERT_EQ(cudaStreamEndCapture(ctx.stream, &graph), cudaSuccess);
  ASSERT_THAT(captured, IsOk());
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, ctx.stream), cudaSuccess);
  ASSERT_THAT(stream->Synchronize(), IsOk());
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  const std::vector<float> r1 = ToHost(c1), r2 = ToHost(c2), r3 = ToHost(c3);
  ASSERT_EQ(std::memcmp(r1.data(), r2.data(), r1.size() * sizeof(float)), 0);
  ASSERT_EQ(std::memcmp(r1.data(), r3.data(), r1.size() * sizeof(float)), 0);
  EXPECT_FALSE(std::isnan(r1[0]));
}

}  // namespace
}  // namespace qtrain::kernels::cuda
