#include "compression/packed_blob.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace qtrain::compression {
namespace {

uint64_t AlignUp(uint64_t x) { return (x + kBlobAlignment - 1) & ~(kBlobAlignment - 1); }

void Store32(uint8_t* p, uint32_t v) {
  for (int k = 0; k < 4; ++k) p[k] = static_cast<uint8_t>(v >> (8 * k));
}
void Store64(uint8_t* p, uint64_t v) {
  for (int k = 0; k < 8; ++k) p[k] = static_cast<uint8_t>(v >> (8 * k));
}
uint32_t Load32(const uint8_t* p) {
  uint32_t v = 0;
  for (int k = 0; k < 4; ++k) v |= uint32_t{p[k]} << (8 * k);
  return v;
}
uint64_t Load64(const uint8_t* p) {
  uint64_t v = 0;
  for (int k = 0; k < 8; ++k) v |= uint64_t{p[k]} << (8 * k);
  return v;
}

bool KnownCodec(uint32_t id) {
  return id >= static_cast<uint32_t>(CodecId::kFp32) &&
         id <= static_cast<uint32_t>(CodecId::kTernGrad);
}

absl::Status Bad(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("packed blob: ", what));
}

}  // namespace

BlobLayout ComputeLayout(uint32_t num_scales, uint32_t num_params, uint64_t payload_bytes) {
  QTRAIN_CHECK(payload_bytes <= kMaxBlobPayloadBytes) << "payload of " << payload_bytes << " bytes";
  BlobLayout layout;
  layout.scales_offset = kBlobHeaderBytes;
  layout.params_offset = layout.scales_offset + 4 * uint64_t{num_scales};
  layout.payload_offset = AlignUp(layout.params_offset + 4 * uint64_t{num_params});
  layout.total_bytes = AlignUp(layout.payload_offset + payload_bytes);
  return layout;
}

absl::Status PackBlob(const EncodedTensor& tensor, std::vector<uint8_t>* out) {
  constexpr uint64_t kMaxCount = std::numeric_limits<uint32_t>::max();
  if (tensor.scales.size() > kMaxCount || tensor.params.size() > kMaxCount) {
    return Bad(absl::StrCat(tensor.scales.size(), " scales and ", tensor.params.size(),
                            " params do not fit the header's 32-bit counts"));
  }
  if (tensor.payload.size() > kMaxBlobPayloadBytes) {
    return Bad(absl::StrCat("payload of ", tensor.payload.size(), " bytes is over the limit of ",
                            kMaxBlobPayloadBytes));
  }
  const auto num_scales = static_cast<uint32_t>(tensor.scales.size());
  const auto num_params = static_cast<uint32_t>(tensor.params.size());
  const BlobLayout layout = ComputeLayout(num_scales, num_params, tensor.payload.size());
  out->assign(layout.total_bytes, 0);  // the padding is zero
  uint8_t* p = out->data();
  Store32(p + 0, kBlobMagic);
  Store32(p + 4, static_cast<uint32_t>(tensor.codec));
  Store32(p + 8, tensor.format_version);
  Store32(p + 12, num_scales);
  Store32(p + 16, num_params);
  Store32(p + 20, 0);
  Store64(p + 24, tensor.payload.size());
  for (uint32_t k = 0; k < num_scales; ++k) {
    uint32_t bits;
    std::memcpy(&bits, &tensor.scales[k], 4);
    Store32(p + layout.scales_offset + 4 * uint64_t{k}, bits);
  }
  for (uint32_t k = 0; k < num_params; ++k) {
    Store32(p + layout.params_offset + 4 * uint64_t{k}, tensor.params[k]);
  }
  if (!tensor.payload.empty()) {
    std::memcpy(p + layout.payload_offset, tensor.payload.data(), tensor.payload.size());
  }
  return absl::OkStatus();
}

absl::StatusOr<EncodedTensor> UnpackBlob(std::span<const uint8_t> blob, uint64_t num_elements,
                                         std::span<const int64_t> shape) {
  const uint64_t size = blob.size();
  if (size < kBlobHeaderBytes) {
    return Bad(absl::StrCat("blob is ", size, " bytes, shorter than its ", kBlobHeaderBytes,
                            "-byte header"));
  }
  const uint8_t* p = blob.data();
  const uint32_t magic = Load32(p + 0);
  if (magic != kBlobMagic) {
    return Bad(absl::StrCat("magic is 0x", absl::Hex(magic), ", expected 0x", absl::Hex(kBlobMagic),
                            " ('QTBL')"));
  }
  const uint32_t codec = Load32(p + 4);
  if (!KnownCodec(codec)) return Bad(absl::StrCat("codec id ", codec, " is not a known codec"));
  const uint32_t version = Load32(p + 8);
  const uint32_t num_scales = Load32(p + 12);
  const uint32_t num_params = Load32(p + 16);
  const uint32_t reserved = Load32(p + 20);
  const uint64_t payload_bytes = Load64(p + 24);
  if (reserved == kBlobReservedNonFinite) {
    return Bad(
        absl::StrCat("reserved field is ", reserved,
                     ": the (GPU) encoder met a non-finite value (NaN or Inf in gradient + "
                     "residual, or a sum that overflows float) and marked the blob invalid"));
  }
  if (reserved != 0) {
    return Bad(absl::StrCat("reserved field is 0x", absl::Hex(reserved), ", expected 0"));
  }
  const uint64_t room = size - kBlobHeaderBytes;
  if (4 * uint64_t{num_scales} > room) {
    return Bad(
        absl::StrCat("num_scales ", num_scales, " does not fit the blob's ", size, " bytes"));
  }
  if (4 * uint64_t{num_scales} + 4 * uint64_t{num_params} > room) {
    return Bad(absl::StrCat("num_params ", num_params, " (after ", num_scales,
                            " scales) does not fit the blob's ", size, " bytes"));
  }
  if (payload_bytes > room || payload_bytes > kMaxBlobPayloadBytes) {
    return Bad(
        absl::StrCat("payload_bytes ", payload_bytes, " does not fit the blob's ", size, " bytes"));
  }
  const BlobLayout layout = ComputeLayout(num_scales, num_params, payload_bytes);
  if (layout.total_bytes != size) {
    return Bad(absl::StrCat("blob is ", size, " bytes but its header (", num_scales, " scales, ",
                            num_params, " params, payload_bytes ", payload_bytes, ") implies ",
                            layout.total_bytes));
  }
  const uint64_t params_end = layout.params_offset + 4 * uint64_t{num_params};
  for (uint64_t k = params_end; k < layout.payload_offset; ++k) {
    if (p[k] != 0) {
      return Bad(absl::StrCat("padding byte at offset ", k, " (before the payload) is 0x",
                              absl::Hex(p[k]), ", expected 0"));
    }
  }
  for (uint64_t k = layout.payload_offset + payload_bytes; k < size; ++k) {
    if (p[k] != 0) {
      return Bad(absl::StrCat("padding byte at offset ", k, " (after the payload) is 0x",
                              absl::Hex(p[k]), ", expected 0"));
    }
  }
  EncodedTensor tensor;
  tensor.codec = static_cast<CodecId>(codec);
  tensor.format_version = version;
  tensor.num_elements = num_elements;
  tensor.shape.assign(shape.begin(), shape.end());
  tensor.scales.resize(num_scales);
  for (uint32_t k = 0; k < num_scales; ++k) {
    const uint32_t bits = Load32(p + layout.scales_offset + 4 * uint64_t{k});
    std::memcpy(&tensor.scales[k], &bits, 4);
  }
  tensor.params.resize(num_params);
  for (uint32_t k = 0; k < num_params; ++k) {
    tensor.params[k] = Load32(p + layout.params_offset + 4 * uint64_t{k});
  }
  tensor.payload.assign(p + layout.payload_offset, p + layout.payload_offset + payload_bytes);
  return tensor;
}

}  // namespace qtrain::compression
