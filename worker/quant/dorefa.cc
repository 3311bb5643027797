#include "worker/quant/dorefa.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/quant/lane_sum.h"

namespace qtrain::quant {

DorefaWeightQuantizer::DorefaWeightQuantizer(int bits, Discretize discretize)
    : bits_(bits), discretize_(discretize) {
  QTRAIN_CHECK(bits >= 1 && bits <= 8) << "dorefa weight bits " << bits;
}

std::string DorefaWeightQuantizer::Describe() const {
  return absl::StrCat("dorefa ", bits_, "-bit");
}

void DorefaWeightQuantizer::Forward(const nn::RunContext& ctx, const nn::Tensor& w,
                                    nn::Tensor* wq) {
  QTRAIN_CHECK(!w.empty()) << "dorefa: empty weight";
  if (wq->shape() != w.shape()) wq->Resize(w.shape());
  const int64_t size = w.size();
  const float* src = w.data();
  // tanh is monotone, so max |tanh(w)| = tanh(max |w|); the first largest index wins.
  int64_t argmax = 0;
  for (int64_t i = 1; i < size; ++i) {
    if (std::fabs(src[i]) > std::fabs(src[argmax])) argmax = i;
  }
  argmax_ = argmax;
  max_tanh_ = std::max(std::tanh(std::fabs(src[argmax])), 1e-12f);
  const float inv_2m = 0.5f / max_tanh_;
  const float n = NumSteps(bits_);
  const Discretize discretize = discretize_;
  float* dst = wq->data();
  if (tanh_.shape() != w.shape()) tanh_.Resize(w.shape());
  float* t = tanh_.data();
  ParallelRange(ctx.cpu, size, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      t[i] = std::tanh(src[i]);
      const float u = std::clamp(t[i] * inv_2m + 0.5f, 0.0f, 1.0f);
      dst[i] = 2.0f * RoundUnit(u, n, discretize) - 1.0f;
    }
  });
}

void DorefaWeightQuantizer::Backward(const nn::RunContext& ctx, const nn::Tensor& w,
                                     const nn::Tensor& dwq, nn::Tensor* dw) {
  QTRAIN_CHECK(dwq.shape() == w.shape()) << "dorefa: dwq " << nn::ShapeToString(dwq.shape());
  QTRAIN_CHECK(tanh_.shape() == w.shape()) << "dorefa: Backward before Forward";
  if (dw->shape() != w.shape()) dw->Resize(w.shape());
  const int64_t size = w.size();
  const float m = max_tanh_;
  const float* t = tanh_.data();
  const float inv_m = 1.0f / m;
  const float* src = w.data();
  const float* g = dwq.data();
  float* out = dw->data();
  // sum_j g_j t_j, for the path through m; read before dw (which may alias dwq) is written.
  const auto sums = ChunkedSums<1>(ctx.cpu, size, [&](int64_t begin, int64_t end, auto& acc) {
    acc[0] += LaneSum(begin, end, [=](int64_t i) { return g[i] * t[i]; });
  });
  ParallelRange(ctx.cpu, size, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = g[i] * (1.0f - t[i] * t[i]) * inv_m;
  });
  const float ta = t[argmax_];
  const float sign = src[argmax_] >= 0.0f ? 1.0f : -1.0f;
  const double dm = -sums[0] / (static_cast<double>(m) * m);
  out[argmax_] += static_cast<float>(dm * sign * (1.0f - ta * ta));
}

std::vector<float> DorefaWeightQuantizer::Levels() const {
  const int n = (1 << bits_) - 1;
  std::vector<float> levels;
  for (int j = 0; j <= n; ++j) levels.push_back(2.0f * (static_cast<float>(j) / n) - 1.0f);
  return levels;
}

DorefaActivationQuantizer::DorefaActivationQuantizer(std::string name, int bits,
                                                     Discretize discretize)
    : ActivationQuantizer(std::move(name)), bits_(bits), discretize_(discretize) {
  QTRAIN_CHECK(bits >= 1 && bits <= 8) << "dorefa activation bits " << bits;
}

std::string DorefaActivationQuantizer::Describe() const {
  return absl::StrCat("dorefa-act ", bits_, "-bit");
}

std::vector<float> DorefaActivationQuantizer::Levels() const {
  const int n = (1 << bits_) - 1;
  std::vector<float> levels;
  for (int j = 0; j <= n; ++j) levels.push_back(static_cast<float>(j) / n);
  return levels;
}

void DorefaActivationQuantizer::Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) {
  QTRAIN_CHECK(y != &x) << "'" << name() << "': cannot run in place";
  if (y->shape() != x.shape()) y->Resize(x.shape());
  const float n = NumSteps(bits_);
  const Discretize discretize = discretize_;
  const float* src = x.data();
  float* dst = y->data();
  ParallelRange(ctx.cpu, x.size(), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[i] = RoundUnit(std::clamp(src[i], 0.0f, 1.0f), n, discretize);
    }
  });
  input_ = &x;
}

void DorefaActivationQuantizer::Backward(nn::RunContext& ctx, const nn::Tensor& dy,
                                         nn::Tensor* dx) {
  if (!PrepareBackward(input_, dy, dx)) return;
  const float* src = input_->data();
  const float* g = dy.data();
  float* out = dx->data();
  ParallelRange(ctx.cpu, dy.size(), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // Unconditional loads and '&' instead of '&&': a select, no branch, so it vectorizes.
      const float v = src[i], gi = g[i];
      out[i] = ((v >= 0.0f) & (v <= 1.0f)) ? gi : 0.0f;
    }
  });
}

}  // namespace qtrain::quant
