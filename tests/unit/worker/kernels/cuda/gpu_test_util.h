// Shared helpers for the CUDA kernel tests: a fixture that skips without a GPU and owns a stream
// and a reduction workspace, host <-> device copies that abort on infrastructure failures, and
// float comparison helpers (bit equality, ulp distance, rounding-boundary detection).
#ifndef QTRAIN_TESTS_UNIT_WORKER_KERNELS_CUDA_GPU_TEST_UTIL_H_
#define QTRAIN_TESTS_UNIT_WORKER_KERNELS_CUDA_GPU_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/cuda/cuda_util.h"
#include "common/logging.h"
#include "common/testing/cuda_testing.h"
#include "gtest/gtest.h"
#include "worker/kernels/cuda/cuda_context.h"
#include "worker/kernels/cuda/launch_util.h"

namespace qtrain::kernels::cuda::testing {

using ::qtrain::cuda::DeviceArray;

// Sizes every element-wise kernel is run at: empty, tiny, odd, around one block, and above one
// grid-stride round (kThreads * kElementwiseMaxBlocks elements).
inline std::vector<int64_t> ElementwiseSizes() {
  return {0, 1, 7, 255, 256, 257, 100003, kThreads * kElementwiseMaxBlocks + 12345};
}
// Sizes for flat reductions: around one block, above one reduction grid-stride round
// (kThreads * kReduceMaxBlocks = 65536), and above one element-wise round.
inline std::vector<int64_t> ReductionSizes() {
  return {1, 5, 256, 1000, 65536, 3 * 65536 + 17, kThreads * kElementwiseMaxBlocks + 5};
}

// The copies go through the legacy default stream, which does not order against the tests'
// non-blocking stream, and a pageable host-to-device cudaMemcpy may return before its DMA lands:
// every copy helper therefore synchronizes the whole device around itself.
template <class T>
DeviceArray<T> Upload(const std::vector<T>& host) {
  absl::StatusOr<DeviceArray<T>> a = DeviceArray<T>::Create(host.size());
  QTRAIN_CHECK(a.ok()) << a.status();
  const absl::Status copied = a->CopyFromHost(host);
  QTRAIN_CHECK(copied.ok()) << copied;
  QTRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  return std::move(*a);
}

// Overwrites an existing device array (same size) from the host.
template <class T>
void UploadInto(DeviceArray<T>& device, const std::vector<T>& host) {
  const absl::Status copied = device.CopyFromHost(host);
  QTRAIN_CHECK(copied.ok()) << copied;
  QTRAIN_CUDA_CHECK(cudaDeviceSynchronize());
}

// A device array of n floats filled with a NaN pattern, so an output a kernel forgot to write
// shows up.
inline DeviceArray<float> Poisoned(size_t n) {
  return Upload(std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()));
}

template <class T>
std::vector<T> Download(const DeviceArray<T>& a) {
  QTRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<T> host(a.size());
  const absl::Status copied = a.CopyToHost(host);
  QTRAIN_CHECK(copied.ok()) << copied;
  return host;
}

template <class T>
T DownloadOne(const T* device) {
  QTRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  T host;
  QTRAIN_CUDA_CHECK(cudaMemcpy(&host, device, sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

template <class T>
void UploadOne(T* device, const T& host) {
  QTRAIN_CUDA_CHECK(cudaMemcpy(device, &host, sizeof(T), cudaMemcpyHostToDevice));
  QTRAIN_CUDA_CHECK(cudaDeviceSynchronize());
}

// Skips without a GPU; otherwise owns a non-default stream (so tests exercise ctx.stream) and a
// flat-reduction workspace.
class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    QTRAIN_REQUIRE_GPU();
    absl::StatusOr<::qtrain::cuda::Stream> stream = ::qtrain::cuda::Stream::Create();
    ASSERT_TRUE(stream.ok()) << stream.status();
    stream_ = std::move(*stream);
    ctx_.stream = stream_.get();
    workspace_ = Workspace(kReductionWorkspaceBytes);
  }

  // Waits for the stream and checks that no kernel failed.
  void Sync() {
    const absl::Status status = stream_.Synchronize();
    ASSERT_TRUE(status.ok()) << status;
  }

  static DeviceArray<unsigned char> Workspace(size_t bytes) {
    absl::StatusOr<DeviceArray<unsigned char>> w =
        DeviceArray<unsigned char>::Create(bytes > 0 ? bytes : 1);
    QTRAIN_CHECK(w.ok()) << w.status();
    return std::move(*w);
  }

  ::qtrain::cuda::Stream stream_;
  CudaContext ctx_;
  DeviceArray<unsigned char> workspace_;
};

inline bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }
inline bool SameBits(double a, double b) { return std::memcmp(&a, &b, sizeof(double)) == 0; }

// Distance in units in the last place between two finite floats (0 for +0 / -0).
inline int64_t UlpDistance(float a, float b) {
  auto ordered = [](float v) {
    int32_t i;
    std::memcpy(&i, &v, sizeof(i));
    return i < 0 ? static_cast<int64_t>(std::numeric_limits<int32_t>::min()) - i
                 : static_cast<int64_t>(i);
  };
  const int64_t d = ordered(a) - ordered(b);
  return d < 0 ? -d : d;
}

// The spacing of floats at |v|.
inline double FloatUlp(double v) {
  const float f = static_cast<float>(std::fabs(v));
  return static_cast<double>(std::nextafter(f, std::numeric_limits<float>::infinity()) - f);
}

// Expects two float vectors identical bit for bit; reports the count and the first mismatches.
inline void ExpectBitsEqual(const std::vector<float>& expected, const std::vector<float>& actual,
                            const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  int64_t mismatches = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (!SameBits(expected[i], actual[i])) {
      if (++mismatches <= 5) {
        ADD_FAILURE() << what << ": element " << i << " expected " << expected[i] << " got "
                      << actual[i];
      }
    }
  }
  EXPECT_EQ(mismatches, 0) << what << ": " << mismatches << " of " << expected.size()
                           << " elements differ";
}

// True when v (a value about to be rounded to the nearest integer, ties up) lies within tol of a
// rounding boundary k + 1/2.
inline bool NearRoundingBoundary(double v, double tol) {
  const double frac = v - std::floor(v);
  return std::fabs(frac - 0.5) <= tol;
}

}  // namespace qtrain::kernels::cuda::testing

#endif  // QTRAIN_TESTS_UNIT_WORKER_KERNELS_CUDA_GPU_TEST_UTIL_H_
