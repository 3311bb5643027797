#include "compression/wire.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "common/crc32.h"
#include "common/status_macros.h"

namespace qtrain::compression {

uint32_t PayloadCrc32(std::span<const uint8_t> payload) {
  return Crc32(payload.data(), payload.size());
}

pb::EncodedTensor ToProto(const EncodedTensor& tensor, Checksum checksum) {
  pb::EncodedTensor proto;
  proto.set_codec(static_cast<pb::CodecId>(tensor.codec));
  proto.set_format_version(tensor.format_version);
  proto.set_num_elements(tensor.num_elements);
  proto.mutable_shape()->Assign(tensor.shape.begin(), tensor.shape.end());
  proto.mutable_scales()->Assign(tensor.scales.begin(), tensor.scales.end());
  proto.mutable_params()->Assign(tensor.params.begin(), tensor.params.end());
  proto.set_payload(reinterpret_cast<const char*>(tensor.payload.data()), tensor.payload.size());
  if (checksum == Checksum::kCrc32) {
    proto.set_has_checksum(true);
    proto.set_checksum(PayloadCrc32(tensor.payload));
  }
  return proto;
}

absl::StatusOr<EncodedTensor> FromProto(const pb::EncodedTensor& proto) {
  const int codec = static_cast<int>(proto.codec());
  if (codec < static_cast<int>(CodecId::kFp32) || codec > static_cast<int>(CodecId::kTernGrad)) {
    return absl::InvalidArgumentError(absl::StrCat("encoded tensor names unknown codec id ", codec));
  }
  if (proto.num_elements() > kMaxElements) {
    return absl::InvalidArgumentError(absl::StrCat("encoded tensor declares ",
                                                   proto.num_elements(),
                                                   " elements, over the limit ", kMaxElements));
  }
  const std::string& payload = proto.payload();
  if (proto.has_checksum()) {
    uint32_t crc = PayloadCrc32(
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(payload.data()), payload.size()));
    if (crc != proto.checksum()) {
      return absl::DataLossError(absl::StrCat("encoded tensor payload checksum mismatch: stored ",
                                              proto.checksum(), ", computed ", crc));
    }
  }
  EncodedTensor t;
  t.codec = static_cast<CodecId>(codec);
  t.format_version = proto.format_version();
  t.num_elements = proto.num_elements();
  t.shape.assign(proto.shape().begin(), proto.shape().end());
  t.scales.assign(proto.scales().begin(), proto.scales().end());
  t.params.assign(proto.params().begin(), proto.params().end());
  t.payload.assign(payload.begin(), payload.end());
  return t;
}

std::string Serialize(const EncodedTensor& tensor, Checksum checksum) {
  return ToProto(tensor, checksum).SerializeAsString();
}

absl::StatusOr<EncodedTensor> Parse(std::span<const uint8_t> bytes, uint64_t max_bytes) {
  if (bytes.size() > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("encoded tensor message of ", bytes.size(),
                                                   " bytes exceeds the limit of ", max_bytes));
  }
  if (bytes.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
    return absl::InvalidArgumentError("encoded tensor message over 2 GiB");
  }
  pb::EncodedTensor proto;
  if (!proto.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return absl::InvalidArgumentError(
        absl::StrCat("encoded tensor message of ", bytes.size(), " bytes does not parse"));
  }
  return FromProto(proto);
}

}  // namespace qtrain::compression
