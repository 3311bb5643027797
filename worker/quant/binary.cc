#include "worker/quant/binary.h"

#include <algorithm>
#include <cmath>

#include "common/logging.h"

namespace qtrain::quant {

BinaryWeightQuantizer::BinaryWeightQuantizer(BinaryScale scale) : scale_(scale) {}

std::string BinaryWeightQuantizer::Describe() const {
  return scale_ == BinaryScale::kNone ? "binary (BinaryConnect)" : "binary (XNOR per-channel)";
}

void BinaryWeightQuantizer::Forward(const nn::RunContext& ctx, const nn::Tensor& w,
                                    nn::Tensor* wq) {
  QTRAIN_CHECK(!w.empty() && w.rank() >= 1) << "binary: empty weight";
  if (wq->shape() != w.shape()) wq->Resize(w.shape());
  const int64_t channels = w.dim(0);
  const int64_t per = w.size() / channels;
  scales_.assign(static_cast<size_t>(channels), 1.0f);
  const float* src = w.data();
  float* dst = wq->data();
  // Channels are split over the pool; each is reduced serially in double.
  kernels::ParallelFor(ctx.cpu.pool, channels, std::max<int64_t>(1, kQuantGrain / per),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t c = begin; c < end; ++c) {
                           const float* row = src + c * per;
                           float alpha = 1.0f;
                           if (scale_ == BinaryScale::kPerChannelMeanAbs) {
                             double s = 0.0;
                             for (int64_t i = 0; i < per; ++i) s += std::fabs(row[i]);
                             alpha = static_cast<float>(s / per);
                             scales_[static_cast<size_t>(c)] = alpha;
                           }
                           float* out = dst + c * per;
                           for (int64_t i = 0; i < per; ++i)
                             out[i] = row[i] >= 0.0f ? alpha : -alpha;
                         }
                       });
}

void BinaryWeightQuantizer::Backward(const nn::RunContext& ctx, const nn::Tensor& w,
                                     const nn::Tensor& dwq, nn::Tensor* dw) {
  QTRAIN_CHECK(dwq.shape() == w.shape()) << "binary: dwq " << nn::ShapeToString(dwq.shape());
  QTRAIN_CHECK(static_cast<int64_t>(scales_.size()) == w.dim(0))
      << "binary: Backward before Forward";
  if (dw->shape() != w.shape()) dw->Resize(w.shape());
  const int64_t channels = w.dim(0);
  const int64_t per = w.size() / channels;
  const float inv_n = scale_ == BinaryScale::kNone ? 0.0f : 1.0f / static_cast<float>(per);
  const float* src = w.data();
  const float* g = dwq.data();
  float* out = dw->data();
  kernels::ParallelFor(ctx.cpu.pool, channels, std::max<int64_t>(1, kQuantGrain / per),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t c = begin; c < end; ++c) {
                           const float alpha = scales_[static_cast<size_t>(c)];
                           for (int64_t i = c * per; i < (c + 1) * per; ++i) {
                             out[i] = g[i] * (inv_n + (std::fabs(src[i]) <= 1.0f ? alpha : 0.0f));
                           }
                         }
                       });
}

std::vector<float> BinaryWeightQuantizer::Levels() const {
  std::vector<float> levels;
  if (scales_.empty() || scale_ == BinaryScale::kNone) return {-1.0f, 1.0f};
  for (float a : scales_) {
    levels.push_back(-a);
    levels.push_back(a);
  }
  std::sort(levels.begin(), levels.end());
  levels.erase(std::unique(levels.begin(), levels.end()), levels.end());
  return levels;
}

}  // namespace qtrain::quant
