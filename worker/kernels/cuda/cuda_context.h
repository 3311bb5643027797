// What every CUDA kernel is told about where it runs: the stream to enqueue on. Kernels are
// asynchronous: a call returns once the work is enqueued, and its Status reports launch errors
// only (bad configuration, no device); errors during execution surface at the next
// synchronization. The CUDA analogue of kernels::CpuContext.
//
// A CudaContext is a small value; copy it freely. The stream is not owned.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_CUDA_CONTEXT_H_
#define QTRAIN_WORKER_KERNELS_CUDA_CUDA_CONTEXT_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace qtrain::kernels::cuda {

struct CudaContext {
  cudaStream_t stream = nullptr;  // nullptr: the legacy default stream
};

// Blocks of `threads` covering n elements with a grid-stride loop: at most `max_blocks` blocks.
inline unsigned GridFor(int64_t n, unsigned threads = 256, unsigned max_blocks = 65535u * 8) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

// The Status of the last kernel launch on this thread (cudaGetLastError), naming `kernel`.
absl::Status LaunchStatus(const char* kernel);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_CUDA_CONTEXT_H_
