#include "worker/train/checkpoint.h"

#include <algorithm>
#include <limits>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/framed_file.h"
#include "common/status_macros.h"

namespace qtrain::train {
namespace {

constexpr FrameFormat kCheckpointFormat{
    .magic = kCheckpointMagic, .version = kCheckpointVersion, .what = "checkpoint"};

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
  return WriteFramedFile(path, kCheckpointFormat, body);
}

absl::StatusOr<pb::Checkpoint> ReadCheckpointFile(const std::string& path, uint64_t max_bytes) {
  ASSIGN_OR_RETURN(FramedBody framed, ReadFramedFile(path, kCheckpointFormat, max_bytes));
  pb::Checkpoint checkpoint;
  if (framed.body.size() > static_cast<uint64_t>(std::numeric_limits<int>::max()) ||
      !checkpoint.ParseFromString(framed.body)) {
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

absl::StatusOr<MatchCounts> CopyMatchingState(const pb::Checkpoint& checkpoint,
                                              const std::vector<nn::Parameter*>& params,
                                              const std::vector<nn::Buffer*>& buffers) {
  // Parameters and buffers are separate name spaces.
  std::map<std::string, const pb::NamedTensor*> stored[2];
  for (int kind = 0; kind < 2; ++kind) {
    for (const pb::NamedTensor& t : kind == 0 ? checkpoint.parameters() : checkpoint.buffers()) {
      int64_t n = 1;
      for (int64_t d : t.shape()) n = (d < 0 || n < 0) ? -1 : n * d;
      if (n != t.values_size()) {
        return absl::DataLossError(absl::StrCat("checkpoint tensor '", t.name(), "' has shape ",
                                                ProtoShape(t), " but ", t.values_size(),
                                                " values"));
      }
      stored[kind][t.name()] = &t;
    }
  }
  MatchCounts counts;
  auto copy = [&](int kind, const std::string& name, nn::Tensor* value) {
    auto it = stored[kind].find(name);
    if (it == stored[kind].end() || !SameShape(*it->second, *value)) return 0;
    CopyInto(*it->second, value);
    return 1;
  };
  for (nn::Parameter* p : params) {
    ++counts.parameters_total;
    counts.parameters += copy(0, p->name, &p->value);
  }
  for (nn::Buffer* b : buffers) {
    ++counts.buffers_total;
    counts.buffers += copy(1, b->name, &b->value);
  }
  return counts;
}

}  // namespace qtrain::train
