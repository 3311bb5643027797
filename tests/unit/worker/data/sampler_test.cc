#include "worker/data/sampler.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <set>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::data {
namespace {

using ::qtrain::testing::StatusIs;
using ::testing::ElementsAre;

std::vector<ShardedSampler> AllRanks(int64_t n, int world, uint64_t seed,
                                     const SamplerOptions& options = {}) {
  std::vector<ShardedSampler> samplers;
  for (int r = 0; r < world; ++r) {
    absl::StatusOr<ShardedSampler> s = ShardedSampler::Create(n, r, world, seed, options);
    EXPECT_TRUE(s.ok()) << s.status();
    samplers.push_back(*s);
  }
  return samplers;
}

TEST(ShardedSamplerTest, PermutationIsAPermutationAndDeterministic) {
  ASSERT_OK_AND_ASSIGN(ShardedSampler s, ShardedSampler::Create(1000, 0, 1, 17));
  std::vector<int64_t> p = s.EpochPermutation(3);
  EXPECT_EQ(p, s.EpochPermutation(3));
  ASSERT_OK_AND_ASSIGN(ShardedSampler other_instance, ShardedSampler::Create(1000, 0, 4, 17));
  EXPECT_EQ(p, other_instance.EpochPermutation(3));  // same on every rank
  EXPECT_NE(p, s.EpochPermutation(4));               // epochs differ
  ASSERT_OK_AND_ASSIGN(ShardedSampler other_seed, ShardedSampler::Create(1000, 0, 1, 18));
  EXPECT_NE(p, other_seed.EpochPermutation(3));
  std::vector<int64_t> identity(1000);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_NE(p, identity);
  std::sort(p.begin(), p.end());
  EXPECT_EQ(p, identity);
}

TEST(ShardedSamplerTest, FirstElementIsRoughlyUniform) {
  // Over 2000 epochs, each of 4 values leads the permutation ~500 times (stddev 19.4);
  // a 6-sigma bound catches a biased shuffle without flaking.
  ASSERT_OK_AND_ASSIGN(ShardedSampler s, ShardedSampler::Create(4, 0, 1, 1));
  std::vector<int> counts(4, 0);
  for (int e = 0; e < 2000; ++e) ++counts[s.EpochPermutation(e)[0]];
  for (int c : counts) EXPECT_NEAR(c, 500, 117);
}

TEST(ShardedSamplerTest, DivisibleSizeIsPartitionedExactly) {
  const auto samplers = AllRanks(120, 4, 9);
  for (int64_t epoch : {0, 1, 7}) {
    std::vector<int64_t> all;
    for (const ShardedSampler& s : samplers) {
      EXPECT_EQ(s.PerRankSize(), 30);
      const std::vector<int64_t> mine = s.EpochIndices(epoch);
      EXPECT_EQ(mine.size(), 30u);
      all.insert(all.end(), mine.begin(), mine.end());
    }
    std::sort(all.begin(), all.end());
    std::vector<int64_t> expected(120);
    std::iota(expected.begin(), expected.end(), 0);
    EXPECT_EQ(all, expected) << "epoch " << epoch;  // disjoint and covering
  }
}

TEST(ShardedSamplerTest, RanksTakeStridedPositions) {
  const auto samplers = AllRanks(10, 3, 5);
  const std::vector<int64_t> perm = samplers[0].EpochPermutation(2);
  const std::vector<int64_t> rank1 = samplers[1].EpochIndices(2);
  ASSERT_EQ(rank1.size(), 4u);
  EXPECT_EQ(rank1[0], perm[1]);
  EXPECT_EQ(rank1[1], perm[4]);
  EXPECT_EQ(rank1[2], perm[7]);
  EXPECT_EQ(rank1[3], perm[0]);  // position 10 wraps to 0 (kPad)
}

TEST(ShardedSamplerTest, PadRepeatsExactlyTheShortfall) {
  const int64_t n = 103;
  const int world = 4;  // ceil(103 / 4) = 26 per rank, 104 total: one example is seen twice
  const auto samplers = AllRanks(n, world, 3);
  std::map<int64_t, int> seen;
  for (const ShardedSampler& s : samplers) {
    EXPECT_EQ(s.PerRankSize(), 26);
    EXPECT_EQ(s.BatchesPerEpoch(8), 4);  // 8, 8, 8, 2
    for (int64_t i : s.EpochIndices(5)) ++seen[i];
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(n));  // every example is covered
  int twice = 0;
  for (const auto& [index, count] : seen) {
    EXPECT_LE(count, 2);
    twice += count == 2;
  }
  EXPECT_EQ(twice, 26 * world - n);
}

TEST(ShardedSamplerTest, PadWithFewerExamplesThanRanks) {
  const auto samplers = AllRanks(3, 8, 1);
  std::set<int64_t> seen;
  for (const ShardedSampler& s : samplers) {
    ASSERT_EQ(s.EpochIndices(0).size(), 1u);
    seen.insert(s.EpochIndices(0)[0]);
  }
  EXPECT_THAT(seen, ElementsAre(0, 1, 2));
}

TEST(ShardedSamplerTest, DropIsDisjointAndDropsTheRemainder) {
  const SamplerOptions options{.remainder = ShardRemainder::kDrop};
  const auto samplers = AllRanks(103, 4, 3, options);
  std::set<int64_t> seen;
  size_t total = 0;
  for (const ShardedSampler& s : samplers) {
    EXPECT_EQ(s.PerRankSize(), 25);
    for (int64_t i : s.EpochIndices(2)) {
      seen.insert(i);
      ++total;
    }
  }
  EXPECT_EQ(total, 100u);
  EXPECT_EQ(seen.size(), 100u);  // disjoint
  // The dropped examples are the permutation's last 3 positions, so they change per epoch.
  const std::vector<int64_t> perm = samplers[0].EpochPermutation(2);
  for (int64_t pos = 100; pos < 103; ++pos) EXPECT_EQ(seen.count(perm[pos]), 0u);
}

TEST(ShardedSamplerTest, BatchCountsAreEqualAcrossRanks) {
  for (ShardRemainder remainder : {ShardRemainder::kPad, ShardRemainder::kDrop}) {
    for (LastBatch last : {LastBatch::kKeepPartial, LastBatch::kDrop}) {
      const auto samplers = AllRanks(1001, 6, 2, {.remainder = remainder, .last_batch = last});
      for (int64_t batch_size : {1, 7, 32, 500}) {
        const int64_t b0 = samplers[0].BatchesPerEpoch(batch_size);
        for (const ShardedSampler& s : samplers) EXPECT_EQ(s.BatchesPerEpoch(batch_size), b0);
      }
    }
  }
  const auto keep = AllRanks(100, 1, 0);
  EXPECT_EQ(keep[0].BatchesPerEpoch(32), 4);
  const auto drop = AllRanks(100, 1, 0, {.last_batch = LastBatch::kDrop});
  EXPECT_EQ(drop[0].BatchesPerEpoch(32), 3);
  EXPECT_EQ(drop[0].BatchesPerEpoch(101), 0);
}

TEST(ShardedSamplerTest, BatchOfSlicesConsecutiveRuns) {
  const std::vector<int64_t> idx = {10, 11, 12, 13, 14, 15, 16};
  EXPECT_THAT(ShardedSampler::BatchOf(idx, 0, 3), ElementsAre(10, 11, 12));
  EXPECT_THAT(ShardedSampler::BatchOf(idx, 1, 3), ElementsAre(13, 14, 15));
  EXPECT_THAT(ShardedSampler::BatchOf(idx, 2, 3), ElementsAre(16));
}

TEST(ShardedSamplerTest, NoShuffleIsIdentity) {
  const auto samplers = AllRanks(10, 2, 0, {.shuffle = false});
  EXPECT_THAT(samplers[0].EpochIndices(4), ElementsAre(0, 2, 4, 6, 8));
  EXPECT_THAT(samplers[1].EpochIndices(4), ElementsAre(1, 3, 5, 7, 9));
}

TEST(ShardedSamplerTest, InvalidArgumentsAreRejected) {
  EXPECT_THAT(ShardedSampler::Create(0, 0, 1, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShardedSampler::Create(10, 2, 2, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShardedSampler::Create(10, -1, 2, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShardedSampler::Create(10, 0, 0, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShardedSampler::Create(3, 0, 4, 0, {.remainder = ShardRemainder::kDrop}),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::data
