#include "worker/kernels/cpu/softmax_xent.h"

#include <cmath>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace qtrain::kernels {
namespace {

// Rows per chunk before a parallel split is worth it (a row of 10 classes is ~100 ns).
constexpr int64_t kRowGrain = 256;

struct Partial {
  double loss = 0.0;
  int64_t correct = 0;
};

// One row: returns its loss, writes its gradient (scaled by grad_scale) when dz != nullptr.
double Row(int64_t classes, const float* z, int32_t label, float grad_scale, float* dz,
           bool* correct) {
  int64_t argmax = 0;
  float max = z[0];
  for (int64_t j = 1; j < classes; ++j) {
    if (z[j] > max) {
      max = z[j];
      argmax = j;
    }
  }
  *correct = argmax == label;
  double sum = 0.0;
  for (int64_t j = 0; j < classes; ++j) sum += std::exp(static_cast<double>(z[j]) - max);
  const double log_sum = std::log(sum);
  if (dz != nullptr) {
    const double inv_sum = 1.0 / sum;
    for (int64_t j = 0; j < classes; ++j) {
      const double p = std::exp(static_cast<double>(z[j]) - max) * inv_sum;
      dz[j] = static_cast<float>((p - (j == label ? 1.0 : 0.0)) * grad_scale);
    }
  }
  return log_sum + max - z[label];
}

}  // namespace

absl::StatusOr<SoftmaxXentResult> SoftmaxCrossEntropy(const CpuContext& ctx, int64_t batch,
                                                      int64_t classes, const float* logits,
                                                      const int32_t* labels, float* dlogits) {
  if (batch < 1 || classes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("softmax cross-entropy needs batch >= 1 and classes >= 1, got batch=", batch,
                     " classes=", classes));
  }
  for (int64_t i = 0; i < batch; ++i) {
    if (labels[i] < 0 || labels[i] >= classes) {
      return absl::InvalidArgumentError(
          absl::StrCat("label ", labels[i], " of row ", i, " is outside [0, ", classes, ")"));
    }
  }
  const float grad_scale = static_cast<float>(1.0 / static_cast<double>(batch));
  std::vector<Partial> partial(NumChunks(ctx.pool, batch, kRowGrain));
  ParallelForChunks(ctx.pool, batch, kRowGrain, [&](int64_t c, int64_t begin, int64_t end) {
    Partial sum;
    for (int64_t i = begin; i < end; ++i) {
      bool correct = false;
      sum.loss += Row(classes, logits + i * classes, labels[i], grad_scale,
                      dlogits == nullptr ? nullptr : dlogits + i * classes, &correct);
      sum.correct += correct ? 1 : 0;
    }
    partial[c] = sum;
  });
  SoftmaxXentResult result;
  for (const Partial& p : partial) {
    result.mean_loss += p.loss;
    result.correct += p.correct;
  }
  result.mean_loss /= static_cast<double>(batch);
  return result;
}

}  // namespace qtrain::kernels
