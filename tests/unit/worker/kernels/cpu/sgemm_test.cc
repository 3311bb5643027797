#include "worker/kernels/cpu/sgemm.h"

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"

namespace qtrain::kernels {
namespace {

using testing::KernelTest;
using testing::RandomVector;
using testing::SameBits;
using testing::SumErrorBound;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct GemmCase {
  Transpose ta;
  Transpose tb;
  int64_t m, n, k;
  float alpha, beta;
  int64_t pad = 0;  // extra elements per row of every stored matrix (lda > cols)
};

struct Operands {
  int64_t lda, ldb, ldc;
  std::vector<float> a, b, c;
};

Operands MakeOperands(const GemmCase& g, uint32_t seed, float c_fill) {
  Operands o;
  const int64_t a_rows = g.ta == Transpose::kNo ? g.m : g.k;
  const int64_t a_cols = g.ta == Transpose::kNo ? g.k : g.m;
  const int64_t b_rows = g.tb == Transpose::kNo ? g.k : g.n;
  const int64_t b_cols = g.tb == Transpose::kNo ? g.n : g.k;
  o.lda = std::max<int64_t>(1, a_cols + g.pad);
  o.ldb = std::max<int64_t>(1, b_cols + g.pad);
  o.ldc = std::max<int64_t>(1, g.n + g.pad);
  o.a = RandomVector(a_rows * o.lda, seed);
  o.b = RandomVector(b_rows * o.ldb, seed + 1);
  o.c = std::isnan(c_fill) ? std::vector<float>(g.m * o.ldc, kNaN)
                           : RandomVector(g.m * o.ldc, seed + 2);
  return o;
}

float OpA(const GemmCase& g, const Operands& o, int64_t i, int64_t p) {
  return g.ta == Transpose::kNo ? o.a[i * o.lda + p] : o.a[p * o.lda + i];
}
float OpB(const GemmCase& g, const Operands& o, int64_t p, int64_t j) {
  return g.tb == Transpose::kNo ? o.b[p * o.ldb + j] : o.b[j * o.ldb + p];
}

// Runs Sgemm and compares every element of C (and its untouched padding) with a double-precision
// triple loop, allowing the float rounding bound for a k-term dot product.
void CheckAgainstReference(const CpuContext& ctx, const GemmCase& g, bool nan_c) {
  SCOPED_TRACE(::testing::Message()
               << "m=" << g.m << " n=" << g.n << " k=" << g.k << " ta=" << (g.ta == Transpose::kYes)
               << " tb=" << (g.tb == Transpose::kYes) << " alpha=" << g.alpha << " beta=" << g.beta
               << " pad=" << g.pad << " nan_c=" << nan_c);
  Operands o = MakeOperands(g, 17 + g.m * 3 + g.n * 5 + g.k * 7, nan_c ? kNaN : 0.0f);
  const std::vector<float> c0 = o.c;
  Sgemm(ctx, g.ta, g.tb, g.m, g.n, g.k, g.alpha, o.a.data(), o.lda, o.b.data(), o.ldb, g.beta,
        o.c.data(), o.ldc);
  int failures = 0;
  for (int64_t i = 0; i < g.m; ++i) {
    for (int64_t j = 0; j < o.ldc; ++j) {
      const float got = o.c[i * o.ldc + j];
      if (j >= g.n) {  // padding past column n is never written
        if (!SameBits(got, c0[i * o.ldc + j])) ++failures;
        continue;
      }
      double dot = 0.0;
      double abs_dot = 0.0;
      for (int64_t p = 0; p < g.k; ++p) {
        const double term = static_cast<double>(OpA(g, o, i, p)) * OpB(g, o, p, j);
        dot += term;
        abs_dot += std::fabs(term);
      }
      const double c_old = g.beta == 0.0f ? 0.0 : c0[i * o.ldc + j];
      const double want = g.alpha * dot + g.beta * c_old;
      const double bound =
          SumErrorBound(g.k + 2, std::fabs(g.alpha) * abs_dot + std::fabs(g.beta * c_old));
      if (!(std::fabs(got - want) <= bound)) {
        if (++failures <= 5) {
          ADD_FAILURE() << "C(" << i << "," << j << ") = " << got << ", want " << want << " +- "
                        << bound;
        }
      }
    }
  }
  EXPECT_EQ(failures, 0);
}

class SgemmTest : public KernelTest {};

TEST_P(SgemmTest, MatchesReferenceOnEdgeSizesTransposesAndScalars) {
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> sizes = {
      {1, 1, 1},   {1, 17, 3},  {5, 7, 9},   {6, 16, 8},   {4, 8, 5},     {12, 32, 16},
      {7, 17, 33}, {13, 31, 1}, {2, 65, 70}, {33, 3, 300}, {19, 45, 257}, {25, 40, 513}};
  const std::vector<std::pair<float, float>> scalars = {
      {1.0f, 0.0f}, {0.5f, 2.0f}, {-1.5f, 1.0f}, {1.0f, -0.25f}};
  for (auto [m, n, k] : sizes) {
    for (Transpose ta : {Transpose::kNo, Transpose::kYes}) {
      for (Transpose tb : {Transpose::kNo, Transpose::kYes}) {
        for (auto [alpha, beta] : scalars) {
          CheckAgainstReference(ctx_, GemmCase{ta, tb, m, n, k, alpha, beta}, /*nan_c=*/false);
        }
      }
    }
  }
}

TEST_P(SgemmTest, BetaZeroOverwritesNanFilledC) {
  for (Transpose ta : {Transpose::kNo, Transpose::kYes}) {
    for (Transpose tb : {Transpose::kNo, Transpose::kYes}) {
      CheckAgainstReference(ctx_, GemmCase{ta, tb, 23, 37, 41, 1.0f, 0.0f}, /*nan_c=*/true);
      CheckAgainstReference(ctx_, GemmCase{ta, tb, 6, 16, 3, -2.0f, 0.0f}, /*nan_c=*/true);
    }
  }
}

TEST_P(SgemmTest, PaddedLeadingDimensionsLeavePaddingUntouched) {
  for (Transpose ta : {Transpose::kNo, Transpose::kYes}) {
    for (Transpose tb : {Transpose::kNo, Transpose::kYes}) {
      CheckAgainstReference(ctx_, GemmCase{ta, tb, 29, 35, 47, 0.75f, 0.5f, /*pad=*/5},
                            /*nan_c=*/false);
    }
  }
}

TEST_P(SgemmTest, SizesCrossingCacheBlocks) {
  const SgemmBlocking bl = SgemmBlockingFor(ctx_.simd);
  // Rows past one MC block, depth past one KC block, columns past one NC panel.
  CheckAgainstReference(
      ctx_, GemmCase{Transpose::kNo, Transpose::kNo, bl.mc + bl.mr + 1, 21, bl.kc + 3, 1.0f, 0.5f},
      false);
  CheckAgainstReference(
      ctx_, GemmCase{Transpose::kYes, Transpose::kYes, 5, bl.nc + bl.nr + 3, 2, 1.0f, 0.0f}, false);
  CheckAgainstReference(
      ctx_, GemmCase{Transpose::kNo, Transpose::kYes, 9, 11, 2 * bl.kc + 1, -1.0f, 1.0f}, false);
}

TEST_P(SgemmTest, EveryRowAndColumnRemainder) {
  // Every m % mr (each row-edge kernel) against full and ragged column strips.
  const SgemmBlocking bl = SgemmBlockingFor(ctx_.simd);
  for (int64_t m = 1; m <= 2 * bl.mr + 1; ++m) {
    for (int64_t n : {int64_t{bl.nr - 1}, int64_t{bl.nr}, int64_t{2 * bl.nr + 3}}) {
      for (Transpose ta : {Transpose::kNo, Transpose::kYes}) {
        for (Transpose tb : {Transpose::kNo, Transpose::kYes}) {
          CheckAgainstReference(ctx_, GemmCase{ta, tb, m, n, 19, 1.0f, 0.5f}, false);
        }
      }
    }
  }
}

TEST_P(SgemmTest, SmallMWideNPacksBInSeveralGroups) {
  // m fits one block of A, so B is packed and consumed a group of strips at a time; these widths
  // need several groups (the last one ragged).
  for (Transpose tb : {Transpose::kNo, Transpose::kYes}) {
    CheckAgainstReference(ctx_, GemmCase{Transpose::kNo, tb, 7, 1500, 37, 1.0f, 0.0f}, false);
    CheckAgainstReference(ctx_, GemmCase{Transpose::kYes, tb, 20, 2000, 300, -0.5f, 1.0f}, false);
  }
}

TEST_P(SgemmTest, LargeEnoughToSplitAcrossThreads) {
  // Both above the parallel threshold: the first splits columns (n >= m), the second rows.
  CheckAgainstReference(ctx_, GemmCase{Transpose::kNo, Transpose::kNo, 150, 200, 130, 1.0f, 0.0f},
                        false);
  CheckAgainstReference(ctx_, GemmCase{Transpose::kYes, Transpose::kNo, 250, 97, 140, 0.5f, 1.0f},
                        false);
}

TEST_P(SgemmTest, ZeroDepthScalesC) {
  std::vector<float> c = {1.0f, -2.0f, 3.0f, 4.0f, 5.0f, 6.0f};
  Sgemm(ctx_, Transpose::kNo, Transpose::kNo, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 0.5f, c.data(),
        3);
  EXPECT_EQ(c, (std::vector<float>{0.5f, -1.0f, 1.5f, 2.0f, 2.5f, 3.0f}));
  std::vector<float> nan_c(6, kNaN);
  Sgemm(ctx_, Transpose::kNo, Transpose::kNo, 2, 3, 0, 1.0f, nullptr, 1, nullptr, 3, 0.0f,
        nan_c.data(), 3);
  EXPECT_EQ(nan_c, std::vector<float>(6, 0.0f));
}

TEST_P(SgemmTest, AlphaZeroDoesNotReadAOrB) {
  const std::vector<float> a(4 * 5, kNaN);
  const std::vector<float> b(5 * 3, kNaN);
  std::vector<float> c(4 * 3, 2.0f);
  Sgemm(ctx_, Transpose::kNo, Transpose::kNo, 4, 3, 5, 0.0f, a.data(), 5, b.data(), 3, 1.5f,
        c.data(), 3);
  EXPECT_EQ(c, std::vector<float>(12, 3.0f));
}

TEST_P(SgemmTest, EmptyOutputIsANoOp) {
  std::vector<float> c = {7.0f};
  Sgemm(ctx_, Transpose::kNo, Transpose::kNo, 0, 1, 4, 1.0f, nullptr, 4, nullptr, 1, 0.0f, c.data(),
        1);
  Sgemm(ctx_, Transpose::kNo, Transpose::kNo, 1, 0, 4, 1.0f, nullptr, 4, nullptr, 1, 0.0f, c.data(),
        1);
  EXPECT_EQ(c[0], 7.0f);
}

TEST_P(SgemmTest, ResultIsIndependentOfThreadCount) {
  // Every element is computed with the same depth blocking and arithmetic whichever slab holds
  // it, so 1 and N threads agree bit for bit.
  const GemmCase g{Transpose::kNo, Transpose::kYes, 131, 262, 300, 1.0f, 0.0f};
  Operands o = MakeOperands(g, 5, 0.0f);
  std::vector<float> single = o.c;
  std::vector<float> parallel = o.c;
  Sgemm(CpuContext{nullptr, ctx_.simd}, g.ta, g.tb, g.m, g.n, g.k, g.alpha, o.a.data(), o.lda,
        o.b.data(), o.ldb, g.beta, single.data(), o.ldc);
  Sgemm(ctx_, g.ta, g.tb, g.m, g.n, g.k, g.alpha, o.a.data(), o.lda, o.b.data(), o.ldb, g.beta,
        parallel.data(), o.ldc);
  for (size_t i = 0; i < single.size(); ++i) {
    ASSERT_TRUE(SameBits(single[i], parallel[i])) << "element " << i;
  }
}

QTRAIN_INSTANTIATE_KERNEL_TEST(SgemmTest);

TEST(SgemmDeathTest, RejectsShortLeadingDimension) {
  std::vector<float> a(16), b(16), c(16);
  EXPECT_DEATH(Sgemm(CpuContext{}, Transpose::kNo, Transpose::kNo, 4, 4, 4, 1.0f, a.data(), 3,
                     b.data(), 4, 0.0f, c.data(), 4),
               "lda");
}

TEST(SgemmBlockingTest, TilesDivideBlocks) {
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    const SgemmBlocking bl = SgemmBlockingFor(level);
    EXPECT_EQ(bl.mc % bl.mr, 0) << SimdLevelName(level);
    EXPECT_EQ(bl.nc % bl.nr, 0) << SimdLevelName(level);
    EXPECT_GT(bl.kc, 0);
  }
}

}  // namespace
}  // namespace qtrain::kernels
