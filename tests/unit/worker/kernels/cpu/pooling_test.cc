#include "worker/kernels/cpu/pooling.h"

#include <algorithm>
#include <cmath>
#include <limits>
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

Pool2dShape MakeShape(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t stride,
                      int64_t pad) {
  Pool2dShape s;
  s.batch = n;
  s.channels = c;
  s.in_height = h;
  s.in_width = w;
  s.kernel_h = s.kernel_w = k;
  s.stride_h = s.stride_w = stride;
  s.pad_h = s.pad_w = pad;
  return s;
}

std::vector<Pool2dShape> Shapes() {
  std::vector<Pool2dShape> shapes = {
      MakeShape(2, 3, 28, 28, 2, 2, 0),                                  // the CNN's 2x2 max pool
      MakeShape(3, 2, 7, 7, 3, 2, 1),                                    // odd size, padded
      MakeShape(2, 2, 6, 5, 3, 1, 1),                                    // overlapping windows
      MakeShape(1, 1, 1, 1, 1, 1, 0),   MakeShape(4, 5, 9, 4, 2, 3, 1),  // stride > kernel
  };
  Pool2dShape rect = MakeShape(2, 3, 8, 9, 2, 1, 0);
  rect.kernel_w = 3;
  rect.stride_w = 2;
  rect.pad_w = 1;
  shapes.push_back(rect);
  return shapes;
}

std::string Describe(const Pool2dShape& s) {
  std::ostringstream os;
  os << s.batch << "x" << s.channels << "x" << s.in_height << "x" << s.in_width << " k"
     << s.kernel_h << "x" << s.kernel_w << " s" << s.stride_h << "x" << s.stride_w << " p"
     << s.pad_h << "x" << s.pad_w;
  return os.str();
}

class PoolingTest : public KernelTest {};

TEST_P(PoolingTest, MaxPoolMatchesReference) {
  for (const Pool2dShape& s : Shapes()) {
    SCOPED_TRACE(Describe(s));
    ASSERT_THAT(ValidatePool2dShape(s), IsOk());
    const int64_t planes = s.batch * s.channels;
    const std::vector<float> x = RandomVector(planes * s.in_plane(), 31);
    std::vector<float> y(planes * s.out_plane());
    std::vector<int32_t> argmax(y.size(), -1);
    MaxPool2dForward(ctx_, s, x.data(), y.data(), argmax.data());

    const std::vector<float> dy = RandomVector(y.size(), 32);
    std::vector<float> dx(x.size(), 99.0f);
    MaxPool2dBackward(ctx_, s, dy.data(), argmax.data(), dx.data());
    std::vector<float> want_dx(x.size(), 0.0f);

    for (int64_t p = 0; p < planes; ++p) {
      for (int64_t oh = 0; oh < s.out_height(); ++oh) {
        for (int64_t ow = 0; ow < s.out_width(); ++ow) {
          float best = -std::numeric_limits<float>::infinity();
          int64_t best_index = -1;
          for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
            for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
              const int64_t ih = oh * s.stride_h - s.pad_h + kh;
              const int64_t iw = ow * s.stride_w - s.pad_w + kw;
              if (ih < 0 || ih >= s.in_height || iw < 0 || iw >= s.in_width) continue;
              const float v = x[p * s.in_plane() + ih * s.in_width + iw];
              if (best_index < 0 || v > best) {
                best = v;
                best_index = ih * s.in_width + iw;
              }
            }
          }
          const int64_t o = p * s.out_plane() + oh * s.out_width() + ow;
          ASSERT_EQ(y[o], best) << "output " << o;
          ASSERT_EQ(argmax[o], best_index) << "output " << o;
          want_dx[p * s.in_plane() + best_index] += dy[o];
        }
      }
    }
    EXPECT_EQ(dx, want_dx);  // same additions in the same (output) order
  }
}

TEST_P(PoolingTest, MaxPoolTiesPickFirstAndNanPropagates) {
  const Pool2dShape s = MakeShape(1, 1, 2, 4, 2, 2, 0);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {5.0f, 5.0f, 1.0f, nan, 5.0f, 5.0f, nan, 2.0f};
  std::vector<float> y(2);
  std::vector<int32_t> argmax(2);
  MaxPool2dForward(ctx_, s, x.data(), y.data(), argmax.data());
  EXPECT_EQ(y[0], 5.0f);
  EXPECT_EQ(argmax[0], 0);
  EXPECT_TRUE(std::isnan(y[1]));
  EXPECT_EQ(argmax[1], 3);  // the first NaN in row-major window order
}

// Wide enough for the vectorised 2x2 path (8 outputs at a time) and its scalar tail; ties, NaNs
// and -inf placed at every window position.
TEST_P(PoolingTest, MaxPool2x2WideRowsKeepTieAndNanRules) {
  const Pool2dShape s = MakeShape(1, 2, 4, 38, 2, 2, 0);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const float pattern[] = {1.0f, 1.0f, nan, -inf, 3.0f, nan, 2.0f, 3.0f, -1.0f, 0.0f, -0.0f};
  std::vector<float> x(static_cast<size_t>(s.batch * s.channels * s.in_plane()));
  for (size_t i = 0; i < x.size(); ++i) x[i] = pattern[(i * 7 + i / 5) % 11];
  std::vector<float> y(static_cast<size_t>(s.batch * s.channels * s.out_plane()));
  std::vector<int32_t> argmax(y.size());
  MaxPool2dForward(ctx_, s, x.data(), y.data(), argmax.data());
  for (int64_t p = 0; p < s.batch * s.channels; ++p) {
    const float* xp = x.data() + p * s.in_plane();
    for (int64_t o = 0; o < s.out_plane(); ++o) {
      const int64_t oh = o / s.out_width();
      const int64_t ow = o % s.out_width();
      int64_t best_index = 2 * oh * s.in_width + 2 * ow;
      for (int64_t kh = 0; kh < 2; ++kh) {
        for (int64_t kw = 0; kw < 2; ++kw) {
          const int64_t i = (2 * oh + kh) * s.in_width + 2 * ow + kw;
          if (xp[i] > xp[best_index] || (std::isnan(xp[i]) && !std::isnan(xp[best_index]))) {
            best_index = i;
          }
        }
      }
      const size_t at = static_cast<size_t>(p * s.out_plane() + o);
      EXPECT_EQ(argmax[at], best_index) << "plane " << p << " output " << o;
      if (std::isnan(xp[best_index])) {
        EXPECT_TRUE(std::isnan(y[at]));
      } else {
        EXPECT_EQ(y[at], xp[best_index]);
      }
    }
  }
}

TEST_P(PoolingTest, AvgPoolMatchesReferenceForBothDivisors) {
  for (AvgPoolDivisor divisor : {AvgPoolDivisor::kWindowSize, AvgPoolDivisor::kValidCount}) {
    for (const Pool2dShape& s : Shapes()) {
      SCOPED_TRACE(Describe(s) + (divisor == AvgPoolDivisor::kWindowSize ? " window" : " valid"));
      const int64_t planes = s.batch * s.channels;
      const std::vector<float> x = RandomVector(planes * s.in_plane(), 33);
      std::vector<float> y(planes * s.out_plane());
      AvgPool2dForward(ctx_, s, divisor, x.data(), y.data());
      const std::vector<float> dy = RandomVector(y.size(), 34);
      std::vector<float> dx(x.size(), 99.0f);
      AvgPool2dBackward(ctx_, s, divisor, dy.data(), dx.data());

      std::vector<double> want_dx(x.size(), 0.0);
      for (int64_t p = 0; p < planes; ++p) {
        for (int64_t oh = 0; oh < s.out_height(); ++oh) {
          for (int64_t ow = 0; ow < s.out_width(); ++ow) {
            double sum = 0.0;
            int64_t valid = 0;
            std::vector<int64_t> inputs;
            for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
              for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
                const int64_t ih = oh * s.stride_h - s.pad_h + kh;
                const int64_t iw = ow * s.stride_w - s.pad_w + kw;
                if (ih < 0 || ih >= s.in_height || iw < 0 || iw >= s.in_width) continue;
                inputs.push_back(p * s.in_plane() + ih * s.in_width + iw);
                sum += x[inputs.back()];
                ++valid;
              }
            }
            const double div = divisor == AvgPoolDivisor::kWindowSize
                                   ? static_cast<double>(s.kernel_h * s.kernel_w)
                                   : static_cast<double>(valid);
            const int64_t o = p * s.out_plane() + oh * s.out_width() + ow;
            // A float sum of `valid` terms of magnitude <= 1, then one division.
            ASSERT_NEAR(y[o], sum / div, testing::SumErrorBound(valid + 1, valid) / div) << o;
            for (int64_t i : inputs) want_dx[i] += dy[o] / div;
          }
        }
      }
      const int64_t overlap = ((s.kernel_h + s.stride_h - 1) / s.stride_h) *
                              ((s.kernel_w + s.stride_w - 1) / s.stride_w);
      for (size_t i = 0; i < dx.size(); ++i) {
        ASSERT_NEAR(dx[i], want_dx[i], testing::SumErrorBound(overlap + 1, overlap)) << i;
      }
    }
  }
}

TEST_P(PoolingTest, GlobalAvgPoolMatchesReference) {
  const int64_t batch = 3, channels = 5, spatial = 49;
  const std::vector<float> x = RandomVector(batch * channels * spatial, 35);
  std::vector<float> y(batch * channels);
  GlobalAvgPoolForward(ctx_, batch, channels, spatial, x.data(), y.data());
  for (int64_t p = 0; p < batch * channels; ++p) {
    double sum = 0.0;
    for (int64_t i = 0; i < spatial; ++i) sum += x[p * spatial + i];
    EXPECT_NEAR(y[p], sum / spatial, 2.0 * testing::kU * std::fabs(sum / spatial) + 1e-30);
  }
  const std::vector<float> dy = RandomVector(batch * channels, 36);
  std::vector<float> dx(x.size());
  GlobalAvgPoolBackward(ctx_, batch, channels, spatial, dy.data(), dx.data());
  for (int64_t p = 0; p < batch * channels; ++p) {
    for (int64_t i = 0; i < spatial; ++i) {
      ASSERT_EQ(dx[p * spatial + i], dy[p] / static_cast<float>(spatial));
    }
  }
}

TEST(PoolingValidateTest, RejectsBadShapes) {
  EXPECT_THAT(ValidatePool2dShape(MakeShape(1, 1, 4, 4, 2, 2, 0)), IsOk());
  EXPECT_THAT(ValidatePool2dShape(MakeShape(0, 1, 4, 4, 2, 2, 0)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidatePool2dShape(MakeShape(1, 1, 4, 4, 0, 2, 0)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidatePool2dShape(MakeShape(1, 1, 4, 4, 2, 0, 0)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidatePool2dShape(MakeShape(1, 1, 4, 4, 2, 2, 2)),  // pad == kernel
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidatePool2dShape(MakeShape(1, 1, 2, 2, 5, 1, 1)),  // kernel > padded input
              StatusIs(absl::StatusCode::kInvalidArgument));
}

QTRAIN_INSTANTIATE_KERNEL_TEST(PoolingTest);

}  // namespace
}  // namespace qtrain::kernels
