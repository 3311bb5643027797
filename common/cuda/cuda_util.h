// The CUDA runtime seen through absl::Status: error conversion, device discovery that never
// fails, and owning handles for device memory, pinned host memory, streams and events.
//
// Every CUDA call that can fail at run time (allocation, copies, launches on a broken context) is
// wrapped with QTRAIN_CUDA_RETURN_IF_ERROR, so the message names the call and the CUDA error.
// QTRAIN_CUDA_CHECK is for programmer errors only (it aborts).
//
// Thread-safety: the handles are move-only values; use each from one thread at a time.
#ifndef QTRAIN_COMMON_CUDA_CUDA_UTIL_H_
#define QTRAIN_COMMON_CUDA_CUDA_UTIL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/logging.h"

namespace qtrain::cuda {

// OK for cudaSuccess; otherwise INTERNAL (RESOURCE_EXHAUSTED for out-of-memory) naming `what`
// and the CUDA error, e.g. "cudaMalloc(&p, 4096): out of memory (cudaErrorMemoryAllocation)".
absl::Status CudaStatus(cudaError_t error, std::string_view what);

// Number of usable CUDA devices; 0 when there is no driver or no device (never an error). When it
// is 0, make no other CUDA call: without a driver the runtime reports its initialisation error
// from every call.
int DeviceCount();
// "NVIDIA H200 (sm_90, 139.8 GiB)" for `device`, or the error.
absl::StatusOr<std::string> DeviceName(int device);

}  // namespace qtrain::cuda

#define QTRAIN_CUDA_RETURN_IF_ERROR(expr)                                   \
  do {                                                                      \
    const cudaError_t qtrain_cuda_error_ = (expr);                          \
    if (qtrain_cuda_error_ != cudaSuccess) {                                \
      return ::qtrain::cuda::CudaStatus(qtrain_cuda_error_, #expr);         \
    }                                                                       \
  } while (false)

#define QTRAIN_CUDA_CHECK(expr)                                             \
  do {                                                                      \
    const cudaError_t qtrain_cuda_error_ = (expr);                          \
    QTRAIN_CHECK(qtrain_cuda_error_ == cudaSuccess)                         \
        << #expr << ": " << cudaGetErrorString(qtrain_cuda_error_);         \
  } while (false)

namespace qtrain::cuda {

// Owns `size` elements of T in device memory (uninitialised). Empty when default-constructed.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  static absl::StatusOr<DeviceArray> Create(size_t size) {
    DeviceArray a;
    if (size > 0) {
      void* p = nullptr;
      QTRAIN_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, size * sizeof(T)));
      a.data_ = static_cast<T*>(p);
      a.size_ = size;
    }
    return a;
  }
  DeviceArray(DeviceArray&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      Reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { Reset(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }
  size_t bytes() const { return size_ * sizeof(T); }
  std::span<T> span() { return {data_, size_}; }
  std::span<const T> span() const { return {data_, size_}; }

  // Synchronous copies; the host span's size must equal size() (INVALID_ARGUMENT otherwise).
  absl::Status CopyFromHost(std::span<const T> host) {
    if (host.size() != size_) return SizeMismatch(host.size());
    if (size_ > 0) {
      QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpy(data_, host.data(), bytes(), cudaMemcpyHostToDevice));
    }
    return absl::OkStatus();
  }
  absl::Status CopyToHost(std::span<T> host) const {
    if (host.size() != size_) return SizeMismatch(host.size());
    if (size_ > 0) {
      QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpy(host.data(), data_, bytes(), cudaMemcpyDeviceToHost));
    }
    return absl::OkStatus();
  }

 private:
  void Reset() {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }
  absl::Status SizeMismatch(size_t host_size) const {
    return absl::InvalidArgumentError("DeviceArray copy: host span has " +
                                      std::to_string(host_size) + " elements, device array " +
                                      std::to_string(size_));
  }
  T* data_ = nullptr;
  size_t size_ = 0;
};

// Owns a CUDA stream (non-blocking with respect to the legacy default stream).
class Stream {
 public:
  Stream() = default;
  static absl::StatusOr<Stream> Create();
  Stream(Stream&& o) noexcept : stream_(std::exchange(o.stream_, nullptr)) {}
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream();
  cudaStream_t get() const { return stream_; }
  absl::Status Synchronize() const;

 private:
  cudaStream_t stream_ = nullptr;
};

// Owns a CUDA event (timing enabled).
class Event {
 public:
  Event() = default;
  static absl::StatusOr<Event> Create();
  Event(Event&& o) noexcept : event_(std::exchange(o.event_, nullptr)) {}
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event();
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

}  // namespace qtrain::cuda

#endif  // QTRAIN_COMMON_CUDA_CUDA_UTIL_H_
