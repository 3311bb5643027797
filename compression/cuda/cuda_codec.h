// GPU gradient codecs: onebit, threshold, qsgd (dense coding), terngrad and fp16 on device
// buffers, with error feedback fused into the encode pass and a fused decode-and-add.
//
// Wire format. A CudaCodec writes exactly the payload, scales and params the CPU codec of the
// same config writes (compression/onebit.h, threshold.h, qsgd.h, terngrad.h, fp16.h state the
// math and byte layouts), packed into one contiguous device "blob" (compression/packed_blob.h):
// UnpackBlob + the CPU codec's DecodeAdd decodes a GPU blob, and PackBlob of a CPU EncodedTensor
// is accepted by DecodeAdd here. Stochastic codecs draw StreamUniform(stream_key, i)
// (compression/rng.h) for element i, with stream_key = Rng::NextStream() taken by the caller as
// the CPU encoder takes it, so a GPU payload does not depend on the launch configuration and
// equals the CPU payload of the same input and Rng state, except where a norm, mean or sigma
// summed in another order rounds differently (each codec's .cu file says where and how much;
// threshold and fp16 are bit-identical).
//
// Error feedback (d_residual non-null): v = grad + residual is encoded and the residual becomes
// v - decode(blob), in the same pass (grad and residual read once, payload and residual written
// once; terngrad's per-tensor scale needs one more read of v, see terngrad.cu). d_residual null
// means no feedback: v = grad. Whether a caller should use feedback is ErrorFeedbackEnabled().
//
// Errors. Every method validates its host-side arguments first and returns INVALID_ARGUMENT
// (FAILED_PRECONDITION for a call the config does not allow) without enqueuing anything. Device
// work is asynchronous on `stream`; launch failures are INTERNAL. An encoder that meets a
// non-finite value (where the CPU codec returns INVALID_ARGUMENT) cannot report it without a
// host synchronization: it marks the blob's reserved header field instead, and every decoder,
// GPU or CPU, rejects that blob saying why. A decoder validates the blob on the device and
// reports through a device error word (see DecodeAdd and CheckDecodeError).
//
// Memory. Blobs must be 16-byte aligned (cudaMalloc'd memory and offsets that are multiples of
// MaxBlobBytes are). threshold (encode and decode) and terngrad (encode, PrepareScale) need a
// little device scratch, taken from the stream-ordered pool (cudaMallocAsync / cudaFreeAsync on
// `stream`): no host synchronization, and after the first call the pool serves it without a
// driver allocation. No other call allocates.
//
// Thread-safety: a CudaCodec is immutable after Create; every method is const and may run
// concurrently on different buffers and streams.
#ifndef QTRAIN_COMPRESSION_CUDA_CUDA_CODEC_H_
#define QTRAIN_COMPRESSION_CUDA_CUDA_CODEC_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/codec.h"
#include "proto/config.pb.h"

namespace qtrain::compression::cuda {

class CudaCodec {
 public:
  // Builds the codec of `config` with the CPU registry's validation (compression/codec_registry.h,
  // builtin codecs): INVALID_ARGUMENT for a bad config, as the CPU registry says it.
  // UNIMPLEMENTED for fp32 ("fp32 needs no codec") and for qsgd with coding=elias (the Elias
  // form stays on the CPU).
  static absl::StatusOr<std::unique_ptr<CudaCodec>> Create(const pb::CodecConfig& config);
  // The same from a spec string, e.g. "qsgd:levels=16,bucket=512" (the CPU registry's parser).
  static absl::StatusOr<std::unique_ptr<CudaCodec>> CreateFromSpec(std::string_view spec);

  ~CudaCodec();

  CodecId id() const;
  // The canonical spec, as the CPU codec of the same config gives it.
  std::string Spec() const;
  pb::CodecConfig Config() const;
  // Error feedback: the config's `ef` if set, else the codec's default (on for onebit, threshold).
  bool ErrorFeedbackEnabled() const;
  // Whether every blob for a given shape has the same size (all but threshold).
  bool fixed_size() const;
  // terngrad with shared=1: EncodeWithFeedback is refused; use PrepareScale + EncodeWithScale.
  bool shared_scale() const;
  // The CPU codec of the same config (decodes unpacked GPU blobs; useful for tests and checks).
  const Codec& cpu_codec() const { return *cpu_; }

  // Bytes of the blob for n elements of `shape` (empty = 1-D): exact when fixed_size(), else the
  // largest possible (threshold: one payload byte per element). A multiple of 16.
  uint64_t MaxBlobBytes(std::span<const int64_t> shape, uint64_t n) const;

  // Encodes v = grad + residual (residual null: v = grad) into the blob at d_blob (capacity
  // bytes, >= MaxBlobBytes(shape, n)) and, with feedback, leaves residual = v - decode(blob).
  // *d_blob_bytes (device u64) receives the blob's size (data-dependent for threshold). grad and
  // residual may not overlap the blob. `stream_key` seeds the stochastic codecs (qsgd, terngrad;
  // ignored by the others). INVALID_ARGUMENT for n over kMaxElements, a shape whose product is
  // not n, null or misaligned pointers, or a capacity below MaxBlobBytes; FAILED_PRECONDITION for
  // terngrad with shared=1. Asynchronous on `stream`.
  absl::Status EncodeWithFeedback(const float* d_grad, float* d_residual, uint64_t n,
                                  std::span<const int64_t> shape, uint32_t stream_key, void* d_blob,
                                  uint64_t capacity, uint64_t* d_blob_bytes,
                                  cudaStream_t stream) const;

  // TernGrad's shared scale (see worker/comm/bucket_codec.h), step 1: writes the local scale of
  // v = grad + residual (residual null: v = grad) into *d_scale (device float; +Inf when v holds
  // a non-finite value, so that a max-reduction carries it) and, with feedback, stores v into the
  // residual. Reads grad and residual once (and writes the residual once).
  // FAILED_PRECONDITION for codecs other than terngrad.
  absl::Status PrepareScale(const float* d_grad, float* d_residual, uint64_t n, float* d_scale,
                            cudaStream_t stream) const;
  // Step 2: ternarizes v with the agreed scale *d_scale (the maximum of the ranks' step-1
  // scales; it must be finite and >= 0, else the blob is marked invalid), clipping with v's own
  // sigma. With feedback pass the residual step 1 left holding v as d_residual (d_grad is then
  // ignored and may be null); it becomes v - decoded. Without feedback v = d_grad and d_residual
  // is null. Otherwise as EncodeWithFeedback. Works with shared=0 too. Reads v twice (local
  // statistics, then ternarize), as the CPU codec does.
  absl::Status EncodeWithScale(const float* d_grad, float* d_residual, uint64_t n,
                               std::span<const int64_t> shape, uint32_t stream_key,
                               const float* d_scale, void* d_blob, uint64_t capacity,
                               uint64_t* d_blob_bytes, cudaStream_t stream) const;

  // Validates the blob (blob_bytes bytes at d_blob) ON THE DEVICE — magic, codec, version,
  // counts, reserved field, padding, params (column length, levels/bucket, entry count), finite
  // scales, unused bits, every code or varint and every index, the checks the CPU codec's
  // DecodeAdd makes — and only if it is valid adds the decoded values into d_out (n floats).
  // A validation kernel records the first problem as a DecodeError (compression/cuda/
  // blob_check.h) in *d_error (device int32; the caller zeroes it once, CheckDecodeError resets
  // it); the decode kernel reads it first and writes nothing when it is non-zero. So a bad blob
  // leaves d_out bit-identical, without a host synchronization. When *d_error is already
  // non-zero on entry (an earlier blob failed), nothing is validated or written, so one error
  // word can serve several blobs and keeps the first failure.
  // Returns INVALID_ARGUMENT at once, enqueuing nothing, for what the host can see: n over
  // kMaxElements, a shape whose product is not n, null or misaligned pointers, a blob_bytes that
  // is below the header size or not a multiple of 16.
  absl::Status DecodeAdd(const void* d_blob, uint64_t blob_bytes, uint64_t n,
                         std::span<const int64_t> shape, float* d_out, int32_t* d_error,
                         cudaStream_t stream) const;

  // Synchronizes `stream`, reads *d_error and, when it is non-zero, resets it to 0 and returns
  // INVALID_ARGUMENT naming the problem and `source` (e.g. "rank 3"). INTERNAL for a CUDA error
  // (including an asynchronous failure of earlier work on the stream).
  static absl::Status CheckDecodeError(int32_t* d_error, std::string_view source,
                                       cudaStream_t stream);

 private:
  struct Settings;
  CudaCodec(std::unique_ptr<Codec> cpu, std::unique_ptr<Settings> settings);

  absl::Status CheckEncodeArgs(const float* d_grad, uint64_t n, std::span<const int64_t> shape,
                               const void* d_blob, uint64_t capacity,
                               const uint64_t* d_blob_bytes) const;
  absl::Status EncodeTernGrad(const float* d_x, const float* d_y, float* d_residual, uint64_t n,
                              uint32_t stream_key, const float* d_shared_scale, void* d_blob,
                              uint64_t* d_blob_bytes, cudaStream_t stream) const;

  std::unique_ptr<Codec> cpu_;
  std::unique_ptr<Settings> settings_;
};

}  // namespace qtrain::compression::cuda

#endif  // QTRAIN_COMPRESSION_CUDA_CUDA_CODEC_H_
