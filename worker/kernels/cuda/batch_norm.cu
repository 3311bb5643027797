#include <cmath>
#include <cstdint>

#include "common/status_macros.h"
#include "worker/kernels/cuda/batch_norm.h"
#include "worker/kernels/cuda/kernel_util.cuh"
#include "worker/kernels/cuda/launch_util.h"

namespace qtrain::kernels::cuda {
namespace {

// Workspace: [segment partials (16-byte accumulators)][C doubles][3 C floats].
struct Layout {
  size_t partial_bytes;
  size_t doubles_offset;
  size_t floats_offset;
  size_t total;
};

Layout MakeLayout(const BatchNormShape& s) {
  Layout l;
  l.partial_bytes = SegmentPartialBytes(s.channels, s.batch * s.spatial, sizeof(detail::Sum2));
  l.doubles_offset = l.partial_bytes;
  l.floats_offset = l.doubles_offset + AlignUp(static_cast<size_t>(s.channels) * sizeof(double));
  l.total = l.floats_offset + AlignUp(3 * static_cast<size_t>(s.channels) * sizeof(float));
  return l;
}

template <class T>
T* At(void* workspace, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
}

// Element j in [0, N * spatial) of channel c.
struct ChannelIndex {
  int64_t channels;
  int64_t spatial;
  __device__ int64_t operator()(int64_t c, int64_t j) const {
    const int64_t n = j / spatial;
    return (n * channels + c) * spatial + (j - n * spatial);
  }
};

__device__ __forceinline__ float MaybeRelu(float v, BatchNormActivation activation) {
  return activation == BatchNormActivation::kRelu ? (v > 0.0f ? v : 0.0f) : v;
}

// Pass 1 of the training forward: mean_c = sum x / count (double, kept in the workspace).
struct MeanOp {
  using Acc = detail::Sum1;
  ChannelIndex index;
  const float* x;
  double count;
  double* mean;
  __device__ Acc Identity() const { return {0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t c, int64_t j) const { acc.s += x[index(c, j)]; }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s + b.s}; }
  __device__ void Finish(int64_t c, const Acc& total) const { mean[c] = total.s / count; }
};

// Pass 2: sum (x - mean)^2, then every per-channel output (the CPU's expressions, in order).
struct VarianceOp {
  using Acc = detail::Sum1;
  ChannelIndex index;
  const float* x;
  int64_t count;
  BatchNormOptions options;
  const float* gamma;
  const double* mean;
  float* saved_mean;
  float* saved_inv_std;
  float* running_mean;
  float* running_var;
  float* scale;
  __device__ Acc Identity() const { return {0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t c, int64_t j) const {
    const double d = static_cast<double>(x[index(c, j)]) - mean[c];
    acc.s += d * d;
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s + b.s}; }
  __device__ void Finish(int64_t c, const Acc& total) const {
    const double squared = total.s;
    const double m_c = mean[c];
    const double var = squared / static_cast<double>(count);
    const double inv_std = 1.0 / sqrt(var + static_cast<double>(options.epsilon));
    saved_mean[c] = static_cast<float>(m_c);
    saved_inv_std[c] = static_cast<float>(inv_std);
    scale[c] = static_cast<float>(static_cast<double>(gamma[c]) * inv_std);
    const double unbiased = count > 1 ? squared / static_cast<double>(count - 1) : var;
    const double m = options.momentum;
    running_mean[c] =
        static_cast<float>((1.0 - m) * static_cast<double>(running_mean[c]) + m * m_c);
    running_var[c] =
        static_cast<float>((1.0 - m) * static_cast<double>(running_var[c]) + m * unbiased);
  }
};

// Pass 3: y = (x - mean_f) * scale + beta (+ ReLU).
struct NormalizeFn {
  int64_t channels;
  int64_t spatial;
  const float* x;
  const float* saved_mean;
  const float* scale;
  const float* beta;
  BatchNormActivation activation;
  float* y;
  __device__ void operator()(int64_t i) const {
    const int64_t c = (i / spatial) % channels;
    y[i] = MaybeRelu((x[i] - saved_mean[c]) * scale[c] + beta[c], activation);
  }
};

struct EvalFn {
  int64_t channels;
  int64_t spatial;
  float epsilon;
  const float* x;
  const float* gamma;
  const float* beta;
  const float* running_mean;
  const float* running_var;
  BatchNormActivation activation;
  float* y;
  __device__ void operator()(int64_t i) const {
    const int64_t c = (i / spatial) % channels;
    const double inv_std =
        1.0 / sqrt(static_cast<double>(running_var[c]) + static_cast<double>(epsilon));
    const float scale = static_cast<float>(static_cast<double>(gamma[c]) * inv_std);
    y[i] = MaybeRelu((x[i] - running_mean[c]) * scale + beta[c], activation);
  }
};

// dy, masked by the fused ReLU's output when relu_y is non-null.
__device__ __forceinline__ float MaskedDy(const float* dy, const float* relu_y, int64_t i) {
  const float g = dy[i];
  return relu_y == nullptr ? g : (relu_y[i] > 0.0f ? g : 0.0f);
}

// Backward pass 1: sum dy and sum dy * x, then dgamma, dbeta and the dx coefficients.
struct BackwardSumsOp {
  using Acc = detail::Sum2;
  ChannelIndex index;
  const float* x;
  const float* dy;
  const float* relu_y;
  int64_t count;
  const float* gamma;
  const float* saved_mean;
  const float* saved_inv_std;
  float* dgamma;
  float* dbeta;
  float* coefficients;  // k_dy[C], k_x[C], k0[C]
  int64_t channels;
  __device__ Acc Identity() const { return {0.0, 0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t c, int64_t j) const {
    const int64_t i = index(c, j);
    const double g = MaskedDy(dy, relu_y, i);
    acc.s0 += g;
    acc.s1 += g * static_cast<double>(x[i]);
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s0 + b.s0, a.s1 + b.s1}; }
  __device__ void Finish(int64_t c, const Acc& total) const {
    const double sum_dy = total.s0;
    const double sum_dy_x = total.s1;
    const double mean = saved_mean[c];
    const double inv_std = saved_inv_std[c];
    const double dgamma_c = inv_std * (sum_dy_x - mean * sum_dy);
    dgamma[c] = static_cast<float>(dgamma_c);
    dbeta[c] = static_cast<float>(sum_dy);
    const double k_dy = static_cast<double>(gamma[c]) * inv_std;
    const double k_x = -k_dy * inv_std * dgamma_c / static_cast<double>(count);
    const double k0 = -k_dy * sum_dy / static_cast<double>(count);
    coefficients[c] = static_cast<float>(k_dy);
    coefficients[channels + c] = static_cast<float>(k_x);
    coefficients[2 * channels + c] = static_cast<float>(k0);
  }
};

struct BackwardDxFn {
  int64_t channels;
  int64_t spatial;
  const float* x;
  const float* dy;
  const float* relu_y;
  const float* saved_mean;
  const float* coefficients;
  float* dx;
  __device__ void operator()(int64_t i) const {
    const int64_t c = (i / spatial) % channels;
    const float k_dy = coefficients[c];
    const float k_x = coefficients[channels + c];
    const float k0 = coefficients[2 * channels + c];
    const float g = MaskedDy(dy, relu_y, i);
    dx[i] = (k_dy * g + k_x * (x[i] - saved_mean[c])) + k0;
  }
};

absl::Status CheckShape(const char* what, const BatchNormShape& s) {
  RETURN_IF_ERROR(CheckAtLeast(what, "batch", s.batch, 1));
  RETURN_IF_ERROR(CheckAtLeast(what, "channels", s.channels, 1));
  RETURN_IF_ERROR(CheckAtLeast(what, "spatial", s.spatial, 1));
  return absl::OkStatus();
}

absl::Status Backward(const char* what, const CudaContext& ctx, const BatchNormShape& s,
                      const float* x, const float* relu_y, const float* dy, const float* gamma,
                      const float* saved_mean, const float* saved_inv_std, float* dx, float* dgamma,
                      float* dbeta, void* workspace) {
  RETURN_IF_ERROR(CheckShape(what, s));
  RETURN_IF_ERROR(CheckNotNull(what, {{"x", x},
                                      {"dy", dy},
                                      {"gamma", gamma},
                                      {"saved_mean", saved_mean},
                                      {"saved_inv_std", saved_inv_std},
                                      {"dx", dx},
                                      {"dgamma", dgamma},
                                      {"dbeta", dbeta}}));
  RETURN_IF_ERROR(CheckWorkspace(what, workspace));
  const Layout layout = MakeLayout(s);
  float* coefficients = At<float>(workspace, layout.floats_offset);
  const int64_t count = s.batch * s.spatial;
  const ChannelIndex index{s.channels, s.spatial};
  RETURN_IF_ERROR(detail::LaunchSegmentedReduce(
      ctx, what, s.channels, count,
      BackwardSumsOp{index, x, dy, relu_y, count, gamma, saved_mean, saved_inv_std, dgamma, dbeta,
                     coefficients, s.channels},
      workspace));
  return detail::LaunchMap(
      ctx, what, s.batch * s.channels * s.spatial,
      BackwardDxFn{s.channels, s.spatial, x, dy, relu_y, saved_mean, coefficients, dx});
}

}  // namespace

size_t BatchNormWorkspaceBytes(const BatchNormShape& shape) {
  if (shape.batch < 1 || shape.channels < 1 || shape.spatial < 1) return 0;
  return MakeLayout(shape).total;
}

absl::Status BatchNormTrainForward(const CudaContext& ctx, const BatchNormShape& s,
                                   const BatchNormOptions& options, const float* x,
                                   const float* gamma, const float* beta, float* y,
                                   float* saved_mean, float* saved_inv_std, float* running_mean,
                                   float* running_var, void* workspace,
                                   BatchNormActivation activation) {
  constexpr const char* kWhat = "cuda BatchNormTrainForward";
  RETURN_IF_ERROR(CheckShape(kWhat, s));
  RETURN_IF_ERROR(CheckNotNull(kWhat, {{"x", x},
                                       {"gamma", gamma},
                                       {"beta", beta},
                                       {"y", y},
                                       {"saved_mean", saved_mean},
                                       {"saved_inv_std", saved_inv_std},
                                       {"running_mean", running_mean},
                                       {"running_var", running_var}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  const Layout layout = MakeLayout(s);
  double* mean = At<double>(workspace, layout.doubles_offset);
  float* scale = At<float>(workspace, layout.floats_offset);
  const int64_t count = s.batch * s.spatial;
  const ChannelIndex index{s.channels, s.spatial};
  RETURN_IF_ERROR(detail::LaunchSegmentedReduce(ctx, kWhat, s.channels, count,
                                                MeanOp{index, x, static_cast<double>(count), mean},
                                                workspace));
  RETURN_IF_ERROR(
      detail::LaunchSegmentedReduce(ctx, kWhat, s.channels, count,
                                    VarianceOp{index, x, count, options, gamma, mean, saved_mean,
                                               saved_inv_std, running_mean, running_var, scale},
                                    workspace));
  return detail::LaunchMap(
      ctx, kWhat, s.batch * s.channels * s.spatial,
      NormalizeFn{s.channels, s.spatial, x, saved_mean, scale, beta, activation, y});
}

absl::Status BatchNormEvalForward(const CudaContext& ctx, const BatchNormShape& s,
                                  const BatchNormOptions& options, const float* x,
                                  const float* gamma, const float* beta, const float* running_mean,
                                  const float* running_var, float* y,
                                  BatchNormActivation activation) {
  constexpr const char* kWhat = "cuda BatchNormEvalForward";
  RETURN_IF_ERROR(CheckShape(kWhat, s));
  RETURN_IF_ERROR(CheckNotNull(kWhat, {{"x", x},
                                       {"gamma", gamma},
                                       {"beta", beta},
                                       {"running_mean", running_mean},
                                       {"running_var", running_var},
                                       {"y", y}}));
  return detail::LaunchMap(ctx, kWhat, s.batch * s.channels * s.spatial,
                           EvalFn{s.channels, s.spatial, options.epsilon, x, gamma, beta,
                                  running_mean, running_var, activation, y});
}

absl::Status BatchNormBackward(const CudaContext& ctx, const BatchNormShape& shape, const float* x,
                               const float* dy, const float* gamma, const float* saved_mean,
                               const float* saved_inv_std, float* dx, float* dgamma, float* dbeta,
                               void* workspace) {
  return Backward("cuda BatchNormBackward", ctx, shape, x, nullptr, dy, gamma, saved_mean,
                  saved_inv_std, dx, dgamma, dbeta, workspace);
}

absl::Status BatchNormReluBackward(const CudaContext& ctx, const BatchNormShape& shape,
                                   const float* x, const float* y, const float* dy,
                                   const float* gamma, const float* saved_mean,
                                   const float* saved_inv_std, float* dx, float* dgamma,
                                   float* dbeta, void* workspace) {
  constexpr const char* kWhat = "cuda BatchNormReluBackward";
  RETURN_IF_ERROR(CheckNotNull(kWhat, {{"y", y}}));
  return Backward(kWhat, ctx, shape, x, y, dy, gamma, saved_mean, saved_inv_std, dx, dgamma, dbeta,
                  workspace);
}

}  // namespace qtrain::kernels::cuda
