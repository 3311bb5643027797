#include "worker/quant/binary.h"

#include <random>

#include "gtest/gtest.h"
#include "tests/unit/worker/quant/quant_test_util.h"

namespace qtrain::quant {
namespace {

using nn::testing::SingleThreadContext;
using testing::ExpectOnCodebook;

TEST(BinaryTest, PerChannelMeanAbsScale) {
  const nn::Tensor w({2, 3}, {0.3f, -0.6f, 0.0f, -2.0f, 1.0f, 3.0f});
  BinaryWeightQuantizer q;
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor wq;
  q.Forward(ctx, w, &wq);
  ASSERT_EQ(q.channel_scales().size(), 2u);
  EXPECT_FLOAT_EQ(q.channel_scales()[0], 0.3f);
  EXPECT_FLOAT_EQ(q.channel_scales()[1], 2.0f);
  const float a = q.channel_scales()[0];
  const std::vector<float> expected = {a, -a, a, -2.0f, 2.0f, 2.0f};  // sign(0) = +1
  for (int i = 0; i < 6; ++i) EXPECT_EQ(wq[i], expected[i]) << i;
  EXPECT_EQ(q.Levels(), (std::vector<float>{-2.0f, -a, a, 2.0f}));
}

TEST(BinaryTest, CodebookOnConvWeight) {
  std::mt19937_64 rng(1);
  const nn::Tensor w = nn::testing::RandomTensor({16, 8, 3, 3}, rng, -0.2f, 0.2f);
  BinaryWeightQuantizer q;
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor wq;
  q.Forward(ctx, w, &wq);
  ExpectOnCodebook(wq, q.Levels());
  // Each channel uses only its own +-alpha_c.
  for (int64_t c = 0; c < 16; ++c) {
    for (int64_t i = 0; i < 72; ++i) {
      ASSERT_EQ(std::fabs(wq[c * 72 + i]), q.channel_scales()[c]);
    }
  }
}

// XNOR-Net: dL/dw = g (1/n + alpha_c 1{|w| <= 1}); BinaryConnect: g 1{|w| <= 1}.
TEST(BinaryTest, StraightThroughClippedAtOne) {
  const nn::Tensor w({2, 2}, {0.5f, -1.5f, 2.0f, -0.25f});
  const nn::Tensor g({2, 2}, {1.0f, 2.0f, 3.0f, 4.0f});
  nn::RunContext ctx = SingleThreadContext();
  nn::Tensor wq, dw;
  BinaryWeightQuantizer xnor;
  xnor.Forward(ctx, w, &wq);
  xnor.Backward(ctx, w, g, &dw);
  EXPECT_FLOAT_EQ(dw[0], 1.0f * (0.5f + 1.0f));  // alpha_0 = 1, n = 2
  EXPECT_FLOAT_EQ(dw[1], 2.0f * 0.5f);           // |w| > 1: only the 1/n term
  EXPECT_FLOAT_EQ(dw[2], 3.0f * 0.5f);
  EXPECT_FLOAT_EQ(dw[3], 4.0f * (0.5f + 1.125f));  // alpha_1 = 1.125
  BinaryWeightQuantizer connect(BinaryScale::kNone);
  connect.Forward(ctx, w, &wq);
  EXPECT_EQ(connect.Levels(), (std::vector<float>{-1.0f, 1.0f}));
  ExpectOnCodebook(wq, connect.Levels());
  connect.Backward(ctx, w, g, &dw);
  EXPECT_EQ(dw[0], 1.0f);
  EXPECT_EQ(dw[1], 0.0f);
  EXPECT_EQ(dw[2], 0.0f);
  EXPECT_EQ(dw[3], 4.0f);
}

}  // namespace
}  // namespace qtrain::quant
