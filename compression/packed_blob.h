// A packed blob: one EncodedTensor as a single contiguous, 16-byte-aligned byte string, the form
// in which device payloads travel (the CUDA codecs in compression/cuda/ write and read it, and a
// collective such as ncclAllGather moves it as opaque bytes). The element count and the shape are
// not in the blob: sender and receiver both know them.
//
// Layout, format of this file (little-endian; offsets in bytes):
//   0   u32  magic 0x4C425451 (the bytes 'Q' 'T' 'B' 'L')
//   4   u32  codec id (CodecId, as proto/tensor.proto numbers it)
//   8   u32  format_version of the codec's payload (the codec's own version, not this layout's)
//   12  u32  num_scales S
//   16  u32  num_params P
//   20  u32  reserved: 0 in every valid blob. A GPU encoder that meets a non-finite value (which
//            the CPU encoders reject with INVALID_ARGUMENT) cannot return an error without a host
//            synchronization, so it writes kBlobReservedNonFinite here instead and every decoder
//            rejects the blob, naming the cause.
//   24  u64  payload_bytes B
//   32       scales: S x f32
//   32+4S    params: P x u32
//            zero padding up to payload_offset = align16(32 + 4S + 4P)
//   payload_offset   the payload: B bytes, exactly EncodedTensor::payload
//            zero padding up to total = align16(payload_offset + B)
// The blob is exactly `total` bytes: a decoder is given its exact size and rejects any other.
//
// UnpackBlob never trusts its input: every count is bounded by the blob's size before it is used,
// and a malformed blob is INVALID_ARGUMENT naming the field. The codec's own DecodeAdd then checks
// the EncodedTensor (version, counts, payload) as it checks any payload.
//
// Thread-safe (pure functions). Cost: one copy of the blob's bytes.
#ifndef QTRAIN_COMPRESSION_PACKED_BLOB_H_
#define QTRAIN_COMPRESSION_PACKED_BLOB_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/codec.h"

namespace qtrain::compression {

inline constexpr uint32_t kBlobMagic = 0x4C425451u;  // "QTBL" read as a little-endian u32
inline constexpr uint64_t kBlobHeaderBytes = 32;
inline constexpr uint64_t kBlobAlignment = 16;
// The one non-zero value of the reserved field (see the layout above).
inline constexpr uint32_t kBlobReservedNonFinite = 1;
// Payloads larger than this are refused (it keeps every offset computation far from overflow;
// real payloads are at most a few times kMaxElements bytes).
inline constexpr uint64_t kMaxBlobPayloadBytes = uint64_t{1} << 40;

// Byte offsets of a blob's parts.
struct BlobLayout {
  uint64_t scales_offset = kBlobHeaderBytes;
  uint64_t params_offset = kBlobHeaderBytes;
  uint64_t payload_offset = kBlobHeaderBytes;
  uint64_t total_bytes = kBlobHeaderBytes;
};

// The layout of a blob with these counts. Precondition: payload_bytes <= kMaxBlobPayloadBytes
// (CHECKed: it is a programmer error to ask for more).
BlobLayout ComputeLayout(uint32_t num_scales, uint32_t num_params, uint64_t payload_bytes);

// Writes `tensor` as a blob into *out (resized to the blob's total). INVALID_ARGUMENT when a count
// does not fit the header (more than 2^32 - 1 scales or params, or a payload over
// kMaxBlobPayloadBytes).
absl::Status PackBlob(const EncodedTensor& tensor, std::vector<uint8_t>* out);

// Reads a blob back. num_elements and shape are the receiver's (they are not in the blob).
// INVALID_ARGUMENT, naming the field, for: a blob shorter than the header, a wrong magic, an
// unknown codec id, a non-zero reserved field, counts or a payload size that do not fit the blob,
// a blob size that differs from the layout's total, non-zero padding.
absl::StatusOr<EncodedTensor> UnpackBlob(std::span<const uint8_t> blob, uint64_t num_elements,
                                         std::span<const int64_t> shape);

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_PACKED_BLOB_H_
