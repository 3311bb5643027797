#include "common/status_macros.h"
#include "worker/kernels/cuda/activation.h"
#include "worker/kernels/cuda/kernel_util.cuh"
#include "worker/kernels/cuda/launch_util.h"

namespace qtrain::kernels::cuda {
namespace {

struct ReluForwardFn {
  const float* x;
  float* y;
  __device__ void operator()(int64_t i) const {
    const float v = x[i];
    y[i] = v > 0.0f ? v : 0.0f;
  }
};

struct ReluBackwardFn {
  const float* x;
  const float* dy;
  float* dx;
  __device__ void operator()(int64_t i) const { dx[i] = x[i] > 0.0f ? dy[i] : 0.0f; }
};

struct BiasReluFn {
  const float* x;
  const float* bias;
  float* y;
  int64_t channels;
  int64_t spatial;
  __device__ void operator()(int64_t i) const {
    const float v = x[i] + bias[(i / spatial) % channels];
    y[i] = v > 0.0f ? v : 0.0f;
  }
};

}  // namespace

absl::Status ReluForward(const CudaContext& ctx, int64_t n, const float* x, float* y) {
  RETURN_IF_ERROR(CheckAtLeast("cuda ReluForward", "n", n, 0));
  if (n > 0) RETURN_IF_ERROR(CheckNotNull("cuda ReluForward", {{"x", x}, {"y", y}}));
  return detail::LaunchMap(ctx, "cuda ReluForward", n, ReluForwardFn{x, y});
}

absl::Status ReluBackward(const CudaContext& ctx, int64_t n, const float* x, const float* dy,
                          float* dx) {
  RETURN_IF_ERROR(CheckAtLeast("cuda ReluBackward", "n", n, 0));
  if (n > 0) {
    RETURN_IF_ERROR(CheckNotNull("cuda ReluBackward", {{"x", x}, {"dy", dy}, {"dx", dx}}));
  }
  return detail::LaunchMap(ctx, "cuda ReluBackward", n, ReluBackwardFn{x, dy, dx});
}

absl::Status BiasReluForward(const CudaContext& ctx, int64_t batch, int64_t channels,
                             int64_t spatial, const float* x, const float* bias, float* y) {
  constexpr const char* kWhat = "cuda BiasReluForward";
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "batch", batch, 0));
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "channels", channels, 1));
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "spatial", spatial, 1));
  const int64_t n = batch * channels * spatial;
  if (n > 0) RETURN_IF_ERROR(CheckNotNull(kWhat, {{"x", x}, {"bias", bias}, {"y", y}}));
  return detail::LaunchMap(ctx, kWhat, n, BiasReluFn{x, bias, y, channels, spatial});
}

}  // namespace qtrain::kernels::cuda
