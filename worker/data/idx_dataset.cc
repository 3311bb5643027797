#include "worker/data/idx_dataset.h"

#include <algorithm>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/data/gzip_file.h"
#include "worker/data/idx.h"

namespace qtrain::data {
namespace {

constexpr int kMaxByteLabels = 256;

// Reads <dir>/<stem>.gz, or <dir>/<stem> if the .gz does not exist.
absl::StatusOr<std::vector<uint8_t>> ReadIdxFile(const std::string& dir, const std::string& stem,
                                                 int64_t max_bytes) {
  const std::string gz_path = (std::filesystem::path(dir) / (stem + ".gz")).string();
  absl::StatusOr<std::vector<uint8_t>> bytes = ReadMaybeGzipFile(gz_path, max_bytes);
  if (!absl::IsNotFound(bytes.status())) return bytes;
  const std::string plain_path = (std::filesystem::path(dir) / stem).string();
  bytes = ReadMaybeGzipFile(plain_path, max_bytes);
  if (absl::IsNotFound(bytes.status())) {
    return absl::NotFoundError(
        absl::StrCat("IDX file not found: neither ", gz_path, " nor ", plain_path, " exists"));
  }
  return bytes;
}

struct Split {
  IdxImages images;
  std::vector<int32_t> labels;
};

absl::StatusOr<Split> LoadSplit(const std::string& dir, const std::string& prefix, int label_limit,
                                int64_t max_bytes) {
  const std::string images_stem = prefix + "-images-idx3-ubyte";
  const std::string labels_stem = prefix + "-labels-idx1-ubyte";
  Split split;
  {
    ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadIdxFile(dir, images_stem, max_bytes));
    ASSIGN_OR_RETURN(split.images, ParseIdxImages(bytes, images_stem));
  }
  {
    ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadIdxFile(dir, labels_stem, max_bytes));
    ASSIGN_OR_RETURN(split.labels, ParseIdxLabels(bytes, labels_stem, label_limit));
  }
  if (split.images.count != static_cast<int64_t>(split.labels.size())) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": ", images_stem, " holds ",
                                                   split.images.count, " images but ", labels_stem,
                                                   " holds ", split.labels.size(), " labels"));
  }
  return split;
}

Dataset ToDataset(const std::string& name, int num_classes, Split split) {
  Dataset d;
  d.name = name;
  d.channels = 1;
  d.height = split.images.rows;
  d.width = split.images.cols;
  d.num_classes = num_classes;
  d.pixels = std::move(split.images.pixels);
  d.labels = std::move(split.labels);
  return d;
}

}  // namespace

absl::StatusOr<DataSplits> LoadIdxDirectory(const std::string& dir,
                                            const IdxDirectoryOptions& idx_options,
                                            const LoadOptions& load_options) {
  RETURN_IF_ERROR(ValidateLoadOptions(load_options));
  if (idx_options.num_classes < 0 || idx_options.num_classes > kMaxByteLabels) {
    return absl::InvalidArgumentError(absl::StrCat("num_classes must be in [0, ", kMaxByteLabels,
                                                   "], got ", idx_options.num_classes));
  }
  const int label_limit = idx_options.num_classes > 0 ? idx_options.num_classes : kMaxByteLabels;
  ASSIGN_OR_RETURN(Split train, LoadSplit(dir, "train", label_limit, load_options.max_file_bytes));
  int num_classes = idx_options.num_classes;
  if (num_classes == 0) {
    if (train.labels.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(dir, ": the training set is empty; cannot infer the number of classes"));
    }
    num_classes = *std::max_element(train.labels.begin(), train.labels.end()) + 1;
  }
  ASSIGN_OR_RETURN(Split test, LoadSplit(dir, "t10k", kMaxByteLabels, load_options.max_file_bytes));
  for (size_t i = 0; i < test.labels.size(); ++i) {
    if (test.labels[i] >= num_classes) {
      return absl::InvalidArgumentError(
          absl::StrCat(dir, ": t10k-labels-idx1-ubyte: label ", test.labels[i], " at index ", i,
                       " is outside [0, ", num_classes, ")",
                       idx_options.num_classes == 0 ? " (inferred from the training labels)" : ""));
    }
  }
  if (train.images.rows != test.images.rows || train.images.cols != test.images.cols) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": training images are ", train.images.rows,
                                                   "x", train.images.cols, " but test images are ",
                                                   test.images.rows, "x", test.images.cols));
  }

  DataSplits splits;
  splits.train = ToDataset(idx_options.name + "/train", num_classes, std::move(train));
  splits.test = ToDataset(idx_options.name + "/test", num_classes, std::move(test));
  TruncateDataset(load_options.max_train, splits.train);
  TruncateDataset(load_options.max_test, splits.test);
  if (splits.train.size() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": the training set is empty"));
  }
  const Normalization normalization =
      idx_options.normalization.has_value()
          ? *idx_options.normalization
          : ComputeNormalization(splits.train.pixels, 1,
                                 int64_t{splits.train.height} * splits.train.width);
  splits.train.normalization = normalization;
  splits.test.normalization = normalization;
  RETURN_IF_ERROR(ValidateDataset(splits.train));
  RETURN_IF_ERROR(ValidateDataset(splits.test));
  return splits;
}

absl::StatusOr<DataSplits> LoadFashionMnist(const std::string& dir,
                                            const LoadOptions& load_options) {
  IdxDirectoryOptions options;
  options.name = "fashion-mnist";
  options.num_classes = 10;
  options.normalization = Normalization{{kFashionMnistMean}, {kFashionMnistStd}};
  return LoadIdxDirectory(dir.empty() ? std::string(kFashionMnistDefaultDir) : dir, options,
                          load_options);
}

}  // namespace qtrain::data
