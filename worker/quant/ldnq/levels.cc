#include "worker/quant/ldnq/levels.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace qtrain::quant::ldnq {

absl::StatusOr<LevelSet> LevelSet::FromCount(int count) {
  if (count != 3 && count != 5 && count != 7 && count != 9) {
    return absl::InvalidArgumentError(
        absl::StrCat("levels must be 3, 5, 7 or 9 (alpha * {0, +-2^0, ..., +-2^b}); got ", count));
  }
  std::vector<float> positive;
  for (int k = 0; k < (count - 1) / 2; ++k) positive.push_back(std::ldexp(1.0f, k));
  return LevelSet(std::move(positive));
}

std::vector<float> LevelSet::UnitLevels() const {
  std::vector<float> out;
  for (auto it = positive_.rbegin(); it != positive_.rend(); ++it) out.push_back(-*it);
  out.push_back(0.0f);
  out.insert(out.end(), positive_.begin(), positive_.end());
  return out;
}

float LevelSet::Nearest(float v) const {
  const float a = std::fabs(v);
  float q;
  if (!(a > 0.5f)) {
    q = 0.0f;  // also NaN
  } else if (a >= positive_.back()) {
    q = positive_.back();
  } else {
    // 2^k <= a < 2^(k+1) with k < b; the midpoint is 1.5 * 2^k.
    int e;
    std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    const float lo = std::ldexp(1.0f, e - 1);
    q = lo < 1.0f ? (a > 0.5f ? 1.0f : 0.0f) : (a > 1.5f * lo ? 2.0f * lo : lo);
  }
  return std::signbit(v) ? -q : q;
}

float MeanAbsQuantized(std::span<const float> v, const MatrixLayout& layout) {
  double sum = 0.0;
  for (int64_t r = 0; r < layout.rows; ++r) {
    const float* row = v.data() + r * layout.cols;
    for (int64_t c = 0; c < layout.quantized_cols; ++c) sum += std::fabs(row[c]);
  }
  const int64_t n = layout.rows * layout.quantized_cols;
  return n > 0 ? static_cast<float>(sum / static_cast<double>(n)) : 0.0f;
}

Projection ProjectToLevels(std::span<const float> v, const MatrixLayout& layout,
                           const LevelSet& levels, float alpha_init, int rounds,
                           std::span<float> g) {
  const int64_t rows = layout.rows, cols = layout.cols, qc = layout.quantized_cols;
  Projection p;
  p.alpha = alpha_init;
  if (!(p.alpha > 0.0f) || !std::isfinite(p.alpha)) p.alpha = MeanAbsQuantized(v, layout);
  // Copy the unquantized columns; g's quantized entries hold Q (unit levels) until the end.
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = qc; c < cols; ++c) g[r * cols + c] = v[r * cols + c];
  }
  if (!(p.alpha > 0.0f)) {
    for (int64_t r = 0; r < rows; ++r) std::fill_n(g.data() + r * cols, qc, 0.0f);
    return p;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < qc; ++c) g[r * cols + c] = levels.Nearest(v[r * cols + c] / p.alpha);
  }
  for (int round = 0; round < std::max(rounds, 1); ++round) {
    p.rounds = round + 1;
    double vq = 0.0, qq = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < qc; ++c) {
        const double q = g[r * cols + c];
        vq += q * v[r * cols + c];
        qq += q * q;
      }
    }
    if (qq == 0.0 || !(vq > 0.0)) break;  // everything rounded to 0: keep alpha
    p.alpha = static_cast<float>(vq / qq);
    bool changed = false;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < qc; ++c) {
        const float q = levels.Nearest(v[r * cols + c] / p.alpha);
        if (q != g[r * cols + c]) {
          g[r * cols + c] = q;
          changed = true;
        }
      }
    }
    if (!changed) break;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < qc; ++c) g[r * cols + c] *= p.alpha;
  }
  return p;
}

}  // namespace qtrain::quant::ldnq
