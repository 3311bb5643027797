// Loading an IDX data set laid out as MNIST is, from a directory:
//   train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
//   t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
// Each file may also be present uncompressed, without the .gz suffix (the .gz is tried first).
// This is the layout of MNIST, Fashion-MNIST and KMNIST.
//
// Errors: NOT_FOUND naming both candidate paths of a missing file; DATA_LOSS for truncated or
// corrupt files (gzip_file.h, idx.h); INVALID_ARGUMENT when image and label counts differ, a
// label is out of range, or train and test image sizes differ.
//
// Thread-safety: free functions without shared state.
// Cost: reads and validates all four files whole (Fashion-MNIST: 30 MB compressed, 55 MB
// inflated, about half a second), then keeps LoadOptions' first examples.
#ifndef QTRAIN_WORKER_DATA_IDX_DATASET_H_
#define QTRAIN_WORKER_DATA_IDX_DATASET_H_

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "worker/data/dataset.h"
#include "worker/data/normalize.h"

namespace qtrain::data {

inline constexpr char kFashionMnistDefaultDir[] = "/usr/share/datasets/fashion-mnist";

struct IdxDirectoryOptions {
  // Short name for Dataset::name ("<name>/train", "<name>/test").
  std::string name = "idx";
  // Number of classes. 0 (the default) infers it as 1 + the largest label in the training
  // file (all of it, before max_train); test labels must then be below it.
  int num_classes = 0;
  // Normalization statistics. Empty (the default): computed over the training examples kept.
  std::optional<Normalization> normalization;
};

// Loads <dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].
absl::StatusOr<DataSplits> LoadIdxDirectory(const std::string& dir,
                                            const IdxDirectoryOptions& idx_options,
                                            const LoadOptions& load_options);

// Fashion-MNIST from `dir` (default kFashionMnistDefaultDir): 10 classes, normalized with
// kFashionMnistMean / kFashionMnistStd.
absl::StatusOr<DataSplits> LoadFashionMnist(const std::string& dir,
                                            const LoadOptions& load_options);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_IDX_DATASET_H_
