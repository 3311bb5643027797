// The few device kernels NcclCommunicator needs around the NCCL collectives and the CUDA codecs:
// the final division by the world size, the 16-byte header that precedes every payload a rank
// exchanges, and a fill. Plain C++ declarations (no absl, no NCCL): the launchers return the
// cudaError_t of the launch, and nccl_communicator.cc turns it into a Status.
//
// Cost: DivideInPlace streams n floats once (8 bytes per element); the others are one thread.
#ifndef QTRAIN_WORKER_COMM_NCCL_KERNELS_H_
#define QTRAIN_WORKER_COMM_NCCL_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace qtrain::comm::nccl_internal {

// Precedes each payload (blob) a rank sends, in device memory (16 bytes, little-endian as the
// GPU writes it; every rank of a job runs on the same architecture). `tag` identifies the bucket
// (a hash of key and size: ranks that call collectives in different orders are caught), `size`
// is the blob's byte count, or -1 when the sender failed its part (it then reports why itself).
struct SlotHeader {
  int64_t tag;
  int64_t size;
};
static_assert(sizeof(SlotHeader) == 16, "SlotHeader is 16 bytes on the wire");

// data[i] = data[i] / divisor for i < n (IEEE division, as the CPU adapters do: same bits).
cudaError_t LaunchDivideInPlace(float* data, uint64_t n, float divisor, cudaStream_t stream);

// Writes *out = {tag, size}: size = *blob_bytes (0 when blob_bytes is null), or -1 when
// local_failed != 0, any of errors[0..num_errors) is non-zero, or any of the num_peer_headers
// headers at peer_headers + k * peer_header_stride (k < num_peer_headers) has a negative size or
// a tag other than `tag` (so an aggregating rank passes on its inputs' failures).
cudaError_t LaunchWriteSlotHeader(SlotHeader* out, int64_t tag, const uint64_t* blob_bytes,
                                  const int32_t* errors, int num_errors,
                                  const uint8_t* peer_headers, int num_peer_headers,
                                  uint64_t peer_header_stride, int local_failed,
                                  cudaStream_t stream);

// data[i] = value for i < n.
cudaError_t LaunchFill(float* data, uint64_t n, float value, cudaStream_t stream);

}  // namespace qtrain::comm::nccl_internal

#endif  // QTRAIN_WORKER_COMM_NCCL_KERNELS_H_
