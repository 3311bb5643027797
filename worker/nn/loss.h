// The classification loss on a model's logits: mean softmax cross-entropy, its gradient and the
// number of correct arg-max predictions (kernels::SoftmaxCrossEntropy with shape checks).
//
// Thread-safety: stateless. Cost: ~3 passes over the logits.
#ifndef QTRAIN_WORKER_NN_LOSS_H_
#define QTRAIN_WORKER_NN_LOSS_H_

#include <cstdint>
#include <span>

#include "absl/status/statusor.h"
#include "worker/kernels/cpu/softmax_xent.h"
#include "worker/nn/layer.h"
#include "worker/nn/tensor.h"

namespace qtrain::nn {

// logits: [N, classes]; labels: N entries in [0, classes). Writes dlogits (resized to the logits'
// shape; the gradient of the MEAN loss) unless it is null. INVALID_ARGUMENT when the logits are not
// rank 2 with N >= 1, the label count differs from N, or a label is out of range (then nothing is
// written).
absl::StatusOr<kernels::SoftmaxXentResult> SoftmaxCrossEntropyLoss(const RunContext& ctx,
                                                                   const Tensor& logits,
                                                                   std::span<const int32_t> labels,
                                                                   Tensor* dlogits);

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_LOSS_H_
