// Softmax cross-entropy over a batch of device logits: the CUDA counterpart of
// kernels/cpu/softmax_xent.h, with the same math and tie rules:
//
//   loss    = mean_i ( log sum_j exp(z_ij - m_i) + m_i - z_i,label_i ),  m_i = max_j z_ij
//   dz_ij   = (p_ij - [j == label_i]) / batch     (double arithmetic, rounded to float)
//   correct = #{ i : first arg-max of row i == label_i }   (strictly-greater scan from j = 0:
//             NaNs never win except a NaN at j = 0, as on the CPU)
//
// One warp per row computes its loss and gradient in one kernel; a one-block pass then sums the
// row losses in a fixed tree (deterministic run to run; differs from the CPU's order by ~1e-16
// relative) and writes a SoftmaxXentDeviceResult. Nothing comes back to the host: read the result
// outside the captured step with FetchSoftmaxXentResult.
//
// Labels are checked on the device: a label outside [0, classes) marks its row bad, the row's
// dlogits are written as 0, and the result records the FIRST bad row and its label (mean_loss is
// NaN and correct 0 then). FetchSoftmaxXentResult / SoftmaxXentResultFromDevice turn that into the
// CPU kernel's INVALID_ARGUMENT Status, same message. (The CPU writes nothing for a bad batch; a
// kernel cannot know before it runs, so the GPU writes zeros for the bad rows instead.)
//
// Asynchronous on ctx.stream, no synchronization, no allocation. Cost: one pass over the logits
// (two exp per logit when dlogits is requested, one otherwise) plus a one-block pass over batch.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_SOFTMAX_XENT_H_
#define QTRAIN_WORKER_KERNELS_CUDA_SOFTMAX_XENT_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/kernels/cpu/softmax_xent.h"
#include "worker/kernels/cuda/cuda_context.h"

namespace qtrain::kernels::cuda {

// What SoftmaxCrossEntropy writes to the device (32 bytes, natural alignment).
struct SoftmaxXentDeviceResult {
  double mean_loss;   // NaN when a label is bad
  int64_t correct;    // rows whose first arg-max equals the label
  int64_t bad_row;    // first row with a label outside [0, classes); -1 when all are valid
  int32_t bad_label;  // labels[bad_row] (0 when bad_row == -1)
  int32_t reserved;
};
static_assert(sizeof(SoftmaxXentDeviceResult) == 32);

// Device scratch bytes for SoftmaxCrossEntropy over `batch` rows (a double and an int32 per row).
size_t SoftmaxXentWorkspaceBytes(int64_t batch);

// logits: batch x classes, row-major; labels: batch. dlogits: batch x classes, or nullptr to skip
// the gradient (evaluation). result: one device SoftmaxXentDeviceResult. INVALID_ARGUMENT (before
// anything is enqueued) for batch < 1, classes < 1, a null pointer or a bad workspace.
absl::Status SoftmaxCrossEntropy(const CudaContext& ctx, int64_t batch, int64_t classes,
                                 const float* logits, const int32_t* labels, float* dlogits,
                                 SoftmaxXentDeviceResult* result, void* workspace);

// The CPU kernel's result (or its INVALID_ARGUMENT for a bad label) from a host copy of the
// device result. Pure host code.
absl::StatusOr<SoftmaxXentResult> SoftmaxXentResultFromDevice(const SoftmaxXentDeviceResult& r,
                                                              int64_t classes);

// Copies the device result to the host on ctx.stream, waits for the stream, and converts it.
// Synchronizes: call it outside a captured step.
absl::StatusOr<SoftmaxXentResult> FetchSoftmaxXentResult(const CudaContext& ctx,
                                                         const SoftmaxXentDeviceResult* result,
                                                         int64_t classes);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_SOFTMAX_XENT_H_
