// Power-of-two weights: alpha * {0, +-2^0, +-2^1, ..., +-2^b} per layer, named by the number of
// levels (3, 5, 7 or 9), the level sets of L-DNQ (Chen, Wang and Pan, AAAI 2019; see
// worker/quant/ldnq/levels.h). Weights on such a set store as small signed integers and multiply
// as shifts; `qtrain export` packs them as such (export.h), which is why this quantizer exists:
// `--wq=pow2:levels=L` rebuilds an L-DNQ result (`qtrain ldnq`) as a quantized model.
//
// Forward, per layer:
//   - w already on such a set (every non-zero |w| equals a common alpha times 2^j, 0 <= j <= b,
//     exactly, in float): wq = w, alpha = the smallest non-zero |w|. The projection is thereby
//     idempotent, and an L-DNQ checkpoint evaluates bit for bit as written.
//   - otherwise the L-DNQ projection (ProjectToLevels): alternate Q = nearest unit level of
//     w / alpha and alpha = <w, Q> / <Q, Q> from alpha = mean |w|, at most kRounds rounds; the
//     "DQ" baseline of the paper. wq = alpha * Q is exact in float (Q is a power of two).
// Gradient: straight-through, dL/dw = dL/dwq. State: alpha of the last Forward. No parameters.
// bits() is the storage width of a level index, ceil(log2(levels)): 2, 3, 3, 4.
// Cost: one pass to test the set, else kRounds passes per Forward (one thread).
#ifndef QTRAIN_WORKER_QUANT_POW2_H_
#define QTRAIN_WORKER_QUANT_POW2_H_

#include <span>
#include <string>
#include <vector>

#include "worker/quant/ldnq/levels.h"
#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant {

class Pow2WeightQuantizer : public WeightQuantizer {
 public:
  static constexpr int kRounds = 10;

  // Precondition (checked): levels in {3, 5, 7, 9} (the spec parser validates user input).
  explicit Pow2WeightQuantizer(int levels);

  std::string Describe() const override;
  int bits() const override { return StorageBits(levels_.count()); }
  void Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) override;
  void Backward(const nn::RunContext& ctx, const nn::Tensor& w, const nn::Tensor& dwq,
                nn::Tensor* dw) override;
  std::vector<float> Levels() const override;

  const ldnq::LevelSet& level_set() const { return levels_; }
  float alpha() const { return alpha_; }
  // ceil(log2(levels)).
  static int StorageBits(int levels);

 private:
  ldnq::LevelSet levels_;
  float alpha_ = 0.0f;
};

// True when every value of w is 0 or +-alpha * 2^j with one alpha and 0 <= j <= max_exponent,
// exactly; *alpha is then the smallest non-zero |w| (0 when w is all zero). False for a non-finite
// value.
bool OnPow2Levels(std::span<const float> w, int max_exponent, float* alpha);

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_POW2_H_
