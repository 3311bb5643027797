#include "worker/quant/ldnq/hessian.h"

#include <bit>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/comm/thread_communicator.h"

namespace qtrain::quant::ldnq {
namespace {

nn::Tensor RandomTensor(nn::Shape shape, uint64_t seed) {
  nn::Tensor t(std::move(shape));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.5f, 1.0f);
  for (int64_t i = 0; i < t.size(); ++i) t[i] = normal(rng);
  return t;
}

// Mean of y y^T over the given rows (each with a trailing 1 when bias), in double.
std::vector<double> Direct(const std::vector<std::vector<double>>& samples, bool bias) {
  const size_t d = samples[0].size() + (bias ? 1 : 0);
  std::vector<double> h(d * d, 0.0);
  for (std::vector<double> y : samples) {
    if (bias) y.push_back(1.0);
    for (size_t i = 0; i < d; ++i) {
      for (size_t j = 0; j < d; ++j) h[i * d + j] += y[i] * y[j];
    }
  }
  for (double& x : h) x /= static_cast<double>(samples.size());
  return h;
}

void ExpectNear(const std::vector<double>& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-5 * (1.0 + std::fabs(want[i]))) << i;
  }
}

TEST(HessianTest, LinearMatchesDirectSum) {
  for (BiasColumn bias : {BiasColumn::kNone, BiasColumn::kAppendOne}) {
    HessianAccumulator acc(5, bias);
    std::vector<std::vector<double>> samples;
    for (int batch = 0; batch < 3; ++batch) {
      const nn::Tensor x = RandomTensor({7, 5}, 11 + batch);
      acc.AddLinearInput(kernels::CpuContext{}, x);
      for (int i = 0; i < 7; ++i) samples.emplace_back(x.data() + i * 5, x.data() + i * 5 + 5);
    }
    EXPECT_EQ(acc.samples(), 21);
    EXPECT_EQ(acc.dim(), bias == BiasColumn::kAppendOne ? 6 : 5);
    ExpectNear(acc.Mean(), Direct(samples, bias == BiasColumn::kAppendOne));
  }
}

TEST(HessianTest, ConvolutionAveragesEveryPatchWithZeroPadding) {
  kernels::Conv2dShape s;
  s.batch = 2;
  s.in_channels = 3;
  s.in_height = 5;
  s.in_width = 6;
  s.out_channels = 4;
  s.kernel_h = s.kernel_w = 3;
  s.stride_h = s.stride_w = 2;
  s.pad_h = s.pad_w = 1;
  for (BiasColumn bias : {BiasColumn::kNone, BiasColumn::kAppendOne}) {
    HessianAccumulator acc(s.col_rows(), bias);
    const nn::Tensor x = RandomTensor({2, 3, 5, 6}, 5);
    acc.AddConvInput(kernels::CpuContext{}, s, x);
    acc.AddConvInput(kernels::CpuContext{}, s, x);  // twice: the mean is unchanged
    std::vector<std::vector<double>> samples;
    for (int64_t n = 0; n < 2; ++n) {
      for (int64_t oh = 0; oh < s.out_height(); ++oh) {
        for (int64_t ow = 0; ow < s.out_width(); ++ow) {
          std::vector<double> y;
          for (int64_t c = 0; c < 3; ++c) {
            for (int64_t kh = 0; kh < 3; ++kh) {
              for (int64_t kw = 0; kw < 3; ++kw) {
                const int64_t ih = oh * 2 - 1 + kh, iw = ow * 2 - 1 + kw;
                const bool inside = ih >= 0 && ih < 5 && iw >= 0 && iw < 6;
                y.push_back(inside ? x[((n * 3 + c) * 5 + ih) * 6 + iw] : 0.0);
              }
            }
          }
          samples.push_back(y);
        }
      }
    }
    EXPECT_EQ(acc.samples(), 2 * static_cast<int64_t>(samples.size()));
    ExpectNear(acc.Mean(), Direct(samples, bias == BiasColumn::kAppendOne));
  }
}

// Distributed accumulation: ranks (threads over an in-memory communicator) each add their own
// batches, AllReduceHessian sums them; every rank then holds the same bits, equal to one
// accumulator fed every batch (to double rounding: the batches' float Gram matrices are added in
// another order), and the samples are counted once each.
TEST(HessianTest, AllReduceSumsTheRanksShards) {
  constexpr int kRanks = 3, kBatches = 5;
  kernels::Conv2dShape shape;
  shape.batch = 2;
  shape.in_channels = 3;
  shape.in_height = shape.in_width = 6;
  shape.out_channels = 4;
  shape.kernel_h = shape.kernel_w = 3;
  shape.stride_h = shape.stride_w = 1;
  shape.pad_h = shape.pad_w = 1;
  const int64_t d = shape.col_rows();
  std::vector<nn::Tensor> batches;
  for (int b = 0; b < kBatches; ++b) batches.push_back(RandomTensor({2, 3, 6, 6}, 40 + b));

  HessianAccumulator one(d, BiasColumn::kAppendOne);
  for (const nn::Tensor& x : batches) one.AddConvInput(kernels::CpuContext{}, shape, x);

  testing::ThreadWorld world(kRanks);
  std::vector<HessianAccumulator> accs(kRanks, HessianAccumulator(d, BiasColumn::kAppendOne));
  std::vector<absl::Status> status(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      testing::ThreadCommunicator comm(&world, r);
      for (int b = r; b < kBatches; b += kRanks) {
        accs[r].AddConvInput(kernels::CpuContext{}, shape, batches[b]);
      }
      status[r] = AllReduceHessian(comm, &accs[r]);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) {
    ASSERT_TRUE(status[r].ok()) << status[r];
    EXPECT_EQ(accs[r].samples(), one.samples()) << r;
    ASSERT_EQ(accs[r].sum().size(), one.sum().size());
    for (size_t i = 0; i < one.sum().size(); ++i) {
      ASSERT_EQ(std::bit_cast<uint64_t>(accs[r].sum()[i]),
                std::bit_cast<uint64_t>(accs[0].sum()[i]))
          << "rank " << r << " entry " << i;
      ASSERT_NEAR(accs[r].sum()[i], one.sum()[i], 1e-12 * (1.0 + std::fabs(one.sum()[i]))) << i;
    }
  }
  ExpectNear(accs[1].Mean(), one.Mean());
}

}  // namespace
}  // namespace qtrain::quant::ldnq
