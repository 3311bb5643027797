#include "worker/nn/loss.h"

#include "absl/strings/str_cat.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {

absl::StatusOr<kernels::SoftmaxXentResult> SoftmaxCrossEntropyLoss(const RunContext& ctx,
                                                                   const Tensor& logits,
                                                                   std::span<const int32_t> labels,
                                                                   Tensor* dlogits) {
  if (logits.rank() != 2 || logits.dim(0) < 1 || logits.dim(1) < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("softmax cross-entropy: logits must be [N>=1, classes>=1], got ",
                     ShapeToString(logits.shape())));
  }
  if (static_cast<int64_t>(labels.size()) != logits.dim(0)) {
    return absl::InvalidArgumentError(absl::StrCat("softmax cross-entropy: ", labels.size(),
                                                   " labels for logits ",
                                                   ShapeToString(logits.shape())));
  }
  float* grad = nullptr;
  if (dlogits != nullptr) {
    internal::EnsureShape(dlogits, {logits.dim(0), logits.dim(1)});
    grad = dlogits->data();
  }
  return kernels::SoftmaxCrossEntropy(ctx.cpu, logits.dim(0), logits.dim(1), logits.data(),
                                      labels.data(), grad);
}

}  // namespace qtrain::nn
