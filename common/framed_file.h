// Files framed for integrity: an 8-byte magic, a format version, the body's length and its
// CRC-32, written atomically. The same framing as checkpoints (worker/train/checkpoint.h), for
// any other file qtrain writes (packed models: worker/quant/packed_format.h).
//
// Layout (little-endian):
//   bytes 0..7    magic (8 bytes, chosen by the caller)
//   bytes 8..11   uint32 format version
//   bytes 12..15  uint32 CRC-32 (zlib) of the body
//   bytes 16..23  uint64 body length
//   bytes 24..    body
//
// Writes go to a temporary file in the same directory, are fsynced and renamed over the target
// (then the directory is fsynced): a crash leaves the old file or the new one, never a torn one.
// Reads check everything and read only within the file's real size: a missing file is
// NOT_FOUND; a wrong magic, a truncated file, a length or checksum mismatch is DATA_LOSS naming
// the file; a version of 0 or above the reader's is FAILED_PRECONDITION.
//
// Thread-safe (no shared state). Cost: one CRC pass of the body; reads allocate the body once.
#ifndef QTRAIN_COMMON_FRAMED_FILE_H_
#define QTRAIN_COMMON_FRAMED_FILE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qtrain {

inline constexpr size_t kFramedHeaderBytes = 24;

struct FrameFormat {
  const char* magic = nullptr;  // exactly 8 bytes (not NUL-terminated)
  uint32_t version = 1;         // written; the highest version a read accepts
  const char* what = "file";    // "checkpoint", "packed model": used in error messages
};

// UNAVAILABLE (naming the path and errno) when a file operation fails; the target is untouched.
absl::Status WriteFramedFile(const std::string& path, const FrameFormat& format,
                             absl::string_view body);

struct FramedBody {
  uint32_t version = 0;
  std::string body;
};

// Bodies longer than max_bytes are DATA_LOSS before anything is allocated.
absl::StatusOr<FramedBody> ReadFramedFile(const std::string& path, const FrameFormat& format,
                                          uint64_t max_bytes);

}  // namespace qtrain

#endif  // QTRAIN_COMMON_FRAMED_FILE_H_
