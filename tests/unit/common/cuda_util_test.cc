#include "common/cuda/cuda_util.h"

#include <vector>

#include "common/testing/cuda_testing.h"
#include "gtest/gtest.h"

namespace qtrain::cuda {
namespace {

TEST(CudaUtilTest, DeviceCountNeverFails) {
  // Without a driver or device this is 0, every time (the runtime keeps reporting its
  // initialisation error, so callers must not use CUDA at all then).
  const int count = DeviceCount();
  EXPECT_GE(count, 0);
  EXPECT_EQ(DeviceCount(), count);
}

TEST(CudaUtilTest, CudaStatusNamesTheCallAndTheError) {
  EXPECT_TRUE(CudaStatus(cudaSuccess, "x").ok());
  const absl::Status oom = CudaStatus(cudaErrorMemoryAllocation, "cudaMalloc(&p, 8)");
  EXPECT_EQ(oom.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(oom.message().find("cudaMalloc(&p, 8)"), std::string::npos);
  EXPECT_NE(oom.message().find("cudaErrorMemoryAllocation"), std::string::npos);
  EXPECT_EQ(CudaStatus(cudaErrorInvalidValue, "f").code(), absl::StatusCode::kInternal);
}

TEST(CudaUtilTest, DeviceArrayRoundTripAndSizeCheck) {
  QTRAIN_REQUIRE_GPU();
  absl::StatusOr<DeviceArray<float>> a = DeviceArray<float>::Create(1000);
  ASSERT_TRUE(a.ok()) << a.status();
  std::vector<float> in(1000), out(1000, -1.0f);
  for (int i = 0; i < 1000; ++i) in[i] = 0.5f * static_cast<float>(i) - 7.0f;
  ASSERT_TRUE(a->CopyFromHost(in).ok());
  ASSERT_TRUE(a->CopyToHost(out).ok());
  EXPECT_EQ(in, out);
  std::vector<float> wrong(999);
  EXPECT_EQ(a->CopyFromHost(wrong).code(), absl::StatusCode::kInvalidArgument);
  DeviceArray<float> moved = std::move(*a);
  EXPECT_EQ(moved.size(), 1000u);
  EXPECT_EQ(a->size(), 0u);
  ASSERT_TRUE(DeviceName(0).ok());
}

TEST(CudaUtilTest, ImpossibleAllocationIsResourceExhausted) {
  QTRAIN_REQUIRE_GPU();
  absl::StatusOr<DeviceArray<float>> a = DeviceArray<float>::Create(size_t{1} << 50);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kResourceExhausted) << a.status();
}

}  // namespace
}  // namespace qtrain::cuda
