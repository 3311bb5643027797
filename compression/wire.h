// Converts EncodedTensor to and from its wire form (pb::EncodedTensor in proto/tensor.proto) and
// to and from serialized bytes. The optional checksum is CRC-32 (zlib) of the payload bytes.
//
// FromProto / Parse never trust their input: an unknown codec id, a count over kMaxElements, or
// unparseable bytes is INVALID_ARGUMENT; a checksum mismatch is DATA_LOSS. The codec's own
// DecodeAdd then checks the payload against its layout.
//
// Thread-safe (pure functions). Cost: one copy of the payload (and one CRC pass if asked).
#ifndef QTRAIN_COMPRESSION_WIRE_H_
#define QTRAIN_COMPRESSION_WIRE_H_

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "compression/codec.h"
#include "proto/tensor.pb.h"

namespace qtrain::compression {

enum class Checksum { kNone, kCrc32 };

uint32_t PayloadCrc32(std::span<const uint8_t> payload);

pb::EncodedTensor ToProto(const EncodedTensor& tensor, Checksum checksum);
absl::StatusOr<EncodedTensor> FromProto(const pb::EncodedTensor& proto);

std::string Serialize(const EncodedTensor& tensor, Checksum checksum);
// `max_bytes` bounds what is accepted (the caller's message size limit).
absl::StatusOr<EncodedTensor> Parse(std::span<const uint8_t> bytes, uint64_t max_bytes);

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_WIRE_H_
