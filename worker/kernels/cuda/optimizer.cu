#include <cstdint>

#include "common/status_macros.h"
#include "worker/kernels/cuda/kernel_util.cuh"
#include "worker/kernels/cuda/launch_util.h"
#include "worker/kernels/cuda/optimizer.h"

namespace qtrain::kernels::cuda {
namespace {

// train::Sgd::Step's loop body, in its order.
__device__ __forceinline__ void Update(const SgdTensor& t, float step, float mu, bool nesterov,
                                       int64_t i) {
  const float w = t.param[i];
  const float gi = t.grad[i] + t.weight_decay * w;
  const float vi = mu * t.momentum[i] + gi;
  t.momentum[i] = vi;
  t.param[i] = w - step * (nesterov ? gi + mu * vi : vi);
}

__device__ __forceinline__ float Step(const float* lr, const SgdTensor& t) {
  return (*lr * t.lr_scale) * t.group_lr_scale;
}

struct SingleFn {
  SgdTensor tensor;
  SgdStepOptions options;
  const float* lr;
  __device__ void operator()(int64_t i) const {
    Update(tensor, Step(lr, tensor), options.momentum, options.nesterov, i);
  }
};

__global__ void __launch_bounds__(kThreads)
    MultiTensorKernel(SgdStepOptions options, const float* __restrict__ lr,
                      const SgdTensor* __restrict__ tensors, const SgdChunk* __restrict__ chunks) {
  const SgdChunk chunk = chunks[blockIdx.x];
  const SgdTensor tensor = tensors[chunk.tensor];
  const float step = Step(lr, tensor);
  for (int64_t i = chunk.begin + threadIdx.x; i < chunk.end; i += kThreads) {
    Update(tensor, step, options.momentum, options.nesterov, i);
  }
}

}  // namespace

absl::Status SgdStep(const CudaContext& ctx, const SgdStepOptions& options, const float* lr,
                     const SgdTensor& tensor) {
  constexpr const char* kWhat = "cuda SgdStep";
  RETURN_IF_ERROR(ValidateSgdStepOptions(options));
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "size", tensor.size, 0));
  if (tensor.size > 0) {
    RETURN_IF_ERROR(CheckNotNull(kWhat, {{"lr", lr},
                                         {"param", tensor.param},
                                         {"grad", tensor.grad},
                                         {"momentum", tensor.momentum}}));
  }
  return detail::LaunchMap(ctx, kWhat, tensor.size, SingleFn{tensor, options, lr});
}

absl::Status SgdStepMultiTensor(const CudaContext& ctx, const SgdStepOptions& options,
                                const float* lr, const SgdTensor* tensors, const SgdChunk* chunks,
                                int64_t num_chunks) {
  constexpr const char* kWhat = "cuda SgdStepMultiTensor";
  RETURN_IF_ERROR(ValidateSgdStepOptions(options));
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "num_chunks", num_chunks, 0));
  if (num_chunks > 0) {
    RETURN_IF_ERROR(CheckNotNull(kWhat, {{"lr", lr}, {"tensors", tensors}, {"chunks", chunks}}));
  }
  if (num_chunks > 0x7fffffff) {
    return absl::InvalidArgumentError("cuda SgdStepMultiTensor: too many chunks for one grid");
  }
  if (num_chunks == 0) return absl::OkStatus();
  MultiTensorKernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, ctx.stream>>>(
      options, lr, tensors, chunks);
  return LaunchStatus(kWhat);
}

}  // namespace qtrain::kernels::cuda
