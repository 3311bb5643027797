#include "worker/kernels/cpu/conv.h"

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"

namespace qtrain::kernels {
namespace {

using qtrain::testing::IsOk;
using qtrain::testing::StatusIs;
using testing::KernelTest;
using testing::RandomVector;
using testing::SumErrorBound;

Conv2dShape MakeShape(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t kernel,
                      int64_t stride, int64_t pad) {
  Conv2dShape s;
  s.batch = n;
  s.in_channels = c;
  s.in_height = h;
  s.in_width = w;
  s.out_channels = k;
  s.kernel_h = s.kernel_w = kernel;
  s.stride_h = s.stride_w = stride;
  s.pad_h = s.pad_w = pad;
  return s;
}

std::vector<Conv2dShape> Shapes() {
  std::vector<Conv2dShape> shapes = {
      MakeShape(2, 3, 7, 6, 4, 3, 1, 1),      // 3x3 "same"
      MakeShape(3, 2, 9, 8, 5, 3, 2, 1),      // strided, odd sizes
      MakeShape(2, 4, 5, 5, 3, 1, 1, 0),      // pointwise: no im2col
      MakeShape(3, 4, 8, 7, 6, 1, 2, 0),      // 1x1 stride 2 (ResNet shortcut)
      MakeShape(4, 5, 4, 4, 6, 3, 1, 0),      // valid convolution
      MakeShape(3, 1, 5, 5, 2, 5, 1, 2),      // 5x5 "same"
      MakeShape(2, 2, 3, 3, 3, 3, 1, 3),      // padding wider than the image
      MakeShape(1, 3, 6, 6, 4, 3, 1, 1),      // batch 1: parallel GEMMs instead of images
      MakeShape(2, 16, 14, 14, 20, 3, 1, 1),  // large enough for the GEMM to use both threads
      MakeShape(2, 3, 5, 21, 7, 3, 1, 1),     // 16-column strips straddling output rows
      MakeShape(2, 32, 5, 5, 7, 3, 1, 1),     // depth 288: two depth blocks; strips span images
      MakeShape(2, 8, 6, 9, 40, 3, 1, 1),     // K >= 32: AVX-512 backward-weights tiles, 12-row A
      MakeShape(2, 5, 7, 7, 33, 3, 2, 1),     // the same strided, ragged rows and columns
  };
  Conv2dShape rows_strided = MakeShape(2, 2, 8, 17, 5, 3, 1, 1);
  rows_strided.stride_h = 2;  // vertical stride only
  shapes.push_back(rows_strided);
  Conv2dShape rect = MakeShape(3, 2, 6, 7, 3, 1, 1, 0);
  rect.kernel_h = 2;
  rect.kernel_w = 3;
  rect.stride_h = 2;
  rect.pad_w = 1;
  shapes.push_back(rect);
  return shapes;
}

std::string Describe(const Conv2dShape& s) {
  std::ostringstream os;
  os << s.batch << "x" << s.in_channels << "x" << s.in_height << "x" << s.in_width << " -> "
     << s.out_channels << " k" << s.kernel_h << "x" << s.kernel_w << " s" << s.stride_h << "x"
     << s.stride_w << " p" << s.pad_h << "x" << s.pad_w;
  return os.str();
}

// Index helpers for the NCHW tensors of a shape.
struct Index {
  const Conv2dShape& s;
  int64_t X(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return ((n * s.in_channels + c) * s.in_height + h) * s.in_width + w;
  }
  int64_t Y(int64_t n, int64_t k, int64_t h, int64_t w) const {
    return ((n * s.out_channels + k) * s.out_height() + h) * s.out_width() + w;
  }
  int64_t W(int64_t k, int64_t c, int64_t h, int64_t w) const {
    return ((k * s.in_channels + c) * s.kernel_h + h) * s.kernel_w + w;
  }
};

// Calls fn(x_index, y_index, w_index) for every multiply of the direct convolution.
template <class Fn>
void ForEachTap(const Conv2dShape& s, Fn fn) {
  const Index ix{s};
  for (int64_t n = 0; n < s.batch; ++n) {
    for (int64_t k = 0; k < s.out_channels; ++k) {
      for (int64_t oh = 0; oh < s.out_height(); ++oh) {
        for (int64_t ow = 0; ow < s.out_width(); ++ow) {
          for (int64_t c = 0; c < s.in_channels; ++c) {
            for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
              for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
                const int64_t ih = oh * s.stride_h - s.pad_h + kh;
                const int64_t iw = ow * s.stride_w - s.pad_w + kw;
                if (ih < 0 || ih >= s.in_height || iw < 0 || iw >= s.in_width) continue;
                fn(ix.X(n, c, ih, iw), ix.Y(n, k, oh, ow), ix.W(k, c, kh, kw));
              }
            }
          }
        }
      }
    }
  }
}

struct Tensors {
  std::vector<float> x, w, bias, dy;
};

Tensors MakeTensors(const Conv2dShape& s, uint32_t seed) {
  const int64_t x_size = s.batch * s.in_channels * s.in_height * s.in_width;
  const int64_t y_size = s.batch * s.out_channels * s.out_height() * s.out_width();
  return Tensors{RandomVector(x_size, seed), RandomVector(s.out_channels * s.col_rows(), seed + 1),
                 RandomVector(s.out_channels, seed + 2), RandomVector(y_size, seed + 3)};
}

// Compares got with want element-wise, allowing SumErrorBound(terms, abs_sum[i]).
void ExpectWithinBound(const std::vector<float>& got, const std::vector<double>& want,
                       const std::vector<double>& abs_sum, int64_t terms, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  int failures = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = SumErrorBound(terms, abs_sum[i]);
    if (!(std::fabs(got[i] - want[i]) <= bound) && ++failures <= 5) {
      ADD_FAILURE() << what << "[" << i << "] = " << got[i] << ", want " << want[i] << " +- "
                    << bound;
    }
  }
  EXPECT_EQ(failures, 0) << what;
}

class ConvTest : public KernelTest {};

TEST_P(ConvTest, ForwardMatchesDirectConvolution) {
  for (const Conv2dShape& s : Shapes()) {
    SCOPED_TRACE(Describe(s));
    ASSERT_THAT(ValidateConv2dShape(s), IsOk());
    const Tensors t = MakeTensors(s, 51);
    for (bool with_bias : {false, true}) {
      std::vector<double> want(t.dy.size(), 0.0), abs_sum(t.dy.size(), 0.0);
      ForEachTap(s, [&](int64_t xi, int64_t yi, int64_t wi) {
        want[yi] += static_cast<double>(t.x[xi]) * t.w[wi];
        abs_sum[yi] += std::fabs(static_cast<double>(t.x[xi]) * t.w[wi]);
      });
      if (with_bias) {
        const Index ix{s};
        for (int64_t n = 0; n < s.batch; ++n) {
          for (int64_t k = 0; k < s.out_channels; ++k) {
            for (int64_t o = 0; o < s.col_cols(); ++o) {
              want[ix.Y(n, k, 0, 0) + o] += t.bias[k];
              abs_sum[ix.Y(n, k, 0, 0) + o] += std::fabs(t.bias[k]);
            }
          }
        }
      }
      std::vector<float> y(t.dy.size(), std::nanf(""));
      Conv2dForward(ctx_, s, t.x.data(), t.w.data(), with_bias ? t.bias.data() : nullptr, y.data());
      ExpectWithinBound(y, want, abs_sum, s.col_rows() + 1, with_bias ? "y+bias" : "y");
    }
  }
}

TEST_P(ConvTest, BackwardDataMatchesDirectConvolution) {
  for (const Conv2dShape& s : Shapes()) {
    SCOPED_TRACE(Describe(s));
    const Tensors t = MakeTensors(s, 52);
    std::vector<double> want(t.x.size(), 0.0), abs_sum(t.x.size(), 0.0);
    ForEachTap(s, [&](int64_t xi, int64_t yi, int64_t wi) {
      want[xi] += static_cast<double>(t.dy[yi]) * t.w[wi];
      abs_sum[xi] += std::fabs(static_cast<double>(t.dy[yi]) * t.w[wi]);
    });
    std::vector<float> dx(t.x.size(), std::nanf(""));
    Conv2dBackwardData(ctx_, s, t.dy.data(), t.w.data(), dx.data());
    // A GEMM sum over output channels, then col2im adds up to KH*KW of those.
    ExpectWithinBound(dx, want, abs_sum, s.out_channels + s.kernel_h * s.kernel_w + 1, "dx");
  }
}

TEST_P(ConvTest, BackwardWeightsMatchesDirectConvolution) {
  for (const Conv2dShape& s : Shapes()) {
    SCOPED_TRACE(Describe(s));
    const Tensors t = MakeTensors(s, 53);
    std::vector<double> want(t.w.size(), 0.0), abs_sum(t.w.size(), 0.0);
    ForEachTap(s, [&](int64_t xi, int64_t yi, int64_t wi) {
      want[wi] += static_cast<double>(t.dy[yi]) * t.x[xi];
      abs_sum[wi] += std::fabs(static_cast<double>(t.dy[yi]) * t.x[xi]);
    });
    std::vector<double> want_bias(s.out_channels, 0.0), abs_bias(s.out_channels, 0.0);
    const Index ix{s};
    for (int64_t n = 0; n < s.batch; ++n) {
      for (int64_t k = 0; k < s.out_channels; ++k) {
        for (int64_t o = 0; o < s.col_cols(); ++o) {
          want_bias[k] += t.dy[ix.Y(n, k, 0, 0) + o];
          abs_bias[k] += std::fabs(t.dy[ix.Y(n, k, 0, 0) + o]);
        }
      }
    }
    std::vector<float> dw(t.w.size(), std::nanf(""));
    std::vector<float> dbias(s.out_channels, std::nanf(""));
    Conv2dBackwardWeights(ctx_, s, t.x.data(), t.dy.data(), dw.data(), dbias.data());
    // Summed over every image and output position (float, across images and chunks).
    const int64_t terms = s.batch * s.col_cols() + s.batch + 2;
    ExpectWithinBound(dw, want, abs_sum, terms, "dw");
    ExpectWithinBound(dbias, want_bias, abs_bias, 2, "dbias");  // double accumulation
    std::vector<float> dw_only(t.w.size());
    Conv2dBackwardWeights(ctx_, s, t.x.data(), t.dy.data(), dw_only.data(), nullptr);
    EXPECT_EQ(dw_only, dw);
  }
}

// L = sum(r * conv(x, w) + bias) is linear in x, w and bias, so a central difference with a large
// step is exact up to float rounding of the few outputs it changes.
TEST_P(ConvTest, GradientsMatchFiniteDifferences) {
  for (const Conv2dShape& s :
       {MakeShape(2, 2, 5, 4, 3, 3, 1, 1), MakeShape(2, 2, 6, 5, 2, 3, 2, 1)}) {
    SCOPED_TRACE(Describe(s));
    Tensors t = MakeTensors(s, 54);
    const std::vector<float>& r = t.dy;
    auto loss = [&]() {
      std::vector<float> y(r.size());
      Conv2dForward(ctx_, s, t.x.data(), t.w.data(), t.bias.data(), y.data());
      double l = 0.0;
      for (size_t i = 0; i < y.size(); ++i) l += static_cast<double>(r[i]) * y[i];
      return l;
    };
    auto central = [&](float* v) {
      const float saved = *v;
      *v = saved + 1.0f;
      const double plus = loss();
      *v = saved - 1.0f;
      const double minus = loss();
      *v = saved;
      return (plus - minus) / 2.0;
    };
    std::vector<float> dx(t.x.size()), dw(t.w.size()), dbias(s.out_channels);
    Conv2dBackwardData(ctx_, s, r.data(), t.w.data(), dx.data());
    Conv2dBackwardWeights(ctx_, s, t.x.data(), r.data(), dw.data(), dbias.data());
    for (size_t i = 0; i < t.x.size(); ++i) EXPECT_NEAR(dx[i], central(&t.x[i]), 1e-4) << "x" << i;
    for (size_t i = 0; i < t.w.size(); ++i) EXPECT_NEAR(dw[i], central(&t.w[i]), 1e-4) << "w" << i;
    for (int64_t k = 0; k < s.out_channels; ++k) {
      EXPECT_NEAR(dbias[k], central(&t.bias[k]), 1e-4) << "bias " << k;
    }
  }
}

TEST_P(ConvTest, ResultsIndependentOfThreadCountExceptWeightGradient) {
  const Conv2dShape s = MakeShape(5, 3, 9, 9, 4, 3, 1, 1);
  const Tensors t = MakeTensors(s, 55);
  const CpuContext single{nullptr, ctx_.simd};
  std::vector<float> y1(t.dy.size()), y2(t.dy.size()), dx1(t.x.size()), dx2(t.x.size());
  Conv2dForward(single, s, t.x.data(), t.w.data(), t.bias.data(), y1.data());
  Conv2dForward(ctx_, s, t.x.data(), t.w.data(), t.bias.data(), y2.data());
  EXPECT_EQ(y1, y2);
  Conv2dBackwardData(single, s, t.dy.data(), t.w.data(), dx1.data());
  Conv2dBackwardData(ctx_, s, t.dy.data(), t.w.data(), dx2.data());
  EXPECT_EQ(dx1, dx2);
  // The weight gradient is deterministic for a given thread count.
  std::vector<float> dw1(t.w.size()), dw2(t.w.size());
  Conv2dBackwardWeights(ctx_, s, t.x.data(), t.dy.data(), dw1.data(), nullptr);
  Conv2dBackwardWeights(ctx_, s, t.x.data(), t.dy.data(), dw2.data(), nullptr);
  EXPECT_EQ(dw1, dw2);
}

QTRAIN_INSTANTIATE_KERNEL_TEST(ConvTest);

TEST(Im2ColTest, MatchesIndexFormulaAndCol2ImIsItsAdjoint) {
  for (const Conv2dShape& s : Shapes()) {
    SCOPED_TRACE(Describe(s));
    const int64_t image_size = s.in_channels * s.in_height * s.in_width;
    const std::vector<float> image = RandomVector(image_size, 56);
    std::vector<float> col(s.col_rows() * s.col_cols(), std::nanf(""));
    Im2Col(s, image.data(), col.data());
    for (int64_t c = 0; c < s.in_channels; ++c) {
      for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
          const int64_t row = (c * s.kernel_h + kh) * s.kernel_w + kw;
          for (int64_t oh = 0; oh < s.out_height(); ++oh) {
            for (int64_t ow = 0; ow < s.out_width(); ++ow) {
              const int64_t ih = oh * s.stride_h - s.pad_h + kh;
              const int64_t iw = ow * s.stride_w - s.pad_w + kw;
              const bool inside = ih >= 0 && ih < s.in_height && iw >= 0 && iw < s.in_width;
              const float want = inside ? image[(c * s.in_height + ih) * s.in_width + iw] : 0.0f;
              ASSERT_EQ(col[row * s.col_cols() + oh * s.out_width() + ow], want)
                  << "row " << row << " oh " << oh << " ow " << ow;
            }
          }
        }
      }
    }
    // <im2col(x), g> == <x, col2im(g)>.
    const std::vector<float> g = RandomVector(col.size(), 57);
    std::vector<float> back(image_size, std::nanf(""));
    Col2Im(s, g.data(), back.data());
    double lhs = 0.0, rhs = 0.0, abs_sum = 0.0;
    for (size_t i = 0; i < col.size(); ++i) {
      lhs += static_cast<double>(col[i]) * g[i];
      abs_sum += std::fabs(static_cast<double>(col[i]) * g[i]);
    }
    for (int64_t i = 0; i < image_size; ++i) rhs += static_cast<double>(image[i]) * back[i];
    EXPECT_NEAR(lhs, rhs, SumErrorBound(s.kernel_h * s.kernel_w, abs_sum));
  }
}

TEST(ConvValidateTest, RejectsBadShapes) {
  EXPECT_THAT(ValidateConv2dShape(MakeShape(1, 1, 4, 4, 1, 3, 1, 1)), IsOk());
  EXPECT_THAT(ValidateConv2dShape(MakeShape(0, 1, 4, 4, 1, 3, 1, 1)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateConv2dShape(MakeShape(1, 1, 4, 4, 0, 3, 1, 1)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateConv2dShape(MakeShape(1, 1, 4, 4, 1, 3, 0, 1)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateConv2dShape(MakeShape(1, 1, 4, 4, 1, 3, 1, -1)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateConv2dShape(MakeShape(1, 1, 2, 2, 1, 5, 1, 1)),  // kernel > padded input
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::kernels
