#include "worker/data/gzip_file.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <limits>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace qtrain::data {
namespace {

constexpr uint8_t kGzipMagic0 = 0x1f;
constexpr uint8_t kGzipMagic1 = 0x8b;
// zlib's windowBits: 15 (32 KiB window) + 16 selects gzip framing (and no zlib framing).
constexpr int kGzipWindowBits = 15 + 16;
// inflate() takes 32-bit counts; feed and drain it in chunks no larger than this.
constexpr size_t kMaxChunk = size_t{1} << 30;
constexpr size_t kMinOutputReserve = size_t{1} << 16;

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

// Initial output size. The ISIZE trailer of the last member (uncompressed size mod 2^32) is an
// exact hint for a sound one-member file, but a truncated or corrupt file has arbitrary bytes
// there, and std::vector zero-fills what it allocates. So the hint is trusted only up to
// kTrustedRatio times the compressed size (plus 1 MiB); beyond that the buffer grows by
// doubling. Either way the zero-filled excess stays proportional to the bytes at hand.
size_t InitialOutputSize(std::span<const uint8_t> compressed, int64_t max_bytes) {
  constexpr size_t kTrustedRatio = 8;
  constexpr size_t kTrustedSlack = size_t{1} << 20;
  size_t hint = kMinOutputReserve;
  if (compressed.size() >= 18) {
    const uint8_t* t = compressed.data() + compressed.size() - 4;
    const uint32_t isize =
        uint32_t{t[0]} | uint32_t{t[1]} << 8 | uint32_t{t[2]} << 16 | uint32_t{t[3]} << 24;
    hint = std::max<size_t>(hint, isize + size_t{1});  // +1 lets inflate report the end
  }
  hint = std::min(hint, compressed.size() * kTrustedRatio + kTrustedSlack);
  return std::min<size_t>(hint, static_cast<size_t>(max_bytes) + 1);
}

}  // namespace

bool HasGzipMagic(std::span<const uint8_t> bytes) {
  return bytes.size() >= 2 && bytes[0] == kGzipMagic0 && bytes[1] == kGzipMagic1;
}

absl::StatusOr<std::vector<uint8_t>> InflateGzip(std::span<const uint8_t> compressed,
                                                 absl::string_view name, int64_t max_bytes) {
  QTRAIN_CHECK(max_bytes > 0) << "max_bytes=" << max_bytes;
  if (!HasGzipMagic(compressed)) {
    return absl::DataLossError(absl::StrCat(name, ": not a gzip stream (no 1f 8b magic)"));
  }
  z_stream strm{};
  if (inflateInit2(&strm, kGzipWindowBits) != Z_OK) {
    return absl::InternalError(absl::StrCat(name, ": inflateInit2 failed"));
  }
  std::unique_ptr<z_stream, int (*)(z_stream*)> guard(&strm, inflateEnd);

  // One byte past the cap is allowed so that "exactly max_bytes" and "more" can be told apart.
  const size_t cap = static_cast<size_t>(max_bytes) + 1;
  std::vector<uint8_t> out(InitialOutputSize(compressed, max_bytes));
  size_t in_pos = 0;
  size_t out_pos = 0;
  for (;;) {
    if (out_pos == out.size()) {
      if (out.size() >= cap) {
        return absl::ResourceExhaustedError(
            absl::StrCat(name, ": decompressed size exceeds the limit of ", max_bytes, " bytes"));
      }
      out.resize(std::min(cap, std::max(out.size() * 2, kMinOutputReserve)));
    }
    const size_t in_chunk = std::min(compressed.size() - in_pos, kMaxChunk);
    const size_t out_chunk = std::min(out.size() - out_pos, kMaxChunk);
    strm.next_in = const_cast<Bytef*>(compressed.data() + in_pos);
    strm.avail_in = static_cast<uInt>(in_chunk);
    strm.next_out = out.data() + out_pos;
    strm.avail_out = static_cast<uInt>(out_chunk);
    const int ret = inflate(&strm, Z_NO_FLUSH);
    in_pos += in_chunk - strm.avail_in;
    out_pos += out_chunk - strm.avail_out;
    if (ret == Z_STREAM_END) {
      if (in_pos == compressed.size()) break;
      // Another gzip member may follow; anything else after a member is corruption.
      if (!HasGzipMagic(compressed.subspan(in_pos))) {
        return absl::DataLossError(
            absl::StrCat(name, ": ", compressed.size() - in_pos,
                         " unexpected bytes after the gzip stream at offset ", in_pos));
      }
      if (inflateReset(&strm) != Z_OK) {
        return absl::InternalError(absl::StrCat(name, ": inflateReset failed"));
      }
      continue;
    }
    if (ret == Z_DATA_ERROR || ret == Z_NEED_DICT) {
      return absl::DataLossError(absl::StrCat(name, ": corrupt gzip data near compressed offset ",
                                              in_pos, ": ",
                                              strm.msg != nullptr ? strm.msg : "invalid data"));
    }
    if (ret == Z_MEM_ERROR) {
      return absl::ResourceExhaustedError(absl::StrCat(name, ": zlib out of memory"));
    }
    if (ret != Z_OK && ret != Z_BUF_ERROR) {
      return absl::InternalError(absl::StrCat(name, ": inflate returned ", ret));
    }
    // Z_OK / Z_BUF_ERROR: progress was made or a buffer ran dry. Running out of input before
    // the end of the stream is truncation; running out of output is handled at the loop top.
    if (in_pos == compressed.size() && strm.avail_out != 0) {
      return absl::DataLossError(absl::StrCat(name, ": truncated gzip stream (ended after ",
                                              compressed.size(), " compressed bytes, ", out_pos,
                                              " decompressed bytes)"));
    }
  }
  if (out_pos > static_cast<size_t>(max_bytes)) {
    return absl::ResourceExhaustedError(
        absl::StrCat(name, ": decompressed size exceeds the limit of ", max_bytes, " bytes"));
  }
  out.resize(out_pos);
  // A sound file sized from its trailer wastes one byte; only a larger excess (left by
  // doubling) is worth a reallocation and copy.
  if (out.capacity() - out_pos > out_pos / 4 + kMinOutputReserve) out.shrink_to_fit();
  return out;
}

absl::StatusOr<std::vector<uint8_t>> ReadMaybeGzipFile(const std::string& path, int64_t max_bytes) {
  QTRAIN_CHECK(max_bytes > 0) << "max_bytes=" << max_bytes;
  errno = 0;
  std::unique_ptr<std::FILE, FileCloser> file(std::fopen(path.c_str(), "rb"));
  if (file == nullptr) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::ErrnoToStatus(err, absl::StrCat("cannot open ", path));
  }
  // Read in chunks rather than trusting a size from stat(): works for pipes, and a file larger
  // than the cap is refused after reading at most max_bytes + 1 bytes.
  std::vector<uint8_t> bytes;
  constexpr size_t kReadChunk = size_t{1} << 20;
  for (;;) {
    const size_t old_size = bytes.size();
    const size_t want = std::min(kReadChunk, static_cast<size_t>(max_bytes) + 1 - old_size);
    bytes.resize(old_size + want);
    const size_t got = std::fread(bytes.data() + old_size, 1, want, file.get());
    bytes.resize(old_size + got);
    if (got < want) {
      if (std::ferror(file.get())) {
        return absl::ErrnoToStatus(errno, absl::StrCat("error reading ", path));
      }
      break;  // EOF
    }
    if (bytes.size() > static_cast<size_t>(max_bytes)) {
      return absl::ResourceExhaustedError(
          absl::StrCat(path, ": file exceeds the limit of ", max_bytes, " bytes"));
    }
  }
  if (!HasGzipMagic(bytes)) return bytes;
  return InflateGzip(bytes, path, max_bytes);
}

}  // namespace qtrain::data
