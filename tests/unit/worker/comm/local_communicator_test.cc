#include "worker/comm/local_communicator.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/logging.h"
#include "common/testing/status_matchers.h"
#include "compression/rng.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/bucket_codec.h"

namespace qtrain::comm {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<float> Gradient(size_t n, uint32_t salt) {
  std::vector<float> g(n);
  for (size_t i = 0; i < n; ++i) {
    g[i] =
        compression::Uniform24(compression::Mix32(static_cast<uint32_t>(i) * 2654435761u + salt)) *
            2.0f -
        1.0f;
  }
  return g;
}

bool BitEqual(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

std::unique_ptr<LocalCommunicator> MakeLocal(const std::string& spec,
                                             FeedbackChoice feedback = FeedbackChoice::kFromSpec,
                                             uint64_t seed = 7) {
  auto comm = LocalCommunicator::Create({spec, feedback, seed});
  QTRAIN_CHECK(comm.ok()) << comm.status().ToString();
  return std::move(comm).value();
}

TEST(LocalCommunicatorTest, WithoutCodecIsANoOpWorldOfOne) {
  for (const char* spec : {"", "fp32"}) {
    auto comm = MakeLocal(spec);
    EXPECT_EQ(comm->rank(), 0);
    EXPECT_EQ(comm->world_size(), 1);
    std::vector<float> g = Gradient(100, 1);
    const std::vector<float> before = g;
    StepStats stats;
    ASSERT_THAT(comm->AllReduceMean("w", g, &stats), IsOk());
    EXPECT_TRUE(BitEqual(g, before));
    EXPECT_EQ(stats.calls, 1);
    EXPECT_EQ(stats.bytes_sent, 0u);
    EXPECT_TRUE(comm->ResidualKeys().empty());
    EXPECT_THAT(comm->SetResidual("w", g), StatusIs(absl::StatusCode::kFailedPrecondition));
    EXPECT_THAT(comm->Describe(), HasSubstr("local"));
  }
}

TEST(LocalCommunicatorTest, TrivialCollectives) {
  auto comm = MakeLocal("");
  std::vector<float> w = {1.0f, 2.0f};
  EXPECT_THAT(comm->Broadcast(w, 0), IsOk());
  EXPECT_THAT(w, ElementsAre(1.0f, 2.0f));
  EXPECT_THAT(comm->Broadcast(w, 1), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK_AND_ASSIGN(double sum, comm->AllReduceSumScalar(2.5));
  EXPECT_EQ(sum, 2.5);
  std::vector<double> sums = {1.0, -3.0};
  EXPECT_THAT(comm->AllReduceSum(sums), IsOk());
  EXPECT_THAT(sums, ElementsAre(1.0, -3.0));
  ASSERT_OK_AND_ASSIGN(std::vector<uint64_t> hashes, comm->AllGatherU64(0xDEADBEEFull));
  EXPECT_THAT(hashes, ElementsAre(0xDEADBEEFull));
  EXPECT_THAT(comm->Barrier(), IsOk());
}

TEST(LocalCommunicatorTest, BadSpecIsInvalidArgument) {
  EXPECT_THAT(LocalCommunicator::Create({"nope", FeedbackChoice::kFromSpec, 1}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(LocalCommunicator::Create({"qsgd:levels=0", FeedbackChoice::kFromSpec, 1}),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(LocalCommunicatorTest, EmptyKeyIsInvalidArgument) {
  auto comm = MakeLocal("onebit");
  std::vector<float> g = Gradient(10, 2);
  EXPECT_THAT(comm->AllReduceMean("", g, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
}

// With a codec the result is decode(encode(g + residual)) and the residual keeps the rest:
// the same steps a BucketCodec with the rank-0 seed takes.
class LocalCodecTest : public ::testing::TestWithParam<const char*> {};

TEST_P(LocalCodecTest, MatchesBucketCodecAndKeepsFeedbackInvariant) {
  const std::string spec = GetParam();
  auto comm = MakeLocal(spec, FeedbackChoice::kOn, 11);
  ASSERT_OK_AND_ASSIGN(auto reference, BucketCodec::Create(spec, FeedbackChoice::kOn));
  compression::Rng rng(RankSeed(11, 0));
  const size_t n = 1001;
  for (uint32_t step = 0; step < 3; ++step) {
    std::vector<float> g = Gradient(n, 100 + step);
    // v = g + old residual, as the codec forms it.
    std::vector<float> v(n);
    std::span<const float> old_residual = comm->Residual("bucket");
    for (size_t i = 0; i < n; ++i) v[i] = g[i] + (old_residual.empty() ? 0.0f : old_residual[i]);

    ASSERT_OK_AND_ASSIGN(float scale, reference->Prepare("bucket", g));
    compression::EncodedTensor encoded;
    ASSERT_THAT(reference->Encode("bucket", g, scale, rng, &encoded), IsOk());
    std::vector<float> expected(n, 0.0f);
    ASSERT_THAT(reference->codec().DecodeAdd(encoded, expected), IsOk());

    StepStats stats;
    ASSERT_THAT(comm->AllReduceMean("bucket", g, &stats), IsOk());
    EXPECT_TRUE(BitEqual(g, expected)) << spec << " step " << step;
    std::span<const float> residual = comm->Residual("bucket");
    ASSERT_EQ(residual.size(), n);
    EXPECT_TRUE(BitEqual(residual, reference->Residual("bucket")));
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(residual[i], v[i] - expected[i]) << spec << " step " << step << " i " << i;
    }
  }
  EXPECT_THAT(comm->ResidualKeys(), ElementsAre("bucket"));
}

INSTANTIATE_TEST_SUITE_P(Codecs, LocalCodecTest,
                         ::testing::Values("fp16", "onebit", "threshold:tau=0.05", "qsgd:levels=16",
                                           "qsgd:levels=4,coding=elias", "terngrad",
                                           "terngrad:shared=1"));

TEST(LocalCommunicatorTest, TernGradValuesAreZeroOrPlusMinusScale) {
  auto comm = MakeLocal("terngrad:clip=0");
  std::vector<float> g = Gradient(512, 5);
  float max_abs = 0.0f;
  for (float x : g) max_abs = std::max(max_abs, std::abs(x));
  ASSERT_THAT(comm->AllReduceMean("t", g, nullptr), IsOk());
  for (float x : g) EXPECT_TRUE(x == 0.0f || std::abs(x) == max_abs) << x;
  EXPECT_TRUE(comm->ResidualKeys().empty());  // terngrad: feedback off by default
}

TEST(LocalCommunicatorTest, SetResidualIsUsedByTheNextEncode) {
  auto comm = MakeLocal("threshold:tau=0.5");
  std::vector<float> r = {0.6f, -0.7f, 0.1f, 0.0f};
  ASSERT_THAT(comm->SetResidual("b", r), IsOk());
  std::vector<float> g(4, 0.0f);
  ASSERT_THAT(comm->AllReduceMean("b", g, nullptr), IsOk());
  EXPECT_THAT(g, ElementsAre(0.5f, -0.5f, 0.0f, 0.0f));
  EXPECT_THAT(comm->Residual("b"), ElementsAre(0.6f - 0.5f, -0.7f + 0.5f, 0.1f, 0.0f));
  std::vector<float> wrong_size(3, 0.0f);
  EXPECT_THAT(comm->AllReduceMean("b", wrong_size, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(LocalCommunicatorTest, FeedbackOffKeepsNoResidual) {
  auto comm = MakeLocal("onebit", FeedbackChoice::kOff);
  std::vector<float> g = Gradient(64, 9);
  ASSERT_THAT(comm->AllReduceMean("b", g, nullptr), IsOk());
  EXPECT_TRUE(comm->ResidualKeys().empty());
  EXPECT_THAT(comm->SetResidual("b", g), StatusIs(absl::StatusCode::kFailedPrecondition));
}

// fp32 warm-up: steps below fp32_warmup_steps leave the gradient as it is and touch no residual;
// from that step on the codec runs, exactly as a communicator without warm-up at its first call.
TEST(LocalCommunicatorTest, Fp32WarmupStepsSkipTheCodec) {
  LocalOptions options{"onebit", FeedbackChoice::kFromSpec, 7};
  options.fp32_warmup_steps = 2;
  ASSERT_OK_AND_ASSIGN(auto comm, LocalCommunicator::Create(options));
  EXPECT_THAT(comm->Describe(), HasSubstr("after 2 uncompressed warm-up steps"));
  for (int64_t step = 0; step < 2; ++step) {
    comm->SetStep(step);
    std::vector<float> g = Gradient(300, 10 + static_cast<uint32_t>(step));
    const std::vector<float> before = g;
    ASSERT_THAT(comm->AllReduceMean("b", g, nullptr), IsOk());
    EXPECT_TRUE(BitEqual(g, before)) << "step " << step;
    EXPECT_TRUE(comm->ResidualKeys().empty()) << "step " << step;
  }
  comm->SetStep(2);
  auto fresh = MakeLocal("onebit");
  std::vector<float> g = Gradient(300, 20);
  std::vector<float> expected = g;
  ASSERT_THAT(comm->AllReduceMean("b", g, nullptr), IsOk());
  ASSERT_THAT(fresh->AllReduceMean("b", expected, nullptr), IsOk());
  EXPECT_TRUE(BitEqual(g, expected));
  EXPECT_FALSE(BitEqual(g, Gradient(300, 20)));  // compressed now
  EXPECT_THAT(comm->ResidualKeys(), ElementsAre("b"));
  options.fp32_warmup_steps = -1;
  EXPECT_THAT(LocalCommunicator::Create(options), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(StepStatsTest, Accumulates) {
  StepStats a{1.0, 2.0, 3.0, 4, 5, 1};
  a += StepStats{0.5, 0.5, 0.5, 1, 1, 2};
  EXPECT_EQ(a.encode_seconds, 1.5);
  EXPECT_EQ(a.communicate_seconds, 2.5);
  EXPECT_EQ(a.decode_seconds, 3.5);
  EXPECT_EQ(a.bytes_sent, 5u);
  EXPECT_EQ(a.bytes_received, 6u);
  EXPECT_EQ(a.calls, 3);
}

}  // namespace
}  // namespace qtrain::comm
