#include "worker/train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/crc32.h"
#include "common/status_macros.h"

namespace qtrain::train {
namespace {

constexpr size_t kHeaderBytes = 24;

void Put32(char* p, uint32_t v) { for (int i = 0; i < 4; ++i) p[i] = char(v >> (8 * i)); }
void Put64(char* p, uint64_t v) { for (int i = 0; i < 8; ++i) p[i] = char(v >> (8 * i)); }
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
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("cannot write", path);
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

bool SameShape(const pb::NamedTensor& t, const nn::Tensor& tensor) {
  if (t.shape_size() != tensor.rank()) return false;
  for (int i = 0; i < tensor.rank(); ++i) {
    if (t.shape(i) != tensor.dim(i)) return false;
  }
  return t.values_size() == tensor.size();
}

std::string ProtoShape(const pb::NamedTensor& t) {
  nn::Shape s(t.shape().begin(), t.shape().end());
  return nn::ShapeToString(s);
}

// Checks that `stored` matches `names`/`tensors` one to one (same order, names and shapes).
absl::Status CheckMatches(const char* what,
                          const google::protobuf::RepeatedPtrField<pb::NamedTensor>& stored,
                          const std::vector<std::string>& names,
                          const std::vector<const nn::Tensor*>& tensors) {
  if (stored.size() != static_cast<int>(tensors.size())) {
    return absl::FailedPreconditionError(absl::StrCat("checkpoint has ", stored.size(), " ", what,
                                                      ", the model has ", tensors.size()));
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    const pb::NamedTensor& t = stored[static_cast<int>(i)];
    if (t.name() != names[i] || !SameShape(t, *tensors[i])) {
      return absl::FailedPreconditionError(absl::StrCat(
          "checkpoint ", what, " #", i, " is '", t.name(), "' ", ProtoShape(t), " with ",
          t.values_size(), " values; the model has '", names[i], "' ",
          nn::ShapeToString(tensors[i]->shape())));
    }
  }
  return absl::OkStatus();
}

void CopyInto(const pb::NamedTensor& t, nn::Tensor* tensor) {
  std::copy(t.values().begin(), t.values().end(), tensor->data());
}

}  // namespace

absl::Status WriteCheckpointFile(const std::string& path, const pb::Checkpoint& checkpoint) {
  std::string body;
  if (!checkpoint.SerializeToString(&body)) {
    return absl::InternalError(absl::StrCat("cannot serialize checkpoint for ", path));
  }
  char header[kHeaderBytes];
  std::memcpy(header, kCheckpointMagic, 8);
  Put32(header + 8, kCheckpointVersion);
  Put32(header + 12, Crc32(body.data(), body.size()));
  Put64(header + 16, body.size());

  const std::filesystem::path target(path);
  const std::filesystem::path dir =
      target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", tmp);
  absl::Status s = WriteAll(fd, header, kHeaderBytes, tmp);
  if (s.ok()) s = WriteAll(fd, body.data(), body.size(), tmp);
  if (s.ok() && ::fsync(fd) != 0) s = Errno("cannot fsync", tmp);
  if (::close(fd) != 0 && s.ok()) s = Errno("cannot close", tmp);
  if (s.ok() && std::rename(tmp.c_str(), path.c_str()) != 0) s = Errno("cannot rename onto", path);
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return s;
  }
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);  // best effort: makes the rename durable
    ::close(dfd);
  }
  return absl::OkStatus();
}

absl::StatusOr<pb::Checkpoint> ReadCheckpointFile(const std::string& path, uint64_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open checkpoint ", path));
  char header[kHeaderBytes];
  in.read(header, kHeaderBytes);
  if (in.gcount() != static_cast<std::streamsize>(kHeaderBytes)) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, " is truncated: ", in.gcount(),
                                            " bytes, the header alone is ", kHeaderBytes));
  }
  if (std::memcmp(header, kCheckpointMagic, 8) != 0) {
    return absl::DataLossError(
        absl::StrCat("checkpoint ", path, " does not start with the magic QTRNCKPT"));
  }
  const uint32_t version = Get32(header + 8);
  if (version == 0 || version > kCheckpointVersion) {
    return absl::FailedPreconditionError(absl::StrCat("checkpoint ", path, " has format version ",
                                                      version, "; this qtrain reads 1..",
                                                      kCheckpointVersion));
  }
  const uint32_t crc = Get32(header + 12);
  const uint64_t length = Get64(header + 16);
  if (length > max_bytes) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, " declares a body of ", length,
                                            " bytes, over the limit ", max_bytes));
  }
  // Compare against the real file size before allocating what the header claims.
  std::error_code ec;
  const uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec || file_size != kHeaderBytes + length) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, " is ", file_size,
                                            " bytes; its header says ", kHeaderBytes + length));
  }
  std::string body(length, '\0');
  in.read(body.data(), static_cast<std::streamsize>(length));
  if (static_cast<uint64_t>(in.gcount()) != length) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, " is truncated"));
  }
  if (Crc32(body.data(), body.size()) != crc) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, " fails its checksum (corrupt)"));
  }
  pb::Checkpoint checkpoint;
  if (length > static_cast<uint64_t>(std::numeric_limits<int>::max()) ||
      !checkpoint.ParseFromString(body)) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, " body does not parse"));
  }
  return checkpoint;
}

void ToNamedTensor(const std::string& name, const nn::Tensor& t, pb::NamedTensor* out) {
  out->set_name(name);
  out->mutable_shape()->Assign(t.shape().begin(), t.shape().end());
  out->mutable_values()->Assign(t.data(), t.data() + t.size());
}

void CaptureState(const std::vector<nn::Parameter*>& params,
                  const std::vector<nn::Buffer*>& buffers, const std::vector<nn::Tensor>* momentum,
                  pb::Checkpoint* checkpoint) {
  checkpoint->clear_parameters();
  checkpoint->clear_buffers();
  checkpoint->clear_momentum();
  for (size_t i = 0; i < params.size(); ++i) {
    ToNamedTensor(params[i]->name, params[i]->value, checkpoint->add_parameters());
    if (momentum) ToNamedTensor(params[i]->name, (*momentum)[i], checkpoint->add_momentum());
  }
  for (const nn::Buffer* b : buffers) ToNamedTensor(b->name, b->value, checkpoint->add_buffers());
}

absl::Status RestoreState(const pb::Checkpoint& checkpoint,
                          const std::vector<nn::Parameter*>& params,
                          const std::vector<nn::Buffer*>& buffers,
                          std::vector<nn::Tensor>* momentum) {
  std::vector<std::string> names;
  std::vector<const nn::Tensor*> values;
  for (const nn::Parameter* p : params) {
    names.push_back(p->name);
    values.push_back(&p->value);
  }
  RETURN_IF_ERROR(CheckMatches("parameters", checkpoint.parameters(), names, values));
  if (momentum != nullptr && checkpoint.momentum_size() > 0) {
    RETURN_IF_ERROR(CheckMatches("momentum tensors", checkpoint.momentum(), names, values));
  }
  std::vector<std::string> buffer_names;
  std::vector<const nn::Tensor*> buffer_values;
  for (const nn::Buffer* b : buffers) {
    buffer_names.push_back(b->name);
    buffer_values.push_back(&b->value);
  }
  RETURN_IF_ERROR(CheckMatches("buffers", checkpoint.buffers(), buffer_names, buffer_values));
  for (size_t i = 0; i < params.size(); ++i) {
    CopyInto(checkpoint.parameters(static_cast<int>(i)), &params[i]->value);
    if (momentum != nullptr && checkpoint.momentum_size() > 0) {
      CopyInto(checkpoint.momentum(static_cast<int>(i)), &(*momentum)[i]);
    }
  }
  for (size_t i = 0; i < buffers.size(); ++i) {
    CopyInto(checkpoint.buffers(static_cast<int>(i)), &buffers[i]->value);
  }
  return absl::OkStatus();
}

}  // namespace qtrain::train
