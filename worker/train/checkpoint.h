// Checkpoint files: a pb::Checkpoint (proto/checkpoint.proto) framed for integrity.
//
// File layout, format version 1 (little-endian):
//   bytes 0..7    magic "QTRNCKPT"
//   bytes 8..11   uint32 format version (1)
//   bytes 12..15  uint32 CRC-32 (zlib) of the body
//   bytes 16..23  uint64 body length
//   bytes 24..    body: the serialized pb::Checkpoint
//
// Writes are atomic: a temporary file in the same directory, fsync, rename over the target,
// fsync of the directory; a crash leaves either the old or the new checkpoint, never a torn one.
// Reading checks everything: a missing file is NOT_FOUND; a wrong magic, a truncated file, a
// length or checksum mismatch or an unparseable body is DATA_LOSS naming the file; a newer
// format version is FAILED_PRECONDITION. Restoring into a model whose parameter names or shapes
// differ is FAILED_PRECONDITION naming the first difference, and changes nothing.
//
// Thread-safe (no shared state). Cost: one serialization and one CRC pass of the body.
#ifndef QTRAIN_WORKER_TRAIN_CHECKPOINT_H_
#define QTRAIN_WORKER_TRAIN_CHECKPOINT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/checkpoint.pb.h"
#include "worker/nn/layer.h"

namespace qtrain::train {

inline constexpr char kCheckpointMagic[8] = {'Q', 'T', 'R', 'N', 'C', 'K', 'P', 'T'};
inline constexpr uint32_t kCheckpointVersion = 1;
inline constexpr uint64_t kMaxCheckpointBytes = uint64_t{4} << 30;

absl::Status WriteCheckpointFile(const std::string& path, const pb::Checkpoint& checkpoint);
absl::StatusOr<pb::Checkpoint> ReadCheckpointFile(const std::string& path,
                                                  uint64_t max_bytes = kMaxCheckpointBytes);

// Tensor <-> NamedTensor.
void ToNamedTensor(const std::string& name, const nn::Tensor& t, pb::NamedTensor* out);

// Copies parameters (and optional momentum, same order) and buffers into `checkpoint`.
void CaptureState(const std::vector<nn::Parameter*>& params,
                  const std::vector<nn::Buffer*>& buffers, const std::vector<nn::Tensor>* momentum,
                  pb::Checkpoint* checkpoint);

// Restores what CaptureState captured. Everything is validated before anything is written.
absl::Status RestoreState(const pb::Checkpoint& checkpoint,
                          const std::vector<nn::Parameter*>& params,
                          const std::vector<nn::Buffer*>& buffers,
                          std::vector<nn::Tensor>* momentum);

// What CopyMatchingState copied, and out of how many of the model's tensors.
struct MatchCounts {
  int parameters = 0;
  int parameters_total = 0;
  int buffers = 0;
  int buffers_total = 0;
};

// Copies every parameter and buffer of `checkpoint` into the model tensor with the same name and
// shape, and leaves the rest of the model as it is (fine-tuning a quantized model from a
// full-precision one: the quantizers' own parameters are not in the checkpoint). Momentum is not
// copied. A stored tensor whose value count disagrees with its shape is DATA_LOSS, checked
// before anything is written.
absl::StatusOr<MatchCounts> CopyMatchingState(const pb::Checkpoint& checkpoint,
                                              const std::vector<nn::Parameter*>& params,
                                              const std::vector<nn::Buffer*>& buffers);

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_CHECKPOINT_H_
