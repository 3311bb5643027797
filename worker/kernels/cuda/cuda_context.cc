#include "worker/kernels/cuda/cuda_context.h"

#include "absl/strings/str_cat.h"
#include "common/cuda/cuda_util.h"

namespace qtrain::kernels::cuda {

absl::Status LaunchStatus(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error == cudaSuccess) return absl::OkStatus();
  return qtrain::cuda::CudaStatus(error, absl::StrCat("launching ", kernel));
}

}  // namespace qtrain::kernels::cuda
