// MpiCommunicator on real MPI ranks: run as `mpiexec -np 4 mpi_communicator_test` (ctest does).
// Each rank computes every rank's deterministic input, so it can check its result against a
// one-process simulation of the whole world (SimulatedWorld below: the same BucketCodec steps and
// per-rank Rng seeds, without MPI or serialization). Bit-identity across ranks is checked by
// all-gathering a hash of each result.
//
// Every communicator here has a short timeout, so a failure on one rank makes its peers fail
// with DEADLINE_EXCEEDED instead of hanging the test.
#include "worker/comm/mpi_communicator.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/testing/status_matchers.h"
#include "compression/rng.h"
#include "compression/wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/bucket_codec.h"

namespace qtrain::comm {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr double kTestTimeoutSeconds = 20.0;

uint64_t HashFloats(std::span<const float> v) {
  uint64_t h = 1469598103934665603ull;
  for (float x : v) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    for (int b = 0; b < 4; ++b) {
      h ^= (bits >> (8 * b)) & 0xFF;
      h *= 1099511628211ull;
    }
  }
  return h;
}

bool BitEqual(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

// Rank r's gradient at `step`: pseudo-random in [-(r+1)/10, (r+1)/10] (ranks differ in scale,
// so TernGrad's local scales differ).
float InputAt(int rank, int step, size_t i) {
  const uint32_t bits = compression::Mix32(static_cast<uint32_t>(i) * compression::kRngGolden +
                                           static_cast<uint32_t>(rank) * 7919u +
                                           static_cast<uint32_t>(step) * 104729u);
  return (compression::Uniform24(bits) * 2.0f - 1.0f) * 0.1f * static_cast<float>(rank + 1);
}

std::vector<float> Input(int rank, int step, size_t n) {
  std::vector<float> g(n);
  for (size_t i = 0; i < n; ++i) g[i] = InputAt(rank, step, i);
  return g;
}

std::unique_ptr<MpiCommunicator> MakeComm(MpiOptions options) {
  auto comm = MpiCommunicator::Create(options);
  if (!comm.ok()) {
    ADD_FAILURE() << comm.status().ToString();
    return nullptr;
  }
  return std::move(comm).value();
}

MpiOptions Options(const std::string& spec, AllreduceAlgorithm algorithm) {
  MpiOptions options;
  options.codec_spec = spec;
  options.algorithm = algorithm;
  options.timeout_seconds = kTestTimeoutSeconds;
  options.seed = 42;
  return options;
}

// All ranks hold the same hash.
void ExpectSameOnAllRanks(Communicator& comm, std::span<const float> result,
                          const std::string& what) {
  auto hashes = comm.AllGatherU64(HashFloats(result));
  ASSERT_THAT(hashes, IsOk());
  for (uint64_t h : *hashes) EXPECT_EQ(h, (*hashes)[0]) << what << ": ranks differ";
}

// What W ranks running MpiCommunicator compute, in one process.
class SimulatedWorld {
 public:
  SimulatedWorld(const std::string& spec, uint64_t seed, int world) : world_(world) {
    for (int r = 0; r < world; ++r) {
      auto codec = BucketCodec::Create(spec, FeedbackChoice::kFromSpec);
      QTRAIN_CHECK(codec.ok()) << codec.status().ToString();
      codecs_.push_back(std::move(codec).value());
      rngs_.emplace_back(RankSeed(seed, r));
    }
  }

  BucketCodec& codec(int r) { return *codecs_[r]; }

  // Encodes inputs[r] (all ranks), checking the error-feedback invariant, returns payloads.
  // scales[r] must already be the (shared) scale for TernGrad.
  std::vector<compression::EncodedTensor> EncodeAll(
      const std::string& key, const std::vector<std::span<const float>>& inputs,
      const std::vector<float>& scales) {
    std::vector<compression::EncodedTensor> out(world_);
    for (int r = 0; r < world_; ++r) {
      out[r] = EncodeOne(r, key, inputs[r], scales[r]);
    }
    return out;
  }

  compression::EncodedTensor EncodeOne(int r, const std::string& key, std::span<const float> input,
                                       float scale) {
    BucketCodec& c = *codecs_[r];
    // v = input + old residual (the residual already holds v for a prepared TernGrad).
    std::vector<float> v(input.begin(), input.end());
    std::span<const float> old = c.Residual(key);
    const bool prepared_terngrad = c.shares_scale() && c.feedback_on();
    if (prepared_terngrad) {
      v.assign(old.begin(), old.end());
    } else if (!old.empty()) {
      for (size_t i = 0; i < v.size(); ++i) v[i] = input[i] + old[i];
    }
    compression::EncodedTensor encoded;
    EXPECT_THAT(c.Encode(key, input, scale, rngs_[r], &encoded), IsOk());
    if (c.feedback_on()) {
      std::vector<float> decoded(input.size(), 0.0f);
      EXPECT_THAT(c.codec().DecodeAdd(encoded, decoded), IsOk());
      std::span<const float> residual = c.Residual(key);
      EXPECT_EQ(residual.size(), v.size());
      for (size_t i = 0; i < std::min(v.size(), residual.size()); ++i) {
        if (residual[i] != v[i] - decoded[i]) {
          ADD_FAILURE() << "error-feedback invariant broken for " << key << " rank " << r << " i "
                        << i << ": residual " << residual[i] << " v " << v[i] << " decoded "
                        << decoded[i];
          break;
        }
      }
    }
    return encoded;
  }

  // Scales of each rank (TernGrad: prepared, then replaced by the maximum).
  std::vector<float> PrepareAll(const std::string& key,
                                const std::vector<std::span<const float>>& inputs) {
    std::vector<float> scales(world_);
    float max_scale = 0.0f;
    for (int r = 0; r < world_; ++r) {
      auto s = codecs_[r]->Prepare(key, inputs[r]);
      EXPECT_THAT(s, IsOk());
      scales[r] = s.ok() ? *s : 0.0f;
      max_scale = std::max(max_scale, scales[r]);
    }
    if (codecs_[0]->shares_scale()) std::fill(scales.begin(), scales.end(), max_scale);
    return scales;
  }

  // The mean of payloads, as every rank computes it.
  std::vector<float> Mean(const std::vector<compression::EncodedTensor>& payloads, size_t n,
                          float shared_scale) {
    std::vector<float> out(n, 0.0f);
    const float w = static_cast<float>(world_);
    if (codecs_[0]->shares_scale()) {
      std::vector<int32_t> counts(n, 0);
      for (const auto& p : payloads) {
        EXPECT_EQ(p.scales.at(0), shared_scale);
        EXPECT_THAT(codecs_[0]->terngrad()->AccumulateTernary(p, counts), IsOk());
      }
      for (size_t i = 0; i < n; ++i) out[i] = (static_cast<float>(counts[i]) * shared_scale) / w;
    } else {
      for (const auto& p : payloads) EXPECT_THAT(codecs_[0]->codec().DecodeAdd(p, out), IsOk());
      for (float& x : out) x = x / w;
    }
    return out;
  }

  // Returns the result every rank should hold.
  std::vector<float> Allgather(const std::string& key, const std::vector<std::vector<float>>& in) {
    std::vector<std::span<const float>> inputs(in.begin(), in.end());
    std::vector<float> scales = PrepareAll(key, inputs);
    auto payloads = EncodeAll(key, inputs, scales);
    return Mean(payloads, in[0].size(), scales[0]);
  }

  std::vector<float> ReduceScatter(const std::string& key,
                                   const std::vector<std::vector<float>>& in) {
    const uint64_t n = in[0].size();
    const uint64_t w = static_cast<uint64_t>(world_);
    auto begin = [&](int j) { return n * static_cast<uint64_t>(j) / w; };
    auto length = [&](int j) { return begin(j + 1) - begin(j); };
    // Every rank prepares all its slices first, then encodes them in order.
    std::vector<std::vector<float>> slice_scales(world_, std::vector<float>(world_, 0.0f));
    for (int j = 0; j < world_; ++j) {
      if (length(j) == 0) continue;
      std::vector<std::span<const float>> slices;
      for (int r = 0; r < world_; ++r) {
        slices.push_back(std::span<const float>(in[r]).subspan(begin(j), length(j)));
      }
      std::vector<float> s = PrepareAll(absl::StrCat(key, "/rs", j), slices);
      for (int r = 0; r < world_; ++r) slice_scales[r][j] = s[r];
    }
    std::vector<std::vector<compression::EncodedTensor>> sent(world_);  // [r][j]
    for (int r = 0; r < world_; ++r) {
      sent[r].resize(world_);
      for (int j = 0; j < world_; ++j) {
        if (length(j) == 0) continue;
        sent[r][j] = EncodeOne(r, absl::StrCat(key, "/rs", j),
                               std::span<const float>(in[r]).subspan(begin(j), length(j)),
                               slice_scales[r][j]);
      }
    }
    std::vector<float> out(n, 0.0f);
    for (int j = 0; j < world_; ++j) {
      if (length(j) == 0) continue;
      std::vector<compression::EncodedTensor> to_owner;
      for (int r = 0; r < world_; ++r) to_owner.push_back(sent[r][j]);
      std::vector<float> mean = Mean(to_owner, length(j), slice_scales[0][j]);
      const std::string aggregate_key = absl::StrCat(key, "/agg");
      auto scale = codecs_[j]->Prepare(aggregate_key, mean);
      EXPECT_THAT(scale, IsOk());
      compression::EncodedTensor reencoded =
          EncodeOne(j, aggregate_key, mean, scale.ok() ? *scale : 0.0f);
      EXPECT_THAT(codecs_[0]->codec().DecodeAdd(reencoded,
                                                std::span<float>(out).subspan(begin(j), length(j))),
                  IsOk());
    }
    return out;
  }

 private:
  int world_;
  std::vector<std::unique_ptr<BucketCodec>> codecs_;
  std::vector<compression::Rng> rngs_;
};

TEST(MpiCommunicatorTest, Fp32MeanIsExactOnSmallIntegers) {
  auto comm = MakeComm(Options("fp32", AllreduceAlgorithm::kAuto));
  ASSERT_NE(comm, nullptr);
  const int w = comm->world_size();
  const size_t n = 1001;
  std::vector<float> data(n);
  for (size_t i = 0; i < n; ++i) data[i] = static_cast<float>(comm->rank() * 1000 + i % 97);
  StepStats stats;
  ASSERT_THAT(comm->AllReduceMean("fp32", data, &stats), IsOk());
  for (size_t i = 0; i < n; ++i) {
    float sum = 0.0f;
    for (int r = 0; r < w; ++r) sum += static_cast<float>(r * 1000 + i % 97);
    ASSERT_EQ(data[i], sum / static_cast<float>(w)) << i;
  }
  EXPECT_EQ(stats.bytes_sent, 4 * n);
  EXPECT_EQ(stats.calls, 1);
  ExpectSameOnAllRanks(*comm, data, "fp32");
  EXPECT_TRUE(comm->ResidualKeys().empty());
  EXPECT_THAT(comm->SetResidual("fp32", data), StatusIs(absl::StatusCode::kFailedPrecondition));
}

// A large bucket takes the MPI library's large-message allreduce algorithm: still bit-identical.
TEST(MpiCommunicatorTest, Fp32LargeBucketIsBitIdenticalAcrossRanks) {
  auto comm = MakeComm(Options("fp32", AllreduceAlgorithm::kAuto));
  ASSERT_NE(comm, nullptr);
  const int w = comm->world_size();
  const size_t n = size_t{1} << 20;
  std::vector<float> data = Input(comm->rank(), 3, n);
  ASSERT_THAT(comm->AllReduceMean("large", data, nullptr), IsOk());
  ExpectSameOnAllRanks(*comm, data, "fp32 large");
  for (size_t i = 0; i < n; i += 4099) {
    double sum = 0.0;
    for (int r = 0; r < w; ++r) sum += InputAt(r, 3, i);
    ASSERT_NEAR(data[i], sum / w, 1e-6) << i;
  }
}

TEST(MpiCommunicatorTest, DivergedRanksGetFailedPrecondition) {
  for (AllreduceAlgorithm algorithm : {AllreduceAlgorithm::kAllgather, AllreduceAlgorithm::kReduceScatter}) {
    auto comm = MakeComm(Options("onebit", algorithm));
    ASSERT_NE(comm, nullptr);
    if (comm->world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
    std::vector<float> g = Input(comm->rank(), 0, 100);
    const std::string key = comm->rank() == 0 ? "fc1" : "fc2";
    EXPECT_THAT(comm->AllReduceMean(key, g, nullptr),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("different orders")))
        << AllreduceAlgorithmName(algorithm);
    EXPECT_THAT(comm->Barrier(), IsOk());
  }
}

class CodecAlgorithmTest : public ::testing::TestWithParam<std::tuple<const char*, AllreduceAlgorithm>> {
};

TEST_P(CodecAlgorithmTest, EqualsSimulatedMeanOfDecodedPayloadsOnEveryRank) {
  const std::string spec = std::get<0>(GetParam());
  const AllreduceAlgorithm algorithm = std::get<1>(GetParam());
  auto comm = MakeComm(Options(spec, algorithm));
  ASSERT_NE(comm, nullptr);
  const int w = comm->world_size();
  const int rank = comm->rank();
  SimulatedWorld world(spec, 42, w);
  for (int step = 0; step < 3; ++step) {
    comm->SetStep(step);
    for (size_t n : {size_t{1003}, size_t{3}}) {
      const std::string key = absl::StrCat("bucket", n);
      std::vector<std::vector<float>> inputs;
      for (int r = 0; r < w; ++r) inputs.push_back(Input(r, step, n));
      std::vector<float> mine = inputs[rank];
      StepStats stats;
      ASSERT_THAT(comm->AllReduceMean(key, mine, &stats), IsOk());
      const AllreduceAlgorithm resolved = ResolveAllreduceAlgorithm(algorithm, w, n);
      std::vector<float> expected = resolved == AllreduceAlgorithm::kAllgather
                                        ? world.Allgather(key, inputs)
                                        : world.ReduceScatter(key, inputs);
      EXPECT_TRUE(BitEqual(mine, expected))
          << spec << " " << AllreduceAlgorithmName(algorithm) << " step " << step << " n " << n
          << ": first element " << mine[0] << " vs " << expected[0];
      ExpectSameOnAllRanks(*comm, mine, absl::StrCat(spec, " step ", step, " n ", n));
      EXPECT_GT(stats.bytes_sent, 0u);
      if (w > 1) {
        EXPECT_GT(stats.bytes_received, 0u);
      }
    }
  }
  // Residuals: same keys and bits as this rank's simulated codec.
  const std::vector<std::string> keys = comm->ResidualKeys();
  EXPECT_EQ(keys, world.codec(rank).ResidualKeys());
  EXPECT_EQ(keys.empty(), !world.codec(rank).feedback_on());
  for (const std::string& key : keys) {
    EXPECT_TRUE(BitEqual(comm->Residual(key), world.codec(rank).Residual(key))) << key;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Codecs, CodecAlgorithmTest,
    ::testing::Combine(::testing::Values("fp16", "onebit", "threshold:tau=0.05", "qsgd:levels=16",
                                         "qsgd:levels=16,ef=1", "qsgd:levels=4,coding=elias",
                                         "terngrad", "terngrad:shared=1,ef=1"),
                       ::testing::Values(AllreduceAlgorithm::kAllgather, AllreduceAlgorithm::kReduceScatter,
                                         AllreduceAlgorithm::kAuto)),
    [](const auto& info) {
      std::string name =
          absl::StrCat(std::get<0>(info.param), "_", AllreduceAlgorithmName(std::get<1>(info.param)));
      for (char& c : name) {
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
      }
      return name;
    });

TEST(MpiCommunicatorTest, TernGradRanksShareOneScale) {
  auto comm = MakeComm(Options("terngrad:clip=0", AllreduceAlgorithm::kAllgather));
  ASSERT_NE(comm, nullptr);
  const int w = comm->world_size();
  if (w < 2) GTEST_SKIP() << "needs 2 ranks";
  const size_t n = 4096;
  std::vector<float> mine = Input(comm->rank(), 0, n);
  // Local scale (clip=0: max|g|); ranks' scales differ by construction.
  float local = 0.0f;
  for (float x : mine) local = std::max(local, std::abs(x));
  uint32_t local_bits;
  std::memcpy(&local_bits, &local, 4);
  ASSERT_OK_AND_ASSIGN(std::vector<uint64_t> all, comm->AllGatherU64(local_bits));
  float shared = 0.0f;
  std::vector<float> locals;
  for (uint64_t bits : all) {
    float s;
    const uint32_t b = static_cast<uint32_t>(bits);
    std::memcpy(&s, &b, 4);
    locals.push_back(s);
    shared = std::max(shared, s);
  }
  ASSERT_NE(*std::min_element(locals.begin(), locals.end()), shared);
  ASSERT_THAT(comm->AllReduceMean("t", mine, nullptr), IsOk());
  // Each element is (integer count in [-w, w]) * shared / w.
  for (size_t i = 0; i < n; ++i) {
    const float count = mine[i] * static_cast<float>(w) / shared;
    ASSERT_NEAR(count, std::round(count), 1e-4) << i << " " << mine[i];
    ASSERT_LE(std::abs(count), static_cast<float>(w) + 1e-4f);
  }
  ExpectSameOnAllRanks(*comm, mine, "terngrad");
}

TEST(MpiCommunicatorTest, SmallCollectives) {
  auto comm = MakeComm(Options("fp32", AllreduceAlgorithm::kAuto));
  ASSERT_NE(comm, nullptr);
  const int w = comm->world_size();
  const int rank = comm->rank();
  std::vector<float> weights(257, static_cast<float>(rank));
  if (rank == 1 % w) {
    for (size_t i = 0; i < weights.size(); ++i) weights[i] = 0.5f * static_cast<float>(i);
  }
  ASSERT_THAT(comm->Broadcast(weights, 1 % w), IsOk());
  for (size_t i = 0; i < weights.size(); ++i) ASSERT_EQ(weights[i], 0.5f * static_cast<float>(i));
  EXPECT_THAT(comm->Broadcast(weights, w), StatusIs(absl::StatusCode::kInvalidArgument));

  std::vector<double> sums = {1.0, static_cast<double>(rank)};
  ASSERT_THAT(comm->AllReduceSum(sums), IsOk());
  EXPECT_EQ(sums[0], w);
  EXPECT_EQ(sums[1], w * (w - 1) / 2);
  ASSERT_OK_AND_ASSIGN(double total, comm->AllReduceSumScalar(0.25));
  EXPECT_EQ(total, 0.25 * w);

  ASSERT_OK_AND_ASSIGN(std::vector<uint64_t> ranks, comm->AllGatherU64(1000 + rank));
  ASSERT_EQ(ranks.size(), static_cast<size_t>(w));
  for (int r = 0; r < w; ++r) EXPECT_EQ(ranks[r], 1000u + r);
  EXPECT_THAT(comm->Barrier(), IsOk());
  EXPECT_THAT(comm->WaitPending(1.0), IsOk());  // nothing outstanding
}

TEST(MpiCommunicatorTest, ResidualsCanBeRestored) {
  auto comm = MakeComm(Options("threshold:tau=0.5", AllreduceAlgorithm::kAllgather));
  ASSERT_NE(comm, nullptr);
  const int w = comm->world_size();
  std::vector<float> residual = {0.6f, -0.7f, 0.1f, 0.0f};
  ASSERT_THAT(comm->SetResidual("b", residual), IsOk());
  std::vector<float> g(4, 0.0f);
  ASSERT_THAT(comm->AllReduceMean("b", g, nullptr), IsOk());
  // Every rank sends +0.5, -0.5, 0, 0; the mean is the same.
  EXPECT_EQ(g[0], 0.5f * w / w);
  EXPECT_EQ(g[1], -0.5f * w / w);
  EXPECT_EQ(g[2], 0.0f);
  EXPECT_THAT(comm->Residual("b"), ::testing::ElementsAre(0.6f - 0.5f, -0.7f + 0.5f, 0.1f, 0.0f));
  EXPECT_THAT(comm->ResidualKeys(), ::testing::ElementsAre("b"));
}

// fp32 warm-up: at steps below fp32_warmup_steps a codec communicator gives the fp32 allreduce's
// bits, sends 4 bytes per element and keeps no residual; at that step it compresses, exactly as
// a communicator without warm-up does at its first call.
TEST(MpiCommunicatorTest, Fp32WarmupStepsAverageUncompressed) {
  MpiOptions options = Options("onebit", AllreduceAlgorithm::kAuto);
  options.fp32_warmup_steps = 2;
  auto comm = MakeComm(options);
  auto fp32 = MakeComm(Options("fp32", AllreduceAlgorithm::kAuto));
  auto fresh = MakeComm(Options("onebit", AllreduceAlgorithm::kAuto));
  ASSERT_TRUE(comm != nullptr && fp32 != nullptr && fresh != nullptr);
  EXPECT_THAT(comm->Describe(), HasSubstr("after 2 fp32 warm-up steps"));
  const int r = comm->rank();
  const size_t n = 5000;
  for (int step = 0; step < 2; ++step) {
    comm->SetStep(step);
    std::vector<float> g = Input(r, step, n), expected = Input(r, step, n);
    StepStats stats;
    ASSERT_THAT(comm->AllReduceMean("b", g, &stats), IsOk());
    ASSERT_THAT(fp32->AllReduceMean("b", expected, nullptr), IsOk());
    EXPECT_TRUE(BitEqual(g, expected)) << "step " << step;
    EXPECT_EQ(stats.bytes_sent, 4 * n) << "step " << step;
    EXPECT_TRUE(comm->ResidualKeys().empty()) << "step " << step;
  }
  comm->SetStep(2);
  std::vector<float> g = Input(r, 2, n), expected = Input(r, 2, n);
  StepStats stats;
  ASSERT_THAT(comm->AllReduceMean("b", g, &stats), IsOk());
  ASSERT_THAT(fresh->AllReduceMean("b", expected, nullptr), IsOk());
  EXPECT_TRUE(BitEqual(g, expected));
  EXPECT_LT(stats.bytes_sent, n);  // onebit: about n/8 per peer
  EXPECT_FALSE(comm->ResidualKeys().empty());
  ExpectSameOnAllRanks(*comm, g, "onebit after warm-up");
  options.fp32_warmup_steps = -1;
  EXPECT_THAT(MpiCommunicator::Create(options), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(MpiCommunicatorTest, ReduceScatterStatsCountBothPhases) {
  auto comm = MakeComm(Options("onebit", AllreduceAlgorithm::kReduceScatter));
  ASSERT_NE(comm, nullptr);
  const size_t n = 1 << 16;
  std::vector<float> g = Input(comm->rank(), 0, n);
  StepStats stats;
  ASSERT_THAT(comm->AllReduceMean("big", g, &stats), IsOk());
  // ~2 compressed copies of n/W per peer pair: far below fp32's 4n, above zero.
  EXPECT_GT(stats.bytes_sent, n / 8 / 2);
  EXPECT_LT(stats.bytes_sent, 4 * n / 8);
  EXPECT_GE(stats.encode_seconds, 0.0);
  EXPECT_GE(stats.communicate_seconds, 0.0);
  EXPECT_GE(stats.decode_seconds, 0.0);
  const std::vector<std::string> keys = comm->ResidualKeys();
  EXPECT_EQ(keys.size(), static_cast<size_t>(comm->world_size()) + 1);  // /rs<j> and /agg
  ExpectSameOnAllRanks(*comm, g, "onebit reduce_scatter");
}

TEST(MpiCommunicatorTest, BadOptionsAreInvalidArgument) {
  EXPECT_THAT(MpiCommunicator::Create(Options("nope", AllreduceAlgorithm::kAuto)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(MpiCommunicator::Create(Options("qsgd:levels=0", AllreduceAlgorithm::kAuto)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  MpiOptions no_timeout = Options("fp32", AllreduceAlgorithm::kAuto);
  no_timeout.timeout_seconds = 0.0;
  EXPECT_THAT(MpiCommunicator::Create(no_timeout), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CreateMpiCommunicator(Options("fp33", AllreduceAlgorithm::kAuto)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseAllreduceAlgorithm("ring"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseAllreduceAlgorithm("reduce_scatter"), IsOk());
}

TEST(MpiCommunicatorTest, AutoRule) {
  EXPECT_EQ(ResolveAllreduceAlgorithm(AllreduceAlgorithm::kAuto, 4, 1 << 24), AllreduceAlgorithm::kAllgather);
  EXPECT_EQ(ResolveAllreduceAlgorithm(AllreduceAlgorithm::kAuto, 8, 1000), AllreduceAlgorithm::kAllgather);
  EXPECT_EQ(ResolveAllreduceAlgorithm(AllreduceAlgorithm::kAuto, 8, 1 << 18), AllreduceAlgorithm::kReduceScatter);
  EXPECT_EQ(ResolveAllreduceAlgorithm(AllreduceAlgorithm::kAllgather, 64, 1 << 24), AllreduceAlgorithm::kAllgather);
}

class CorruptPayloadTest : public ::testing::TestWithParam<AllreduceAlgorithm> {};

TEST_P(CorruptPayloadTest, EveryRankGetsInvalidArgumentNamingTheSource) {
  MpiOptions options = Options("onebit", GetParam());
  auto probe = MakeComm(options);
  ASSERT_NE(probe, nullptr);
  if (probe->world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  if (probe->rank() == 1) {
    options.payload_hook_for_testing = [](std::string* bytes) {
      bytes->resize(bytes->size() / 2);  // truncated message
    };
  }
  probe.reset();
  auto comm = MakeComm(options);
  ASSERT_NE(comm, nullptr);
  std::vector<float> g = Input(comm->rank(), 0, 1000);
  absl::Status status = comm->AllReduceMean("c", g, nullptr);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument,
                               AllOf(HasSubstr("payload from rank 1"), HasSubstr("bucket 'c'"))));
  // The failure was collective: the communicator still works.
  EXPECT_THAT(comm->Barrier(), IsOk());
}

INSTANTIATE_TEST_SUITE_P(Algorithms, CorruptPayloadTest,
                         ::testing::Values(AllreduceAlgorithm::kAllgather, AllreduceAlgorithm::kReduceScatter),
                         [](const auto& info) { return AllreduceAlgorithmName(info.param); });

TEST(MpiCommunicatorTest, ChecksumMismatchIsDataLossNamingTheSource) {
  MpiOptions options = Options("onebit", AllreduceAlgorithm::kAllgather);
  options.checksum = compression::Checksum::kCrc32;
  auto probe = MakeComm(options);
  ASSERT_NE(probe, nullptr);
  if (probe->world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  if (probe->rank() == 1) {
    options.payload_hook_for_testing = [](std::string* bytes) {
      (*bytes)[bytes->size() / 2] ^= 0x01;  // one flipped payload bit
    };
  }
  probe.reset();
  auto comm = MakeComm(options);
  ASSERT_NE(comm, nullptr);
  std::vector<float> g = Input(comm->rank(), 0, 1000);
  EXPECT_THAT(comm->AllReduceMean("c", g, nullptr),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("payload from rank 1")));
}

TEST(MpiCommunicatorTest, NonFiniteGradientOnOneRankFailsEveryRank) {
  for (const char* spec : {"onebit", "terngrad"}) {
    auto comm = MakeComm(Options(spec, AllreduceAlgorithm::kAllgather));
    ASSERT_NE(comm, nullptr);
    std::vector<float> g = Input(comm->rank(), 0, 100);
    if (comm->rank() == 0) g[7] = std::numeric_limits<float>::quiet_NaN();
    absl::Status status = comm->AllReduceMean("nan", g, nullptr);
    if (comm->rank() == 0) {
      EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument)) << spec;
    } else {
      EXPECT_THAT(status, StatusIs(absl::StatusCode::kAborted)) << spec;
    }
    EXPECT_THAT(comm->Barrier(), IsOk()) << spec;
  }
}

TEST(MpiCommunicatorTest, LatePeerGivesDeadlineExceededNamingTheOperation) {
  MpiOptions options = Options("fp32", AllreduceAlgorithm::kAuto);
  options.timeout_seconds = 1.0;
  auto comm = MakeComm(options);
  ASSERT_NE(comm, nullptr);
  const int w = comm->world_size();
  const int rank = comm->rank();
  if (w < 2) GTEST_SKIP() << "needs 2 ranks";
  comm->SetStep(7);
  const int late = w - 1;
  std::vector<float> data(64, static_cast<float>(rank));
  if (rank == late) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    // The others have given up waiting but their requests are still posted: this completes.
    ASSERT_THAT(comm->AllReduceMean("late", data, nullptr), IsOk());
    EXPECT_EQ(data[0], static_cast<float>(w * (w - 1) / 2) / static_cast<float>(w));
  } else {
    const auto start = std::chrono::steady_clock::now();
    absl::Status status = comm->AllReduceMean("late", data, nullptr);
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kDeadlineExceeded,
                                 AllOf(HasSubstr("AllReduceMean"), HasSubstr("bucket 'late'"),
                                       HasSubstr(absl::StrCat("rank ", rank, " of ", w)),
                                       HasSubstr("step 7"))));
    EXPECT_GE(waited, 1.0);
    EXPECT_LT(waited, 2.4);
    // Refused until the outstanding request completes; `data` was not touched.
    EXPECT_EQ(data[0], static_cast<float>(rank));
    EXPECT_THAT(comm->Barrier(),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("WaitPending")));
    EXPECT_THAT(comm->WaitPending(kTestTimeoutSeconds), IsOk());
  }
  EXPECT_THAT(comm->Barrier(), IsOk());
}

}  // namespace
}  // namespace qtrain::comm

int main(int argc, char** argv) {
  absl::Status status = qtrain::comm::InitMpi(&argc, &argv);
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", status.ToString().c_str());
    return 1;
  }
  int rank = 0;
  {
    auto world = qtrain::comm::MpiCommunicator::Create({});
    if (!world.ok()) {
      std::fprintf(stderr, "%s\n", world.status().ToString().c_str());
      return 1;
    }
    rank = (*world)->rank();
  }
  // Rank 0 prints the full report; the others print failures only (set before InitGoogleTest,
  // which picks the result printer).
  if (rank != 0) GTEST_FLAG_SET(brief, true);
  ::testing::InitGoogleTest(&argc, argv);
  const int result = RUN_ALL_TESTS();
  status = qtrain::comm::FinalizeMpi();
  if (!status.ok()) std::fprintf(stderr, "%s\n", status.ToString().c_str());
  return result;
}
