// The CIFAR-10 binary format ("CIFAR-10 binary version", cifar-10-binary.tar.gz).
//
// Files: data_batch_1.bin .. data_batch_5.bin (training, in that order) and test_batch.bin,
// either directly in <dir> or in <dir>/cifar-10-batches-bin/ (the tarball's folder).
// Each file is a sequence of 3073-byte records with no header:
//   byte 0:        label, 0..9
//   bytes 1..3072: 32x32 red plane, then green, then blue (CHW, row-major, bytes)
// Files may also be gzip-compressed (detected by magic, see gzip_file.h).
//
// Errors: NOT_FOUND naming the missing file; DATA_LOSS when a file's size is not a multiple of
// 3073 bytes (a truncated or foreign file); INVALID_ARGUMENT for a label above 9.
//
// Normalization: per-channel mean and stddev computed over the training examples kept (for the
// full training set this gives 0.4914/0.4822/0.4465 and 0.2470/0.2435/0.2616).
//
// Thread-safety: free functions without shared state.
// Cost: each file read is read whole (30 MB per batch). With LoadOptions::max_train, training
// files after the one that fills the cap are not opened; the test file is always read whole.
#ifndef QTRAIN_WORKER_DATA_CIFAR10_H_
#define QTRAIN_WORKER_DATA_CIFAR10_H_

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/data/dataset.h"

namespace qtrain::data {

inline constexpr int kCifar10Classes = 10;
inline constexpr int kCifar10Channels = 3;
inline constexpr int kCifar10Side = 32;
inline constexpr int64_t kCifar10ImageBytes = kCifar10Channels * kCifar10Side * kCifar10Side;
inline constexpr int64_t kCifar10RecordBytes = 1 + kCifar10ImageBytes;  // 3073
inline constexpr int kCifar10TrainBatches = 5;

// Appends the records of one batch file's bytes to `dataset` (pixels and labels only), keeping
// at most `max_records` of them (0: all). The whole file is validated even when fewer are kept.
// `name` is used in errors only.
absl::Status AppendCifar10Batch(std::span<const uint8_t> bytes, absl::string_view name,
                                int64_t max_records, Dataset& dataset);

// Loads the training and test splits from `dir`.
absl::StatusOr<DataSplits> LoadCifar10(const std::string& dir, const LoadOptions& load_options);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_CIFAR10_H_
