// ShardedSampler: which examples each rank trains on, epoch by epoch.
//
// Every epoch, each rank computes the same permutation of [0, dataset_size), seeded by
// DeriveSeed(seed, epoch) (Fisher-Yates over std::mt19937_64 through rng.h, so it is the same
// on every machine and standard library). The permutation is split across ranks by stride:
// rank r takes positions r, r + W, r + 2W, ... of it (W = world_size). Shares are disjoint.
//
// Every rank gets the same number of examples, and so the same number of batches, so the
// collective steps of data-parallel training line up. When W does not divide dataset_size:
//   ShardRemainder::kPad  (default) the permutation is extended by wrapping around to its
//       start until its length is a multiple of W (as PyTorch's DistributedSampler does);
//       per-rank size = ceil(N / W) and (ceil(N / W) * W - N) examples are seen twice.
//   ShardRemainder::kDrop the last (N mod W) positions of the permutation are dropped;
//       per-rank size = floor(N / W). Which examples are dropped changes every epoch.
// Within a rank's share, batches are consecutive runs of batch_size indices; the last batch
// is smaller when batch_size does not divide the share, unless LastBatch::kDrop drops it.
// Since shares are equal, the partial batch has the same size on every rank.
//
// With SamplerOptions::shuffle false the "permutation" is the identity (for evaluation).
//
// Thread-safety: immutable after Create; all methods are const and safe to call concurrently.
// Cost: EpochIndices is O(dataset_size) time and memory on every rank (8 bytes per example).
#ifndef QTRAIN_WORKER_DATA_SAMPLER_H_
#define QTRAIN_WORKER_DATA_SAMPLER_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace qtrain::data {

enum class ShardRemainder { kPad, kDrop };
enum class LastBatch { kKeepPartial, kDrop };

struct SamplerOptions {
  ShardRemainder remainder = ShardRemainder::kPad;
  LastBatch last_batch = LastBatch::kKeepPartial;
  bool shuffle = true;
};

class ShardedSampler {
 public:
  // INVALID_ARGUMENT unless dataset_size >= 1, world_size >= 1, 0 <= rank < world_size, and
  // (with kDrop) dataset_size >= world_size.
  static absl::StatusOr<ShardedSampler> Create(int64_t dataset_size, int rank, int world_size,
                                               uint64_t seed, const SamplerOptions& options = {});

  // Examples per rank per epoch (equal on every rank).
  int64_t PerRankSize() const { return per_rank_; }

  // Batches per rank per epoch (equal on every rank). Precondition: batch_size >= 1.
  int64_t BatchesPerEpoch(int64_t batch_size) const;

  // This rank's example indices for `epoch`, in training order (PerRankSize() of them).
  std::vector<int64_t> EpochIndices(int64_t epoch) const;

  // Batch `batch` (0-based) of a rank's epoch indices: a view into `epoch_indices`.
  // Precondition: 0 <= batch < BatchesPerEpoch(batch_size).
  static std::span<const int64_t> BatchOf(std::span<const int64_t> epoch_indices, int64_t batch,
                                          int64_t batch_size);

  // The full permutation for `epoch`, identical on all ranks (exposed for tests and tools).
  std::vector<int64_t> EpochPermutation(int64_t epoch) const;

  int64_t dataset_size() const { return dataset_size_; }
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }

 private:
  ShardedSampler(int64_t dataset_size, int rank, int world_size, uint64_t seed,
                 const SamplerOptions& options, int64_t per_rank)
      : dataset_size_(dataset_size),
        rank_(rank),
        world_size_(world_size),
        seed_(seed),
        options_(options),
        per_rank_(per_rank) {}

  int64_t dataset_size_;
  int rank_;
  int world_size_;
  uint64_t seed_;
  SamplerOptions options_;
  int64_t per_rank_;
};

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_SAMPLER_H_
