// Parser for the IDX format of MNIST, Fashion-MNIST, KMNIST and similar data sets.
//
// Byte layout (all integers big-endian, as LeCun's format defines it):
//   offset 0: u8 0, u8 0, u8 type (0x08 = unsigned byte, the only type supported), u8 rank
//   offset 4: rank x u32 dimension sizes
//   then:     prod(dims) elements of `type`, row-major, and nothing after them
// Images are rank 3 (magic 0x00000803: count, rows, cols); labels are rank 1 (0x00000801).
//
// The parser reads only within the span it is given and checks every size before it allocates:
// the element count is computed with overflow checks and compared with the bytes present, so a
// header declaring a huge size fails without allocating anything.
//
// Errors (each message names the file, passed in as `name`):
//   DATA_LOSS         not IDX (first two bytes not zero), header shorter than its rank says,
//                     body shorter ("expected X bytes, got Y") or longer than the dimensions say,
//                     dimensions whose product overflows
//   INVALID_ARGUMENT  a well-formed IDX file of the wrong kind (type other than u8, wrong rank,
//                     zero-sized image), a label outside [0, num_classes), and (ParseIdxPair)
//                     image and label counts that differ
//
// Thread-safety: free functions without shared state.
// Cost: one pass over the bytes; the result copies the element bytes.
#ifndef QTRAIN_WORKER_DATA_IDX_H_
#define QTRAIN_WORKER_DATA_IDX_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qtrain::data {

inline constexpr uint32_t kIdxImagesMagic = 0x00000803;
inline constexpr uint32_t kIdxLabelsMagic = 0x00000801;
inline constexpr uint8_t kIdxTypeUnsignedByte = 0x08;

// A generic unsigned-byte IDX array.
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;  // prod(dims) bytes, row-major
};

// Images: count x rows x cols bytes, one channel.
struct IdxImages {
  int64_t count = 0;
  int rows = 0;
  int cols = 0;
  std::vector<uint8_t> pixels;  // count * rows * cols
};

// Parses any unsigned-byte IDX array of rank 1..4 (the ranks real data sets use).
absl::StatusOr<IdxArray> ParseIdx(std::span<const uint8_t> bytes, absl::string_view name);

// Parses an image file (magic 0x00000803). Rows and cols must each be in [1, 65535].
absl::StatusOr<IdxImages> ParseIdxImages(std::span<const uint8_t> bytes, absl::string_view name);

// Parses a label file (magic 0x00000801); every label must be in [0, num_classes).
// Precondition: 1 <= num_classes <= 256 (labels are bytes).
absl::StatusOr<std::vector<int32_t>> ParseIdxLabels(std::span<const uint8_t> bytes,
                                                    absl::string_view name, int num_classes);

// Serializes an unsigned-byte IDX array (used by tests and tools to write IDX files).
// Precondition: data.size() == prod(dims), each dim in [0, 2^32).
std::vector<uint8_t> EncodeIdx(std::span<const int64_t> dims, std::span<const uint8_t> data);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_IDX_H_
