#include "worker/kernels/cuda/batch_norm.h"

#include <cmath>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "tests/unit/worker/kernels/cuda/gpu_test_util.h"
#include "worker/kernels/cpu/activation.h"
#include "worker/kernels/cpu/batch_norm.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::kernels::testing::RandomVector;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::Download;
using testing::ExpectBitsEqual;
using testing::FloatUlp;
using testing::GpuTest;
using testing::Poisoned;
using testing::Upload;

const CpuContext kCpu{};

BatchNormShape MakeShape(int64_t n, int64_t c, int64_t s) {
  BatchNormShape shape;
  shape.batch = n;
  shape.channels = c;
  shape.spatial = s;
  return shape;
}

// Tiny and odd shapes, one value per channel (the biased-variance fallback), a fully-connected
// output (spatial 1), segments split over several blocks (N * spatial > 4096), and a tensor above
// one grid-stride round whose channels use the maximum split.
std::vector<BatchNormShape> Shapes() {
  return {MakeShape(2, 3, 5),     MakeShape(1, 1, 1),    MakeShape(1, 4, 1),
          MakeShape(8, 16, 64),   MakeShape(64, 100, 1), MakeShape(32, 8, 1024),
          MakeShape(128, 4, 4096)};
}

std::string Describe(const BatchNormShape& s) {
  return std::to_string(s.batch) + "x" + std::to_string(s.channels) + "x" +
         std::to_string(s.spatial);
}

// 2 * gamma(terms) * abs_sum with u = 2^-53 (two double sums of the same terms in different
// orders differ by at most this), doubled.
double DoubleSumBound(int64_t terms, double abs_sum) {
  const double t = static_cast<double>(terms + 1) * std::ldexp(1.0, -53);
  return 4.0 * t / (1.0 - t) * abs_sum;
}

struct Inputs {
  std::vector<float> x, gamma, beta, running_mean, running_var, dy;
};

Inputs MakeInputs(const BatchNormShape& s, uint32_t seed) {
  Inputs in;
  const int64_t n = s.batch * s.channels * s.spatial;
  in.x = RandomVector(n, seed, -1.0f, 1.0f);
  // A per-channel offset well above the spread: the two-pass variance matters.
  for (int64_t i = 0; i < n; ++i) in.x[i] += 3.0f + 0.5f * static_cast<float>((i / s.spatial) % s.channels);
  in.gamma = RandomVector(s.channels, seed + 1, 0.5f, 1.5f);
  in.beta = RandomVector(s.channels, seed + 2, -0.5f, 0.5f);
  in.running_mean = RandomVector(s.channels, seed + 3, -1.0f, 1.0f);
  in.running_var = RandomVector(s.channels, seed + 4, 0.5f, 2.0f);
  in.dy = RandomVector(n, seed + 5, -1.0f, 1.0f);
  return in;
}

int64_t ChannelOf(const BatchNormShape& s, int64_t i) { return (i / s.spatial) % s.channels; }

// Per-channel statistics: the float roundings of two double values ~1e-16 relative apart are
// equal or neighbours.
void ExpectStatClose(const std::vector<float>& cpu, const std::vector<float>& gpu,
                     const std::string& what) {
  ASSERT_EQ(cpu.size(), gpu.size());
  for (size_t c = 0; c < cpu.size(); ++c) {
    EXPECT_NEAR(gpu[c], cpu[c], FloatUlp(cpu[c]) * 1.01) << what << " channel " << c;
  }
}

class BatchNormGpuTest : public GpuTest {
 protected:
  struct Outputs {
    std::vector<float> y, saved_mean, saved_inv_std, running_mean, running_var;
  };

  Outputs GpuTrain(const BatchNormShape& s, const BatchNormOptions& o, const Inputs& in,
                   BatchNormActivation activation) {
    const int64_t n = s.batch * s.channels * s.spatial;
    auto x = Upload(in.x);
    auto gamma = Upload(in.gamma);
    auto beta = Upload(in.beta);
    auto rm = Upload(in.running_mean);
    auto rv = Upload(in.running_var);
    auto y = Poisoned(n);
    auto sm = Poisoned(s.channels);
    auto si = Poisoned(s.channels);
    auto ws = Workspace(BatchNormWorkspaceBytes(s));
    EXPECT_THAT(cuda::BatchNormTrainForward(ctx_, s, o, x.data(), gamma.data(), beta.data(),
                                            y.data(), sm.data(), si.data(), rm.data(), rv.data(),
                                            ws.data(), activation),
                IsOk());
    Sync();
    return {Download(y), Download(sm), Download(si), Download(rm), Download(rv)};
  }

  struct Grads {
    std::vector<float> dx, dgamma, dbeta;
  };

  // relu_y: the fused forward's output for the ReLU variant, empty for the plain backward.
  Grads GpuBackward(const BatchNormShape& s, const Inputs& in, const std::vector<float>& saved_mean,
                    const std::vector<float>& saved_inv_std, const std::vector<float>& relu_y) {
    const int64_t n = s.batch * s.channels * s.spatial;
    auto x = Upload(in.x);
    auto dy = Upload(in.dy);
    auto gamma = Upload(in.gamma);
    auto sm = Upload(saved_mean);
    auto si = Upload(saved_inv_std);
    auto dx = Poisoned(n);
    auto dgamma = Poisoned(s.channels);
    auto dbeta = Poisoned(s.channels);
    auto ws = Workspace(BatchNormWorkspaceBytes(s));
    if (relu_y.empty()) {
      EXPECT_THAT(cuda::BatchNormBackward(ctx_, s, x.data(), dy.data(), gamma.data(), sm.data(),
                                          si.data(), dx.data(), dgamma.data(), dbeta.data(),
                                          ws.data()),
                  IsOk());
    } else {
      auto y = Upload(relu_y);
      EXPECT_THAT(cuda::BatchNormReluBackward(ctx_, s, x.data(), y.data(), dy.data(), gamma.data(),
                                              sm.data(), si.data(), dx.data(), dgamma.data(),
                                              dbeta.data(), ws.data()),
                  IsOk());
    }
    Sync();
    return {Download(dx), Download(dgamma), Download(dbeta)};
  }
};

TEST_F(BatchNormGpuTest, TrainForwardMatchesCpu) {
  BatchNormOptions options_a;  // PyTorch's defaults
  BatchNormOptions options_b;
  options_b.momentum = 0.3f;
  options_b.epsilon = 1e-3f;
  for (const BatchNormShape& s : Shapes()) {
    for (const BatchNormOptions& o : {options_a, options_b}) {
      for (BatchNormActivation activation :
           {BatchNormActivation::kNone, BatchNormActivation::kRelu}) {
        const bool relu = activation == BatchNormActivation::kRelu;
        SCOPED_TRACE(Describe(s) + " momentum " + std::to_string(o.momentum) +
                     (relu ? " +relu" : ""));
        const int64_t n = s.batch * s.channels * s.spatial;
        const Inputs in = MakeInputs(s, 31);
        Outputs cpu{std::vector<float>(n), std::vector<float>(s.channels),
                    std::vector<float>(s.channels), in.running_mean, in.running_var};
        kernels::BatchNormTrainForward(kCpu, s, o, in.x.data(), in.gamma.data(), in.beta.data(),
                                       cpu.y.data(), cpu.saved_mean.data(),
                                       cpu.saved_inv_std.data(), cpu.running_mean.data(),
                                       cpu.running_var.data());
        if (relu) kernels::ReluForward(kCpu, n, cpu.y.data(), cpu.y.data());
        const Outputs gpu = GpuTrain(s, o, in, activation);

        ExpectStatClose(cpu.saved_mean, gpu.saved_mean, "saved_mean");
        ExpectStatClose(cpu.saved_inv_std, gpu.saved_inv_std, "saved_inv_std");
        ExpectStatClose(cpu.running_mean, gpu.running_mean, "running_mean");
        ExpectStatClose(cpu.running_var, gpu.running_var, "running_var");
        // y = (x - mean) * scale + beta in float: mean and scale may each be 1 ulp apart, and
        // the three roundings may then differ by 1 ulp each, so |dy| <= ~3e-7 *
        // ((|x| + |mean|) |scale| + |beta|); 1e-6 leaves a 3x margin. ReLU is 1-Lipschitz.
        int64_t bad = 0;
        for (int64_t i = 0; i < n && bad < 5; ++i) {
          const int64_t c = ChannelOf(s, i);
          const double scale = std::fabs(in.gamma[c] * cpu.saved_inv_std[c]);
          const double tol =
              1e-6 * ((std::fabs(in.x[i]) + std::fabs(cpu.saved_mean[c])) * scale +
                      std::fabs(in.beta[c])) +
              1e-30;
          if (!(std::fabs(gpu.y[i] - cpu.y[i]) <= tol)) {
            ++bad;
            ADD_FAILURE() << "y[" << i << "]: cpu " << cpu.y[i] << " gpu " << gpu.y[i];
          }
        }
        if (relu) {
          for (int64_t i = 0; i < n; ++i) ASSERT_GE(gpu.y[i], 0.0f) << i;
        }
      }
    }
  }
}

TEST_F(BatchNormGpuTest, EvalForwardMatchesCpuExactly) {
  BatchNormOptions o;
  o.epsilon = 1e-4f;
  for (const BatchNormShape& s : Shapes()) {
    for (BatchNormActivation activation :
         {BatchNormActivation::kNone, BatchNormActivation::kRelu}) {
      SCOPED_TRACE(Describe(s));
      const int64_t n = s.batch * s.channels * s.spatial;
      const Inputs in = MakeInputs(s, 41);
      std::vector<float> want(n);
      kernels::BatchNormEvalForward(kCpu, s, o, in.x.data(), in.gamma.data(), in.beta.data(),
                                    in.running_mean.data(), in.running_var.data(), want.data());
      if (activation == BatchNormActivation::kRelu) {
        kernels::ReluForward(kCpu, n, want.data(), want.data());
      }
      auto x = Upload(in.x);
      auto gamma = Upload(in.gamma);
      auto beta = Upload(in.beta);
      auto rm = Upload(in.running_mean);
      auto rv = Upload(in.running_var);
      auto y = Poisoned(n);
      ASSERT_THAT(cuda::BatchNormEvalForward(ctx_, s, o, x.data(), gamma.data(), beta.data(),
                                             rm.data(), rv.data(), y.data(), activation),
                  IsOk());
      Sync();
      ExpectBitsEqual(want, Download(y), "eval y");
    }
  }
}

TEST_F(BatchNormGpuTest, BackwardMatchesCpu) {
  for (const BatchNormShape& s : Shapes()) {
    for (bool relu : {false, true}) {
      SCOPED_TRACE(Describe(s) + (relu ? " +relu" : ""));
      const int64_t n = s.batch * s.channels * s.spatial;
      const int64_t count = s.batch * s.spatial;
      const Inputs in = MakeInputs(s, 51);
      // Saved statistics and (for the fused variant) the forward output from the CPU forward,
      // so both backwards see identical inputs.
      std::vector<float> y(n), saved_mean(s.channels), saved_inv_std(s.channels);
      std::vector<float> rm = in.running_mean, rv = in.running_var;
      kernels::BatchNormTrainForward(kCpu, s, BatchNormOptions{}, in.x.data(), in.gamma.data(),
                                     in.beta.data(), y.data(), saved_mean.data(),
                                     saved_inv_std.data(), rm.data(), rv.data());
      std::vector<float> dy_effective = in.dy;
      if (relu) {
        kernels::ReluForward(kCpu, n, y.data(), y.data());
        kernels::ReluBackward(kCpu, n, y.data(), in.dy.data(), dy_effective.data());
      }
      std::vector<float> dx_cpu(n), dgamma_cpu(s.channels), dbeta_cpu(s.channels);
      kernels::BatchNormBackward(kCpu, s, in.x.data(), dy_effective.data(), in.gamma.data(),
                                 saved_mean.data(), saved_inv_std.data(), dx_cpu.data(),
                                 dgamma_cpu.data(), dbeta_cpu.data());
      const Grads gpu =
          GpuBackward(s, in, saved_mean, saved_inv_std, relu ? y : std::vector<float>());

      // Per-channel magnitudes for the bounds.
      std::vector<double> abs_dy(s.channels, 0.0), abs_dy_x(s.channels, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t c = ChannelOf(s, i);
        abs_dy[c] += std::fabs(dy_effective[i]);
        abs_dy_x[c] += std::fabs(static_cast<double>(dy_effective[i]) * in.x[i]);
      }
      for (int64_t c = 0; c < s.channels; ++c) {
        const double inv_std = saved_inv_std[c];
        const double mean = saved_mean[c];
        EXPECT_NEAR(gpu.dbeta[c], dbeta_cpu[c],
                    FloatUlp(dbeta_cpu[c]) + DoubleSumBound(count, abs_dy[c]))
            << "dbeta " << c;
        EXPECT_NEAR(gpu.dgamma[c], dgamma_cpu[c],
                    FloatUlp(dgamma_cpu[c]) +
                        inv_std * (DoubleSumBound(count, abs_dy_x[c]) +
                                   std::fabs(mean) * DoubleSumBound(count, abs_dy[c]) +
                                   1e-15 * (abs_dy_x[c] + std::fabs(mean) * abs_dy[c])))
            << "dgamma " << c;
      }
      // dx = (k_dy dy + k_x (x - mean)) + k0 with float coefficients that may be 1 ulp apart:
      // |ddx| <= ~4e-7 (|k_dy dy| + |k_x| (|x| + |mean|) + |k0|); 1e-6 for margin.
      int64_t bad = 0;
      for (int64_t i = 0; i < n && bad < 5; ++i) {
        const int64_t c = ChannelOf(s, i);
        const double k_dy = static_cast<double>(in.gamma[c]) * saved_inv_std[c];
        const double k_x = k_dy * saved_inv_std[c] * dgamma_cpu[c] / count;
        const double k0 = k_dy * dbeta_cpu[c] / count;
        const double tol = 1e-6 * (std::fabs(k_dy * dy_effective[i]) +
                                   std::fabs(k_x) * (std::fabs(in.x[i]) + std::fabs(saved_mean[c])) +
                                   std::fabs(k0)) +
                           1e-30;
        if (!(std::fabs(gpu.dx[i] - dx_cpu[i]) <= tol)) {
          ++bad;
          ADD_FAILURE() << "dx[" << i << "]: cpu " << dx_cpu[i] << " gpu " << gpu.dx[i];
        }
      }
    }
  }
}

TEST_F(BatchNormGpuTest, BackwardMayRunInPlace) {
  const BatchNormShape s = MakeShape(4, 3, 50);
  const int64_t n = s.batch * s.channels * s.spatial;
  const Inputs in = MakeInputs(s, 61);
  const std::vector<float> saved_mean = RandomVector(s.channels, 62, 2.0f, 4.0f);
  const std::vector<float> saved_inv_std = RandomVector(s.channels, 63, 0.5f, 2.0f);
  const Grads separate = GpuBackward(s, in, saved_mean, saved_inv_std, {});
  auto x = Upload(in.x);
  auto dy = Upload(in.dy);  // becomes dx
  auto gamma = Upload(in.gamma);
  auto sm = Upload(saved_mean);
  auto si = Upload(saved_inv_std);
  auto dgamma = Poisoned(s.channels);
  auto dbeta = Poisoned(s.channels);
  auto ws = Workspace(BatchNormWorkspaceBytes(s));
  ASSERT_THAT(cuda::BatchNormBackward(ctx_, s, x.data(), dy.data(), gamma.data(), sm.data(),
                                      si.data(), dy.data(), dgamma.data(), dbeta.data(), ws.data()),
              IsOk());
  Sync();
  ExpectBitsEqual(separate.dx, Download(dy), "in-place dx");
  ExpectBitsEqual(separate.dgamma, Download(dgamma), "dgamma");
  ASSERT_EQ(n, static_cast<int64_t>(separate.dx.size()));
}

TEST_F(BatchNormGpuTest, TrainingIsDeterministic) {
  const BatchNormShape s = MakeShape(128, 4, 4096);
  const Inputs in = MakeInputs(s, 71);
  for (BatchNormActivation activation : {BatchNormActivation::kNone, BatchNormActivation::kRelu}) {
    const Outputs first = GpuTrain(s, BatchNormOptions{}, in, activation);
    const Outputs second = GpuTrain(s, BatchNormOptions{}, in, activation);
    ExpectBitsEqual(first.y, second.y, "y");
    ExpectBitsEqual(first.saved_mean, second.saved_mean, "saved_mean");
    ExpectBitsEqual(first.saved_inv_std, second.saved_inv_std, "saved_inv_std");
    ExpectBitsEqual(first.running_var, second.running_var, "running_var");
    const std::vector<float> relu_y =
        activation == BatchNormActivation::kRelu ? first.y : std::vector<float>();
    const Grads g1 = GpuBackward(s, in, first.saved_mean, first.saved_inv_std, relu_y);
    const Grads g2 = GpuBackward(s, in, first.saved_mean, first.saved_inv_std, relu_y);
    ExpectBitsEqual(g1.dx, g2.dx, "dx");
    ExpectBitsEqual(g1.dgamma, g2.dgamma, "dgamma");
    ExpectBitsEqual(g1.dbeta, g2.dbeta, "dbeta");
  }
}

TEST(BatchNormArgumentsTest, WorkspaceSizesAndBadArguments) {
  EXPECT_EQ(BatchNormWorkspaceBytes(MakeShape(0, 3, 4)), 0u);
  // One 16-byte partial per channel (short channels), C doubles, 3 C floats, each 16-aligned.
  EXPECT_EQ(BatchNormWorkspaceBytes(MakeShape(2, 3, 5)), 48u + 32u + 48u);
  // Long channels get SegmentSplit(N * spatial) partials each.
  const BatchNormShape big = MakeShape(128, 4, 4096);
  EXPECT_EQ(BatchNormWorkspaceBytes(big),
            4u * SegmentSplit(128 * 4096) * 16u + AlignUp(4 * 8) + AlignUp(12 * 4));
  const CudaContext ctx;
  float v = 0.0f;
  alignas(16) unsigned char ws[16];
  EXPECT_THAT(cuda::BatchNormTrainForward(ctx, MakeShape(0, 1, 1), BatchNormOptions{}, &v, &v, &v,
                                          &v, &v, &v, &v, &v, ws),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("batch")));
  EXPECT_THAT(cuda::BatchNormTrainForward(ctx, MakeShape(1, 1, 1), BatchNormOptions{}, &v, &v, &v,
                                          &v, &v, &v, nullptr, &v, ws),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("running_mean")));
  EXPECT_THAT(cuda::BatchNormBackward(ctx, MakeShape(1, 1, 1), &v, &v, &v, &v, &v, &v, &v, &v,
                                      nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("workspace")));
  EXPECT_THAT(cuda::BatchNormReluBackward(ctx, MakeShape(1, 1, 1), &v, nullptr, &v, &v, &v, &v,
                                          &v, &v, &v, ws),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("y is null")));
}

}  // namespace
}  // namespace qtrain::kernels::cuda
