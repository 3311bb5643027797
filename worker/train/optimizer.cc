#include "worker/train/optimizer.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "worker/kernels/cpu/thread_pool.h"

namespace qtrain::train {

absl::Status ValidateSgdOptions(const SgdOptions& o) {
  if (!(o.momentum >= 0 && o.momentum < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("momentum must be in [0, 1), got ", o.momentum));
  }
  if (!(o.weight_decay >= 0) || !std::isfinite(o.weight_decay)) {
    return absl::InvalidArgumentError(
        absl::StrCat("weight decay must be finite and >= 0, got ", o.weight_decay));
  }
  if (!(o.quantizer_lr_scale >= 0) || !std::isfinite(o.quantizer_lr_scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("quantizer lr scale must be finite and >= 0, got ", o.quantizer_lr_scale));
  }
  if (o.nesterov && o.momentum == 0) {
    return absl::InvalidArgumentError("nesterov needs momentum > 0");
  }
  return absl::OkStatus();
}

Sgd::Sgd(std::vector<nn::Parameter*> params, const SgdOptions& options)
    : params_(std::move(params)), options_(options) {
  momentum_.reserve(params_.size());
  for (nn::Parameter* p : params_) momentum_.emplace_back(p->value.shape());
}

void Sgd::Step(const kernels::CpuContext& ctx, float lr) {
  const float mu = options_.momentum;
  for (size_t k = 0; k < params_.size(); ++k) {
    nn::Parameter& p = *params_[k];
    const float wd = p.kind == nn::ParamKind::kWeight ? options_.weight_decay : 0.0f;
    const float step = p.kind == nn::ParamKind::kQuantizer
                           ? lr * p.lr_scale * options_.quantizer_lr_scale
                           : lr * p.lr_scale;
    float* w = p.value.data();
    const float* g = p.grad.data();
    float* v = momentum_[k].data();
    const bool nesterov = options_.nesterov;
    kernels::ParallelFor(ctx.pool, p.value.size(), 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float gi = g[i] + wd * w[i];
        const float vi = mu * v[i] + gi;
        v[i] = vi;
        w[i] -= step * (nesterov ? gi + mu * vi : vi);
      }
    });
  }
}

}  // namespace qtrain::train
