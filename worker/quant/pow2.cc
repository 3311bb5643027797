#include "worker/quant/pow2.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/elementwise.h"

namespace qtrain::quant {

bool OnPow2Levels(std::span<const float> w, int max_exponent, float* alpha) {
  float smallest = std::numeric_limits<float>::infinity();
  for (float v : w) {
    if (!std::isfinite(v)) return false;
    if (v != 0.0f) smallest = std::min(smallest, std::fabs(v));
  }
  if (smallest == std::numeric_limits<float>::infinity()) {
    *alpha = 0.0f;
    return true;
  }
  // |v| = smallest * 2^j exactly iff both have the same mantissa (frexp normalises denormals).
  int e0 = 0;
  const float m0 = std::frexp(smallest, &e0);
  for (float v : w) {
    if (v == 0.0f) continue;
    int e = 0;
    const float m = std::frexp(std::fabs(v), &e);
    if (m != m0 || e - e0 > max_exponent) return false;
  }
  *alpha = smallest;
  return true;
}

Pow2WeightQuantizer::Pow2WeightQuantizer(int levels)
    : levels_([&] {
        absl::StatusOr<ldnq::LevelSet> set = ldnq::LevelSet::FromCount(levels);
        QTRAIN_CHECK(set.ok()) << set.status().ToString();
        return *std::move(set);
      }()) {}

int Pow2WeightQuantizer::StorageBits(int levels) {
  int bits = 1;
  while ((1 << bits) < levels) ++bits;
  return bits;
}

std::string Pow2WeightQuantizer::Describe() const {
  return absl::StrCat("pow2 ", levels_.count(), " levels");
}

void Pow2WeightQuantizer::Forward(const nn::RunContext& ctx, const nn::Tensor& w, nn::Tensor* wq) {
  QTRAIN_CHECK(!w.empty()) << "pow2: empty weight";
  if (wq->shape() != w.shape()) wq->Resize(w.shape());
  if (OnPow2Levels(w.span(), levels_.max_exponent(), &alpha_)) {
    kernels::Copy(ctx.cpu, w.size(), w.data(), wq->data());
    return;
  }
  const ldnq::MatrixLayout layout{.rows = 1, .cols = w.size(), .quantized_cols = w.size()};
  alpha_ = ldnq::ProjectToLevels(w.span(), layout, levels_, 0.0f, kRounds, wq->span()).alpha;
}

void Pow2WeightQuantizer::Backward(const nn::RunContext& ctx, const nn::Tensor& w,
                                   const nn::Tensor& dwq, nn::Tensor* dw) {
  QTRAIN_CHECK(dwq.shape() == w.shape()) << "pow2: dwq " << nn::ShapeToString(dwq.shape());
  if (dw == &dwq) return;
  if (dw->shape() != w.shape()) dw->Resize(w.shape());
  kernels::Copy(ctx.cpu, w.size(), dwq.data(), dw->data());
}

std::vector<float> Pow2WeightQuantizer::Levels() const {
  if (alpha_ == 0.0f) return {0.0f};
  std::vector<float> out = levels_.UnitLevels();
  for (float& v : out) v *= alpha_;
  return out;
}

}  // namespace qtrain::quant
