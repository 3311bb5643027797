#include "worker/quant/sawb.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/quant/sawb_table.h"

namespace qtrain::quant {

SawbWeightQuantizer::SawbWeightQuantizer(int bits) : bits_(bits) {
  QTRAIN_CHECK(bits >= 1 && bits <= 8) << "sawb bits " << bits;
}

std::string SawbWeightQuantizer::Describe() const { return absl::StrCat("sawb ", bits_, "-bit"); }

double SawbWeightQuantizer::Scale(int bits, double rms, double mean_abs) {
  const SawbCoefficients& c = kSawbCoefficients[bits - 1];
  const double alpha = c.c1 * rms - c.c2 * mean_abs;
  return alpha > 0.0 ? alpha : std::max(mean_abs, 1e-12);
}

void SawbWeightQuantizer::Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) {
  QTRAIN_CHECK(!w.empty()) << "sawb: empty weight";
  if (wq->shape() != w.shape()) wq->Resize(w.shape());
  const int64_t size = w.size();
  const float* src = w.data();
  const auto sums = ChunkedSums<2>(ctx.cpu, size, [&](int64_t begin, int64_t end, auto& acc) {
    double s2 = 0.0, s1 = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      const double v = src[i];
      s2 += v * v;
      s1 += std::fabs(v);
    }
    acc[0] += s2;
    acc[1] += s1;
  });
  alpha_ = static_cast<float>(Scale(bits_, std::sqrt(sums[0] / size), sums[1] / size));
  const float alpha = alpha_;
  const float n = NumSteps(bits_);  // 2^k levels are 2^k - 1 steps apart
  const float to_grid = n / (2.0f * alpha);
  const float step = 2.0f * alpha / n;
  float* dst = wq->data();
  ParallelRange(ctx.cpu, size, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // Level j in [0, n]; (j - n/2) counts half-steps from zero: j*step - alpha.
      const float j = RoundNonNegative((std::clamp(src[i], -alpha, alpha) + alpha) * to_grid);
      dst[i] = std::min(j, n) * step - alpha;
    }
  });
}

void SawbWeightQuantizer::Backward(const nn::RunContext& ctx, const nn::Tensor& w,
                                   const nn::Tensor& dwq, nn::Tensor* dw) {
  QTRAIN_CHECK(dwq.shape() == w.shape()) << "sawb: dwq " << nn::ShapeToString(dwq.shape());
  if (dw->shape() != w.shape()) dw->Resize(w.shape());
  const float alpha = alpha_;
  const float* src = w.data();
  const float* g = dwq.data();
  float* out = dw->data();
  ParallelRange(ctx.cpu, w.size(), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float gi = g[i];
      out[i] = std::fabs(src[i]) <= alpha ? gi : 0.0f;
    }
  });
}

std::vector<float> SawbWeightQuantizer::Levels() const {
  const int n = (1 << bits_) - 1;
  const float step = 2.0f * alpha_ / static_cast<float>(n);
  std::vector<float> levels;
  for (int j = 0; j <= n; ++j) levels.push_back(static_cast<float>(j) * step - alpha_);
  std::sort(levels.begin(), levels.end());
  levels.erase(std::unique(levels.begin(), levels.end()), levels.end());
  return levels;
}

SymmetricUniformMse::SymmetricUniformMse(std::span<const float> w) {
  sorted_abs_.reserve(w.size());
  for (float v : w) sorted_abs_.push_back(std::fabs(static_cast<double>(v)));
  std::sort(sorted_abs_.begin(), sorted_abs_.end());
  prefix_.assign(sorted_abs_.size() + 1, 0.0);
  prefix_sq_.assign(sorted_abs_.size() + 1, 0.0);
  for (size_t i = 0; i < sorted_abs_.size(); ++i) {
    prefix_[i + 1] = prefix_[i] + sorted_abs_[i];
    prefix_sq_[i + 1] = prefix_sq_[i] + sorted_abs_[i] * sorted_abs_[i];
  }
}

double SymmetricUniformMse::rms() const {
  return sorted_abs_.empty() ? 0.0 : std::sqrt(prefix_sq_.back() / sorted_abs_.size());
}

double SymmetricUniformMse::mean_abs() const {
  return sorted_abs_.empty() ? 0.0 : prefix_.back() / sorted_abs_.size();
}

double SymmetricUniformMse::Mse(int bits, double alpha) const {
  if (sorted_abs_.empty()) return 0.0;
  // The levels are symmetric, so the error depends on |w| only. Positive levels
  // l_j = alpha (2j + 1) / n, j = 0..2^(k-1) - 1 (n = 2^k - 1); |w| in [alpha 2j / n,
  // alpha (2j + 2) / n) goes to l_j, and everything above the top boundary to the top level alpha.
  const int half = 1 << (bits - 1);
  const double n = static_cast<double>((1 << bits) - 1);
  double total = 0.0;
  size_t lo = 0;
  for (int j = 0; j < half; ++j) {
    size_t hi = sorted_abs_.size();
    if (j + 1 < half) {
      const double boundary = alpha * (2.0 * j + 2.0) / n;
      hi = static_cast<size_t>(
          std::lower_bound(sorted_abs_.begin() + lo, sorted_abs_.end(), boundary) -
          sorted_abs_.begin());
    }
    const double level = alpha * (2.0 * j + 1.0) / n;
    const double count = static_cast<double>(hi - lo);
    const double s1 = prefix_[hi] - prefix_[lo];
    const double s2 = prefix_sq_[hi] - prefix_sq_[lo];
    total += s2 - 2.0 * level * s1 + level * level * count;
    lo = hi;
  }
  return std::max(total, 0.0) / sorted_abs_.size();
}

SymmetricUniformMse::Optimum SymmetricUniformMse::Optimal(int bits) const {
  Optimum best{max_abs(), Mse(bits, max_abs())};
  const double top = max_abs();
  if (top <= 0.0) return best;
  constexpr int kCoarse = 4000;
  double step = top / kCoarse;
  for (int i = 1; i <= kCoarse; ++i) {
    const double a = step * i;
    const double e = Mse(bits, a);
    if (e < best.mse) best = {a, e};
  }
  for (int round = 0; round < 3; ++round) {
    const double center = best.alpha;
    const double lo = std::max(center - step, step * 1e-3);
    const double span = center + step - lo;
    constexpr int kFine = 200;
    for (int i = 0; i <= kFine; ++i) {
      const double a = lo + span * i / kFine;
      const double e = Mse(bits, a);
      if (e < best.mse) best = {a, e};
    }
    step = span / kFine;
  }
  return best;
}

}  // namespace qtrain::quant
