#include "worker/data/dataset.h"

#include "absl/strings/str_cat.h"

namespace qtrain::data {

absl::Status ValidateLoadOptions(const LoadOptions& options) {
  if (options.max_train < 0 || options.max_test < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_train (", options.max_train,
                                                   ") and max_test (", options.max_test,
                                                   ") must be >= 0 (0 keeps all examples)"));
  }
  if (options.max_file_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_file_bytes must be positive, got ", options.max_file_bytes));
  }
  return absl::OkStatus();
}

absl::Status ValidateDataset(const Dataset& d) {
  if (d.channels <= 0 || d.height <= 0 || d.width <= 0 || d.num_classes <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(d.name, ": bad shape ", d.channels, "x",
                                                   d.height, "x", d.width, " with ", d.num_classes,
                                                   " classes"));
  }
  if (static_cast<int64_t>(d.pixels.size()) != d.size() * d.example_size()) {
    return absl::InvalidArgumentError(absl::StrCat(d.name, ": ", d.pixels.size(),
                                                   " pixel bytes for ", d.size(), " examples of ",
                                                   d.example_size()));
  }
  for (int64_t i = 0; i < d.size(); ++i) {
    if (d.labels[i] < 0 || d.labels[i] >= d.num_classes) {
      return absl::InvalidArgumentError(absl::StrCat(d.name, ": label ", d.labels[i], " at index ",
                                                     i, " is outside [0, ", d.num_classes, ")"));
    }
  }
  if (d.normalization.mean.size() != static_cast<size_t>(d.channels) ||
      d.normalization.stddev.size() != static_cast<size_t>(d.channels)) {
    return absl::InvalidArgumentError(
        absl::StrCat(d.name, ": normalization has ", d.normalization.mean.size(), " means and ",
                     d.normalization.stddev.size(), " stddevs for ", d.channels, " channels"));
  }
  for (float s : d.normalization.stddev) {
    if (!(s > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(d.name, ": non-positive stddev ", s));
    }
  }
  return absl::OkStatus();
}

void TruncateDataset(int64_t max_examples, Dataset& dataset) {
  if (max_examples <= 0 || max_examples >= dataset.size()) return;
  dataset.labels.resize(max_examples);
  dataset.labels.shrink_to_fit();
  dataset.pixels.resize(max_examples * dataset.example_size());
  dataset.pixels.shrink_to_fit();
}

}  // namespace qtrain::data
