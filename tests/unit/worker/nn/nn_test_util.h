// Test helpers for worker/nn: random tensors and a finite-difference gradient checker.
//
// The checker evaluates the scalar loss L = sum_i r_i * y_i (r a fixed random projection, the sum
// in double) and compares the layer's analytic dx and parameter gradients with central
// differences (L(v + h) - L(v - h)) / (h+ + h-), where h+/h- are the perturbations actually
// representable in float at v. Layers compute in float, so the differences carry float rounding of
// y (~1e-7 relative per element); each test picks eps and tolerances for its layer and says why.
#ifndef QTRAIN_TESTS_UNIT_WORKER_NN_NN_TEST_UTIL_H_
#define QTRAIN_TESTS_UNIT_WORKER_NN_NN_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "worker/nn/layer.h"
#include "worker/nn/tensor.h"

namespace qtrain::nn::testing {

inline Tensor RandomTensor(const Shape& shape, std::mt19937_64& rng, float lo = -1.0f,
                           float hi = 1.0f) {
  Tensor t(shape);
  std::uniform_real_distribution<float> dist(lo, hi);
  for (int64_t i = 0; i < t.size(); ++i) t[i] = dist(rng);
  return t;
}

// Values whose magnitude is at least `min_abs` (random sign): keeps ReLU inputs away from the kink.
inline Tensor RandomAwayFromZero(const Shape& shape, std::mt19937_64& rng, float min_abs,
                                 float max_abs) {
  Tensor t(shape);
  std::uniform_real_distribution<float> mag(min_abs, max_abs);
  std::bernoulli_distribution sign(0.5);
  for (int64_t i = 0; i < t.size(); ++i) t[i] = sign(rng) ? mag(rng) : -mag(rng);
  return t;
}

inline double Projection(const Tensor& r, const Tensor& y) {
  double sum = 0.0;
  for (int64_t i = 0; i < y.size(); ++i) sum += static_cast<double>(r[i]) * y[i];
  return sum;
}

struct GradCheckOptions {
  float epsilon = 1e-2f;
  // Element passes when |analytic - numeric| <= abs_tol + rel_tol * |numeric|.
  double abs_tol = 1e-3;
  double rel_tol = 1e-2;
  Mode mode = Mode::kTrain;
  // For layers with kinks (ReLU, max): a probe that fails and whose one-sided slopes differ by
  // more than the tolerance straddles a kink, where no finite difference is meaningful; it is
  // skipped and counted. At most max_skipped_fraction of the probes of each tensor may be skipped.
  bool skip_kinks = false;
  double max_skipped_fraction = 0.05;
  uint64_t seed = 1234;  // for r
};

struct GradCheckStats {
  int64_t probes = 0;
  int64_t skipped = 0;
  double max_abs_error = 0.0;
};

// Probes every element of `values` (x or a parameter), comparing with `analytic`.
template <class LossFn>
GradCheckStats CheckTensor(const std::string& what, Tensor* values, const Tensor& analytic,
                           const GradCheckOptions& options, LossFn loss) {
  GradCheckStats stats;
  const double base = loss();
  for (int64_t i = 0; i < values->size(); ++i) {
    const float v = (*values)[i];
    const float up = v + options.epsilon;
    const float down = v - options.epsilon;
    (*values)[i] = up;
    const double loss_up = loss();
    (*values)[i] = down;
    const double loss_down = loss();
    (*values)[i] = v;
    const double h_up = static_cast<double>(up) - v;
    const double h_down = static_cast<double>(v) - down;
    const double numeric = (loss_up - loss_down) / (h_up + h_down);
    ++stats.probes;
    const double error = std::abs(analytic[i] - numeric);
    const double tolerance = options.abs_tol + options.rel_tol * std::abs(numeric);
    if (error > tolerance && options.skip_kinks) {
      // Smooth curvature makes the one-sided slopes differ by ~eps * |L''| but leaves the central
      // difference O(eps^2)-accurate; only a failing probe whose one-sided slopes jump by more
      // than the tolerance is blamed on a kink.
      const double slope_up = (loss_up - base) / h_up;
      const double slope_down = (base - loss_down) / h_down;
      if (std::abs(slope_up - slope_down) > tolerance) {
        ++stats.skipped;
        continue;
      }
    }
    stats.max_abs_error = std::max(stats.max_abs_error, error);
    EXPECT_LE(error, tolerance) << what << "[" << i << "]: analytic " << analytic[i] << " numeric "
                                << numeric;
  }
  EXPECT_LE(stats.skipped, options.max_skipped_fraction * stats.probes)
      << what << ": too many probes straddle a kink";
  return stats;
}

// Checks dx and every parameter gradient of `layer` at input x. Returns per-tensor stats (x
// first, then the parameters in CollectParameters order).
inline std::vector<GradCheckStats> CheckGradients(Layer& layer, const Tensor& x_in,
                                                  const GradCheckOptions& options = {}) {
  RunContext ctx;
  ctx.cpu.pool = nullptr;
  ctx.mode = options.mode;
  Tensor x = x_in;
  Tensor y;
  layer.Forward(ctx, x, &y);
  std::mt19937_64 rng(options.seed);
  const Tensor r = RandomTensor(y.shape(), rng);
  Tensor dx;
  layer.Backward(ctx, r, &dx);
  EXPECT_EQ(dx.shape(), x.shape());
  std::vector<Parameter*> params;
  layer.CollectParameters(&params);
  std::vector<Tensor> analytic_params;
  for (Parameter* p : params) analytic_params.push_back(p->grad);
  const Tensor analytic_dx = dx;

  auto loss = [&] {
    Tensor out;
    layer.Forward(ctx, x, &out);
    return Projection(r, out);
  };
  std::vector<GradCheckStats> stats;
  stats.push_back(CheckTensor("dx", &x, analytic_dx, options, loss));
  for (size_t k = 0; k < params.size(); ++k) {
    stats.push_back(
        CheckTensor("d" + params[k]->name, &params[k]->value, analytic_params[k], options, loss));
  }
  return stats;
}

inline RunContext SingleThreadContext(Mode mode = Mode::kTrain) {
  RunContext ctx;
  ctx.cpu.pool = nullptr;
  ctx.mode = mode;
  return ctx;
}

}  // namespace qtrain::nn::testing

#endif  // QTRAIN_TESTS_UNIT_WORKER_NN_NN_TEST_UTIL_H_
