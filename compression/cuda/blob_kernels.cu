// The blob header kernels shared by every CUDA codec: writing a fixed-size blob's header, params
// and padding before the encode kernels run, and checking a received blob's header (the checks of
// blob_check.h) before the decode kernels run. Both are single-thread kernels (a few dozen
// bytes); their cost is one launch.
#include "compression/cuda/codec_kernels.h"
#include "compression/cuda/device_util.cuh"

namespace qtrain::compression::cuda {
namespace {

__global__ void WriteHeaderKernel(HeaderWrite h) {
  if (threadIdx.x != 0) return;
  uint32_t* w = reinterpret_cast<uint32_t*>(h.blob);
  const DevBlobLayout l = BlobLayoutFor(h.num_scales, h.num_params, h.payload_bytes);
  w[0] = kDevBlobMagic;
  w[1] = h.codec;
  w[2] = h.version;
  w[3] = h.num_scales;
  w[4] = h.num_params;
  w[5] = 0;  // reserved; encode kernels may OR the non-finite mark in later
  w[6] = static_cast<uint32_t>(h.payload_bytes);
  w[7] = static_cast<uint32_t>(h.payload_bytes >> 32);
  for (uint32_t k = 0; k < h.num_params; ++k) w[l.params_offset / 4 + k] = h.params[k];
  // Padding between the params and the payload, and after the payload's last whole word (the
  // encode kernels write whole words, zero bits past the last element included).
  for (uint64_t k = l.params_end / 4; k < l.payload_offset / 4; ++k) w[k] = 0;
  const uint64_t payload_words = (h.payload_bytes + 3) / 4;
  for (uint64_t k = l.payload_offset / 4 + payload_words; k < l.total / 4; ++k) w[k] = 0;
  if (h.blob_bytes_out != nullptr) *h.blob_bytes_out = l.total;
}

__global__ void CheckHeaderKernel(const uint8_t* blob, DecodeExpect expect, int32_t* error) {
  if (threadIdx.x != 0 || *error != kDecodeOk) return;
  ReportError(error, CheckBlobHeader(blob, expect));
}

}  // namespace

cudaError_t LaunchWriteHeader(const HeaderWrite& h, cudaStream_t stream) {
  WriteHeaderKernel<<<1, 32, 0, stream>>>(h);
  return cudaGetLastError();
}

cudaError_t LaunchCheckHeader(const uint8_t* blob, const DecodeExpect& expect, int32_t* error,
                              cudaStream_t stream) {
  CheckHeaderKernel<<<1, 32, 0, stream>>>(blob, expect, error);
  return cudaGetLastError();
}

}  // namespace qtrain::compression::cuda
