// The in-memory image-classification data set every loader returns, and the load limits.
//
// Images are stored as bytes, N x C x H x W (CHW per example), exactly as the files hold them;
// `normalization` turns them into floats when a batch is gathered (batch.h). Labels are
// class ids in [0, num_classes).
//
// Thread-safety: a Dataset is a plain value; after loading it is only read, and any number of
// threads may read it concurrently.
#ifndef QTRAIN_WORKER_DATA_DATASET_H_
#define QTRAIN_WORKER_DATA_DATASET_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "worker/data/gzip_file.h"
#include "worker/data/normalize.h"

namespace qtrain::data {

struct Dataset {
  std::string name;  // e.g. "fashion-mnist/train", for logs and errors
  int channels = 0;
  int height = 0;
  int width = 0;
  int num_classes = 0;
  std::vector<uint8_t> pixels;  // size() * example_size() bytes
  std::vector<int32_t> labels;  // size() entries in [0, num_classes)
  Normalization normalization;  // per channel; the train split's statistics on both splits

  int64_t size() const { return static_cast<int64_t>(labels.size()); }
  int64_t example_size() const { return int64_t{channels} * height * width; }
  // The bytes of example i. Precondition: 0 <= i < size().
  std::span<const uint8_t> example(int64_t i) const {
    return std::span<const uint8_t>(pixels).subspan(i * example_size(), example_size());
  }
};

struct DataSplits {
  Dataset train;
  Dataset test;
};

// Limits on what a loader reads. Every default is documented; flags in main.cc map onto these.
struct LoadOptions {
  // Keep only the first max_train training / max_test test examples (0: keep all). The files
  // are still read and validated whole (CIFAR-10: see cifar10.h).
  int64_t max_train = 0;
  int64_t max_test = 0;
  // Largest file, or decompressed file, any loader reads; larger ones give RESOURCE_EXHAUSTED.
  int64_t max_file_bytes = kDefaultMaxFileBytes;
};

// INVALID_ARGUMENT unless max_train, max_test >= 0 and max_file_bytes > 0.
absl::Status ValidateLoadOptions(const LoadOptions& options);

// Checks the invariants above (shape positive, byte and label counts agree, labels in range,
// normalization sized to channels). Loaders call it before returning; cost: one pass over labels.
absl::Status ValidateDataset(const Dataset& dataset);

// Keeps the first `max_examples` examples (0: all). Cost: a shrink of both vectors.
void TruncateDataset(int64_t max_examples, Dataset& dataset);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_DATASET_H_
