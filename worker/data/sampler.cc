#include "worker/data/sampler.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/data/rng.h"

namespace qtrain::data {

absl::StatusOr<ShardedSampler> ShardedSampler::Create(int64_t dataset_size, int rank,
                                                      int world_size, uint64_t seed,
                                                      const SamplerOptions& options) {
  if (dataset_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampler: dataset_size must be >= 1, got ", dataset_size));
  }
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampler: need 0 <= rank < world_size, got rank ", rank, " of ", world_size));
  }
  int64_t per_rank = 0;
  if (options.remainder == ShardRemainder::kDrop) {
    per_rank = dataset_size / world_size;
    if (per_rank == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("sampler: dropping the remainder leaves nothing: ", dataset_size,
                       " examples over ", world_size, " ranks (use ShardRemainder::kPad)"));
    }
  } else {
    per_rank = (dataset_size + world_size - 1) / world_size;
  }
  return ShardedSampler(dataset_size, rank, world_size, seed, options, per_rank);
}

int64_t ShardedSampler::BatchesPerEpoch(int64_t batch_size) const {
  QTRAIN_CHECK(batch_size >= 1) << "batch_size=" << batch_size;
  return options_.last_batch == LastBatch::kDrop ? per_rank_ / batch_size
                                                 : (per_rank_ + batch_size - 1) / batch_size;
}

std::vector<int64_t> ShardedSampler::EpochPermutation(int64_t epoch) const {
  std::vector<int64_t> perm(dataset_size_);
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (!options_.shuffle) return perm;
  std::mt19937_64 rng(DeriveSeed(seed_, static_cast<uint64_t>(epoch)));
  for (int64_t i = dataset_size_ - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(UniformBelow(rng, static_cast<uint64_t>(i) + 1));
    std::swap(perm[i], perm[j]);
  }
  return perm;
}

std::vector<int64_t> ShardedSampler::EpochIndices(int64_t epoch) const {
  const std::vector<int64_t> perm = EpochPermutation(epoch);
  std::vector<int64_t> mine(per_rank_);
  for (int64_t k = 0; k < per_rank_; ++k) {
    // Position in the (conceptually wrapped, for kPad) permutation.
    const int64_t pos = k * world_size_ + rank_;
    mine[k] = perm[pos % dataset_size_];
  }
  return mine;
}

std::span<const int64_t> ShardedSampler::BatchOf(std::span<const int64_t> epoch_indices,
                                                 int64_t batch, int64_t batch_size) {
  QTRAIN_CHECK(batch_size >= 1 && batch >= 0 &&
               batch * batch_size < static_cast<int64_t>(epoch_indices.size()))
      << "batch " << batch << " of size " << batch_size << " in " << epoch_indices.size();
  const int64_t begin = batch * batch_size;
  const int64_t len = std::min<int64_t>(batch_size, epoch_indices.size() - begin);
  return epoch_indices.subspan(begin, len);
}

}  // namespace qtrain::data
