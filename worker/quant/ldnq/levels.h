// The power-of-two level sets of L-DNQ (Chen, Wang and Pan, AAAI 2019) and the projection onto
// them: Omega = alpha * {0, +-2^0, +-2^1, ..., +-2^b}, one alpha per layer, named by the number of
// levels as the paper does (3 = {0, +-alpha}, 5 = {0, +-alpha, +-2 alpha}, 7, 9). Weights on such a
// set store as small signed integers and multiply as shifts.
//
// The projection of a matrix V onto alpha * Omega alternates, as the authors' code does,
//   Q = Proj(V / alpha)   (each entry to its nearest level of {0, +-1, ..., +-2^b})
//   alpha = <V, Q> / <Q, Q>
// until Q stops changing (at most `rounds` rounds). Only the first `quantized_cols` columns of
// each row are projected; the rest (a layer's bias column) are copied unchanged.
//
// Thread-safety: pure functions and a value type. Cost: O(rounds * rows * cols).
#ifndef QTRAIN_WORKER_QUANT_LDNQ_LEVELS_H_
#define QTRAIN_WORKER_QUANT_LDNQ_LEVELS_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace qtrain::quant::ldnq {

class LevelSet {
 public:
  // count in {3, 5, 7, 9}; INVALID_ARGUMENT otherwise.
  static absl::StatusOr<LevelSet> FromCount(int count);

  int count() const { return 2 * static_cast<int>(positive_.size()) + 1; }
  // The largest exponent b: levels reach +-2^b.
  int max_exponent() const { return static_cast<int>(positive_.size()) - 1; }
  // {1, 2, 4, ..., 2^b}.
  const std::vector<float>& positive() const { return positive_; }
  // Every unit level, ascending: {-2^b, ..., -1, 0, 1, ..., 2^b}.
  std::vector<float> UnitLevels() const;
  // The nearest of {0, +-1, ..., +-2^b} to v (ties go to the smaller magnitude).
  float Nearest(float v) const;

 private:
  explicit LevelSet(std::vector<float> positive) : positive_(std::move(positive)) {}
  std::vector<float> positive_;
};

// A rows x cols row-major matrix whose first quantized_cols columns are quantized.
struct MatrixLayout {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t quantized_cols = 0;
};

struct Projection {
  float alpha = 0.0f;
  int rounds = 0;  // rounds run (<= the limit)
};

// g = alpha * Q, the alternating projection of v above, starting from alpha_init (> 0; a
// non-positive or non-finite value starts from mean |v| over the quantized entries). Columns past
// quantized_cols are copied from v. If v's quantized entries are all zero, alpha stays at its
// start and g's quantized entries are zero. Precondition: v and g hold rows * cols values.
Projection ProjectToLevels(std::span<const float> v, const MatrixLayout& layout,
                           const LevelSet& levels, float alpha_init, int rounds,
                           std::span<float> g);

// Mean |v| over the quantized entries (0 for none).
float MeanAbsQuantized(std::span<const float> v, const MatrixLayout& layout);

}  // namespace qtrain::quant::ldnq

#endif  // QTRAIN_WORKER_QUANT_LDNQ_LEVELS_H_
