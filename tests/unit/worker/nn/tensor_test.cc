#include "worker/nn/tensor.h"

#include <cstdint>

#include "gtest/gtest.h"

namespace qtrain::nn {
namespace {

TEST(ShapeTest, NumElementsAndToString) {
  EXPECT_EQ(NumElements({}), 1);
  EXPECT_EQ(NumElements({2, 3, 4}), 24);
  EXPECT_EQ(NumElements({5, 0}), 0);
  EXPECT_EQ(ShapeToString({128, 1, 28, 28}), "[128,1,28,28]");
  EXPECT_EQ(ShapeToString({}), "[]");
}

TEST(TensorTest, ShapeConstructorZeroFills) {
  Tensor t({2, 3});
  EXPECT_EQ(t.rank(), 2);
  EXPECT_EQ(t.dim(0), 2);
  EXPECT_EQ(t.dim(1), 3);
  EXPECT_EQ(t.size(), 6);
  for (int64_t i = 0; i < t.size(); ++i) EXPECT_EQ(t[i], 0.0f);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u);
}

TEST(TensorTest, ValuesConstructorAndCopy) {
  Tensor a({2, 2}, {1, 2, 3, 4});
  Tensor b = a;
  b[0] = 9;
  EXPECT_EQ(a[0], 1.0f);
  EXPECT_EQ(b[3], 4.0f);
  EXPECT_EQ(b.shape(), a.shape());
  Tensor c;
  EXPECT_TRUE(c.empty());
  c = a;
  EXPECT_EQ(c.span()[2], 3.0f);
}

TEST(TensorTest, ResizeOnlyGrows) {
  Tensor t({4, 4});
  const float* before = t.data();
  t.Resize({2, 2});
  EXPECT_EQ(t.size(), 4);
  EXPECT_EQ(t.data(), before);  // shrinking keeps the allocation
  t.Resize({4, 4});
  EXPECT_EQ(t.data(), before);  // and growing back within capacity too
  t.Resize({64, 64});
  EXPECT_EQ(t.size(), 4096);
}

TEST(TensorTest, ReshapeKeepsData) {
  Tensor t({2, 3}, {1, 2, 3, 4, 5, 6});
  t.Reshape({3, 2});
  EXPECT_EQ(t.shape(), (Shape{3, 2}));
  EXPECT_EQ(t[5], 6.0f);
  t.Fill(-1.0f);
  EXPECT_EQ(t[0], -1.0f);
}

TEST(TensorDeathTest, ReshapeToOtherSizeAborts) {
  Tensor t({2, 3});
  EXPECT_DEATH(t.Reshape({4, 2}), "reshape");
}

}  // namespace
}  // namespace qtrain::nn
