// The one entry point a trainer needs to get data: DataSpec (from --data) -> DataSplits.
//
//   fashion-mnist[:<dir>]  LoadFashionMnist   10 classes, 1x28x28, mean/std 0.2860/0.3530
//   idx:<dir>              LoadIdxDirectory   classes inferred, statistics computed
//   cifar10:<dir>          LoadCifar10        10 classes, 3x32x32, statistics computed
//   synthetic[:...]        GenerateSynthetic  deterministic, statistics computed
// "Statistics computed" means per-channel mean/stddev over the training examples loaded
// (after LoadOptions::max_train); both splits use the training statistics.
//
// Thread-safety: free functions without shared state. Cost: that of the loader called.
#ifndef QTRAIN_WORKER_DATA_LOAD_DATASET_H_
#define QTRAIN_WORKER_DATA_LOAD_DATASET_H_

#include "absl/status/statusor.h"
#include "worker/data/augment.h"
#include "worker/data/data_spec.h"
#include "worker/data/dataset.h"

namespace qtrain::data {

absl::StatusOr<DataSplits> LoadDataset(const DataSpec& spec, const LoadOptions& options);

// The augmentation the data set is usually trained with: CIFAR-10 gets a random crop with
// padding 4 and random horizontal flips; the others get none (flipping clothes or digits is
// not label-preserving for every class, and 28x28 sets are trained without crops).
AugmentOptions TrainAugmentation(const DataSpec& spec);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_LOAD_DATASET_H_
