// Test helpers for worker/quant: codebook membership and finite-difference checks of weight
// quantizers (activation quantizers are layers and use nn::testing::CheckGradients).
#ifndef QTRAIN_TESTS_UNIT_WORKER_QUANT_QUANT_TEST_UTIL_H_
#define QTRAIN_TESTS_UNIT_WORKER_QUANT_QUANT_TEST_UTIL_H_

#include <algorithm>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"
#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant::testing {

// Every element of t is exactly one of `levels` (sorted ascending, unique).
inline void ExpectOnCodebook(const nn::Tensor& t, const std::vector<float>& levels) {
  ASSERT_TRUE(std::is_sorted(levels.begin(), levels.end()));
  ASSERT_TRUE(std::adjacent_find(levels.begin(), levels.end()) == levels.end());
  int64_t bad = 0;
  for (int64_t i = 0; i < t.size(); ++i) {
    if (!std::binary_search(levels.begin(), levels.end(), t[i])) {
      if (++bad <= 5) ADD_FAILURE() << "value " << t[i] << " at " << i << " is not a level";
    }
  }
  EXPECT_EQ(bad, 0);
}

// Compares dw and the quantizer's parameter grads with central differences of
// L = sum_i r_i Q(w)_i. The quantizer should be built with Discretize::kOff where it rounds.
inline void CheckWeightGradients(WeightQuantizer& q, const nn::Tensor& w_in,
                                 const nn::testing::GradCheckOptions& options) {
  nn::RunContext ctx = nn::testing::SingleThreadContext();
  nn::Tensor w = w_in;
  nn::Tensor wq, dw;
  q.Forward(ctx, w, &wq);
  std::mt19937_64 rng(options.seed);
  const nn::Tensor r = nn::testing::RandomTensor(wq.shape(), rng);
  q.Backward(ctx, w, r, &dw);
  ASSERT_EQ(dw.shape(), w.shape());
  std::vector<nn::Parameter*> params;
  q.CollectParameters(&params);
  std::vector<nn::Tensor> analytic;
  for (nn::Parameter* p : params) analytic.push_back(p->grad);
  const nn::Tensor analytic_dw = dw;
  auto loss = [&] {
    nn::Tensor out;
    q.Forward(ctx, w, &out);
    return nn::testing::Projection(r, out);
  };
  nn::testing::CheckTensor("dw", &w, analytic_dw, options, loss);
  for (size_t k = 0; k < params.size(); ++k) {
    nn::testing::CheckTensor("d" + params[k]->name, &params[k]->value, analytic[k], options, loss);
  }
}

// Uniform values in [lo, hi] whose distance to every point of `avoid` is at least `margin`.
inline nn::Tensor RandomAvoiding(const nn::Shape& shape, std::mt19937_64& rng, float lo, float hi,
                                 const std::vector<float>& avoid, float margin) {
  nn::Tensor t(shape);
  std::uniform_real_distribution<float> dist(lo, hi);
  for (int64_t i = 0; i < t.size(); ++i) {
    float v;
    bool ok;
    do {
      v = dist(rng);
      ok = true;
      for (float a : avoid) ok &= std::abs(v - a) >= margin;
    } while (!ok);
    t[i] = v;
  }
  return t;
}

}  // namespace qtrain::quant::testing

#endif  // QTRAIN_TESTS_UNIT_WORKER_QUANT_QUANT_TEST_UTIL_H_
