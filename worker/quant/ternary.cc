#include "worker/quant/ternary.h"

#include <cmath>

#include "common/logging.h"
#include "worker/kernels/cpu/elementwise.h"
#include "worker/quant/lane_sum.h"

namespace qtrain::quant {

void TernaryWeightQuantizer::Forward(const nn::RunContext& ctx, const nn::Tensor& w,
                                     nn::Tensor* wq) {
  QTRAIN_CHECK(!w.empty()) << "ternary: empty weight";
  if (wq->shape() != w.shape()) wq->Resize(w.shape());
  const int64_t size = w.size();
  const float* src = w.data();
  const auto abs_sum = ChunkedSums<1>(ctx.cpu, size, [&](int64_t begin, int64_t end, auto& acc) {
    acc[0] += LaneSum(begin, end, [&](int64_t i) { return std::fabs(src[i]); });
  });
  threshold_ = static_cast<float>(kThresholdFactor * abs_sum[0] / size);
  const float delta = threshold_;
  const auto kept = ChunkedSums<2>(ctx.cpu, size, [&](int64_t begin, int64_t end, auto& acc) {
    acc[0] += LaneSum(begin, end, [&](int64_t i) {
      const float a = std::fabs(src[i]);
      return a > delta ? a : 0.0f;
    });
    acc[1] +=
        LaneSum(begin, end, [&](int64_t i) { return std::fabs(src[i]) > delta ? 1.0f : 0.0f; });
  });
  scale_ = kept[1] > 0.0 ? static_cast<float>(kept[0] / kept[1]) : 0.0f;
  const float alpha = scale_;
  float* dst = wq->data();
  ParallelRange(ctx.cpu, size, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float pos = src[i] > delta ? alpha : 0.0f;
      const float neg = src[i] < -delta ? alpha : 0.0f;
      dst[i] = pos - neg;
    }
  });
}

void TernaryWeightQuantizer::Backward(const nn::RunContext& ctx, const nn::Tensor& w,
                                      const nn::Tensor& dwq, nn::Tensor* dw) {
  QTRAIN_CHECK(dwq.shape() == w.shape()) << "ternary: dwq " << nn::ShapeToString(dwq.shape());
  if (dw == &dwq) return;
  if (dw->shape() != w.shape()) dw->Resize(w.shape());
  kernels::Copy(ctx.cpu, w.size(), dwq.data(), dw->data());
}

std::vector<float> TernaryWeightQuantizer::Levels() const {
  if (scale_ == 0.0f) return {0.0f};
  return {-scale_, 0.0f, scale_};
}

}  // namespace qtrain::quant
