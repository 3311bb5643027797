// ServerCore without a network: synchronous rounds, deadlines, heartbeat drop and rejoin,
// a new process joining a job in progress (the state handover), asynchronous staleness, the auxiliary collectives, checkpoint and restore, and malformed
// requests that must be refused with the right code and change nothing.
#include "server/ps_core.h"

#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"

#include "common/testing/status_matchers.h"
#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/wire.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::server {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

struct Fixture {
  double now = 1000.0;
  std::unique_ptr<ServerCore> core;

  explicit Fixture(ServerCoreOptions o) {
    o.clock = [this] { return now; };
    auto created = ServerCore::Create(o);
    EXPECT_THAT(created, IsOk());
    if (created.ok()) core = std::move(*created);
  }

  absl::Status Register(int id, const std::string& codec, int shard = 0, int num_shards = 1,
                        const std::string& token = "t") {
    pb::RegisterRequest r;
    r.set_token(token);
    r.set_worker_id(id);
    r.set_shard(shard);
    r.set_num_shards(num_shards);
    r.set_codec_spec(codec);
    pb::RegisterResponse response;
    return core->Register(r, &response);
  }

  absl::Status Push(const pb::PushRequest& r) {
    pb::PushResponse response;
    return core->Push(r, &response);
  }

  absl::StatusOr<pb::PullResponse> Pull(int id, int64_t step, uint32_t bucket = 0, int shard = 0) {
    pb::PullRequest r;
    r.set_token("t");
    r.set_worker_id(id);
    r.set_shard(shard);
    r.set_step(step);
    r.set_bucket(bucket);
    pb::PullResponse response;
    absl::Status s = core->Pull(r, &response);
    if (!s.ok()) return s;
    return response;
  }

  // A new process's registration (RegisterRequest.joining).
  absl::StatusOr<pb::RegisterResponse> RegisterJoining(int id, const std::string& codec) {
    pb::RegisterRequest r;
    r.set_token("t");
    r.set_worker_id(id);
    r.set_num_shards(1);
    r.set_codec_spec(codec);
    r.set_joining(true);
    pb::RegisterResponse response;
    absl::Status s = core->Register(r, &response);
    if (!s.ok()) return s;
    return response;
  }

  absl::StatusOr<pb::JoinResponse> Join(int id, uint32_t piece = 0) {
    pb::JoinRequest r;
    r.set_token("t");
    r.set_worker_id(id);
    r.set_piece(piece);
    pb::JoinResponse response;
    absl::Status s = core->Join(r, &response);
    if (!s.ok()) return s;
    return response;
  }

  absl::Status Handover(int donor, int joiner, uint32_t piece, uint32_t pieces,
                        const std::string& data) {
    pb::HandoverRequest r;
    r.set_token("t");
    r.set_worker_id(donor);
    r.set_joiner(joiner);
    r.set_piece(piece);
    r.set_pieces(pieces);
    r.set_data(data);
    pb::HandoverResponse response;
    return core->Handover(r, &response);
  }

  absl::Status Heartbeat(int id) {
    pb::HeartbeatRequest r;
    r.set_token("t");
    r.set_worker_id(id);
    pb::HeartbeatResponse response;
    return core->Heartbeat(r, &response);
  }

  absl::Status Leave(int id) {
    pb::LeaveRequest r;
    r.set_token("t");
    r.set_worker_id(id);
    pb::LeaveResponse response;
    return core->Leave(r, &response);
  }

  // Silences `gone` past the heartbeat timeout while the others stay fresh; Tick drops it.
  void Drop(int gone, int workers) {
    now += 11;
    for (int id = 0; id < workers; ++id) {
      if (id != gone) (void)Heartbeat(id);
    }
    core->Tick();
  }

  pb::StatusResponse Status() {
    pb::StatusRequest r;
    r.set_token("t");
    pb::StatusResponse response;
    EXPECT_THAT(core->GetStatus(r, &response), IsOk());
    return response;
  }
};

ServerCoreOptions Options(const std::string& codec, int workers) {
  ServerCoreOptions o;
  o.codec_spec = codec;
  o.world_size = workers;
  o.token = "t";
  o.step_deadline_seconds = 5;
  o.heartbeat_timeout_seconds = 10;
  return o;
}

// A push of `values` encoded with `codec` (a fresh encoder, no feedback).
pb::PushRequest MakePush(const std::string& codec, int id, int64_t step, uint32_t bucket,
                         const std::vector<float>& values, int shard = 0) {
  compression::CodecRegistry registry;
  EXPECT_THAT(compression::RegisterBuiltinCodecs(&registry), IsOk());
  auto config = registry.ParseSpec(codec);
  EXPECT_THAT(config, IsOk());
  auto c = registry.Create(*config, {});
  EXPECT_THAT(c, IsOk());
  compression::Rng rng(7);
  compression::EncodedTensor t;
  EXPECT_THAT((*c)->Encode(values, {}, rng, &t), IsOk());
  pb::PushRequest r;
  r.set_token("t");
  r.set_worker_id(id);
  r.set_shard(shard);
  r.set_step(step);
  r.set_bucket(bucket);
  *r.mutable_gradient() = compression::ToProto(t, compression::Checksum::kCrc32);
  return r;
}

std::vector<float> Decode(const pb::PullResponse& response, size_t n) {
  std::vector<float> out(n, 0.0f);
  compression::CodecRegistry registry;
  EXPECT_THAT(compression::RegisterBuiltinCodecs(&registry), IsOk());
  for (const pb::EncodedTensor& u : response.updates()) {
    auto t = compression::FromProto(u);
    EXPECT_THAT(t, IsOk());
    pb::CodecConfig config;
    auto c = registry.ParseSpec(compression::CodecName(t->codec));
    EXPECT_THAT(c, IsOk());
    auto codec = registry.Create(*c, {});
    EXPECT_THAT((*codec)->DecodeAdd(*t, out), IsOk());
  }
  return out;
}

TEST(ServerCoreTest, SyncRoundClosesWhenEveryWorkerPushed) {
  Fixture f(Options("fp32", 2));
  ASSERT_THAT(f.Register(0, "fp32"), IsOk());
  ASSERT_THAT(f.Register(1, "fp32"), IsOk());
  ASSERT_THAT(f.Push(MakePush("fp32", 0, 0, 0, {1, 2, 3, 4})), IsOk());
  auto pending = f.Pull(0, 0);
  ASSERT_THAT(pending, IsOk());
  EXPECT_FALSE(pending->ready());
  EXPECT_FALSE(pending->need_push());
  auto other = f.Pull(1, 0);
  ASSERT_THAT(other, IsOk());
  EXPECT_TRUE(other->need_push());  // worker 1 has not pushed yet
  ASSERT_THAT(f.Push(MakePush("fp32", 1, 0, 0, {3, 4, 5, 6})), IsOk());
  auto a = f.Pull(0, 0);
  auto b = f.Pull(1, 0);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  ASSERT_TRUE(a->ready());
  EXPECT_EQ(a->contributors(), 2);
  EXPECT_EQ(a->SerializeAsString(), b->SerializeAsString());  // the same bytes for everyone
  EXPECT_EQ(Decode(*a, 4), (std::vector<float>{2, 3, 4, 5}));
  EXPECT_EQ(f.Status().version(), 1u);
  EXPECT_EQ(f.Status().buckets(0).open_step(), 1);
}

// A round's later pushes are decoded outside the server's lock (ps_core.h): 8 workers pushing 3
// buckets from 8 threads at once must still count every push exactly once, never close a round
// under a decoder, and give the exact mean (fp32 and small integers: sums are exact).
TEST(ServerCoreTest, ConcurrentPushesAreEachCountedOnce) {
  constexpr int kWorkers = 8, kBuckets = 3, kSteps = 6;
  constexpr size_t kN = 50000;
  Fixture f(Options("fp32", kWorkers));
  for (int w = 0; w < kWorkers; ++w) ASSERT_THAT(f.Register(w, "fp32"), IsOk());
  auto values = [](int w, int step, uint32_t bucket) {
    std::vector<float> v(kN);
    for (size_t i = 0; i < kN; ++i) v[i] = float((w + 1) * int((i + bucket) % 7) + step);
    return v;
  };
  std::vector<std::thread> threads;
  std::vector<std::string> errors(kWorkers);
  for (int w = 0; w < kWorkers; ++w) {
    threads.emplace_back([&, w] {
      for (int step = 0; step < kSteps; ++step) {
        for (uint32_t b = 0; b < kBuckets; ++b) {
          absl::Status s = f.Push(MakePush("fp32", w, step, b, values(w, step, b)));
          for (int tries = 0; s.ok() && tries < 2000; ++tries) {
            const uint64_t seen = f.core->change_count();
            auto r = f.Pull(w, step, b);
            if (!r.ok()) {
              s = r.status();
            } else if (r->ready()) {
              if (r->contributors() != kWorkers) s = absl::InternalError("short round");
              const std::vector<float> mean = Decode(*r, kN);
              for (size_t i = 0; i < kN && s.ok(); ++i) {
                const float want = 4.5f * float((i + b) % 7) + float(step);
                if (mean[i] != want) {
                  s = absl::InternalError(absl::StrCat("element ", i, " is ", mean[i]));
                }
              }
              break;
            }
            f.core->WaitForChange(seen, 0.05);
          }
          if (!s.ok()) {
            errors[w] = absl::StrCat("step ", step, " bucket ", b, ": ", s.ToString());
            return;
          }
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int w = 0; w < kWorkers; ++w) EXPECT_EQ(errors[w], "") << "worker " << w;
  EXPECT_EQ(f.Status().version(), uint64_t{kBuckets * kSteps});
}

TEST(ServerCoreTest, OnebitDownlinkKeepsAResidual) {
  Fixture f(Options("onebit", 1));
  ASSERT_THAT(f.Register(0, "onebit"), IsOk());
  ASSERT_THAT(f.Push(MakePush("onebit", 0, 0, 0, {1, -2, 3, -4, 5, 6, -7, 8})), IsOk());
  auto a = f.Pull(0, 0);
  ASSERT_THAT(a, IsOk());
  ASSERT_TRUE(a->ready());
  EXPECT_EQ(a->updates(0).codec(), pb::CODEC_ONEBIT);
  EXPECT_TRUE(a->updates(0).has_checksum());
}

TEST(ServerCoreTest, DeadlineClosesARoundAndTheStragglerPullsIt) {
  Fixture f(Options("fp32", 2));
  ASSERT_THAT(f.Register(0, "fp32"), IsOk());
  ASSERT_THAT(f.Register(1, "fp32"), IsOk());
  ASSERT_THAT(f.Push(MakePush("fp32", 0, 0, 0, {2, 4})), IsOk());
  f.now += 4;
  f.core->Tick();
  EXPECT_FALSE(f.Pull(0, 0)->ready());
  f.now += 1.5;
  f.core->Tick();
  auto a = f.Pull(0, 0);
  ASSERT_TRUE(a->ready());
  EXPECT_EQ(a->contributors(), 1);
  EXPECT_EQ(Decode(*a, 2), (std::vector<float>{2, 4}));
  EXPECT_THAT(f.Push(MakePush("fp32", 1, 0, 0, {1, 1})),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("STALE_STEP")));
  auto b = f.Pull(1, 0);
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->SerializeAsString(), b->SerializeAsString());
}

TEST(ServerCoreTest, SilentWorkerIsDroppedAndMayRejoin) {
  Fixture f(Options("fp32", 2));
  ASSERT_THAT(f.Register(0, "fp32"), IsOk());
  ASSERT_THAT(f.Register(1, "fp32"), IsOk());
  f.now += 6;
  ASSERT_THAT(f.Push(MakePush("fp32", 0, 0, 0, {1})), IsOk());  // worker 0 stays fresh
  f.now += 5;
  f.core->Tick();  // worker 1 silent 11 s > 10 s: dropped, so the round closes
  EXPECT_EQ(f.Status().live(), 1);
  auto a = f.Pull(0, 0);
  ASSERT_THAT(a, IsOk());
  EXPECT_TRUE(a->ready());
  EXPECT_THAT(f.Push(MakePush("fp32", 1, 0, 0, {1})),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("NOT_REGISTERED")));
  EXPECT_THAT(f.Pull(1, 0), StatusIs(absl::StatusCode::kFailedPrecondition));
  // Rejoin: register again with the same id, pull what was missed, push the next step.
  ASSERT_THAT(f.Register(1, "fp32"), IsOk());
  EXPECT_EQ(f.Status().live(), 2);
  auto b = f.Pull(1, 0);
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->SerializeAsString(), b->SerializeAsString());
  ASSERT_THAT(f.Push(MakePush("fp32", 1, 1, 0, {3})), IsOk());
  EXPECT_FALSE(f.Pull(1, 1)->ready());  // waits for worker 0 again
  ASSERT_THAT(f.Push(MakePush("fp32", 0, 1, 0, {5})), IsOk());
  EXPECT_EQ(Decode(*f.Pull(1, 1), 1), std::vector<float>{4});
}

TEST(ServerCoreTest, RoundsWaitUntilEveryWorkerRegisteredOnce) {
  Fixture f(Options("fp32", 2));
  ASSERT_THAT(f.Register(0, "fp32"), IsOk());
  ASSERT_THAT(f.Push(MakePush("fp32", 0, 0, 0, {1})), IsOk());
  EXPECT_FALSE(f.Pull(0, 0)->ready());  // worker 1 never registered: wait (until the deadline)
}

TEST(ServerCoreTest, RegisterChecks) {
  Fixture f(Options("onebit", 2));
  EXPECT_THAT(f.Register(0, "fp32"), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("codec")));
  EXPECT_THAT(f.Register(2, "onebit"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(f.Register(0, "onebit", 1, 2), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("WRONG_SHARD")));
  EXPECT_THAT(f.Register(0, "onebit", 0, 2), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(f.Register(0, "onebit", 0, 1, "bad"), StatusIs(absl::StatusCode::kUnauthenticated));
  pb::RegisterRequest r;
  r.set_token("t");
  r.set_worker_id(-1);
  r.set_num_shards(1);
  r.set_codec_spec("onebit");
  pb::RegisterResponse response;
  ASSERT_THAT(f.core->Register(r, &response), IsOk());
  EXPECT_EQ(response.worker_id(), 0);
  ASSERT_THAT(f.core->Register(r, &response), IsOk());
  EXPECT_EQ(response.worker_id(), 1);
  EXPECT_EQ(response.world_size(), 2);
  EXPECT_THAT(f.core->Register(r, &response), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ServerCoreTest, MalformedRequestsAreRefusedAndChangeNothing) {
  ServerCoreOptions o = Options("onebit", 2);
  o.num_shards = 2;
  o.shard = 0;
  Fixture f(o);
  ASSERT_THAT(f.Register(0, "onebit", 0, 2), IsOk());
  ASSERT_THAT(f.Register(1, "onebit", 0, 2), IsOk());
  const std::vector<float> g = {1, -2, 3, -4, 5, -6, 7, -8};
  ASSERT_THAT(f.Push(MakePush("onebit", 0, 0, 0, g)), IsOk());
  ASSERT_THAT(f.Push(MakePush("onebit", 1, 0, 0, g)), IsOk());  // round 0 closed
  ASSERT_THAT(f.Push(MakePush("onebit", 0, 1, 0, g)), IsOk());  // round 1 open, worker 0 in
  const pb::StatusResponse before = f.Status();

  auto expect = [&](const char* what, pb::PushRequest r, absl::StatusCode code, const char* text) {
    SCOPED_TRACE(what);
    EXPECT_THAT(f.Push(r), StatusIs(code, HasSubstr(text)));
    const pb::StatusResponse after = f.Status();
    EXPECT_EQ(after.state_hash(), before.state_hash());
    EXPECT_EQ(after.version(), before.version());
  };
  pb::PushRequest good = MakePush("onebit", 1, 1, 0, g);
  {
    pb::PushRequest r = good;
    r.set_token("wrong");
    expect("bad token", r, absl::StatusCode::kUnauthenticated, "token");
  }
  {
    pb::PushRequest r = good;
    r.set_worker_id(7);
    expect("unknown worker", r, absl::StatusCode::kFailedPrecondition, "NOT_REGISTERED");
  }
  {
    pb::PushRequest r = good;
    r.set_shard(1);
    expect("wrong shard", r, absl::StatusCode::kInvalidArgument, "WRONG_SHARD");
  }
  {
    pb::PushRequest r = MakePush("onebit", 1, 1, 1, g);  // bucket 1 belongs to shard 1
    expect("bucket not owned", r, absl::StatusCode::kInvalidArgument, "WRONG_SHARD");
  }
  {
    pb::PushRequest r = MakePush("onebit", 1, 1, 0, {1, 2, 3});
    expect("wrong element count", r, absl::StatusCode::kInvalidArgument, "elements");
  }
  {
    pb::PushRequest r = good;
    r.mutable_gradient()->set_codec(static_cast<pb::CodecId>(99));
    expect("unknown codec", r, absl::StatusCode::kInvalidArgument, "codec");
  }
  {
    pb::PushRequest r = MakePush("fp16", 1, 1, 0, g);
    expect("another codec", r, absl::StatusCode::kInvalidArgument, "codec");
  }
  {
    pb::PushRequest r = good;
    std::string payload = r.gradient().payload();
    payload.resize(payload.size() / 2);
    r.mutable_gradient()->set_payload(payload);
    r.mutable_gradient()->set_has_checksum(false);
    expect("truncated payload", r, absl::StatusCode::kInvalidArgument, "BAD_TENSOR");
  }
  {
    pb::PushRequest r = good;
    r.mutable_gradient()->set_checksum(r.gradient().checksum() ^ 1);
    expect("bad checksum", r, absl::StatusCode::kDataLoss, "checksum");
  }
  {
    pb::PushRequest r = good;
    r.mutable_gradient()->set_payload(std::string(1 << 16, 'x'));
    r.mutable_gradient()->set_has_checksum(false);
    expect("oversized", r, absl::StatusCode::kInvalidArgument, "oversized");
  }
  {
    pb::PushRequest r = MakePush("onebit", 1, 0, 0, g);
    expect("stale step", r, absl::StatusCode::kFailedPrecondition, "STALE_STEP");
  }
  {
    pb::PushRequest r = MakePush("onebit", 1, 5, 0, g);
    expect("future step", r, absl::StatusCode::kFailedPrecondition, "FUTURE_STEP");
  }
  {
    pb::PushRequest r = good;
    r.set_step(-3);
    expect("negative step", r, absl::StatusCode::kInvalidArgument, "negative");
  }
  {
    // A repeated push (a retry) is accepted once only.
    pb::PushResponse response;
    ASSERT_THAT(f.core->Push(MakePush("onebit", 0, 1, 0, g), &response), IsOk());
    EXPECT_TRUE(response.duplicate());
    EXPECT_EQ(f.Status().state_hash(), before.state_hash());
  }
  EXPECT_GE(f.Status().rejected_requests(), 13u);
  // Pull / Heartbeat / Leave / Collective / Status with a bad token.
  pb::StatusRequest sr;
  sr.set_token("nope");
  pb::StatusResponse srr;
  EXPECT_THAT(f.core->GetStatus(sr, &srr), StatusIs(absl::StatusCode::kUnauthenticated));
  pb::HeartbeatRequest hr;
  hr.set_token("nope");
  pb::HeartbeatResponse hrr;
  EXPECT_THAT(f.core->Heartbeat(hr, &hrr), StatusIs(absl::StatusCode::kUnauthenticated));
  // The good push still works afterwards.
  ASSERT_THAT(f.Push(good), IsOk());
  EXPECT_EQ(f.Status().version(), before.version() + 1);
}

TEST(ServerCoreTest, AsyncAppliesEachPushAndBoundsStaleness) {
  ServerCoreOptions o = Options("fp32", 2);
  o.mode = PsMode::kAsync;
  o.staleness = 1;
  Fixture f(o);
  ASSERT_THAT(f.Register(0, "fp32"), IsOk());
  ASSERT_THAT(f.Register(1, "fp32"), IsOk());
  ASSERT_THAT(f.Push(MakePush("fp32", 0, 0, 0, {2})), IsOk());  // round 0 closes at once
  ASSERT_THAT(f.Push(MakePush("fp32", 0, 1, 0, {4})), IsOk());  // round 1
  EXPECT_EQ(f.Status().version(), 2u);
  ASSERT_THAT(f.Push(MakePush("fp32", 1, 1, 0, {6})), IsOk());  // 1 round old: accepted
  EXPECT_THAT(f.Push(MakePush("fp32", 1, 0, 0, {6})),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("STALE_STEP")));
  EXPECT_THAT(f.Push(MakePush("fp32", 1, 9, 0, {6})),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("FUTURE_STEP")));
  auto all = f.Pull(1, 0);
  ASSERT_THAT(all, IsOk());
  ASSERT_TRUE(all->ready());
  EXPECT_EQ(all->updates_size(), 3);
  EXPECT_EQ(Decode(*all, 1), std::vector<float>{12});
}

pb::CollectiveRequest Contribution(int id, uint64_t seq, pb::CollectiveKind kind) {
  pb::CollectiveRequest r;
  r.set_token("t");
  r.set_worker_id(id);
  r.set_seq(seq);
  r.set_kind(kind);
  return r;
}

TEST(ServerCoreTest, CollectivesSumGatherBroadcast) {
  Fixture f(Options("fp32", 3));
  for (int i = 0; i < 3; ++i) ASSERT_THAT(f.Register(i, "fp32"), IsOk());
  pb::CollectiveResponse response;
  for (int i = 0; i < 3; ++i) {
    pb::CollectiveRequest r = Contribution(i, 0, pb::COLLECTIVE_SUM);
    r.set_size(2);
    r.add_values(i);
    r.add_values(1);
    ASSERT_THAT(f.core->Collective(r, &response), IsOk());
    EXPECT_EQ(response.ready(), i == 2);
  }
  EXPECT_EQ(response.values(0), 3);
  EXPECT_EQ(response.values(1), 3);
  for (int i = 0; i < 3; ++i) {
    pb::CollectiveRequest r = Contribution(i, 1, pb::COLLECTIVE_BROADCAST);
    r.set_root(1);
    r.set_size(1);
    if (i == 1) {
      const float v = 2.5f;
      r.set_data(&v, 4);
    }
    ASSERT_THAT(f.core->Collective(r, &response), IsOk());
  }
  ASSERT_TRUE(response.ready());
  float got = 0;
  std::memcpy(&got, response.data().data(), 4);
  EXPECT_EQ(got, 2.5f);
  // A kind mismatch is the workers calling collectives in different orders.
  pb::CollectiveRequest mismatched = Contribution(0, 1, pb::COLLECTIVE_SUM);
  EXPECT_THAT(f.core->Collective(mismatched, &response),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  // Worker 2 dies: after the heartbeat timeout the gather closes with 0 and 1; its slot holds
  // rank 0's value; a sum is scaled to the world size.
  f.now += 6;
  for (int i = 0; i < 2; ++i) {
    pb::CollectiveRequest r = Contribution(i, 2, pb::COLLECTIVE_GATHER_U64);
    r.set_value_u64(100 + i);
    ASSERT_THAT(f.core->Collective(r, &response), IsOk());
    EXPECT_FALSE(response.ready());
  }
  f.now += 5;
  f.core->Tick();
  pb::CollectiveRequest again = Contribution(0, 2, pb::COLLECTIVE_GATHER_U64);
  again.set_value_u64(100);
  ASSERT_THAT(f.core->Collective(again, &response), IsOk());
  ASSERT_TRUE(response.ready());
  EXPECT_THAT(response.gathered(), ::testing::ElementsAre(100, 101, 100));
  // Worker 2 comes back late: it gets the closed result with its own value in its own slot.
  ASSERT_THAT(f.Register(2, "fp32"), IsOk());
  pb::CollectiveRequest late = Contribution(2, 2, pb::COLLECTIVE_GATHER_U64);
  late.set_value_u64(555);
  ASSERT_THAT(f.core->Collective(late, &response), IsOk());
  EXPECT_THAT(response.gathered(), ::testing::ElementsAre(100, 101, 555));
  pb::LeaveRequest leave;
  leave.set_token("t");
  leave.set_worker_id(2);
  pb::LeaveResponse left;
  ASSERT_THAT(f.core->Leave(leave, &left), IsOk());  // and leaves the quorum again
  for (int i = 0; i < 2; ++i) {
    pb::CollectiveRequest r = Contribution(i, 3, pb::COLLECTIVE_SUM);
    r.set_size(1);
    r.add_values(2);
    ASSERT_THAT(f.core->Collective(r, &response), IsOk());
  }
  ASSERT_TRUE(response.ready());
  EXPECT_EQ(response.values(0), 6);  // (2 + 2) * 3 / 2
}

TEST(ServerCoreTest, CheckpointRestoresExactRounds) {
  const std::string dir = ::testing::TempDir() + "/ps_core_ckpt";
  std::filesystem::remove_all(dir);
  ServerCoreOptions o = Options("onebit", 1);
  o.checkpoint_dir = dir;
  o.checkpoint_every = 1;
  uint64_t version = 0;
  std::vector<float> residual;
  {
    Fixture f(o);
    ASSERT_THAT(f.Register(0, "onebit"), IsOk());
    for (int step = 0; step < 3; ++step) {
      ASSERT_THAT(f.Push(MakePush("onebit", 0, step, 0, {1, -2, 3, 0.5f})), IsOk());
    }
    version = f.Status().version();
    EXPECT_EQ(f.Status().checkpoints_written(), 3u);
  }
  ASSERT_TRUE(std::filesystem::exists(ServerCheckpointPath(dir, 0)));
  {
    Fixture f(o);
    EXPECT_TRUE(f.core->restored());
    const pb::StatusResponse s = f.Status();
    EXPECT_EQ(s.version(), version);
    EXPECT_EQ(s.live(), 1);  // the worker table came back
    ASSERT_EQ(s.buckets_size(), 1);
    EXPECT_EQ(s.buckets(0).elements(), 4);
    EXPECT_EQ(s.buckets(0).open_step(), 3);  // exact: the next round is 3
    // A worker that had not pulled round 2 yet gets it from the checkpoint's history.
    ASSERT_THAT(f.Pull(0, 2), IsOk());
    EXPECT_TRUE(f.Pull(0, 2)->ready());
    // A push ahead of the open round is FUTURE_STEP, the open round is accepted.
    EXPECT_THAT(f.Push(MakePush("onebit", 0, 7, 0, {1, -2, 3, 0.5f})),
                StatusIs(absl::StatusCode::kFailedPrecondition));
    ASSERT_THAT(f.Push(MakePush("onebit", 0, 3, 0, {1, -2, 3, 0.5f})), IsOk());
    EXPECT_EQ(f.Status().buckets(0).open_step(), 4);
    // A wrong element count is still refused after the restore.
    EXPECT_THAT(f.Push(MakePush("onebit", 0, 4, 0, {1, 2})),
                StatusIs(absl::StatusCode::kInvalidArgument));
  }
  // Another layout refuses the checkpoint instead of mixing states.
  ServerCoreOptions other = o;
  other.world_size = 3;
  EXPECT_THAT(ServerCore::Create(other), StatusIs(absl::StatusCode::kFailedPrecondition));
  // A corrupt file is DATA_LOSS.
  {
    std::FILE* file = std::fopen(ServerCheckpointPath(dir, 0).c_str(), "r+b");
    ASSERT_NE(file, nullptr);
    std::fseek(file, 30, SEEK_SET);
    std::fputc('Z', file);
    std::fclose(file);
  }
  EXPECT_THAT(ServerCore::Create(o), StatusIs(absl::StatusCode::kDataLoss));
  std::filesystem::remove_all(dir);
}

// The server dies (no Shutdown checkpoint) after rounds closed since its last checkpoint; some
// workers applied them, some not. The restarted server replays its journal and serves the same
// bytes for each of those rounds, and its open rounds are exact.
TEST(ServerCoreTest, JournalKeepsRoundsClosedAfterTheCheckpoint) {
  const std::string dir = ::testing::TempDir() + "/ps_core_journal";
  std::filesystem::remove_all(dir);
  ServerCoreOptions o = Options("onebit", 2);
  o.checkpoint_dir = dir;
  o.checkpoint_every = 4;
  std::vector<std::string> served;  // round s of bucket 1 as served before the kill
  {
    Fixture f(o);
    ASSERT_THAT(f.Register(0, "onebit"), IsOk());
    ASSERT_THAT(f.Register(1, "onebit"), IsOk());
    for (int step = 0; step < 7; ++step) {  // 7 rounds: a checkpoint at 4, three in the journal
      for (int w = 0; w < 2; ++w) {
        ASSERT_THAT(f.Push(MakePush("onebit", w, step, 1, {1.0f + step, -2, 3, w - 0.5f})),
                    IsOk());
      }
      absl::StatusOr<pb::PullResponse> r = f.Pull(0, step, 1);
      ASSERT_THAT(r, IsOk());
      ASSERT_TRUE(r->ready());
      served.push_back(r->updates(0).SerializeAsString());
    }
    // Round 7 is half pushed when the server dies.
    ASSERT_THAT(f.Push(MakePush("onebit", 0, 7, 1, {1, 1, 1, 1})), IsOk());
    EXPECT_EQ(f.Status().checkpoints_written(), 1u);
  }
  ASSERT_TRUE(std::filesystem::exists(ServerJournalPath(dir, 0)));
  {
    Fixture f(o);
    ASSERT_TRUE(f.core->restored());
    EXPECT_EQ(f.Status().version(), 7u);
    EXPECT_EQ(f.Status().buckets(0).open_step(), 7);
    for (int step = 2; step < 7; ++step) {  // 2, 3 from the checkpoint; 4..6 from the journal
      absl::StatusOr<pb::PullResponse> r = f.Pull(1, step, 1);
      ASSERT_THAT(r, IsOk());
      ASSERT_TRUE(r->ready()) << step;
      EXPECT_EQ(r->updates(0).SerializeAsString(), served[step]) << "round " << step;
    }
    // The half-pushed round 7 was lost: worker 0 is asked to push again.
    absl::StatusOr<pb::PullResponse> open = f.Pull(0, 7, 1);
    ASSERT_THAT(open, IsOk());
    EXPECT_FALSE(open->ready());
    EXPECT_TRUE(open->need_push());
  }
  // The restart wrote a checkpoint holding the journal's rounds and emptied the journal.
  EXPECT_EQ(std::filesystem::file_size(ServerJournalPath(dir, 0)), 0u);
  {
    Fixture f(o);
    EXPECT_EQ(f.Status().version(), 7u);
    EXPECT_EQ(f.Status().buckets(0).open_step(), 7);
  }
  std::filesystem::remove_all(dir);
}

TEST(ServerCoreTest, TornJournalTailIsDroppedDamageIsDataLoss) {
  const std::string dir = ::testing::TempDir() + "/ps_core_torn";
  std::filesystem::remove_all(dir);
  ServerCoreOptions o = Options("onebit", 1);
  o.checkpoint_dir = dir;
  o.checkpoint_every = 100;
  {
    Fixture f(o);
    ASSERT_THAT(f.Register(0, "onebit"), IsOk());
    for (int step = 0; step < 3; ++step) {
      ASSERT_THAT(f.Push(MakePush("onebit", 0, step, 0, {1, -2, 3, 0.5f})), IsOk());
    }
  }
  const std::string journal = ServerJournalPath(dir, 0);
  const uintmax_t whole = std::filesystem::file_size(journal);
  // A kill in the middle of the third record's write: two rounds come back.
  std::filesystem::resize_file(journal, whole - 5);
  {
    Fixture f(o);
    EXPECT_EQ(f.Status().version(), 2u);
    EXPECT_EQ(f.Status().buckets(0).open_step(), 2);
    ASSERT_THAT(f.Register(0, "onebit"), IsOk());  // no checkpoint held the worker table
    ASSERT_THAT(f.Push(MakePush("onebit", 0, 2, 0, {1, -2, 3, 0.5f})), IsOk());
    ASSERT_THAT(f.Push(MakePush("onebit", 0, 3, 0, {1, -2, 3, 0.5f})), IsOk());
  }
  // A flipped byte inside the first of two records is damage, not a torn tail.
  {
    std::FILE* file = std::fopen(journal.c_str(), "r+b");
    ASSERT_NE(file, nullptr);
    std::fseek(file, 20, SEEK_SET);
    std::fputc('Z', file);
    std::fclose(file);
  }
  EXPECT_THAT(ServerCore::Create(o), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("journal")));
  std::filesystem::remove_all(dir);
}

TEST(ServerCoreTest, JoiningWorkerTakesALiveWorkersStateAndJoinsAtItsFirstAcceptedPush) {
  Fixture f(Options("fp32", 3));
  for (int id = 0; id < 3; ++id) ASSERT_THAT(f.Register(id, "fp32"), IsOk());
  for (int id = 0; id < 3; ++id) ASSERT_THAT(f.Push(MakePush("fp32", id, 0, 0, {1, 2})), IsOk());
  ASSERT_TRUE(f.Pull(0, 0)->ready());
  f.Drop(2, 3);  // worker 2's process was killed
  EXPECT_EQ(f.Status().live(), 2);
  // Its restarted process registers into the running job: joining, not in the quorum.
  auto reg = f.RegisterJoining(2, "fp32");
  ASSERT_THAT(reg, IsOk());
  EXPECT_TRUE(reg->in_progress());
  EXPECT_EQ(reg->live(), 2);
  ASSERT_THAT(f.Heartbeat(2), IsOk());
  // Rounds do not wait for it.
  ASSERT_THAT(f.Push(MakePush("fp32", 0, 1, 0, {2, 2})), IsOk());
  ASSERT_THAT(f.Push(MakePush("fp32", 1, 1, 0, {4, 4})), IsOk());
  auto round1 = f.Pull(0, 1);
  ASSERT_TRUE(round1->ready());
  EXPECT_EQ(round1->contributors(), 2);
  // It asks for the state: the lowest live worker is the donor and learns it from its pulls.
  auto join = f.Join(2);
  ASSERT_THAT(join, IsOk());
  EXPECT_FALSE(join->ready());
  EXPECT_EQ(join->donor(), 0);
  EXPECT_THAT(f.Pull(0, 1)->handover_to(), ::testing::ElementsAre(2));
  EXPECT_TRUE(f.Pull(1, 1)->handover_to().empty());
  // Only the donor may upload, and only for a joiner that waits.
  const uint64_t before = f.Status().state_hash();
  EXPECT_THAT(f.Handover(1, 2, 0, 1, "x"),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("BAD_REQUEST")));
  EXPECT_THAT(f.Handover(0, 1, 0, 1, "x"), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(f.Status().state_hash(), before);
  ASSERT_THAT(f.Handover(0, 2, 0, 2, "first,"), IsOk());
  EXPECT_FALSE(f.Join(2)->ready());  // one piece of two
  EXPECT_THAT(f.Handover(0, 2, 1, 3, "bad"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("pieces")));
  ASSERT_THAT(f.Handover(0, 2, 1, 2, "second"), IsOk());
  EXPECT_TRUE(f.Pull(0, 1)->handover_to().empty());  // served
  auto piece0 = f.Join(2, 0);
  auto piece1 = f.Join(2, 1);
  ASSERT_THAT(piece0, IsOk());
  ASSERT_THAT(piece1, IsOk());
  ASSERT_TRUE(piece0->ready());
  EXPECT_EQ(piece0->pieces(), 2u);
  EXPECT_EQ(piece0->data() + piece1->data(), "first,second");
  EXPECT_THAT(f.Join(2, 2), StatusIs(absl::StatusCode::kInvalidArgument));
  // Catching up: a closed round is STALE_STEP (it pulls the result), and it stays joining.
  EXPECT_THAT(f.Push(MakePush("fp32", 2, 1, 0, {9, 9})),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("STALE_STEP")));
  EXPECT_EQ(f.Pull(2, 1)->SerializeAsString(), round1->SerializeAsString());
  EXPECT_EQ(f.Status().live(), 2);
  // With its state in hand it is waited for: the open round does not close on the others' pushes
  // (a joiner a step behind would otherwise never catch up), and its first accepted push puts it
  // in the quorum.
  ASSERT_THAT(f.Push(MakePush("fp32", 0, 2, 0, {3, 3})), IsOk());
  ASSERT_THAT(f.Push(MakePush("fp32", 1, 2, 0, {6, 6})), IsOk());
  EXPECT_FALSE(f.Pull(0, 2)->ready());
  EXPECT_EQ(f.Status().live(), 2);
  ASSERT_THAT(f.Push(MakePush("fp32", 2, 2, 0, {3, 3})), IsOk());
  EXPECT_EQ(f.Status().live(), 3);
  auto round2 = f.Pull(2, 2);
  ASSERT_TRUE(round2->ready());
  EXPECT_EQ(round2->contributors(), 3);
  EXPECT_EQ(Decode(*round2, 2), (std::vector<float>{4, 4}));
  // In the quorum now: no more state to ask for.
  EXPECT_THAT(f.Join(2), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(ServerCoreTest, ANewProcessWaitsUntilTheOldOneIsDropped) {
  Fixture f(Options("fp32", 2));
  ASSERT_THAT(f.Register(0, "fp32"), IsOk());
  ASSERT_THAT(f.Register(1, "fp32"), IsOk());
  const uint64_t before = f.Status().state_hash();
  EXPECT_THAT(f.RegisterJoining(1, "fp32"),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("WORKER_LIVE")));
  EXPECT_EQ(f.Status().state_hash(), before);
  EXPECT_EQ(f.Status().live(), 2);
  f.Drop(1, 2);
  auto reg = f.RegisterJoining(1, "fp32");
  ASSERT_THAT(reg, IsOk());
  EXPECT_TRUE(reg->in_progress());
}

TEST(ServerCoreTest, JoiningBeforeTheJobStartedIsAnOrdinaryRegistration) {
  Fixture f(Options("fp32", 2));
  auto reg = f.RegisterJoining(0, "fp32");  // every fresh process registers `joining`
  ASSERT_THAT(reg, IsOk());
  EXPECT_FALSE(reg->in_progress());
  EXPECT_EQ(reg->live(), 1);
  auto second = f.RegisterJoining(1, "fp32");
  ASSERT_THAT(second, IsOk());
  EXPECT_FALSE(second->in_progress());
  EXPECT_EQ(second->live(), 2);
  EXPECT_THAT(f.Join(0), StatusIs(absl::StatusCode::kFailedPrecondition));  // not joining
}

TEST(ServerCoreTest, AnAssignedIdReplacesAGoneWorker) {
  Fixture f(Options("fp32", 3));
  for (int id = 0; id < 3; ++id) ASSERT_THAT(f.Register(id, "fp32"), IsOk());
  EXPECT_THAT(f.RegisterJoining(-1, "fp32"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("every id is taken")));
  f.Drop(1, 3);
  auto reg = f.RegisterJoining(-1, "fp32");
  ASSERT_THAT(reg, IsOk());
  EXPECT_EQ(reg->worker_id(), 1);
  EXPECT_TRUE(reg->in_progress());
  EXPECT_EQ(reg->world_size(), 3);  // the world never grows
}

TEST(ServerCoreTest, AGoneDonorIsReplacedAndWithoutOneJoinFails) {
  Fixture f(Options("fp32", 3));
  for (int id = 0; id < 3; ++id) ASSERT_THAT(f.Register(id, "fp32"), IsOk());
  f.Drop(2, 3);
  ASSERT_THAT(f.RegisterJoining(2, "fp32"), IsOk());
  EXPECT_EQ(f.Join(2)->donor(), 0);
  ASSERT_THAT(f.Handover(0, 2, 0, 2, "half"), IsOk());
  ASSERT_THAT(f.Leave(0), IsOk());  // gone before it finished: worker 1 starts over
  EXPECT_EQ(f.Join(2)->donor(), 1);
  EXPECT_THAT(f.Handover(0, 2, 1, 2, "x"), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_FALSE(f.Join(2)->ready());
  EXPECT_THAT(f.Pull(1, 0)->handover_to(), ::testing::ElementsAre(2));
  ASSERT_THAT(f.Leave(1), IsOk());
  EXPECT_THAT(f.Join(2), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("NO_DONOR")));
}

TEST(ServerCoreTest, MalformedHandoversAreRefusedAndChangeNothing) {
  ServerCoreOptions o = Options("fp32", 2);
  o.max_message_bytes = 4096;
  Fixture f(o);
  ASSERT_THAT(f.Register(0, "fp32"), IsOk());
  ASSERT_THAT(f.Register(1, "fp32"), IsOk());
  f.Drop(1, 2);
  ASSERT_THAT(f.RegisterJoining(1, "fp32"), IsOk());
  ASSERT_THAT(f.Join(1), IsOk());
  const uint64_t before = f.Status().state_hash();
  EXPECT_THAT(f.Handover(0, 1, 0, 0, "x"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(f.Handover(0, 1, 2, 2, "x"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(f.Handover(0, 1, 0, 1, std::string(4097, 'x')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("exceeds")));
  EXPECT_THAT(f.Handover(5, 1, 0, 1, "x"),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("NOT_REGISTERED")));
  pb::HandoverRequest bad_token;
  bad_token.set_token("wrong");
  pb::HandoverResponse response;
  EXPECT_THAT(f.core->Handover(bad_token, &response),
              StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_EQ(f.Status().state_hash(), before);
}

TEST(ServerCoreTest, ASilentJoinerIsDroppedAndForgotten) {
  Fixture f(Options("fp32", 2));
  ASSERT_THAT(f.Register(0, "fp32"), IsOk());
  ASSERT_THAT(f.Register(1, "fp32"), IsOk());
  f.Drop(1, 2);
  ASSERT_THAT(f.RegisterJoining(1, "fp32"), IsOk());
  ASSERT_THAT(f.Join(1), IsOk());
  EXPECT_FALSE(f.Pull(0, 0)->handover_to().empty());
  f.Drop(1, 2);
  EXPECT_THAT(f.Join(1), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("NOT_REGISTERED")));
  EXPECT_TRUE(f.Pull(0, 0)->handover_to().empty());
}

TEST(ServerCoreTest, BadOptions) {
  ServerCoreOptions o = Options("nonsense", 1);
  EXPECT_THAT(ServerCore::Create(o), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("codec")));
  o = Options("onebit", 1);
  o.shard = 2;
  EXPECT_THAT(ServerCore::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::server
