#include "worker/data/idx.h"

#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace qtrain::data {
namespace {

constexpr int kMaxRank = 4;
constexpr int64_t kMaxImageSide = 65535;

uint32_t ReadBigEndian32(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | uint32_t{p[3]};
}

std::string DimsString(std::span<const int64_t> dims) {
  std::string s;
  for (size_t i = 0; i < dims.size(); ++i) absl::StrAppend(&s, i ? "x" : "", dims[i]);
  return s;
}

}  // namespace

absl::StatusOr<IdxArray> ParseIdx(std::span<const uint8_t> bytes, absl::string_view name) {
  if (bytes.size() < 4) {
    return absl::DataLossError(absl::StrCat(name, ": truncated IDX header: expected at least 4 ",
                                            "bytes, got ", bytes.size()));
  }
  if (bytes[0] != 0 || bytes[1] != 0) {
    return absl::DataLossError(
        absl::StrFormat("%s: not an IDX file: magic 0x%08x does not start with two zero bytes",
                        name, ReadBigEndian32(bytes.data())));
  }
  const uint8_t type = bytes[2];
  const int rank = bytes[3];
  if (type != kIdxTypeUnsignedByte) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: unsupported IDX element type 0x%02x (only 0x08, unsigned byte)", name, type));
  }
  if (rank < 1 || rank > kMaxRank) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": unsupported IDX rank ", rank, " (supported: 1..", kMaxRank, ")"));
  }
  const size_t header_bytes = 4 + 4 * static_cast<size_t>(rank);
  if (bytes.size() < header_bytes) {
    return absl::DataLossError(absl::StrCat(name, ": truncated IDX header: expected ", header_bytes,
                                            " bytes for rank ", rank, ", got ", bytes.size()));
  }
  IdxArray array;
  array.dims.resize(rank);
  // Overflow-safe product; with u32 dims and rank <= 4 it can exceed 2^64, so check each step.
  uint64_t elements = 1;
  bool overflow = false;
  for (int i = 0; i < rank; ++i) {
    const uint32_t d = ReadBigEndian32(bytes.data() + 4 + 4 * i);
    array.dims[i] = d;
    if (d != 0 && elements > std::numeric_limits<uint64_t>::max() / d) overflow = true;
    elements *= d;
  }
  if (overflow || elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return absl::DataLossError(
        absl::StrCat(name, ": IDX dimensions ", DimsString(array.dims), " overflow a 64-bit size"));
  }
  const size_t body_bytes = bytes.size() - header_bytes;
  if (elements > body_bytes) {
    return absl::DataLossError(absl::StrCat(name, ": truncated IDX body: dimensions ",
                                            DimsString(array.dims), " expected ", elements,
                                            " bytes, got ", body_bytes));
  }
  if (elements < body_bytes) {
    return absl::DataLossError(absl::StrCat(name, ": IDX body longer than its dimensions ",
                                            DimsString(array.dims), ": expected ", elements,
                                            " bytes, got ", body_bytes));
  }
  array.data.assign(bytes.begin() + header_bytes, bytes.end());
  return array;
}

absl::StatusOr<IdxImages> ParseIdxImages(std::span<const uint8_t> bytes, absl::string_view name) {
  // The rank is checked before the body so a label file given as images gets the clear error.
  if (bytes.size() >= 4 && bytes[0] == 0 && bytes[1] == 0 && bytes[2] == kIdxTypeUnsignedByte &&
      bytes[3] != 3) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: not an IDX image file: magic 0x%08x, expected 0x%08x (rank 3)", name,
                        ReadBigEndian32(bytes.data()), kIdxImagesMagic));
  }
  ASSIGN_OR_RETURN(IdxArray array, ParseIdx(bytes, name));
  const int64_t rows = array.dims[1];
  const int64_t cols = array.dims[2];
  if (rows < 1 || rows > kMaxImageSide || cols < 1 || cols > kMaxImageSide) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": IDX image size ", rows, "x", cols,
                                                   " outside [1, ", kMaxImageSide, "]"));
  }
  IdxImages images;
  images.count = array.dims[0];
  images.rows = static_cast<int>(rows);
  images.cols = static_cast<int>(cols);
  images.pixels = std::move(array.data);
  return images;
}

absl::StatusOr<std::vector<int32_t>> ParseIdxLabels(std::span<const uint8_t> bytes,
                                                    absl::string_view name, int num_classes) {
  QTRAIN_CHECK(num_classes >= 1 && num_classes <= 256) << "num_classes=" << num_classes;
  if (bytes.size() >= 4 && bytes[0] == 0 && bytes[1] == 0 && bytes[2] == kIdxTypeUnsignedByte &&
      bytes[3] != 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: not an IDX label file: magic 0x%08x, expected 0x%08x (rank 1)", name,
                        ReadBigEndian32(bytes.data()), kIdxLabelsMagic));
  }
  ASSIGN_OR_RETURN(IdxArray array, ParseIdx(bytes, name));
  std::vector<int32_t> labels(array.data.size());
  for (size_t i = 0; i < array.data.size(); ++i) {
    const int label = array.data[i];
    if (label >= num_classes) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": label ", label, " at index ", i,
                                                     " is outside [0, ", num_classes, ")"));
    }
    labels[i] = label;
  }
  return labels;
}

std::vector<uint8_t> EncodeIdx(std::span<const int64_t> dims, std::span<const uint8_t> data) {
  QTRAIN_CHECK(!dims.empty() && dims.size() <= 255) << "rank=" << dims.size();
  std::vector<uint8_t> out = {0, 0, kIdxTypeUnsignedByte, static_cast<uint8_t>(dims.size())};
  uint64_t elements = 1;
  for (int64_t d : dims) {
    QTRAIN_CHECK(d >= 0 && d <= 0xffffffffLL) << "dim=" << d;
    const uint32_t u = static_cast<uint32_t>(d);
    out.insert(out.end(), {static_cast<uint8_t>(u >> 24), static_cast<uint8_t>(u >> 16),
                           static_cast<uint8_t>(u >> 8), static_cast<uint8_t>(u)});
    elements *= u;
  }
  QTRAIN_CHECK(elements == data.size()) << "elements=" << elements << " data=" << data.size();
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

}  // namespace qtrain::data
