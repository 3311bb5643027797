#include "worker/quant/quant_util.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "worker/kernels/cpu/thread_pool.h"

namespace qtrain::quant {
namespace {

TEST(QuantUtilTest, RoundNonNegative) {
  EXPECT_EQ(RoundNonNegative(0.0f), 0.0f);
  EXPECT_EQ(RoundNonNegative(0.49f), 0.0f);
  EXPECT_EQ(RoundNonNegative(0.5f), 1.0f);  // ties away from zero
  EXPECT_EQ(RoundNonNegative(2.51f), 3.0f);
  EXPECT_EQ(RoundNonNegative(255.0f), 255.0f);
  EXPECT_EQ(RoundUnit(0.4f, 3.0f, Discretize::kOn), 1.0f / 3.0f);
  EXPECT_EQ(RoundUnit(0.4f, 3.0f, Discretize::kOff), 0.4f);
  EXPECT_EQ(NumSteps(1), 1.0f);
  EXPECT_EQ(NumSteps(8), 255.0f);
}

TEST(QuantUtilTest, ReductionsAgreeAcrossThreadCounts) {
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> x(100000);
  for (float& v : x) v = dist(rng);
  x[77777] = -3.5f;
  kernels::CpuContext serial;
  serial.pool = nullptr;
  kernels::ThreadPool pool(2);
  kernels::CpuContext parallel;
  parallel.pool = &pool;
  EXPECT_EQ(MaxAbs(serial, static_cast<int64_t>(x.size()), x.data()), 3.5f);
  EXPECT_EQ(MaxAbs(parallel, static_cast<int64_t>(x.size()), x.data()), 3.5f);
  double expected = 0.0;
  for (float v : x) expected += v;
  for (const kernels::CpuContext* ctx : {&serial, &parallel}) {
    const auto sums = ChunkedSums<2>(*ctx, static_cast<int64_t>(x.size()),
                                     [&](int64_t begin, int64_t end, auto& acc) {
                                       for (int64_t i = begin; i < end; ++i) {
                                         acc[0] += x[i];
                                         acc[1] += 1.0;
                                       }
                                     });
    EXPECT_NEAR(sums[0], expected, 1e-9);
    EXPECT_EQ(sums[1], 100000.0);
  }
}

}  // namespace
}  // namespace qtrain::quant
