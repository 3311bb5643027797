// A growable, 64-byte-aligned float scratch buffer for packing panels and im2col columns.
// Internal to the CPU kernels. Not thread-safe; one per thread or per parallel chunk. Growing
// costs one allocation; the contents are not preserved or initialised.
#ifndef QTRAIN_WORKER_KERNELS_CPU_ALIGNED_BUFFER_H_
#define QTRAIN_WORKER_KERNELS_CPU_ALIGNED_BUFFER_H_

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "common/logging.h"

namespace qtrain::kernels {

class AlignedBuffer {
 public:
  static constexpr size_t kAlignment = 64;  // a cache line; enough for AVX-512 aligned loads

  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t count) { Reserve(count); }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  // Returns room for at least `count` floats, reallocating only when it must grow.
  float* Reserve(int64_t count) {
    const size_t need = static_cast<size_t>(count < 1 ? 1 : count);
    if (need > capacity_) {
      std::free(data_);
      const size_t bytes = (need * sizeof(float) + kAlignment - 1) / kAlignment * kAlignment;
      data_ = static_cast<float*>(std::aligned_alloc(kAlignment, bytes));
      QTRAIN_CHECK(data_ != nullptr) << "out of memory allocating " << bytes << " bytes";
      capacity_ = bytes / sizeof(float);
    }
    return data_;
  }
  float* data() { return data_; }

 private:
  float* data_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_ALIGNED_BUFFER_H_
