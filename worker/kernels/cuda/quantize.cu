#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/status_macros.h"
#include "worker/kernels/cuda/kernel_util.cuh"
#include "worker/kernels/cuda/launch_util.h"
#include "worker/kernels/cuda/quantize.h"
#include "worker/quant/sawb_table.h"

namespace qtrain::kernels::cuda {
namespace {

using detail::Clamp;
using detail::RoundNonNegative;
using detail::RoundUnit;
using detail::StdMax;
using detail::StdMin;

// quant::NumSteps: 2^bits - 1.
float NumSteps(int bits) { return static_cast<float>((1 << bits) - 1); }

// Checks n >= min_n and the pointers (only when n > 0).
absl::Status CheckCall(const char* what, int64_t n, int64_t min_n,
                       std::initializer_list<NamedPointer> pointers) {
  RETURN_IF_ERROR(CheckAtLeast(what, "n", n, min_n));
  if (n > 0) RETURN_IF_ERROR(CheckNotNull(what, pointers));
  return absl::OkStatus();
}

// ---- DoReFa weights ----------------------------------------------------------------------------

struct ArgmaxAcc {
  float value;  // |w| of the candidate; -1 when none
  int32_t pad;
  int64_t index;  // INT64_MAX when none
};

// First index of the largest |w| (NaNs never win), then m = max(tanh |w_a|, 1e-12).
struct DorefaArgmaxOp {
  using Acc = ArgmaxAcc;
  const float* w;
  DorefaWeightState* state;
  __device__ Acc Identity() const { return {-1.0f, 0, INT64_MAX}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const {
    const float a = fabsf(w[i]);
    if (a > acc.value) {  // indices grow within a thread: strictly greater keeps the first
      acc.value = a;
      acc.index = i;
    }
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const {
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
  }
  __device__ void Finish(const Acc& total) const {
    const int64_t index = total.index == INT64_MAX ? 0 : total.index;
    state->argmax = index;
    state->max_tanh = StdMax(tanhf(fabsf(w[index])), 1e-12f);
    state->reserved = 0.0f;
  }
};

struct DorefaWeightQuantizeFn {
  float steps;
  const float* w;
  const DorefaWeightState* state;
  float* wq;
  float* tanh_w;
  __device__ void operator()(int64_t i) const {
    const float inv_2m = 0.5f / state->max_tanh;
    const float t = tanhf(w[i]);
    tanh_w[i] = t;
    const float u = Clamp(t * inv_2m + 0.5f, 0.0f, 1.0f);
    wq[i] = 2.0f * RoundUnit(u, steps) - 1.0f;
  }
};

// sum_j g_j t_j (each product in float, as the CPU's), then the arg-max correction term.
struct DorefaGradSumOp {
  using Acc = detail::Sum1;
  const float* w;
  const float* t;
  const float* g;
  const DorefaWeightState* state;
  float* correction;
  __device__ Acc Identity() const { return {0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const { acc.s += g[i] * t[i]; }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s + b.s}; }
  __device__ void Finish(const Acc& total) const {
    const float m = state->max_tanh;
    const int64_t a = state->argmax;
    const float ta = t[a];
    const float sign = w[a] >= 0.0f ? 1.0f : -1.0f;
    const double dm = -total.s / (static_cast<double>(m) * static_cast<double>(m));
    *correction =
        static_cast<float>(dm * static_cast<double>(sign) * static_cast<double>(1.0f - ta * ta));
  }
};

struct DorefaWeightGradFn {
  const float* t;
  const float* g;
  const DorefaWeightState* state;
  const float* correction;
  float* out;
  __device__ void operator()(int64_t i) const {
    const float inv_m = 1.0f / state->max_tanh;
    const float ti = t[i];
    float v = g[i] * (1.0f - ti * ti) * inv_m;
    if (i == state->argmax) v += *correction;
    out[i] = v;
  }
};

// ---- DoReFa activations ------------------------------------------------------------------------

struct DorefaActForwardFn {
  float steps;
  const float* x;
  float* y;
  __device__ void operator()(int64_t i) const { y[i] = RoundUnit(Clamp(x[i], 0.0f, 1.0f), steps); }
};

struct DorefaActBackwardFn {
  const float* x;
  const float* dy;
  float* dx;
  __device__ void operator()(int64_t i) const {
    const float v = x[i];
    const float g = dy[i];
    dx[i] = (v >= 0.0f && v <= 1.0f) ? g : 0.0f;
  }
};

// ---- PACT --------------------------------------------------------------------------------------

__device__ __forceinline__ float PactEffectiveAlpha(const float* alpha) {
  return StdMax(*alpha, kPactMinAlpha);
}

struct PactForwardFn {
  float steps;
  const float* x;
  const float* alpha;
  float* y;
  __device__ void operator()(int64_t i) const {
    const float a = PactEffectiveAlpha(alpha);
    const float to_grid = steps / a;
    const float step = a / steps;
    y[i] = RoundNonNegative(Clamp(x[i], 0.0f, a) * to_grid) * step;
  }
};

// Fused: dx and the alpha-gradient sum in one pass.
struct PactBackwardOp {
  using Acc = detail::Sum1;
  const float* x;
  const float* alpha;
  float l2;
  const float* dy;
  float* dx;
  float* alpha_grad;
  __device__ Acc Identity() const { return {0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const {
    const float a = PactEffectiveAlpha(alpha);
    const float v = x[i];
    const float g = dy[i];
    acc.s += v >= a ? g : 0.0f;
    if (dx != nullptr) dx[i] = (v >= 0.0f && v < a) ? g : 0.0f;
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s + b.s}; }
  __device__ void Finish(const Acc& total) const {
    const float value = *alpha;
    const double data_grad = value >= kPactMinAlpha ? total.s : 0.0;
    *alpha_grad =
        static_cast<float>(data_grad + static_cast<double>(l2) * static_cast<double>(value));
  }
};

// ---- SAWB --------------------------------------------------------------------------------------

struct SawbStatsOp {
  using Acc = detail::Sum2;  // s0 = sum w^2, s1 = sum |w|
  const float* w;
  int64_t n;
  double c1;
  double c2;
  float* alpha;
  __device__ Acc Identity() const { return {0.0, 0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const {
    const double v = w[i];
    acc.s0 += v * v;
    acc.s1 += fabs(v);
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s0 + b.s0, a.s1 + b.s1}; }
  __device__ void Finish(const Acc& total) const {
    const double size = static_cast<double>(n);
    const double rms = sqrt(total.s0 / size);
    const double mean_abs = total.s1 / size;
    const double a = c1 * rms - c2 * mean_abs;  // SawbWeightQuantizer::Scale
    *alpha = static_cast<float>(a > 0.0 ? a : StdMax(mean_abs, 1e-12));
  }
};

struct SawbQuantizeFn {
  float steps;
  const float* w;
  const float* alpha;
  float* wq;
  __device__ void operator()(int64_t i) const {
    const float a = *alpha;
    const float to_grid = steps / (2.0f * a);
    const float step = 2.0f * a / steps;
    const float j = RoundNonNegative((Clamp(w[i], -a, a) + a) * to_grid);
    wq[i] = StdMin(j, steps) * step - a;
  }
};

struct SawbBackwardFn {
  const float* w;
  const float* alpha;
  const float* g;
  float* out;
  __device__ void operator()(int64_t i) const {
    const float gi = g[i];
    out[i] = fabsf(w[i]) <= *alpha ? gi : 0.0f;
  }
};

// ---- QIL ---------------------------------------------------------------------------------------

__device__ __forceinline__ float QilHalfWidth(const float* d) {
  return StdMax(fabsf(*d), kQilMinHalfWidth);
}

struct QilWeightInitAcc {
  double sum_squares;
  float max_abs;
  float pad;
};

struct QilWeightInitOp {
  using Acc = QilWeightInitAcc;
  const float* w;
  int64_t n;
  float* c;
  float* d;
  __device__ Acc Identity() const { return {0.0, 0.0f, 0.0f}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const {
    const float v = w[i];
    acc.sum_squares += static_cast<double>(v) * static_cast<double>(v);
    acc.max_abs = StdMax(acc.max_abs, fabsf(v));
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const {
    return {a.sum_squares + b.sum_squares, StdMax(a.max_abs, b.max_abs), 0.0f};
  }
  __device__ void Finish(const Acc& total) const {
    if (*d != 0.0f) return;  // initialised already (or restored from a checkpoint)
    const double rms = sqrt(total.sum_squares / static_cast<double>(n > 1 ? n : 1));
    double hi = StdMin(static_cast<double>(total.max_abs), 3.0 * rms);
    if (!(hi > 0.0)) hi = 1.0;
    *c = static_cast<float>(hi / 2);
    *d = static_cast<float>(hi / 2);
  }
};

struct QilActInitAcc {
  double sum;
  double sum_squares;
  float max;
  float pad;
};

struct QilActInitOp {
  using Acc = QilActInitAcc;
  const float* x;
  int64_t n;
  float* c;
  float* d;
  __device__ Acc Identity() const { return {0.0, 0.0, -INFINITY, 0.0f}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const {
    const float v = x[i];
    acc.sum += v;
    acc.sum_squares += static_cast<double>(v) * static_cast<double>(v);
    acc.max = StdMax(acc.max, v);
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const {
    return {a.sum + b.sum, a.sum_squares + b.sum_squares, StdMax(a.max, b.max), 0.0f};
  }
  __device__ void Finish(const Acc& total) const {
    if (*d != 0.0f) return;
    const double count = static_cast<double>(n > 1 ? n : 1);
    const double mean = total.sum / count;
    const double var = StdMax(total.sum_squares / count - mean * mean, 0.0);
    double hi = StdMin(static_cast<double>(total.max), mean + 3.0 * sqrt(var));
    if (!(hi > 0.0)) hi = 1.0;
    *c = static_cast<float>(hi / 2);
    *d = static_cast<float>(hi / 2);
  }
};

struct QilWeightForwardFn {
  float q;
  const float* w;
  const float* c;
  const float* d;
  const float* gamma;
  float* wq;
  float* log_u;
  float* u_gamma;
  __device__ void operator()(int64_t i) const {
    const float cc = *c;
    const float inv_2d = 0.5f / QilHalfWidth(d);
    const float g = StdMax(*gamma, kQilMinGamma);
    const float v = w[i];
    const float a = fabsf(v);
    const float s = v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
    float u = Clamp((a - cc) * inv_2d + 0.5f, 0.0f, 1.0f);
    float lu = 0.0f;
    if (u > 0.0f && u < 1.0f) {
      lu = logf(u);
      if (g != 1.0f) u = expf(g * lu);
    }
    log_u[i] = lu;
    u_gamma[i] = u;
    wq[i] = s * RoundUnit(u, q);
  }
};

// QilWeightQuantizer::Backward's loop body (in double, as there) fused with its three sums.
struct QilWeightBackwardOp {
  using Acc = detail::Sum3;  // dc, dd, dgamma
  const float* w;
  const float* c;
  const float* d;
  const float* gamma;
  const float* log_u;
  const float* u_gamma;
  const float* g;
  float* out;
  float* c_grad;
  float* d_grad;
  float* gamma_grad;
  __device__ Acc Identity() const { return {0.0, 0.0, 0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const {
    const float cc = *c;
    const float dd = QilHalfWidth(d);
    const float gm = StdMax(*gamma, kQilMinGamma);
    const double inv_2d = 0.5 / static_cast<double>(dd);
    const float v = w[i];
    const double a = fabs(static_cast<double>(v));
    const double s = v > 0.0f ? 1.0 : (v < 0.0f ? -1.0 : 0.0);
    const double u = (a - static_cast<double>(cc)) * inv_2d + 0.5;
    if (u < 0.0 || u > 1.0) {
      out[i] = 0.0f;
      return;
    }
    const double gi = g[i];
    double slope = 1.0;
    const double lu = log_u[i];
    const double ug = u_gamma[i];
    if (gm != 1.0f) {
      const double uc = StdMax(u, 1e-6);
      slope = u > 0.0 && u < 1.0 ? static_cast<double>(gm) * ug / uc
                                 : static_cast<double>(gm) * pow(uc, static_cast<double>(gm) - 1.0);
    }
    if (u > 0.0 && u < 1.0) acc.s2 += gi * s * ug * lu;
    acc.s0 += gi * s * slope * -inv_2d;
    acc.s1 += gi * s * slope * (-(a - static_cast<double>(cc)) * inv_2d / static_cast<double>(dd));
    out[i] = static_cast<float>(gi * slope * inv_2d);
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const {
    return {a.s0 + b.s0, a.s1 + b.s1, a.s2 + b.s2};
  }
  __device__ void Finish(const Acc& total) const {
    const float d_value = *d;
    const float gamma_value = *gamma;
    *c_grad = static_cast<float>(total.s0);
    // d is used as |d| clamped; the gradient is with respect to the stored value.
    *d_grad = fabsf(d_value) >= kQilMinHalfWidth
                  ? static_cast<float>(d_value >= 0.0f ? total.s1 : -total.s1)
                  : 0.0f;
    *gamma_grad = gamma_value >= kQilMinGamma ? static_cast<float>(total.s2) : 0.0f;
  }
};

struct QilActForwardFn {
  float q;
  const float* x;
  const float* c;
  const float* d;
  float* y;
  __device__ void operator()(int64_t i) const {
    const float inv_2d = 0.5f / QilHalfWidth(d);
    y[i] = RoundUnit(Clamp((x[i] - *c) * inv_2d + 0.5f, 0.0f, 1.0f), q);
  }
};

struct QilActBackwardOp {
  using Acc = detail::Sum2;  // sum g_in, sum g_in (x - c)
  const float* x;
  const float* c;
  const float* d;
  const float* dy;
  float* dx;
  float* c_grad;
  float* d_grad;
  __device__ Acc Identity() const { return {0.0, 0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const {
    const float cc = *c;
    const double inv_2d = 0.5 / static_cast<double>(QilHalfWidth(d));
    const float inv_2d_f = static_cast<float>(inv_2d);
    const float v = x[i];
    const float u = (v - cc) * inv_2d_f + 0.5f;
    const float gi = dy[i];
    const float masked = (u >= 0.0f && u <= 1.0f) ? gi : 0.0f;
    acc.s0 += masked;
    acc.s1 += masked * (v - cc);
    if (dx != nullptr) dx[i] = masked * inv_2d_f;
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s0 + b.s0, a.s1 + b.s1}; }
  __device__ void Finish(const Acc& total) const {
    const float d_value = *d;
    const double half_width = QilHalfWidth(d);
    const double inv_2d = 0.5 / half_width;
    *c_grad = static_cast<float>(-total.s0 * inv_2d);
    const double dd = -total.s1 * inv_2d / half_width;
    *d_grad =
        fabsf(d_value) >= kQilMinHalfWidth ? static_cast<float>(d_value >= 0.0f ? dd : -dd) : 0.0f;
  }
};

// ---- Binary ------------------------------------------------------------------------------------

struct BinaryMeanAbsOp {
  using Acc = detail::Sum1;
  const float* w;
  int64_t per_channel;
  float* scales;
  __device__ Acc Identity() const { return {0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t c, int64_t j) const {
    acc.s += fabsf(w[c * per_channel + j]);
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s + b.s}; }
  __device__ void Finish(int64_t c, const Acc& total) const {
    scales[c] = static_cast<float>(total.s / static_cast<double>(per_channel));
  }
};

struct FillOnesFn {
  float* out;
  __device__ void operator()(int64_t i) const { out[i] = 1.0f; }
};

struct BinaryForwardFn {
  bool scaled;
  int64_t per_channel;
  const float* w;
  const float* scales;
  float* wq;
  __device__ void operator()(int64_t i) const {
    const float alpha = scaled ? scales[i / per_channel] : 1.0f;
    wq[i] = w[i] >= 0.0f ? alpha : -alpha;
  }
};

struct BinaryBackwardFn {
  bool scaled;
  int64_t per_channel;
  float inv_n;
  const float* w;
  const float* scales;
  const float* g;
  float* out;
  __device__ void operator()(int64_t i) const {
    const float alpha = scaled ? scales[i / per_channel] : 1.0f;
    out[i] = g[i] * (inv_n + (fabsf(w[i]) <= 1.0f ? alpha : 0.0f));
  }
};

// ---- Ternary -----------------------------------------------------------------------------------

struct TernaryThresholdOp {
  using Acc = detail::Sum1;
  const float* w;
  int64_t n;
  TernaryWeightState* state;
  __device__ Acc Identity() const { return {0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const { acc.s += fabsf(w[i]); }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s + b.s}; }
  __device__ void Finish(const Acc& total) const {
    // TernaryWeightQuantizer::kThresholdFactor * sum / size, in that order.
    state->threshold = static_cast<float>(0.7 * total.s / static_cast<double>(n));
  }
};

struct TernaryScaleOp {
  using Acc = detail::Sum2;  // sum of kept |w|, count kept
  const float* w;
  TernaryWeightState* state;
  __device__ Acc Identity() const { return {0.0, 0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const {
    const float a = fabsf(w[i]);
    if (a > state->threshold) {
      acc.s0 += a;
      acc.s1 += 1.0;
    }
  }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s0 + b.s0, a.s1 + b.s1}; }
  __device__ void Finish(const Acc& total) const {
    state->scale = total.s1 > 0.0 ? static_cast<float>(total.s0 / total.s1) : 0.0f;
  }
};

struct TernaryQuantizeFn {
  const float* w;
  const TernaryWeightState* state;
  float* wq;
  __device__ void operator()(int64_t i) const {
    const float delta = state->threshold;
    const float alpha = state->scale;
    const float v = w[i];
    const float pos = v > delta ? alpha : 0.0f;
    const float neg = v < -delta ? alpha : 0.0f;
    wq[i] = pos - neg;
  }
};

struct CopyFn {
  const float* x;
  float* out;
  __device__ void operator()(int64_t i) const { out[i] = x[i]; }
};

}  // namespace

// ---- DoReFa ------------------------------------------------------------------------------------

absl::Status DorefaWeightForward(const CudaContext& ctx, int bits, int64_t n, const float* w,
                                 float* wq, float* tanh_w, DorefaWeightState* state,
                                 void* workspace) {
  constexpr const char* kWhat = "cuda DorefaWeightForward";
  RETURN_IF_ERROR(CheckBits(kWhat, bits));
  RETURN_IF_ERROR(
      CheckCall(kWhat, n, 1, {{"w", w}, {"wq", wq}, {"tanh_w", tanh_w}, {"state", state}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  RETURN_IF_ERROR(detail::LaunchReduce(ctx, kWhat, n, DorefaArgmaxOp{w, state}, workspace));
  return detail::LaunchMap(ctx, kWhat, n,
                           DorefaWeightQuantizeFn{NumSteps(bits), w, state, wq, tanh_w});
}

absl::Status DorefaWeightBackward(const CudaContext& ctx, int64_t n, const float* w,
                                  const float* tanh_w, const DorefaWeightState* state,
                                  const float* dwq, float* dw, void* workspace) {
  constexpr const char* kWhat = "cuda DorefaWeightBackward";
  RETURN_IF_ERROR(CheckCall(
      kWhat, n, 1, {{"w", w}, {"tanh_w", tanh_w}, {"state", state}, {"dwq", dwq}, {"dw", dw}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  float* correction = detail::ReduceScalars<float>(workspace);
  RETURN_IF_ERROR(detail::LaunchReduce(
      ctx, kWhat, n, DorefaGradSumOp{w, tanh_w, dwq, state, correction}, workspace));
  return detail::LaunchMap(ctx, kWhat, n, DorefaWeightGradFn{tanh_w, dwq, state, correction, dw});
}

absl::Status DorefaActivationForward(const CudaContext& ctx, int bits, int64_t n, const float* x,
                                     float* y) {
  constexpr const char* kWhat = "cuda DorefaActivationForward";
  RETURN_IF_ERROR(CheckBits(kWhat, bits));
  RETURN_IF_ERROR(CheckCall(kWhat, n, 0, {{"x", x}, {"y", y}}));
  return detail::LaunchMap(ctx, kWhat, n, DorefaActForwardFn{NumSteps(bits), x, y});
}

absl::Status DorefaActivationBackward(const CudaContext& ctx, int64_t n, const float* x,
                                      const float* dy, float* dx) {
  constexpr const char* kWhat = "cuda DorefaActivationBackward";
  RETURN_IF_ERROR(CheckCall(kWhat, n, 0, {{"x", x}, {"dy", dy}, {"dx", dx}}));
  return detail::LaunchMap(ctx, kWhat, n, DorefaActBackwardFn{x, dy, dx});
}

// ---- PACT --------------------------------------------------------------------------------------

absl::Status PactForward(const CudaContext& ctx, int bits, int64_t n, const float* x,
                         const float* alpha, float* y) {
  constexpr const char* kWhat = "cuda PactForward";
  RETURN_IF_ERROR(CheckBits(kWhat, bits));
  RETURN_IF_ERROR(CheckCall(kWhat, n, 0, {{"x", x}, {"alpha", alpha}, {"y", y}}));
  return detail::LaunchMap(ctx, kWhat, n, PactForwardFn{NumSteps(bits), x, alpha, y});
}

absl::Status PactBackward(const CudaContext& ctx, int64_t n, const float* x, const float* alpha,
                          float l2, const float* dy, float* dx, float* alpha_grad,
                          void* workspace) {
  constexpr const char* kWhat = "cuda PactBackward";
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "n", n, 0));
  RETURN_IF_ERROR(CheckNotNull(kWhat, {{"alpha", alpha}, {"alpha_grad", alpha_grad}}));
  if (n > 0) RETURN_IF_ERROR(CheckNotNull(kWhat, {{"x", x}, {"dy", dy}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  return detail::LaunchReduce(ctx, kWhat, n, PactBackwardOp{x, alpha, l2, dy, dx, alpha_grad},
                              workspace);
}

// ---- SAWB --------------------------------------------------------------------------------------

absl::Status SawbWeightForward(const CudaContext& ctx, int bits, int64_t n, const float* w,
                               float* wq, float* alpha, void* workspace) {
  constexpr const char* kWhat = "cuda SawbWeightForward";
  RETURN_IF_ERROR(CheckBits(kWhat, bits));
  RETURN_IF_ERROR(CheckCall(kWhat, n, 1, {{"w", w}, {"wq", wq}, {"alpha", alpha}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  const quant::SawbCoefficients& k = quant::kSawbCoefficients[bits - 1];
  RETURN_IF_ERROR(
      detail::LaunchReduce(ctx, kWhat, n, SawbStatsOp{w, n, k.c1, k.c2, alpha}, workspace));
  return detail::LaunchMap(ctx, kWhat, n, SawbQuantizeFn{NumSteps(bits), w, alpha, wq});
}

absl::Status SawbWeightBackward(const CudaContext& ctx, int64_t n, const float* w,
                                const float* alpha, const float* dwq, float* dw) {
  constexpr const char* kWhat = "cuda SawbWeightBackward";
  RETURN_IF_ERROR(CheckCall(kWhat, n, 0, {{"w", w}, {"alpha", alpha}, {"dwq", dwq}, {"dw", dw}}));
  return detail::LaunchMap(ctx, kWhat, n, SawbBackwardFn{w, alpha, dwq, dw});
}

// ---- QIL ---------------------------------------------------------------------------------------

absl::Status QilWeightInitialize(const CudaContext& ctx, int64_t n, const float* w, float* c,
                                 float* d, void* workspace) {
  constexpr const char* kWhat = "cuda QilWeightInitialize";
  RETURN_IF_ERROR(CheckCall(kWhat, n, 1, {{"w", w}, {"c", c}, {"d", d}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  return detail::LaunchReduce(ctx, kWhat, n, QilWeightInitOp{w, n, c, d}, workspace);
}

absl::Status QilActivationInitialize(const CudaContext& ctx, int64_t n, const float* x, float* c,
                                     float* d, void* workspace) {
  constexpr const char* kWhat = "cuda QilActivationInitialize";
  RETURN_IF_ERROR(CheckCall(kWhat, n, 1, {{"x", x}, {"c", c}, {"d", d}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  return detail::LaunchReduce(ctx, kWhat, n, QilActInitOp{x, n, c, d}, workspace);
}

absl::Status QilWeightForward(const CudaContext& ctx, int bits, int64_t n, const float* w,
                              const float* c, const float* d, const float* gamma, float* wq,
                              float* log_u, float* u_gamma) {
  constexpr const char* kWhat = "cuda QilWeightForward";
  RETURN_IF_ERROR(CheckBits(kWhat, bits, 2));
  RETURN_IF_ERROR(CheckCall(kWhat, n, 0,
                            {{"w", w},
                             {"c", c},
                             {"d", d},
                             {"gamma", gamma},
                             {"wq", wq},
                             {"log_u", log_u},
                             {"u_gamma", u_gamma}}));
  const float q = static_cast<float>((1 << (bits - 1)) - 1);
  return detail::LaunchMap(ctx, kWhat, n,
                           QilWeightForwardFn{q, w, c, d, gamma, wq, log_u, u_gamma});
}

absl::Status QilWeightBackward(const CudaContext& ctx, int64_t n, const float* w, const float* c,
                               const float* d, const float* gamma, const float* log_u,
                               const float* u_gamma, const float* dwq, float* dw, float* c_grad,
                               float* d_grad, float* gamma_grad, void* workspace) {
  constexpr const char* kWhat = "cuda QilWeightBackward";
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "n", n, 0));
  RETURN_IF_ERROR(CheckNotNull(kWhat, {{"c", c},
                                       {"d", d},
                                       {"gamma", gamma},
                                       {"c_grad", c_grad},
                                       {"d_grad", d_grad},
                                       {"gamma_grad", gamma_grad}}));
  if (n > 0) {
    RETURN_IF_ERROR(CheckNotNull(
        kWhat, {{"w", w}, {"log_u", log_u}, {"u_gamma", u_gamma}, {"dwq", dwq}, {"dw", dw}}));
  }
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  return detail::LaunchReduce(
      ctx, kWhat, n,
      QilWeightBackwardOp{w, c, d, gamma, log_u, u_gamma, dwq, dw, c_grad, d_grad, gamma_grad},
      workspace);
}

absl::Status QilActivationForward(const CudaContext& ctx, int bits, int64_t n, const float* x,
                                  const float* c, const float* d, float* y) {
  constexpr const char* kWhat = "cuda QilActivationForward";
  RETURN_IF_ERROR(CheckBits(kWhat, bits));
  RETURN_IF_ERROR(CheckCall(kWhat, n, 0, {{"x", x}, {"c", c}, {"d", d}, {"y", y}}));
  return detail::LaunchMap(ctx, kWhat, n, QilActForwardFn{NumSteps(bits), x, c, d, y});
}

absl::Status QilActivationBackward(const CudaContext& ctx, int64_t n, const float* x,
                                   const float* c, const float* d, const float* dy, float* dx,
                                   float* c_grad, float* d_grad, void* workspace) {
  constexpr const char* kWhat = "cuda QilActivationBackward";
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "n", n, 0));
  RETURN_IF_ERROR(
      CheckNotNull(kWhat, {{"c", c}, {"d", d}, {"c_grad", c_grad}, {"d_grad", d_grad}}));
  if (n > 0) RETURN_IF_ERROR(CheckNotNull(kWhat, {{"x", x}, {"dy", dy}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  return detail::LaunchReduce(ctx, kWhat, n, QilActBackwardOp{x, c, d, dy, dx, c_grad, d_grad},
                              workspace);
}

// ---- Binary ------------------------------------------------------------------------------------

size_t BinaryWeightWorkspaceBytes(BinaryScaling scaling, int64_t channels, int64_t per_channel) {
  if (scaling == BinaryScaling::kNone || channels < 1 || per_channel < 1) return 0;
  return SegmentPartialBytes(channels, per_channel, sizeof(detail::Sum1));
}

absl::Status BinaryWeightForward(const CudaContext& ctx, BinaryScaling scaling, int64_t channels,
                                 int64_t per_channel, const float* w, float* wq, float* scales,
                                 void* workspace) {
  constexpr const char* kWhat = "cuda BinaryWeightForward";
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "channels", channels, 1));
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "per_channel", per_channel, 1));
  RETURN_IF_ERROR(CheckNotNull(kWhat, {{"w", w}, {"wq", wq}, {"scales", scales}}));
  const bool scaled = scaling == BinaryScaling::kPerChannelMeanAbs;
  if (scaled) RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  if (scaled) {
    RETURN_IF_ERROR(detail::LaunchSegmentedReduce(
        ctx, kWhat, channels, per_channel, BinaryMeanAbsOp{w, per_channel, scales}, workspace));
  } else {
    RETURN_IF_ERROR(detail::LaunchMap(ctx, kWhat, channels, FillOnesFn{scales}));
  }
  return detail::LaunchMap(ctx, kWhat, channels * per_channel,
                           BinaryForwardFn{scaled, per_channel, w, scales, wq});
}

absl::Status BinaryWeightBackward(const CudaContext& ctx, BinaryScaling scaling, int64_t channels,
                                  int64_t per_channel, const float* w, const float* scales,
                                  const float* dwq, float* dw) {
  constexpr const char* kWhat = "cuda BinaryWeightBackward";
  const bool scaled = scaling == BinaryScaling::kPerChannelMeanAbs;
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "channels", channels, 1));
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "per_channel", per_channel, 1));
  RETURN_IF_ERROR(CheckNotNull(kWhat, {{"w", w}, {"dwq", dwq}, {"dw", dw}}));
  if (scaled) RETURN_IF_ERROR(CheckNotNull(kWhat, {{"scales", scales}}));
  const float inv_n = scaled ? 1.0f / static_cast<float>(per_channel) : 0.0f;
  return detail::LaunchMap(ctx, kWhat, channels * per_channel,
                           BinaryBackwardFn{scaled, per_channel, inv_n, w, scales, dwq, dw});
}

// ---- Ternary -----------------------------------------------------------------------------------

absl::Status TernaryWeightForward(const CudaContext& ctx, int64_t n, const float* w, float* wq,
                                  TernaryWeightState* state, void* workspace) {
  constexpr const char* kWhat = "cuda TernaryWeightForward";
  RETURN_IF_ERROR(CheckCall(kWhat, n, 1, {{"w", w}, {"wq", wq}, {"state", state}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  RETURN_IF_ERROR(detail::LaunchReduce(ctx, kWhat, n, TernaryThresholdOp{w, n, state}, workspace));
  RETURN_IF_ERROR(detail::LaunchReduce(ctx, kWhat, n, TernaryScaleOp{w, state}, workspace));
  return detail::LaunchMap(ctx, kWhat, n, TernaryQuantizeFn{w, state, wq});
}

absl::Status TernaryWeightBackward(const CudaContext& ctx, int64_t n, const float* dwq, float* dw) {
  constexpr const char* kWhat = "cuda TernaryWeightBackward";
  RETURN_IF_ERROR(CheckCall(kWhat, n, 0, {{"dwq", dwq}, {"dw", dw}}));
  if (dw == dwq) return absl::OkStatus();
  return detail::LaunchMap(ctx, kWhat, n, CopyFn{dwq, dw});
}

}  // namespace qtrain::kernels::cuda
