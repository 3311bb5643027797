// Shared helpers for the CPU kernel tests: seeded random data, and a parameterised fixture that
// runs each test under every (SIMD level, thread count) pair, skipping levels this CPU lacks.
#ifndef QTRAIN_TESTS_UNIT_WORKER_KERNELS_CPU_KERNEL_TEST_UTIL_H_
#define QTRAIN_TESTS_UNIT_WORKER_KERNELS_CPU_KERNEL_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/kernels/cpu/cpu_features.h"
#include "worker/kernels/cpu/thread_pool.h"

namespace qtrain::kernels::testing {

// Unit roundoff of float: every float operation is exact to within a factor (1 + d), |d| <= kU.
inline constexpr double kU = 1.0 / (1 << 24);

// The classic bound for a float sum of `terms` rounded products: |computed - exact| <=
// gamma(terms + 1) * sum |term_i| with gamma(t) = t*u / (1 - t*u), for any summation order and
// with or without FMA. Returned with a 2x margin.
inline double SumErrorBound(int64_t terms, double abs_sum) {
  const double t = static_cast<double>(terms + 1) * kU;
  return 2.0 * t / (1.0 - t) * abs_sum + 1e-37;
}

inline std::vector<float> RandomVector(int64_t n, uint32_t seed, float lo = -1.0f,
                                       float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

inline bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

struct KernelConfig {
  SimdLevel simd;
  int threads;
};

inline std::vector<KernelConfig> AllKernelConfigs() {
  std::vector<KernelConfig> configs;
  for (SimdLevel simd : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    for (int threads : {1, 2}) configs.push_back({simd, threads});
  }
  return configs;
}

inline std::string KernelConfigName(const ::testing::TestParamInfo<KernelConfig>& info) {
  return std::string(SimdLevelName(info.param.simd)) + "_" + std::to_string(info.param.threads) +
         "threads";
}

// Gives each test a CpuContext for its (simd, threads) parameter; skips unsupported SIMD levels.
class KernelTest : public ::testing::TestWithParam<KernelConfig> {
 protected:
  void SetUp() override {
    if (!SimdLevelSupported(GetParam().simd)) {
      GTEST_SKIP() << SimdLevelName(GetParam().simd) << " is not supported on this CPU";
    }
    pool_ = std::make_unique<ThreadPool>(GetParam().threads);
    ctx_ = CpuContext{pool_.get(), GetParam().simd};
  }

  std::unique_ptr<ThreadPool> pool_;
  CpuContext ctx_;
};

#define QTRAIN_INSTANTIATE_KERNEL_TEST(Fixture)                                                 \
  INSTANTIATE_TEST_SUITE_P(AllConfigs, Fixture,                                                 \
                           ::testing::ValuesIn(::qtrain::kernels::testing::AllKernelConfigs()), \
                           ::qtrain::kernels::testing::KernelConfigName)

}  // namespace qtrain::kernels::testing

#endif  // QTRAIN_TESTS_UNIT_WORKER_KERNELS_CPU_KERNEL_TEST_UTIL_H_
