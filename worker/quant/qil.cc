#include "worker/quant/qil.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/quant/lane_sum.h"

namespace qtrain::quant {
namespace {

nn::Parameter ScalarParameter(std::string name, float value) {
  nn::Parameter p;
  p.name = std::move(name);
  p.kind = nn::ParamKind::kQuantizer;
  p.lr_scale = kQilLrScale;
  p.value = nn::Tensor({1}, {value});
  p.grad = nn::Tensor({1});
  return p;
}

}  // namespace

QilWeightQuantizer::QilWeightQuantizer(const QilOptions& options) : options_(options) {
  QTRAIN_CHECK(options.bits >= 2 && options.bits <= 8) << "qil weight bits " << options.bits;
  QTRAIN_CHECK(options.gamma_init > 0.0f) << "qil gamma_init " << options.gamma_init;
  c_ = ScalarParameter("wq.c", 0.0f);
  d_ = ScalarParameter("wq.d", 0.0f);  // 0: not yet initialised
  gamma_ = ScalarParameter("wq.gamma", options.gamma_init);
}

std::string QilWeightQuantizer::Describe() const {
  return absl::StrCat("qil ", options_.bits, "-bit c=", c_.value[0], " d=", d_.value[0],
                      " gamma=", gamma_.value[0]);
}

void QilWeightQuantizer::InitializeFrom(const kernels::CpuContext& ctx, const nn::Tensor& w) {
  const float* src = w.data();
  const auto sums = ChunkedSums<1>(ctx, w.size(), [&](int64_t begin, int64_t end, auto& acc) {
    double s = 0.0;
    for (int64_t i = begin; i < end; ++i) s += static_cast<double>(src[i]) * src[i];
    acc[0] += s;
  });
  const double rms = std::sqrt(sums[0] / std::max<int64_t>(w.size(), 1));
  double hi = std::min<double>(MaxAbs(ctx, w.size(), src), 3.0 * rms);
  if (!(hi > 0.0)) hi = 1.0;
  c_.value[0] = static_cast<float>(hi / 2);
  d_.value[0] = static_cast<float>(hi / 2);
}

void QilWeightQuantizer::Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) {
  QTRAIN_CHECK(!w.empty()) << "qil: empty weight";
  if (d_.value[0] == 0.0f) InitializeFrom(ctx.cpu, w);
  if (wq->shape() != w.shape()) wq->Resize(w.shape());
  const float c = c_.value[0];
  const float d = std::max(std::fabs(d_.value[0]), kMinHalfWidth);
  const float gamma = std::max(gamma_.value[0], kMinGamma);
  const float inv_2d = 0.5f / d;
  const float q = static_cast<float>((1 << (options_.bits - 1)) - 1);
  const Discretize discretize = options_.discretize;
  if (log_u_.shape() != w.shape()) log_u_.Resize(w.shape());
  if (u_gamma_.shape() != w.shape()) u_gamma_.Resize(w.shape());
  const float* src = w.data();
  float* dst = wq->data();
  float* log_u = log_u_.data();
  float* u_gamma = u_gamma_.data();
  ParallelRange(ctx.cpu, w.size(), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float a = std::fabs(src[i]);
      const float s = src[i] > 0.0f ? 1.0f : (src[i] < 0.0f ? -1.0f : 0.0f);
      float u = std::clamp((a - c) * inv_2d + 0.5f, 0.0f, 1.0f);
      log_u[i] = 0.0f;
      if (u > 0.0f && u < 1.0f) {
        log_u[i] = std::log(u);
        if (gamma != 1.0f) u = std::exp(gamma * log_u[i]);
      }
      u_gamma[i] = u;
      dst[i] = s * RoundUnit(u, q, discretize);
    }
  });
}

void QilWeightQuantizer::Backward(const nn::RunContext& ctx, const nn::Tensor& w,
                                  const nn::Tensor& dwq, nn::Tensor* dw) {
  QTRAIN_CHECK(dwq.shape() == w.shape()) << "qil: dwq " << nn::ShapeToString(dwq.shape());
  if (dw->shape() != w.shape()) dw->Resize(w.shape());
  const float c = c_.value[0];
  const float d = std::max(std::fabs(d_.value[0]), kMinHalfWidth);
  const float gamma = std::max(gamma_.value[0], kMinGamma);
  const double inv_2d = 0.5 / d;
  QTRAIN_CHECK(log_u_.shape() == w.shape()) << "qil: Backward before Forward";
  const float* src = w.data();
  const float* g = dwq.data();
  const float* log_u_saved = log_u_.data();
  const float* u_gamma_saved = u_gamma_.data();
  float* out = dw->data();
  // One pass: parameter partials are accumulated before out[i] (which may alias g[i]) is written.
  const auto sums = ChunkedSums<3>(ctx.cpu, w.size(), [&](int64_t begin, int64_t end, auto& acc) {
    double dc = 0.0, dd = 0.0, dg = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      const double a = std::fabs(src[i]);
      const double s = src[i] > 0.0f ? 1.0 : (src[i] < 0.0f ? -1.0 : 0.0);
      const double u = (a - c) * inv_2d + 0.5;
      if (u < 0.0 || u > 1.0) {
        out[i] = 0.0f;
        continue;
      }
      const double gi = g[i];
      // slope = d(u^gamma)/du = gamma u^gamma / u, from Forward's u^gamma and ln u; u is kept
      // off 0, where gamma < 1 would make it infinite.
      double slope = 1.0;
      const double log_u = log_u_saved[i];
      const double u_gamma = u_gamma_saved[i];
      if (gamma != 1.0f) {
        const double uc = std::max(u, 1e-6);
        slope = u > 0.0 && u < 1.0 ? gamma * u_gamma / uc : gamma * std::pow(uc, gamma - 1.0);
      }
      if (u > 0.0 && u < 1.0) dg += gi * s * u_gamma * log_u;
      dc += gi * s * slope * -inv_2d;
      dd += gi * s * slope * (-(a - c) * inv_2d / d);
      out[i] = static_cast<float>(gi * slope * inv_2d);
    }
    acc[0] += dc;
    acc[1] += dd;
    acc[2] += dg;
  });
  c_.grad[0] = static_cast<float>(sums[0]);
  // d is used as |d| clamped; the gradient is with respect to the stored value.
  d_.grad[0] = std::fabs(d_.value[0]) >= kMinHalfWidth
                   ? static_cast<float>(d_.value[0] >= 0.0f ? sums[1] : -sums[1])
                   : 0.0f;
  gamma_.grad[0] = gamma_.value[0] >= kMinGamma ? static_cast<float>(sums[2]) : 0.0f;
}

void QilWeightQuantizer::CollectParameters(std::vector<nn::Parameter*>* out) {
  out->push_back(&c_);
  out->push_back(&d_);
  out->push_back(&gamma_);
}

std::vector<float> QilWeightQuantizer::Levels() const {
  const int q = (1 << (options_.bits - 1)) - 1;
  std::vector<float> levels;
  // Computed as Forward does: s * (round(.) / q).
  for (int j = -q; j <= q; ++j) {
    const float mag = static_cast<float>(std::abs(j)) / static_cast<float>(q);
    levels.push_back(j < 0 ? -mag : mag);
  }
  levels.erase(std::unique(levels.begin(), levels.end()), levels.end());
  return levels;
}

QilActivationQuantizer::QilActivationQuantizer(std::string name, const QilOptions& options)
    : ActivationQuantizer(std::move(name)), options_(options) {
  QTRAIN_CHECK(options.bits >= 1 && options.bits <= 8) << "qil activation bits " << options.bits;
  c_ = ScalarParameter("c", 0.0f);
  d_ = ScalarParameter("d", 0.0f);  // 0: not yet initialised
}

std::string QilActivationQuantizer::Describe() const {
  return absl::StrCat("qil-act ", options_.bits, "-bit c=", c_.value[0], " d=", d_.value[0]);
}

std::vector<float> QilActivationQuantizer::Levels() const {
  const int q = (1 << options_.bits) - 1;
  std::vector<float> levels;
  for (int j = 0; j <= q; ++j) levels.push_back(static_cast<float>(j) / static_cast<float>(q));
  return levels;
}

void QilActivationQuantizer::InitializeFrom(const kernels::CpuContext& ctx, const nn::Tensor& x) {
  const float* src = x.data();
  const int64_t n = std::max<int64_t>(x.size(), 1);
  const auto sums = ChunkedSums<2>(ctx, x.size(), [&](int64_t begin, int64_t end, auto& acc) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      s1 += src[i];
      s2 += static_cast<double>(src[i]) * src[i];
    }
    acc[0] += s1;
    acc[1] += s2;
  });
  const double mean = sums[0] / n;
  const double var = std::max(sums[1] / n - mean * mean, 0.0);
  float max_x = x.empty() ? 0.0f : src[0];
  for (int64_t i = 1; i < x.size(); ++i) max_x = std::max(max_x, src[i]);
  double hi = std::min<double>(max_x, mean + 3.0 * std::sqrt(var));
  if (!(hi > 0.0)) hi = 1.0;
  c_.value[0] = static_cast<float>(hi / 2);
  d_.value[0] = static_cast<float>(hi / 2);
}

void QilActivationQuantizer::Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) {
  QTRAIN_CHECK(y != &x) << "'" << name() << "': cannot run in place";
  if (d_.value[0] == 0.0f) InitializeFrom(ctx.cpu, x);
  if (y->shape() != x.shape()) y->Resize(x.shape());
  const float c = c_.value[0];
  const float d = std::max(std::fabs(d_.value[0]), kMinHalfWidth);
  const float inv_2d = 0.5f / d;
  const float q = NumSteps(options_.bits);
  const Discretize discretize = options_.discretize;
  const float* src = x.data();
  float* dst = y->data();
  ParallelRange(ctx.cpu, x.size(), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[i] = RoundUnit(std::clamp((src[i] - c) * inv_2d + 0.5f, 0.0f, 1.0f), q, discretize);
    }
  });
  input_ = &x;
}

void QilActivationQuantizer::Backward(nn::RunContext& ctx, const nn::Tensor& dy, nn::Tensor* dx) {
  QTRAIN_CHECK(input_ != nullptr) << "'" << name() << "': Backward before Forward";
  const bool want_dx = PrepareBackward(input_, dy, dx);
  const float c = c_.value[0];
  const float d = std::max(std::fabs(d_.value[0]), kMinHalfWidth);
  const double inv_2d = 0.5 / d;
  const float* src = input_->data();
  const float* g = dy.data();
  float* out = want_dx ? dx->data() : nullptr;
  const float inv_2d_f = static_cast<float>(inv_2d);
  // g masked to the interval, in float so the loops vectorize; constants are factored out of
  // the sums: dc = -sum(g_in) / (2d), dd = -sum(g_in (x - c)) / (2d^2).
  auto masked = [=](int64_t i) {
    const float u = (src[i] - c) * inv_2d_f + 0.5f;
    const float gi = g[i];
    return ((u >= 0.0f) & (u <= 1.0f)) ? gi : 0.0f;
  };
  // Sums before dx: dx may alias dy.
  const auto sums = ChunkedSums<2>(ctx.cpu, dy.size(), [&](int64_t begin, int64_t end, auto& acc) {
    acc[0] += LaneSum(begin, end, masked);
    acc[1] += LaneSum(begin, end, [=](int64_t i) { return masked(i) * (src[i] - c); });
  });
  if (out != nullptr) {
    ParallelRange(ctx.cpu, dy.size(), [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] = masked(i) * inv_2d_f;
    });
  }
  c_.grad[0] = static_cast<float>(-sums[0] * inv_2d);
  const double dd = -sums[1] * inv_2d / d;
  d_.grad[0] = std::fabs(d_.value[0]) >= kMinHalfWidth
                   ? static_cast<float>(d_.value[0] >= 0.0f ? dd : -dd)
                   : 0.0f;
}

void QilActivationQuantizer::CollectParameters(std::vector<nn::Parameter*>* out) {
  out->push_back(&c_);
  out->push_back(&d_);
}

}  // namespace qtrain::quant
