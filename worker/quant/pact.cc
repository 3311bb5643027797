#include "worker/quant/pact.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/quant/lane_sum.h"

namespace qtrain::quant {

PactActivationQuantizer::PactActivationQuantizer(std::string name, const PactOptions& options)
    : ActivationQuantizer(std::move(name)), options_(options) {
  QTRAIN_CHECK(options.bits >= 1 && options.bits <= 8) << "pact bits " << options.bits;
  QTRAIN_CHECK(options.alpha_init > 0.0f) << "pact alpha_init " << options.alpha_init;
  QTRAIN_CHECK(options.l2 >= 0.0f) << "pact l2 " << options.l2;
  alpha_.name = "alpha";
  alpha_.kind = nn::ParamKind::kQuantizer;
  alpha_.value = nn::Tensor({1}, {options.alpha_init});
  alpha_.grad = nn::Tensor({1});
}

std::string PactActivationQuantizer::Describe() const {
  return absl::StrCat("pact ", options_.bits, "-bit alpha=", alpha_.value[0]);
}

float PactActivationQuantizer::EffectiveAlpha() const {
  return std::max(alpha_.value[0], kMinAlpha);
}

double PactActivationQuantizer::LossPenalty() const {
  const double a = alpha_.value[0];
  return 0.5 * options_.l2 * a * a;
}

std::vector<float> PactActivationQuantizer::Levels() const {
  const int n = (1 << options_.bits) - 1;
  const float alpha = EffectiveAlpha();
  std::vector<float> levels;
  for (int j = 0; j <= n; ++j)
    levels.push_back(RoundNonNegative(static_cast<float>(j)) * (alpha / n));
  return levels;
}

void PactActivationQuantizer::Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) {
  QTRAIN_CHECK(y != &x) << "'" << name() << "': cannot run in place";
  if (y->shape() != x.shape()) y->Resize(x.shape());
  const float alpha = EffectiveAlpha();
  const float n = NumSteps(options_.bits);
  const float to_grid = n / alpha;
  const float step = alpha / n;
  const bool discretize = options_.discretize == Discretize::kOn;
  const float* src = x.data();
  float* dst = y->data();
  ParallelRange(ctx.cpu, x.size(), [=](int64_t begin, int64_t end) {
    if (discretize) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = RoundNonNegative(std::clamp(src[i], 0.0f, alpha) * to_grid) * step;
      }
    } else {
      for (int64_t i = begin; i < end; ++i) dst[i] = std::clamp(src[i], 0.0f, alpha);
    }
  });
  input_ = &x;
}

void PactActivationQuantizer::Backward(nn::RunContext& ctx, const nn::Tensor& dy, nn::Tensor* dx) {
  QTRAIN_CHECK(input_ != nullptr) << "'" << name() << "': Backward before Forward";
  const float alpha = EffectiveAlpha();
  const float* src = input_->data();
  const float* g = dy.data();
  const bool want_dx = PrepareBackward(input_, dy, dx);
  // dalpha first: dx may alias dy.
  const auto sums = ChunkedSums<1>(ctx.cpu, dy.size(), [&](int64_t begin, int64_t end, auto& acc) {
    acc[0] += LaneSum(begin, end, [=](int64_t i) {
      const float gi = g[i];
      return src[i] >= alpha ? gi : 0.0f;
    });
  });
  // Below kMinAlpha the clamp makes the output independent of the stored alpha except through
  // the penalty.
  const double data_grad = alpha_.value[0] >= kMinAlpha ? sums[0] : 0.0;
  alpha_.grad[0] =
      static_cast<float>(data_grad + static_cast<double>(options_.l2) * alpha_.value[0]);
  if (!want_dx) return;
  float* out = dx->data();
  ParallelRange(ctx.cpu, dy.size(), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // Unconditional loads and '&' instead of '&&': a select, no branch, so it vectorizes.
      const float v = src[i], gi = g[i];
      out[i] = ((v >= 0.0f) & (v < alpha)) ? gi : 0.0f;
    }
  });
}

void PactActivationQuantizer::CollectParameters(std::vector<nn::Parameter*>* out) {
  out->push_back(&alpha_);
}

}  // namespace qtrain::quant
