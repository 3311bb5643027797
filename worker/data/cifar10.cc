#include "worker/data/cifar10.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/data/gzip_file.h"
#include "worker/data/normalize.h"

namespace qtrain::data {
namespace {

constexpr char kTarballFolder[] = "cifar-10-batches-bin";
constexpr char kFirstTrainFile[] = "data_batch_1.bin";

// The folder holding the batch files: <dir>, or <dir>/cifar-10-batches-bin if only it has them.
std::string BatchFolder(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(fs::path(dir) / kFirstTrainFile, ec)) return dir;
  const fs::path nested = fs::path(dir) / kTarballFolder;
  if (fs::exists(nested / kFirstTrainFile, ec)) return nested.string();
  return dir;
}

Dataset EmptyCifarDataset(std::string name) {
  Dataset d;
  d.name = std::move(name);
  d.channels = kCifar10Channels;
  d.height = kCifar10Side;
  d.width = kCifar10Side;
  d.num_classes = kCifar10Classes;
  return d;
}

absl::Status AppendFile(const std::string& path, int64_t max_records, int64_t max_file_bytes,
                        Dataset& dataset) {
  ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadMaybeGzipFile(path, max_file_bytes));
  return AppendCifar10Batch(bytes, path, max_records, dataset);
}

}  // namespace

absl::Status AppendCifar10Batch(std::span<const uint8_t> bytes, absl::string_view name,
                                int64_t max_records, Dataset& dataset) {
  const int64_t size = static_cast<int64_t>(bytes.size());
  if (size % kCifar10RecordBytes != 0) {
    return absl::DataLossError(absl::StrCat(
        name, ": size ", size, " is not a multiple of the ", kCifar10RecordBytes,
        "-byte CIFAR-10 record (", size / kCifar10RecordBytes, " whole records and ",
        size % kCifar10RecordBytes, " extra bytes); truncated or not a CIFAR-10 batch"));
  }
  const int64_t records = size / kCifar10RecordBytes;
  for (int64_t r = 0; r < records; ++r) {
    const uint8_t label = bytes[r * kCifar10RecordBytes];
    if (label >= kCifar10Classes) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": record ", r, " has label ", int{label}, ", outside [0, ", kCifar10Classes, ")"));
    }
  }
  const int64_t keep = max_records > 0 ? std::min(max_records, records) : records;
  dataset.labels.reserve(dataset.labels.size() + keep);
  dataset.pixels.reserve(dataset.pixels.size() + keep * kCifar10ImageBytes);
  for (int64_t r = 0; r < keep; ++r) {
    const uint8_t* record = bytes.data() + r * kCifar10RecordBytes;
    dataset.labels.push_back(record[0]);
    dataset.pixels.insert(dataset.pixels.end(), record + 1, record + kCifar10RecordBytes);
  }
  return absl::OkStatus();
}

absl::StatusOr<DataSplits> LoadCifar10(const std::string& dir, const LoadOptions& load_options) {
  RETURN_IF_ERROR(ValidateLoadOptions(load_options));
  const std::filesystem::path folder = BatchFolder(dir);
  DataSplits splits;
  splits.train = EmptyCifarDataset("cifar10/train");
  splits.test = EmptyCifarDataset("cifar10/test");
  for (int b = 1; b <= kCifar10TrainBatches; ++b) {
    int64_t remaining = 0;  // 0: no cap
    if (load_options.max_train > 0) {
      remaining = load_options.max_train - splits.train.size();
      if (remaining <= 0) break;
    }
    const std::string path = (folder / absl::StrCat("data_batch_", b, ".bin")).string();
    RETURN_IF_ERROR(AppendFile(path, remaining, load_options.max_file_bytes, splits.train));
  }
  RETURN_IF_ERROR(AppendFile((folder / "test_batch.bin").string(), load_options.max_test,
                             load_options.max_file_bytes, splits.test));
  if (splits.train.size() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": the CIFAR-10 training set is empty"));
  }
  const Normalization normalization = ComputeNormalization(splits.train.pixels, kCifar10Channels,
                                                           int64_t{kCifar10Side} * kCifar10Side);
  splits.train.normalization = normalization;
  splits.test.normalization = normalization;
  RETURN_IF_ERROR(ValidateDataset(splits.train));
  RETURN_IF_ERROR(ValidateDataset(splits.test));
  return splits;
}

}  // namespace qtrain::data
