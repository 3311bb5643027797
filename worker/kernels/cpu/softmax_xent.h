// Softmax cross-entropy over a batch of logits: the classification loss, its gradient with
// respect to the logits, and the number of rows whose arg-max is the label.
//
//   p_ij   = exp(z_ij - max_j z_ij) / sum_j exp(z_ij - max_j z_ij)     (stable: shifts by the max)
//   loss   = mean_i ( log sum_j exp(z_ij - m_i) + m_i - z_i,label_i )
//   dz_ij  = (p_ij - [j == label_i]) / batch                           (gradient of the mean loss)
//   correct = #{ i : first arg-max of row i == label_i }
//
// Labels come from data files, so they are checked: a label outside [0, classes) is
// INVALID_ARGUMENT and nothing is written. Rows are split over ctx.pool; the loss is summed in
// double per chunk and the chunks combined in order (deterministic for a given thread count).
// Thread-safe. Cost: ~3 passes over batch * classes floats, one exp per logit.
#ifndef QTRAIN_WORKER_KERNELS_CPU_SOFTMAX_XENT_H_
#define QTRAIN_WORKER_KERNELS_CPU_SOFTMAX_XENT_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "worker/kernels/cpu/cpu_context.h"

namespace qtrain::kernels {

struct SoftmaxXentResult {
  double mean_loss = 0.0;
  int64_t correct = 0;
};

// logits: batch x classes, row-major. labels: batch entries. dlogits: batch x classes, or nullptr
// to skip the gradient (evaluation). batch >= 1 and classes >= 1, else INVALID_ARGUMENT.
absl::StatusOr<SoftmaxXentResult> SoftmaxCrossEntropy(const CpuContext& ctx, int64_t batch,
                                                      int64_t classes, const float* logits,
                                                      const int32_t* labels, float* dlogits);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_SOFTMAX_XENT_H_
