#include "common/framed_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/crc32.h"

namespace qtrain {
namespace {

void Put32(char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>(v >> (8 * i));
}
void Put64(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>(v >> (8 * i));
}
uint32_t Get32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(uint8_t(p[i])) << (8 * i);
  return v;
}
uint64_t Get64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(uint8_t(p[i])) << (8 * i);
  return v;
}

absl::Status Errno(const std::string& what, const std::string& path) {
  return absl::UnavailableError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

absl::Status WriteAll(int fd, const char* data, size_t size, const std::string& path) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("cannot write", path);
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteFramedFile(const std::string& path, const FrameFormat& format,
                             absl::string_view body) {
  char header[kFramedHeaderBytes];
  std::memcpy(header, format.magic, 8);
  Put32(header + 8, format.version);
  Put32(header + 12, Crc32(body.data(), body.size()));
  Put64(header + 16, body.size());

  const std::filesystem::path target(path);
  const std::filesystem::path dir =
      target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", tmp);
  absl::Status s = WriteAll(fd, header, kFramedHeaderBytes, tmp);
  if (s.ok()) s = WriteAll(fd, body.data(), body.size(), tmp);
  if (s.ok() && ::fsync(fd) != 0) s = Errno("cannot fsync", tmp);
  if (::close(fd) != 0 && s.ok()) s = Errno("cannot close", tmp);
  if (s.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) s = Errno("cannot rename onto", path);
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return s;
  }
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);  // best effort: makes the rename durable
    ::close(dfd);
  }
  return absl::OkStatus();
}

absl::StatusOr<FramedBody> ReadFramedFile(const std::string& path, const FrameFormat& format,
                                          uint64_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", format.what, " ", path));
  char header[kFramedHeaderBytes];
  in.read(header, kFramedHeaderBytes);
  if (in.gcount() != static_cast<std::streamsize>(kFramedHeaderBytes)) {
    return absl::DataLossError(absl::StrCat(format.what, " ", path, " is truncated: ", in.gcount(),
                                            " bytes, the header alone is ", kFramedHeaderBytes));
  }
  if (std::memcmp(header, format.magic, 8) != 0) {
    return absl::DataLossError(absl::StrCat(format.what, " ", path, " does not start with the magic ",
                                            absl::string_view(format.magic, 8)));
  }
  FramedBody out;
  out.version = Get32(header + 8);
  if (out.version == 0 || out.version > format.version) {
    return absl::FailedPreconditionError(absl::StrCat(format.what, " ", path,
                                                      " has format version ", out.version,
                                                      "; this qtrain reads 1..", format.version));
  }
  const uint32_t crc = Get32(header + 12);
  const uint64_t length = Get64(header + 16);
  if (length > max_bytes) {
    return absl::DataLossError(absl::StrCat(format.what, " ", path, " declares a body of ", length,
                                            " bytes, over the limit ", max_bytes));
  }
  // Compare against the real file size before allocating what the header claims.
  std::error_code ec;
  const uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec || file_size != kFramedHeaderBytes + length) {
    return absl::DataLossError(absl::StrCat(format.what, " ", path, " is ", file_size,
                                            " bytes; its header says ",
                                            kFramedHeaderBytes + length));
  }
  out.body.assign(length, '\0');
  in.read(out.body.data(), static_cast<std::streamsize>(length));
  if (static_cast<uint64_t>(in.gcount()) != length) {
    return absl::DataLossError(absl::StrCat(format.what, " ", path, " is truncated"));
  }
  if (Crc32(out.body.data(), out.body.size()) != crc) {
    return absl::DataLossError(
        absl::StrCat(format.what, " ", path, " fails its checksum (corrupt)"));
  }
  return out;
}

}  // namespace qtrain
