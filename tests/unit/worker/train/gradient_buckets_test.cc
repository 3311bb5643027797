#include "worker/train/gradient_buckets.h"

#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/local_communicator.h"
#include "worker/data/data_spec.h"
#include "worker/data/load_dataset.h"
#include "worker/nn/model.h"
#include "worker/train/trainer.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A Communicator that records every AllReduceMean (key, size, the data it was given, the thread)
// and replaces the data with a known "mean": data * scale + offset. Optionally fails one key.
class FakeCommunicator final : public comm::Communicator {
 public:
  struct Call {
    std::string key;
    std::vector<float> data;
    int64_t step;
    std::thread::id thread;
  };

  int rank() const override { return 0; }
  int world_size() const override { return world_size_; }
  std::string Describe() const override { return "fake"; }
  void SetStep(int64_t step) override { step_ = step; }

  absl::Status AllReduceMean(std::string_view key, std::span<float> data,
                             comm::StepStats* stats) override {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.push_back(Call{std::string(key), std::vector<float>(data.begin(), data.end()), step_,
                          std::this_thread::get_id()});
    if (key == fail_key_) return absl::DeadlineExceededError("peer 3 stalled");
    for (float& v : data) v = v * scale_ + offset_;
    if (stats != nullptr) {
      stats->bytes_sent += 4 * data.size();
      stats->bytes_received += 8 * data.size();
      stats->calls += 1;
    }
    return absl::OkStatus();
  }
  absl::Status Broadcast(std::span<float> data, int root) override { return absl::OkStatus(); }
  absl::Status AllReduceSum(std::span<double> values) override { return absl::OkStatus(); }
  absl::StatusOr<std::vector<uint64_t>> AllGatherU64(uint64_t value) override {
    return std::vector<uint64_t>(static_cast<size_t>(world_size_), value);
  }
  absl::Status Barrier() override { return absl::OkStatus(); }
  std::vector<std::string> ResidualKeys() const override { return {}; }
  std::span<const float> Residual(std::string_view key) const override { return {}; }
  absl::Status SetResidual(std::string_view key, std::span<const float> values) override {
    return absl::FailedPreconditionError("no residuals");
  }

  std::vector<Call> calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }
  float scale_ = 1.0f;
  float offset_ = 0.0f;
  std::string fail_key_;
  int world_size_ = 2;

 private:
  std::mutex mu_;
  std::vector<Call> calls_;
  int64_t step_ = -1;
};

// Parameters with given element counts, grads filled with i*1000 + j.
std::vector<std::unique_ptr<nn::Parameter>> MakeParams(const std::vector<int64_t>& sizes) {
  std::vector<std::unique_ptr<nn::Parameter>> out;
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto p = std::make_unique<nn::Parameter>();
    p->name = "p" + std::to_string(i);
    p->value.Resize({sizes[i]});
    p->grad.Resize({sizes[i]});
    for (int64_t j = 0; j < sizes[i]; ++j) p->grad.data()[j] = static_cast<float>(i * 1000 + j);
    out.push_back(std::move(p));
  }
  return out;
}

std::vector<nn::Parameter*> Raw(const std::vector<std::unique_ptr<nn::Parameter>>& params) {
  std::vector<nn::Parameter*> out;
  for (const auto& p : params) out.push_back(p.get());
  return out;
}

TEST(PlanGradientBucketsTest, ReverseOrderWholeParametersUpToTheCap) {
  // 4 bytes per element; cap 40 bytes = 10 floats.
  auto params = MakeParams({3, 4, 5, 2, 20, 1});
  auto plan = PlanGradientBuckets(Raw(params), 40);
  ASSERT_THAT(plan, IsOk());
  ASSERT_EQ(plan->size(), 4u);
  // Reverse: p5(1) p4(20) p3(2) p2(5) p1(4) p0(3).
  EXPECT_EQ((*plan)[0].key, "b0");
  EXPECT_THAT((*plan)[0].params, ElementsAre(5));      // 1 + 20 > 10: closed
  EXPECT_THAT((*plan)[1].params, ElementsAre(4));      // larger than the cap: alone
  EXPECT_EQ((*plan)[1].elements, 20);
  EXPECT_THAT((*plan)[2].params, ElementsAre(3, 2));   // 2 + 5 = 7; + 4 > 10
  EXPECT_THAT((*plan)[2].offsets, ElementsAre(0, 2));
  EXPECT_THAT((*plan)[3].params, ElementsAre(1, 0));   // 4 + 3
  EXPECT_EQ((*plan)[3].key, "b3");
  EXPECT_EQ((*plan)[3].elements, 7);
}

TEST(PlanGradientBucketsTest, OneBucketWhenEverythingFitsAndBadSizeIsRefused) {
  auto params = MakeParams({3, 4, 5});
  auto plan = PlanGradientBuckets(Raw(params), 4 << 20);
  ASSERT_THAT(plan, IsOk());
  ASSERT_EQ(plan->size(), 1u);
  EXPECT_THAT((*plan)[0].params, ElementsAre(2, 1, 0));
  EXPECT_THAT(PlanGradientBuckets(Raw(params), 0), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(GradientBucketerTest, AveragesEveryBucketOnTheCommThreadInPlanOrder) {
  auto params = MakeParams({3, 4, 5, 2, 20, 1});
  auto raw = Raw(params);
  FakeCommunicator comm;
  comm.scale_ = 0.5f;
  comm.offset_ = 1.0f;
  auto bucketer = GradientBucketer::Create(raw, &comm, BucketOptions{40, 10.0});
  ASSERT_THAT(bucketer, IsOk());
  std::vector<std::vector<float>> before;
  for (auto* p : raw) before.emplace_back(p->grad.data(), p->grad.data() + p->grad.size());

  (*bucketer)->BeginStep(7);
  // Delivered out of plan order and in groups, as layers would; p0 is never reported (flushed).
  std::vector<nn::Parameter*> layer_a = {raw[4], raw[5]};
  (*bucketer)->OnGradsReady(layer_a);
  std::vector<nn::Parameter*> layer_b = {raw[2], raw[3], raw[3]};  // a repeat is ignored
  (*bucketer)->OnGradsReady(layer_b);
  std::vector<nn::Parameter*> layer_c = {raw[1]};
  (*bucketer)->OnGradsReady(layer_c);
  comm::StepStats stats;
  double waited = 0;
  ASSERT_THAT((*bucketer)->FinishStep(&stats, &waited), IsOk());

  auto calls = comm.calls();
  ASSERT_EQ(calls.size(), 4u);
  const std::vector<std::string> keys = {"b0", "b1", "b2", "b3"};
  const std::vector<size_t> sizes = {1, 20, 7, 7};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(calls[i].key, keys[i]);
    EXPECT_EQ(calls[i].data.size(), sizes[i]);
    EXPECT_EQ(calls[i].step, 7);
    EXPECT_NE(calls[i].thread, std::this_thread::get_id());
  }
  // Bucket b2 = [p3 | p2]: the flat buffer holds the grads as they were.
  EXPECT_EQ(calls[2].data[0], 3000.0f);
  EXPECT_EQ(calls[2].data[2], 2000.0f);
  // Every grad now holds the fake mean.
  for (size_t i = 0; i < raw.size(); ++i) {
    for (int64_t j = 0; j < raw[i]->grad.size(); ++j) {
      ASSERT_EQ(raw[i]->grad.data()[j], before[i][j] * 0.5f + 1.0f) << i << " " << j;
    }
  }
  EXPECT_EQ(stats.bytes_sent, 4u * 35);
  EXPECT_EQ(stats.bytes_received, 8u * 35);
  EXPECT_EQ(stats.calls, 4);
  EXPECT_GE(waited, 0.0);

  // A second step works the same (state is reset).
  (*bucketer)->BeginStep(8);
  ASSERT_THAT((*bucketer)->FinishStep(nullptr, nullptr), IsOk());
  EXPECT_EQ(comm.calls().size(), 8u);
  EXPECT_EQ(comm.calls()[7].step, 8);
}

TEST(GradientBucketerTest, BucketsLaunchDuringBackwardNotOnlyAtTheEnd) {
  auto params = MakeParams({4, 4, 4});
  auto raw = Raw(params);
  FakeCommunicator comm;
  auto bucketer = GradientBucketer::Create(raw, &comm, BucketOptions{16, 10.0});
  ASSERT_THAT(bucketer, IsOk());
  ASSERT_EQ((*bucketer)->buckets().size(), 3u);
  (*bucketer)->BeginStep(0);
  std::vector<nn::Parameter*> last = {raw[2]};
  (*bucketer)->OnGradsReady(last);
  // b0 (= p2) is complete: the communication thread picks it up before FinishStep.
  for (int i = 0; i < 2000 && comm.calls().empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(comm.calls().size(), 1u);
  EXPECT_EQ(comm.calls()[0].key, "b0");
  // p0 alone does not launch b2 before b1.
  std::vector<nn::Parameter*> first = {raw[0]};
  (*bucketer)->OnGradsReady(first);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(comm.calls().size(), 1u);
  ASSERT_THAT((*bucketer)->FinishStep(nullptr, nullptr), IsOk());
  auto calls = comm.calls();
  ASSERT_EQ(calls.size(), 3u);
  EXPECT_EQ(calls[1].key, "b1");
  EXPECT_EQ(calls[2].key, "b2");
}

TEST(GradientBucketerTest, FirstErrorIsReturnedAndLaterBucketsAreSkipped) {
  auto params = MakeParams({4, 4, 4});
  FakeCommunicator comm;
  comm.fail_key_ = "b1";
  auto bucketer = GradientBucketer::Create(Raw(params), &comm, BucketOptions{16, 10.0});
  ASSERT_THAT(bucketer, IsOk());
  (*bucketer)->BeginStep(3);
  EXPECT_THAT((*bucketer)->FinishStep(nullptr, nullptr),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       HasSubstr("bucket 'b1' (4 floats): peer 3 stalled")));
  EXPECT_EQ(comm.calls().size(), 2u);  // b2 not attempted
}

// The trainer with a communicator that is not the identity but returns each bucket unchanged
// must train exactly as the plain one-process trainer, bucketing every parameter each step.
TEST(GradientBucketerTest, TrainerWithPassThroughCommunicatorMatchesLocalRun) {
  auto spec = data::ParseDataSpec("synthetic:n=256,test=64,classes=4,shape=1x8x8,seed=3");
  ASSERT_THAT(spec, IsOk());
  auto splits = data::LoadDataset(*spec, {});
  ASSERT_THAT(splits, IsOk());
  auto train = [&](comm::Communicator* comm, std::vector<float>* weights) -> int64_t {
    nn::ModelSpec model_spec{"cnn", {1, 8, 8}, 4, 11};
    auto model = nn::BuildModel(model_spec);
    EXPECT_THAT(model, IsOk());
    TrainerOptions o;
    o.epochs = 1;
    o.batch_size = 32;
    o.seed = 5;
    o.progress = false;
    o.bucket_bytes = 2048;  // several buckets
    auto trainer = Trainer::Create(model->get(), ModelInfo{"cnn", {1, 8, 8}, 4}, &*splits,
                                   data::AugmentOptions{}, o, kernels::CpuContext{}, comm);
    EXPECT_THAT(trainer, IsOk());
    auto summary = (*trainer)->Run();
    EXPECT_THAT(summary, IsOk());
    std::vector<nn::Parameter*> params;
    (*model)->CollectParameters(&params);
    for (auto* p : params) weights->insert(weights->end(), p->value.data(), p->value.data() + p->value.size());
    return static_cast<int64_t>((*trainer)->Buckets().size());
  };
  auto local = comm::LocalCommunicator::Create({});
  ASSERT_THAT(local, IsOk());
  std::vector<float> expected, got;
  EXPECT_EQ(train(local->get(), &expected), 0);  // identity: nothing bucketed
  FakeCommunicator fake;
  fake.world_size_ = 1;  // same shard and steps as the local run
  const int64_t buckets = train(&fake, &got);
  EXPECT_GT(buckets, 1);
  ASSERT_EQ(expected.size(), got.size());
  EXPECT_EQ(0, std::memcmp(expected.data(), got.data(), 4 * got.size()));
  // 256 examples / batch 32 = 8 steps, every bucket every step.
  EXPECT_EQ(static_cast<int64_t>(fake.calls().size()), 8 * buckets);
}

}  // namespace
}  // namespace qtrain::train
