// Test helper: runs a CudaCodec on host vectors (upload, encode or decode on a private stream,
// download), so GPU tests read like the CPU codec tests. Every copy is stream-ordered on the
// harness's stream and every call returns after synchronizing it.
#ifndef QTRAIN_TESTS_UNIT_COMPRESSION_CUDA_GPU_CODEC_HARNESS_H_
#define QTRAIN_TESTS_UNIT_COMPRESSION_CUDA_GPU_CODEC_HARNESS_H_

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/cuda/cuda_util.h"
#include "common/status_macros.h"
#include "compression/cuda/cuda_codec.h"

namespace qtrain::compression::cuda {

class GpuCodecHarness {
 public:
  static absl::StatusOr<GpuCodecHarness> Create(const CudaCodec* codec) {
    GpuCodecHarness h(codec);
    ASSIGN_OR_RETURN(h.stream_, qtrain::cuda::Stream::Create());
    return h;
  }

  cudaStream_t stream() const { return stream_.get(); }

  template <typename T>
  absl::Status Upload(std::span<const T> host, T* device) {
    if (!host.empty()) {
      QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device, host.data(), host.size_bytes(),
                                                  cudaMemcpyHostToDevice, stream()));
    }
    return stream_.Synchronize();
  }
  template <typename T>
  absl::Status Download(const T* device, std::span<T> host) {
    if (!host.empty()) {
      QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host.data(), device, host.size_bytes(),
                                                  cudaMemcpyDeviceToHost, stream()));
    }
    return stream_.Synchronize();
  }

  // Encodes grad (with feedback when residual is non-null: *residual is updated) and returns the
  // blob, exactly as many bytes as the encoder reported.
  absl::StatusOr<std::vector<uint8_t>> Encode(std::span<const float> grad,
                                              std::vector<float>* residual,
                                              std::span<const int64_t> shape, uint32_t key) {
    const uint64_t n = grad.size();
    ASSIGN_OR_RETURN(auto d_grad, qtrain::cuda::DeviceArray<float>::Create(n));
    ASSIGN_OR_RETURN(auto d_res, qtrain::cuda::DeviceArray<float>::Create(residual ? n : 0));
    const uint64_t capacity = codec_->MaxBlobBytes(shape, n);
    ASSIGN_OR_RETURN(auto d_blob, qtrain::cuda::DeviceArray<uint8_t>::Create(capacity));
    ASSIGN_OR_RETURN(auto d_size, qtrain::cuda::DeviceArray<uint64_t>::Create(1));
    RETURN_IF_ERROR(Upload<float>(grad, d_grad.data()));
    if (residual != nullptr) {
      RETURN_IF_ERROR(Upload<float>(*residual, d_res.data()));
    }
    // Poison the blob: every byte of the result must be written by the encoder.
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_blob.data(), 0xa5, capacity, stream()));
    RETURN_IF_ERROR(codec_->EncodeWithFeedback(
        n > 0 ? d_grad.data() : dummy(), residual && n > 0 ? d_res.data() : nullptr, n, shape, key,
        d_blob.data(), capacity, d_size.data(), stream()));
    RETURN_IF_ERROR(stream_.Synchronize());
    uint64_t size = 0;
    RETURN_IF_ERROR(Download<uint64_t>(d_size.data(), std::span<uint64_t>(&size, 1)));
    if (size > capacity || size % 16 != 0) {
      return absl::InternalError(
          absl::StrCat("encoder reported ", size, " blob bytes, capacity ", capacity));
    }
    std::vector<uint8_t> blob(size);
    RETURN_IF_ERROR(Download<uint8_t>(d_blob.data(), std::span<uint8_t>(blob)));
    if (residual != nullptr) {
      RETURN_IF_ERROR(Download<float>(d_res.data(), std::span<float>(*residual)));
    }
    return blob;
  }

  // Decode-adds `blob` (its first blob_bytes bytes; all of it when 0) into *out. Returns
  // DecodeAdd's status if it fails, else CheckDecodeError's. *out is always read back. With
  // out_offset k, the device output starts k floats into its allocation (a bucket inside a flat
  // gradient buffer: not 16-byte aligned unless k % 4 == 0); the k floats before it must stay.
  absl::Status Decode(const std::vector<uint8_t>& blob, uint64_t n, std::span<const int64_t> shape,
                      std::vector<float>* out, uint64_t blob_bytes = 0,
                      const std::string& source = "test blob", uint64_t out_offset = 0) {
    if (blob_bytes == 0) blob_bytes = blob.size();
    ASSIGN_OR_RETURN(auto d_blob,
                     qtrain::cuda::DeviceArray<uint8_t>::Create(std::max<size_t>(blob.size(), 16)));
    ASSIGN_OR_RETURN(auto d_alloc, qtrain::cuda::DeviceArray<float>::Create(
                                       out_offset + std::max<size_t>(n, 1)));
    float* d_out = d_alloc.data() + out_offset;
    ASSIGN_OR_RETURN(auto d_error, qtrain::cuda::DeviceArray<int32_t>::Create(1));
    const std::vector<float> guard(out_offset, 12345.0f);
    RETURN_IF_ERROR(Upload<float>(guard, d_alloc.data()));
    RETURN_IF_ERROR(Upload<uint8_t>(blob, d_blob.data()));
    RETURN_IF_ERROR(Upload<float>(*out, d_out));
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_error.data(), 0, sizeof(int32_t), stream()));
    absl::Status status =
        codec_->DecodeAdd(d_blob.data(), blob_bytes, n, shape, d_out, d_error.data(), stream());
    if (status.ok()) status = CudaCodec::CheckDecodeError(d_error.data(), source, stream());
    RETURN_IF_ERROR(Download<float>(d_out, std::span<float>(*out)));
    std::vector<float> guard_after(out_offset);
    RETURN_IF_ERROR(Download<float>(d_alloc.data(), std::span<float>(guard_after)));
    if (guard_after != guard) return absl::InternalError("the decode wrote before its output");
    if (status.ok()) {
      int32_t error = -1;
      RETURN_IF_ERROR(Download<int32_t>(d_error.data(), std::span<int32_t>(&error, 1)));
      if (error != 0) return absl::InternalError("error word not zero after a clean decode");
    }
    return status;
  }

 private:
  explicit GpuCodecHarness(const CudaCodec* codec) : codec_(codec) {}
  // A non-null, aligned pointer for n == 0 (never dereferenced).
  static float* dummy() { return reinterpret_cast<float*>(uintptr_t{256}); }

  const CudaCodec* codec_;
  qtrain::cuda::Stream stream_;
};

// Bit-identical float arrays.
inline bool SameBits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

// Same bits, except that any NaN equals any NaN: a payload corrupted into a NaN decodes to NaN on
// both sides, but x86 keeps the NaN operand's payload bits in `out + NaN` while the GPU returns
// the canonical NaN.
inline bool SameBitsOrBothNan(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    if (std::memcmp(&a[i], &b[i], 4) != 0) return false;
  }
  return true;
}

}  // namespace qtrain::compression::cuda

#endif  // QTRAIN_TESTS_UNIT_COMPRESSION_CUDA_GPU_CODEC_HARNESS_H_
