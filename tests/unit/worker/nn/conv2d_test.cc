#include "worker/nn/conv2d.h"

#include <random>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"
#include "worker/kernels/cpu/thread_pool.h"

namespace qtrain::nn {
namespace {

using ::qtrain::testing::StatusIs;
using testing::CheckGradients;
using testing::GradCheckOptions;
using testing::RandomTensor;
using testing::SingleThreadContext;

// Direct convolution in double: the reference for the forward pass.
std::vector<double> ReferenceConv(const Tensor& x, const Tensor& w, const Tensor* bias,
                                  int64_t stride, int64_t pad, Shape* out_shape) {
  const int64_t n = x.dim(0), c = x.dim(1), h = x.dim(2), wd = x.dim(3);
  const int64_t k = w.dim(0), kh = w.dim(2), kw = w.dim(3);
  const int64_t oh = (h + 2 * pad - kh) / stride + 1, ow = (wd + 2 * pad - kw) / stride + 1;
  *out_shape = {n, k, oh, ow};
  std::vector<double> y(n * k * oh * ow, 0.0);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t o = 0; o < k; ++o)
      for (int64_t i = 0; i < oh; ++i)
        for (int64_t j = 0; j < ow; ++j) {
          double sum = bias != nullptr ? (*bias)[o] : 0.0;
          for (int64_t ci = 0; ci < c; ++ci)
            for (int64_t u = 0; u < kh; ++u)
              for (int64_t v = 0; v < kw; ++v) {
                const int64_t ih = i * stride - pad + u, iw = j * stride - pad + v;
                if (ih < 0 || ih >= h || iw < 0 || iw >= wd) continue;
                sum += static_cast<double>(x[((b * c + ci) * h + ih) * wd + iw]) *
                       w[((o * c + ci) * kh + u) * kw + v];
              }
          y[((b * k + o) * oh + i) * ow + j] = sum;
        }
  return y;
}

struct ConvCase {
  int64_t in, out, kernel, stride, padding;
  bool bias;
  int64_t h, w;
};

class Conv2dCaseTest : public ::testing::TestWithParam<ConvCase> {};

TEST_P(Conv2dCaseTest, ForwardMatchesDirectConvolution) {
  const ConvCase p = GetParam();
  std::mt19937_64 rng(11);
  Conv2d conv("conv",
              {.in_channels = p.in,
               .out_channels = p.out,
               .kernel = p.kernel,
               .stride = p.stride,
               .padding = p.padding,
               .bias = p.bias},
              rng);
  if (p.bias) conv.bias().value = RandomTensor({p.out}, rng);
  const Tensor x = RandomTensor({2, p.in, p.h, p.w}, rng);
  Tensor y;
  RunContext ctx = SingleThreadContext();
  conv.Forward(ctx, x, &y);
  Shape ref_shape;
  const std::vector<double> ref =
      ReferenceConv(x, conv.weight().value, p.bias ? &conv.bias().value : nullptr, p.stride,
                    p.padding, &ref_shape);
  ASSERT_EQ(y.shape(), ref_shape);
  EXPECT_EQ(*conv.OutputShape(x.shape()), ref_shape);
  // Float dot products of length <= 27 with |terms| < ~1: error well under 1e-5.
  for (int64_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], ref[i], 1e-5) << i;
}

// L is linear in x and in W separately: the central difference is exact up to rounding, so a
// large eps (0.5) keeps the float rounding of y (~1e-7 relative, a few hundred outputs) far below
// the 2e-4 tolerance.
TEST_P(Conv2dCaseTest, GradientsMatchFiniteDifferences) {
  const ConvCase p = GetParam();
  std::mt19937_64 rng(12);
  Conv2d conv("conv",
              {.in_channels = p.in,
               .out_channels = p.out,
               .kernel = p.kernel,
               .stride = p.stride,
               .padding = p.padding,
               .bias = p.bias},
              rng);
  CheckGradients(conv, RandomTensor({2, p.in, p.h, p.w}, rng),
                 GradCheckOptions{.epsilon = 0.5f, .abs_tol = 2e-4, .rel_tol = 1e-4});
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Conv2dCaseTest,
    ::testing::Values(ConvCase{2, 3, 3, 1, 1, false, 5, 5},   // the "same" 3x3 of the models
                      ConvCase{2, 3, 3, 2, 1, true, 6, 5},    // strided, odd width, bias
                      ConvCase{3, 2, 3, 1, 0, true, 4, 4},    // no padding
                      ConvCase{2, 4, 1, 2, 0, false, 5, 5},   // 1x1 stride 2 (a projection)
                      ConvCase{3, 2, 1, 1, 0, true, 3, 4}));  // pointwise (no im2col)

TEST(Conv2dTest, ParametersAndDescribe) {
  std::mt19937_64 rng(1);
  Conv2d conv("conv",
              {.in_channels = 3, .out_channels = 16, .kernel = 3, .stride = 1, .padding = 1}, rng);
  std::vector<Parameter*> params;
  conv.CollectParameters(&params);
  ASSERT_EQ(params.size(), 1u);  // no bias by default
  EXPECT_EQ(params[0]->name, "weight");
  EXPECT_EQ(params[0]->value.shape(), (Shape{16, 3, 3, 3}));
  EXPECT_EQ(conv.Describe(), "conv2d 3->16 k3 s1 p1");
}

TEST(Conv2dTest, OutputShapeErrors) {
  std::mt19937_64 rng(1);
  Conv2d conv("c1", {.in_channels = 3, .out_channels = 4, .kernel = 3, .stride = 1}, rng);
  EXPECT_EQ(*conv.OutputShape({2, 3, 8, 8}), (Shape{2, 4, 6, 6}));
  EXPECT_THAT(conv.OutputShape({2, 1, 8, 8}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("'c1'")));
  EXPECT_THAT(conv.OutputShape({2, 3, 2, 8}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(conv.OutputShape({3, 8, 8}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(Conv2dTest, ThreadedMatchesSingleThreaded) {
  std::mt19937_64 rng(2);
  Conv2d conv("conv", {.in_channels = 4, .out_channels = 8, .kernel = 3, .stride = 1, .padding = 1},
              rng);
  const Tensor x = RandomTensor({5, 4, 6, 6}, rng);
  const Tensor dy = RandomTensor({5, 8, 6, 6}, rng);
  RunContext one = SingleThreadContext();
  Tensor y1, dx1;
  conv.Forward(one, x, &y1);
  conv.Backward(one, dy, &dx1);
  const Tensor dw1 = conv.weight().grad;
  kernels::ThreadPool pool(2);
  RunContext two = SingleThreadContext();
  two.cpu.pool = &pool;
  Tensor y2, dx2;
  conv.Forward(two, x, &y2);
  conv.Backward(two, dy, &dx2);
  // Forward and backward data split by image (same bits); dw sums per-chunk partials in another
  // order: 5*36 products per element, |terms| < 1.
  for (int64_t i = 0; i < y1.size(); ++i) EXPECT_EQ(y1[i], y2[i]);
  for (int64_t i = 0; i < dx1.size(); ++i) EXPECT_EQ(dx1[i], dx2[i]);
  for (int64_t i = 0; i < dw1.size(); ++i) EXPECT_NEAR(dw1[i], conv.weight().grad[i], 1e-4);
}

// The hook the weight quantizers will use: whatever EffectiveWeight returns is what both passes
// use, and the weight gradient lands on the master weight (straight-through).
class NegatedWeightConv : public Conv2d {
 public:
  using Conv2d::Conv2d;

 protected:
  const Tensor& EffectiveWeight(RunContext& ctx) override {
    effective_ = weight().value;
    for (int64_t i = 0; i < effective_.size(); ++i) effective_[i] = -effective_[i];
    return effective_;
  }

 private:
  Tensor effective_;
};

TEST(Conv2dTest, EffectiveWeightHookFeedsBothPasses) {
  std::mt19937_64 rng_a(5), rng_b(5);
  Conv2d plain("conv", {.in_channels = 2, .out_channels = 3, .kernel = 3, .padding = 1}, rng_a);
  NegatedWeightConv negated(
      "conv", {.in_channels = 2, .out_channels = 3, .kernel = 3, .padding = 1}, rng_b);
  std::mt19937_64 rng(6);
  const Tensor x = RandomTensor({2, 2, 4, 4}, rng);
  const Tensor dy = RandomTensor({2, 3, 4, 4}, rng);
  RunContext ctx = SingleThreadContext();
  Tensor y1, y2, dx1, dx2;
  plain.Forward(ctx, x, &y1);
  plain.Backward(ctx, dy, &dx1);
  negated.Forward(ctx, x, &y2);
  negated.Backward(ctx, dy, &dx2);
  for (int64_t i = 0; i < y1.size(); ++i) EXPECT_FLOAT_EQ(y2[i], -y1[i]);
  for (int64_t i = 0; i < dx1.size(); ++i) EXPECT_FLOAT_EQ(dx2[i], -dx1[i]);
  for (int64_t i = 0; i < plain.weight().grad.size(); ++i) {
    EXPECT_FLOAT_EQ(negated.weight().grad[i], plain.weight().grad[i]);
  }
}

}  // namespace
}  // namespace qtrain::nn
