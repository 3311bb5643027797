// Gathering a batch: the examples at given indices, augmented (optionally) and normalized into
// the caller's float buffers, NCHW, ready for the model.
//
// Typical training loop on one rank:
//   ASSIGN_OR_RETURN(DataSplits data, LoadDataset(spec, load_options));
//   ASSIGN_OR_RETURN(ShardedSampler sampler,
//                    ShardedSampler::Create(data.train.size(), rank, world, seed));
//   const AugmentOptions augment = TrainAugmentation(spec);
//   for (int64_t epoch = 0; ...; ++epoch) {
//     const std::vector<int64_t> mine = sampler.EpochIndices(epoch);
//     std::mt19937_64 rng(DeriveSeed(DeriveSeed(seed, epoch), rank));
//     for (int64_t b = 0; b < sampler.BatchesPerEpoch(batch_size); ++b) {
//       std::span<const int64_t> idx = ShardedSampler::BatchOf(mine, b, batch_size);
//       RETURN_IF_ERROR(GatherBatch(data.train, idx, augment, rng, images, labels));
//       ...
//
// Thread-safety: safe to call concurrently on one Dataset with distinct engines and buffers.
// Cost: one pass over the batch's bytes, plus a 256 x C lookup table built per call.
#ifndef QTRAIN_WORKER_DATA_BATCH_H_
#define QTRAIN_WORKER_DATA_BATCH_H_

#include <cstdint>
#include <random>
#include <span>

#include "absl/status/status.h"
#include "worker/data/augment.h"
#include "worker/data/dataset.h"

namespace qtrain::data {

// Fills images[k * example_size() ...] with example indices[k], transformed by a transform
// drawn from `rng` (one per example, in order; nothing is drawn when augment is disabled) and
// normalized with dataset.normalization; labels[k] = its label. Only the first
// indices.size() examples' worth of `images` and `labels` is written.
// INVALID_ARGUMENT if an index is outside [0, dataset.size()), a buffer is too small, or
// augment.crop_padding is outside [0, kMaxCropPadding]; nothing is written then.
absl::Status GatherBatch(const Dataset& dataset, std::span<const int64_t> indices,
                         const AugmentOptions& augment, std::mt19937_64& rng,
                         std::span<float> images, std::span<int32_t> labels);

// The same without augmentation (evaluation).
absl::Status GatherBatch(const Dataset& dataset, std::span<const int64_t> indices,
                         std::span<float> images, std::span<int32_t> labels);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_BATCH_H_
