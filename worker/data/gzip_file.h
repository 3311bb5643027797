// Reading whole data files that may be gzip-compressed (the IDX files ship as .gz).
//
// A file whose first two bytes are the gzip magic (1f 8b) is inflated through zlib; any other
// file is returned as is. Concatenated gzip members are inflated one after the other (as gunzip
// does). Every output is capped: a file, or a decompressed stream, larger than `max_bytes` is
// refused before it is read or inflated past the cap, so a malicious or mistaken file cannot
// make the process allocate without bound.
//
// Errors name the file:
//   NOT_FOUND           the file does not exist
//   RESOURCE_EXHAUSTED  the file, or its decompressed contents, exceed max_bytes
//   DATA_LOSS           a truncated or corrupt gzip stream (bad header, bad deflate data,
//                       CRC or length mismatch), or bytes after the last gzip member
//   other               the errno of a failed open/read, mapped by absl::ErrnoToStatus
//
// Thread-safety: free functions without shared state.
// Cost: one read of the file plus, for gzip, one inflate pass; memory is the compressed bytes
// plus the output (sized from the gzip length trailer where that is plausible, else grown by
// doubling; never past max_bytes).
#ifndef QTRAIN_WORKER_DATA_GZIP_FILE_H_
#define QTRAIN_WORKER_DATA_GZIP_FILE_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qtrain::data {

// 1 GiB: more than any file of the supported data sets (CIFAR-10 batches are 30 MB,
// Fashion-MNIST train images 47 MB decompressed).
inline constexpr int64_t kDefaultMaxFileBytes = int64_t{1} << 30;

// True if `bytes` starts with the gzip magic number.
bool HasGzipMagic(std::span<const uint8_t> bytes);

// Inflates one or more concatenated gzip members held in memory. `name` is used in errors only.
absl::StatusOr<std::vector<uint8_t>> InflateGzip(std::span<const uint8_t> compressed,
                                                 absl::string_view name, int64_t max_bytes);

// Reads the whole file at `path`, inflating it if it is gzip. Precondition: max_bytes > 0.
absl::StatusOr<std::vector<uint8_t>> ReadMaybeGzipFile(const std::string& path,
                                                       int64_t max_bytes = kDefaultMaxFileBytes);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_GZIP_FILE_H_
