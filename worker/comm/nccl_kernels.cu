#include "worker/comm/nccl_kernels.h"

namespace qtrain::comm::nccl_internal {

namespace {

constexpr unsigned kThreads = 256;

unsigned BlocksFor(uint64_t work) {
  const uint64_t blocks = (work + kThreads - 1) / kThreads;
  const uint64_t max_blocks = 65535u * 8;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

// Four elements per thread when `data` is 16-byte aligned (cudaMalloc'd buffers and most bucket
// offsets are), the tail and unaligned buffers one at a time.
__global__ void DivideKernel(float* __restrict__ data, uint64_t n, float divisor, int vectorized) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint64_t scalar_begin = 0;
  if (vectorized) {
    float4* data4 = reinterpret_cast<float4*>(data);
    const uint64_t n4 = n / 4;
    for (uint64_t k = i; k < n4; k += stride) {
      float4 v = data4[k];
      v.x = v.x / divisor;
      v.y = v.y / divisor;
      v.z = v.z / divisor;
      v.w = v.w / divisor;
      data4[k] = v;
    }
    scalar_begin = n4 * 4;
  }
  for (uint64_t k = scalar_begin + i; k < n; k += stride) data[k] = data[k] / divisor;
}

__global__ void WriteSlotHeaderKernel(SlotHeader* out, int64_t tag, const uint64_t* blob_bytes,
                                      const int32_t* errors, int num_errors,
                                      const uint8_t* peer_headers, int num_peer_headers,
                                      uint64_t peer_header_stride, int local_failed) {
  bool failed = local_failed != 0;
  for (int k = 0; k < num_errors; ++k) failed = failed || errors[k] != 0;
  for (int k = 0; k < num_peer_headers; ++k) {
    const SlotHeader* h =
        reinterpret_cast<const SlotHeader*>(peer_headers + k * peer_header_stride);
    failed = failed || h->size < 0 || h->tag != tag;
  }
  const int64_t size = blob_bytes == nullptr ? 0 : static_cast<int64_t>(*blob_bytes);
  out->tag = tag;
  out->size = failed ? -1 : size;
}

__global__ void FillKernel(float* __restrict__ data, uint64_t n, float value) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t k = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += stride) {
    data[k] = value;
  }
}

}  // namespace

cudaError_t LaunchDivideInPlace(float* data, uint64_t n, float divisor, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int vectorized = (reinterpret_cast<uintptr_t>(data) % 16 == 0) ? 1 : 0;
  const uint64_t work = vectorized ? (n + 3) / 4 : n;
  DivideKernel<<<BlocksFor(work), kThreads, 0, stream>>>(data, n, divisor, vectorized);
  return cudaGetLastError();
}

cudaError_t LaunchWriteSlotHeader(SlotHeader* out, int64_t tag, const uint64_t* blob_bytes,
                                  const int32_t* errors, int num_errors,
                                  const uint8_t* peer_headers, int num_peer_headers,
                                  uint64_t peer_header_stride, int local_failed,
                                  cudaStream_t stream) {
  WriteSlotHeaderKernel<<<1, 1, 0, stream>>>(out, tag, blob_bytes, errors, num_errors,
                                             peer_headers, num_peer_headers, peer_header_stride,
                                             local_failed);
  return cudaGetLastError();
}

cudaError_t LaunchFill(float* data, uint64_t n, float value, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  FillKernel<<<BlocksFor(n), kThreads, 0, stream>>>(data, n, value);
  return cudaGetLastError();
}

}  // namespace qtrain::comm::nccl_internal
