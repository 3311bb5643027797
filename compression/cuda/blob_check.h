// The packed-blob layout (compression/packed_blob.h) as the GPU sees it, the decode error codes
// the CUDA decoders report through their device error word, and CheckBlobHeader: every check a
// decoder makes on a blob's header and its codec-level fields (counts, params, scales, the last
// payload byte), written once as a host-and-device function. The CUDA validation kernel runs it
// in one thread; the host tests run the same function on malformed blobs and compare its verdict
// with UnpackBlob + the CPU codec's DecodeAdd.
//
// Plain C++ (no absl, no protobuf) so that .cu files can include it; under nvcc the functions are
// also device functions. cuda_codec.cc static_asserts that the constants equal packed_blob.h's.
// Thread-safe (pure functions). Cost: a few dozen byte loads.
#ifndef QTRAIN_COMPRESSION_CUDA_BLOB_CHECK_H_
#define QTRAIN_COMPRESSION_CUDA_BLOB_CHECK_H_

#include <cstdint>
#include <cstring>

#include "compression/rng.h"  // QTRAIN_HOST_DEVICE

namespace qtrain::compression::cuda {

// Mirrors of compression/packed_blob.h and compression/codec.h (checked in cuda_codec.cc).
inline constexpr uint32_t kDevBlobMagic = 0x4C425451u;
inline constexpr uint64_t kDevBlobHeaderBytes = 32;
inline constexpr uint32_t kDevBlobReservedNonFinite = 1;
inline constexpr uint64_t kDevMaxElements = (uint64_t{1} << 31) - 1;
// Byte offset of the header's reserved field (an encoder ORs kDevBlobReservedNonFinite into it).
inline constexpr uint64_t kDevReservedOffset = 20;

// CodecId values (compression/codec.h).
enum DevCodec : uint32_t {
  kDevFp32 = 1,
  kDevFp16 = 2,
  kDevOneBit = 3,
  kDevThreshold = 4,
  kDevQsgd = 5,
  kDevTernGrad = 6,
};

// What a device decoder found wrong. 0 is "no error". When several threads find different errors
// in one blob the largest code is kept (atomicMax), so the report is deterministic.
enum DecodeError : int32_t {
  kDecodeOk = 0,
  // The blob's own header.
  kErrBlobTooShort = 1,
  kErrMagic = 2,
  kErrCodec = 3,
  kErrVersion = 4,
  kErrEncoderNonFinite = 5,
  kErrReserved = 6,
  kErrCountsTooLarge = 7,
  kErrBlobSize = 8,
  kErrPadding = 9,
  // The codec's fields.
  kErrScaleCount = 10,
  kErrParamCount = 11,
  kErrParamValue = 12,
  kErrPayloadSize = 13,
  kErrScaleValue = 14,
  kErrUnusedBits = 15,
  // The payload body.
  kErrInvalidTernaryCode = 16,
  kErrLevelTooLarge = 17,
  kErrNegativeZero = 18,
  kErrCodeInZeroBucket = 19,
  kErrVarintTruncated = 20,
  kErrVarintTooLong = 21,
  kErrVarintOverflow = 22,
  kErrVarintNonCanonical = 23,
  kErrEntryCount = 24,
  kErrIndexOutOfRange = 25,
  kNumDecodeErrors = 26,
};

// A human-readable description of a DecodeError (host only).
inline const char* DecodeErrorMessage(int32_t code) {
  switch (code) {
    case kDecodeOk:
      return "no error";
    case kErrBlobTooShort:
      return "blob is shorter than its 32-byte header";
    case kErrMagic:
      return "blob magic is not 'QTBL'";
    case kErrCodec:
      return "blob is for another codec";
    case kErrVersion:
      return "blob has an unsupported format version";
    case kErrEncoderNonFinite:
      return "the encoder met a non-finite value (NaN or Inf in gradient + residual, or a sum "
             "that overflows float) and marked the blob invalid";
    case kErrReserved:
      return "blob's reserved header field is not 0";
    case kErrCountsTooLarge:
      return "blob's scale, param or payload counts do not fit its size";
    case kErrBlobSize:
      return "blob size differs from the size its header implies";
    case kErrPadding:
      return "blob has non-zero padding bytes";
    case kErrScaleCount:
      return "wrong number of scales for this codec and element count";
    case kErrParamCount:
      return "wrong number of params for this codec";
    case kErrParamValue:
      return "a param is out of range or differs from this decoder's settings (column length, "
             "levels/bucket, entry count)";
    case kErrPayloadSize:
      return "payload size is wrong for the element count";
    case kErrScaleValue:
      return "a scale is not finite (or negative, or tau <= 0)";
    case kErrUnusedBits:
      return "unused bits after the last element are not zero";
    case kErrInvalidTernaryCode:
      return "terngrad payload holds the invalid code 11";
    case kErrLevelTooLarge:
      return "qsgd payload holds a level over `levels`";
    case kErrNegativeZero:
      return "qsgd payload holds a negative zero (sign bit with level 0)";
    case kErrCodeInZeroBucket:
      return "qsgd payload holds a non-zero code in a bucket whose norm is 0";
    case kErrVarintTruncated:
      return "threshold payload ends inside a varint";
    case kErrVarintTooLong:
      return "threshold payload has a varint longer than 5 bytes";
    case kErrVarintOverflow:
      return "threshold payload has a varint value over 32 bits";
    case kErrVarintNonCanonical:
      return "threshold payload has a non-canonical varint (redundant zero group)";
    case kErrEntryCount:
      return "threshold payload's entry count differs from params[0]";
    case kErrIndexOutOfRange:
      return "threshold payload has an index past the tensor's end";
    default:
      return "unknown decode error code";
  }
}

// ---- Bit helpers usable on both sides ----------------------------------------------------------

QTRAIN_HOST_DEVICE inline uint32_t FloatBits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

QTRAIN_HOST_DEVICE inline float BitsFloat(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

QTRAIN_HOST_DEVICE inline bool IsFiniteF(float f) {
  return (FloatBits(f) & 0x7f800000u) != 0x7f800000u;
}

// Little-endian loads that need no alignment.
QTRAIN_HOST_DEVICE inline uint32_t LoadLe32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
QTRAIN_HOST_DEVICE inline uint64_t LoadLe64(const uint8_t* p) {
  return uint64_t{LoadLe32(p)} | (uint64_t{LoadLe32(p + 4)} << 32);
}

QTRAIN_HOST_DEVICE inline uint64_t Align16(uint64_t x) { return (x + 15) & ~uint64_t{15}; }

// ---- Layout ----------------------------------------------------------------------------------

struct DevBlobHeader {
  uint32_t magic;
  uint32_t codec;
  uint32_t version;
  uint32_t num_scales;
  uint32_t num_params;
  uint32_t reserved;
  uint64_t payload_bytes;
};

struct DevBlobLayout {
  uint64_t scales_offset;
  uint64_t params_offset;
  uint64_t params_end;
  uint64_t payload_offset;
  uint64_t total;
};

QTRAIN_HOST_DEVICE inline DevBlobHeader ReadBlobHeader(const uint8_t* blob) {
  DevBlobHeader h;
  h.magic = LoadLe32(blob + 0);
  h.codec = LoadLe32(blob + 4);
  h.version = LoadLe32(blob + 8);
  h.num_scales = LoadLe32(blob + 12);
  h.num_params = LoadLe32(blob + 16);
  h.reserved = LoadLe32(blob + 20);
  h.payload_bytes = LoadLe64(blob + 24);
  return h;
}

// compression::ComputeLayout. payload_bytes must be below 2^62 (callers bound it by a size first).
QTRAIN_HOST_DEVICE inline DevBlobLayout BlobLayoutFor(uint32_t num_scales, uint32_t num_params,
                                                      uint64_t payload_bytes) {
  DevBlobLayout l;
  l.scales_offset = kDevBlobHeaderBytes;
  l.params_offset = l.scales_offset + 4 * uint64_t{num_scales};
  l.params_end = l.params_offset + 4 * uint64_t{num_params};
  l.payload_offset = Align16(l.params_end);
  l.total = Align16(l.payload_offset + payload_bytes);
  return l;
}

// The layout a (validated) blob's header describes.
QTRAIN_HOST_DEVICE inline DevBlobLayout BlobLayoutOf(const uint8_t* blob) {
  const DevBlobHeader h = ReadBlobHeader(blob);
  return BlobLayoutFor(h.num_scales, h.num_params, h.payload_bytes);
}

// ---- The header check ------------------------------------------------------------------------

// What the decoder expects: its codec, the receiver's element count, the exact blob size, and
// for qsgd its own settings (the CPU decoder requires params == [levels, bucket]).
struct DecodeExpect {
  uint32_t codec = 0;
  uint32_t max_version = 1;
  uint64_t n = 0;
  uint64_t blob_bytes = 0;
  uint32_t levels = 0;     // qsgd
  uint32_t bucket = 0;     // qsgd
  uint32_t code_bits = 0;  // qsgd: 1 + bit_width(levels)
};

// Checks what can be checked from the header and the codec's small fields; the per-element
// checks (scale arrays, codes, varints) are the body kernels' (codec_math.h). Returns a
// DecodeError. Reads only within [blob, blob + e.blob_bytes).
QTRAIN_HOST_DEVICE inline int32_t CheckBlobHeader(const uint8_t* blob, const DecodeExpect& e) {
  if (e.blob_bytes < kDevBlobHeaderBytes) return kErrBlobTooShort;
  const DevBlobHeader h = ReadBlobHeader(blob);
  if (h.magic != kDevBlobMagic) return kErrMagic;
  if (h.codec != e.codec) return kErrCodec;
  if (h.version == 0 || h.version > e.max_version) return kErrVersion;
  if (h.reserved == kDevBlobReservedNonFinite) return kErrEncoderNonFinite;
  if (h.reserved != 0) return kErrReserved;
  const uint64_t room = e.blob_bytes - kDevBlobHeaderBytes;
  if (4 * uint64_t{h.num_scales} + 4 * uint64_t{h.num_params} > room) return kErrCountsTooLarge;
  if (h.payload_bytes > room) return kErrCountsTooLarge;
  const DevBlobLayout l = BlobLayoutFor(h.num_scales, h.num_params, h.payload_bytes);
  if (l.total != e.blob_bytes) return kErrBlobSize;
  for (uint64_t k = l.params_end; k < l.payload_offset; ++k) {
    if (blob[k] != 0) return kErrPadding;
  }
  for (uint64_t k = l.payload_offset + h.payload_bytes; k < l.total; ++k) {
    if (blob[k] != 0) return kErrPadding;
  }
  const uint64_t n = e.n;
  const uint64_t bytes = h.payload_bytes;
  const uint8_t* scales = blob + l.scales_offset;
  const uint8_t* params = blob + l.params_offset;
  const uint8_t* payload = blob + l.payload_offset;
  // The last payload byte's bits at and above `used_bits` (1..7) must be zero.
  auto unused_bits_clear = [&](uint64_t used_bits) {
    return used_bits % 8 == 0 || (payload[bytes - 1] >> (used_bits % 8)) == 0;
  };
  switch (e.codec) {
    case kDevFp16:
      if (h.num_scales != 0) return kErrScaleCount;
      if (h.num_params != 0) return kErrParamCount;
      if (bytes != 2 * n) return kErrPayloadSize;
      return kDecodeOk;
    case kDevOneBit: {  // compression/onebit.h
      if (h.num_params != 1) return kErrParamCount;
      const uint64_t len = LoadLe32(params);
      const uint64_t max_len = n > 0 ? n : 1;
      if (len == 0 || len > max_len) return kErrParamValue;
      const uint64_t columns = (n + len - 1) / len;
      if (h.num_scales != 2 * columns) return kErrScaleCount;
      if (bytes != (n + 7) / 8) return kErrPayloadSize;
      if (!unused_bits_clear(n)) return kErrUnusedBits;
      return kDecodeOk;  // scales: the body kernel
    }
    case kDevThreshold: {  // compression/threshold.h
      if (h.num_scales != 1) return kErrScaleCount;
      const float tau = BitsFloat(LoadLe32(scales));
      if (!IsFiniteF(tau) || !(tau > 0.0f)) return kErrScaleValue;
      if (h.num_params != 1) return kErrParamCount;
      if (LoadLe32(params) > n) return kErrParamValue;
      // A valid stream takes at most one byte per element it covers (see codec_math.h).
      if (bytes > n) return kErrPayloadSize;
      if (bytes > 0 && payload[bytes - 1] >= 0x80) return kErrVarintTruncated;
      return kDecodeOk;  // varints, count, indices: the body kernels
    }
    case kDevQsgd: {  // compression/qsgd.h, dense coding
      if (h.num_params != 2) return kErrParamCount;
      if (LoadLe32(params) != e.levels || LoadLe32(params + 4) != e.bucket) return kErrParamValue;
      const uint64_t buckets = (n + e.bucket - 1) / e.bucket;
      if (h.num_scales != buckets) return kErrScaleCount;
      if (bytes != (n * e.code_bits + 7) / 8) return kErrPayloadSize;
      if (!unused_bits_clear(n * e.code_bits)) return kErrUnusedBits;
      return kDecodeOk;  // norms and codes: the body kernel
    }
    case kDevTernGrad: {  // compression/terngrad.h
      if (h.num_scales != 1) return kErrScaleCount;
      const uint32_t s = LoadLe32(scales);
      if (!IsFiniteF(BitsFloat(s)) || (s >> 31) != 0) return kErrScaleValue;
      if (h.num_params != 0) return kErrParamCount;
      if (bytes != (n + 3) / 4) return kErrPayloadSize;
      if (!unused_bits_clear(2 * n)) return kErrUnusedBits;
      return kDecodeOk;  // codes: the body kernel
    }
    default:
      return kErrCodec;
  }
}

}  // namespace qtrain::compression::cuda

#endif  // QTRAIN_COMPRESSION_CUDA_BLOB_CHECK_H_
