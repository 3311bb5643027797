// Launchers of the CUDA codec kernels (one .cu file per codec plus blob_kernels.cu), called by
// cuda_codec.cc, which validates every argument first: these functions trust their arguments and
// only enqueue work on `stream`, returning the launch's cudaError_t (cudaGetLastError).
//
// Plain C++ with the CUDA runtime API (no absl, no protobuf), so that .cu files can include it.
// All pointers are device pointers; a blob is 16-byte aligned. Thread-safety: as the CUDA runtime.
#ifndef QTRAIN_COMPRESSION_CUDA_CODEC_KERNELS_H_
#define QTRAIN_COMPRESSION_CUDA_CODEC_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "compression/cuda/blob_check.h"
#include "compression/cuda/codec_math.h"

namespace qtrain::compression::cuda {

// ---- Blob header (blob_kernels.cu) --------------------------------------------------------------

// Everything of a fixed-size blob except its scales and payload: the header (reserved = 0), the
// params, the zero padding around the payload, and *blob_bytes_out = total. Runs before the
// encode kernels, which write the scales and payload and may OR the non-finite mark into the
// header's reserved field.
struct HeaderWrite {
  uint8_t* blob = nullptr;
  uint32_t codec = 0;
  uint32_t version = 1;
  uint32_t num_scales = 0;
  uint32_t num_params = 0;
  uint32_t params[2] = {0, 0};
  uint64_t payload_bytes = 0;
  uint64_t* blob_bytes_out = nullptr;  // may be null
};
cudaError_t LaunchWriteHeader(const HeaderWrite& h, cudaStream_t stream);

// Runs CheckBlobHeader in one thread; a failure is recorded in *error (atomicMax). Does nothing
// when *error is already non-zero.
cudaError_t LaunchCheckHeader(const uint8_t* blob, const DecodeExpect& expect, int32_t* error,
                              cudaStream_t stream);

// ---- fp16 (fp16.cu)
// ------------------------------------------------------------------------------

struct Fp16EncodeArgs {
  const float* grad = nullptr;
  float* residual = nullptr;  // null: no error feedback
  uint64_t n = 0;
  uint8_t* blob = nullptr;
  uint64_t payload_offset = 0;
};
cudaError_t LaunchFp16Encode(const Fp16EncodeArgs& a, cudaStream_t stream);

struct DecodeArgs {
  const uint8_t* blob = nullptr;  // header already checked by LaunchCheckHeader
  uint64_t n = 0;
  float* out = nullptr;
  int32_t* error = nullptr;
};
cudaError_t LaunchFp16DecodeAdd(const DecodeArgs& a, cudaStream_t stream);

// ---- onebit (onebit.cu)
// --------------------------------------------------------------------------

struct OneBitEncodeArgs {
  const float* grad = nullptr;
  float* residual = nullptr;  // null: no error feedback
  uint64_t n = 0;
  uint32_t column = 0;  // column length L (clamped to max(n, 1))
  uint8_t* blob = nullptr;
  uint64_t scales_offset = 0;
  uint64_t payload_offset = 0;
  uint64_t payload_words = 0;  // ceil(payload bytes / 4)
  bool atomic_bits = false;    // columns do not start on 32-element boundaries (payload zeroed)
};
cudaError_t LaunchOneBitEncode(const OneBitEncodeArgs& a, cudaStream_t stream);
// Validates the scales, then adds (d_out untouched when *error is set).
cudaError_t LaunchOneBitDecodeAdd(const DecodeArgs& a, cudaStream_t stream);

// ---- qsgd, dense coding (qsgd.cu)
// ----------------------------------------------------------------

struct QsgdEncodeArgs {
  const float* grad = nullptr;
  float* residual = nullptr;  // null: no error feedback
  uint64_t n = 0;
  uint32_t levels = 0;
  uint32_t bucket = 0;
  uint32_t bits = 0;  // code width b
  uint32_t key = 0;   // RNG stream key
  uint8_t* blob = nullptr;
  uint64_t scales_offset = 0;
  uint64_t payload_offset = 0;
  uint64_t payload_words = 0;
  bool atomic_bits = false;  // buckets do not start on 32-element boundaries (payload zeroed)
};
cudaError_t LaunchQsgdEncode(const QsgdEncodeArgs& a, cudaStream_t stream);

struct QsgdDecodeArgs {
  DecodeArgs d;
  uint32_t levels = 0;
  uint32_t bucket = 0;
  uint32_t bits = 0;
};
cudaError_t LaunchQsgdDecodeAdd(const QsgdDecodeArgs& a, cudaStream_t stream);

// ---- terngrad (terngrad.cu)
// ----------------------------------------------------------------------

// Per-block partial statistics of v (sum and sum of squares in double, max |v| as bits).
struct TernPartial {
  double sum;
  double sum_squares;
  uint32_t max_abs_bits;
  uint32_t unused;
};
// Blocks of the statistics pass for n elements (a function of n only, so the sums' order is).
uint32_t TernStatsBlocks(uint64_t n);

struct TernStatsArgs {
  const float* x = nullptr;
  float* y = nullptr;      // null: v = x; else v = x + y
  bool write_sum = false;  // store v into y (PrepareScale with feedback)
  bool sums = true;        // clip > 0: sum and sum of squares are needed
  uint64_t n = 0;
  TernPartial* partials = nullptr;  // TernStatsBlocks(n) entries
  float clip_sigma = 0.0f;
  // The local scale goes to *local_out; a non-finite v gives +Inf (TernScaleFromStats), which
  // a max-allreduce carries to every rank (a NaN might not survive a max).
  float* local_out = nullptr;
};
// Statistics pass and finalization (two kernels).
cudaError_t LaunchTernLocalScale(const TernStatsArgs& a, cudaStream_t stream);

struct TernarizeArgs {
  const float* x = nullptr;
  const float* y = nullptr;   // null: v = x; else v = x + y (y may alias residual)
  float* residual = nullptr;  // null: no error feedback; may alias x or y
  uint64_t n = 0;
  const float* clip_at = nullptr;  // device: the local scale (clip level)
  const float* scale = nullptr;    // device: the scale sent (may equal clip_at)
  uint32_t key = 0;
  uint8_t* blob = nullptr;
  uint64_t scales_offset = 0;
  uint64_t payload_offset = 0;
  uint64_t payload_words = 0;
};
cudaError_t LaunchTernarize(const TernarizeArgs& a, cudaStream_t stream);
cudaError_t LaunchTernDecodeAdd(const DecodeArgs& a, cudaStream_t stream);

// ---- threshold (threshold.cu)
// --------------------------------------------------------------------

inline constexpr uint32_t kThresholdTile = 4096;  // elements per encoder tile
inline constexpr uint32_t kThresholdTileWords = kThresholdTile / 32;
inline constexpr uint32_t kThresholdDecodeTile = 4096;  // payload bytes per decoder tile
// The fixed layout of a threshold blob: 1 scale, 1 param.
inline constexpr uint64_t kThresholdPayloadOffset = 48;

// Scratch of the encoder, in bytes, for n elements (device memory the caller provides): a flag,
// per 4096-element tile an EntryRun and a start, and 2 bits per element of masks.
uint64_t ThresholdEncodeScratchBytes(uint64_t n);
struct ThresholdEncodeArgs {
  const float* grad = nullptr;
  float* residual = nullptr;  // null: no error feedback
  uint64_t n = 0;
  float tau = 0.0f;
  uint8_t* blob = nullptr;
  uint64_t* blob_bytes_out = nullptr;  // may be null
  void* scratch = nullptr;             // ThresholdEncodeScratchBytes(n) bytes
};
// Select (v, residual, masks, tile runs) -> scan (offsets, header) -> write (varints).
cudaError_t LaunchThresholdEncode(const ThresholdEncodeArgs& a, cudaStream_t stream);

// Scratch of the decoder for a blob of blob_bytes bytes.
uint64_t ThresholdDecodeScratchBytes(uint64_t blob_bytes);
struct ThresholdDecodeArgs {
  DecodeArgs d;
  uint64_t blob_bytes = 0;
  void* scratch = nullptr;  // ThresholdDecodeScratchBytes(blob_bytes) bytes (null when 0)
};
// Validate varints and count (per tile) -> check totals, scan -> scatter-add.
cudaError_t LaunchThresholdDecodeAdd(const ThresholdDecodeArgs& a, cudaStream_t stream);

}  // namespace qtrain::compression::cuda

#endif  // QTRAIN_COMPRESSION_CUDA_CODEC_KERNELS_H_
