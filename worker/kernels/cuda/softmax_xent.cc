// Host side of the CUDA softmax cross-entropy: turning the device result into the CPU kernel's
// result or Status.
#include "worker/kernels/cuda/softmax_xent.h"

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/cuda/cuda_util.h"

namespace qtrain::kernels::cuda {

absl::StatusOr<SoftmaxXentResult> SoftmaxXentResultFromDevice(const SoftmaxXentDeviceResult& r,
                                                              int64_t classes) {
  if (r.bad_row >= 0) {
    // The CPU kernel's message, word for word.
    return absl::InvalidArgumentError(absl::StrCat("label ", r.bad_label, " of row ", r.bad_row,
                                                   " is outside [0, ", classes, ")"));
  }
  SoftmaxXentResult result;
  result.mean_loss = r.mean_loss;
  result.correct = r.correct;
  return result;
}

absl::StatusOr<SoftmaxXentResult> FetchSoftmaxXentResult(const CudaContext& ctx,
                                                         const SoftmaxXentDeviceResult* result,
                                                         int64_t classes) {
  if (result == nullptr) {
    return absl::InvalidArgumentError("FetchSoftmaxXentResult: result is null");
  }
  SoftmaxXentDeviceResult host;
  QTRAIN_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&host, result, sizeof(host), cudaMemcpyDeviceToHost, ctx.stream));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(ctx.stream));
  return SoftmaxXentResultFromDevice(host, classes);
}

}  // namespace qtrain::kernels::cuda
