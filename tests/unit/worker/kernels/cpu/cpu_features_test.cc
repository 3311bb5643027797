#include "worker/kernels/cpu/cpu_features.h"

#include <iostream>
#include <string>

#include "gtest/gtest.h"
#include "worker/kernels/cpu/cpu_context.h"

namespace qtrain::kernels {
namespace {

TEST(CpuFeaturesTest, DetectedLevelIsSupportedAndStable) {
  const SimdLevel level = DetectSimdLevel();
  EXPECT_TRUE(SimdLevelSupported(level));
  EXPECT_TRUE(SimdLevelSupported(SimdLevel::kScalar));
  EXPECT_EQ(DetectSimdLevel(), level);
  std::cout << "detected SIMD level: " << SimdLevelName(level) << "\n";
}

TEST(CpuFeaturesTest, EffectiveLevelNeverExceedsDetected) {
  const SimdLevel detected = DetectSimdLevel();
  EXPECT_EQ(EffectiveSimdLevel(SimdLevel::kScalar), SimdLevel::kScalar);
  EXPECT_EQ(EffectiveSimdLevel(SimdLevel::kAvx512), detected);
  for (SimdLevel level : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    EXPECT_LE(static_cast<int>(EffectiveSimdLevel(level)), static_cast<int>(detected));
    EXPECT_LE(static_cast<int>(EffectiveSimdLevel(level)), static_cast<int>(level));
  }
}

TEST(CpuFeaturesTest, Names) {
  EXPECT_EQ(std::string(SimdLevelName(SimdLevel::kScalar)), "scalar");
  EXPECT_EQ(std::string(SimdLevelName(SimdLevel::kAvx2)), "avx2");
  EXPECT_EQ(std::string(SimdLevelName(SimdLevel::kAvx512)), "avx512");
}

TEST(CpuContextTest, DefaultsToOneThreadAndDetectedLevel) {
  const CpuContext ctx;
  EXPECT_EQ(ctx.pool, nullptr);
  EXPECT_EQ(ctx.num_threads(), 1);
  EXPECT_EQ(ctx.simd, DetectSimdLevel());
  ThreadPool pool(3);
  const CpuContext threaded{&pool, SimdLevel::kScalar};
  EXPECT_EQ(threaded.num_threads(), 3);
  EXPECT_EQ(threaded.SingleThreaded().pool, nullptr);
  EXPECT_EQ(threaded.SingleThreaded().simd, SimdLevel::kScalar);
}

}  // namespace
}  // namespace qtrain::kernels
