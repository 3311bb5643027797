// ps_load_bench: synthetic parameter-server workers that load `qserver` shards over gRPC with the
// real protocol (proto/ps.proto, the PS communicator's channel settings from
// worker/comm/ps_rpc.h), to measure how fast a server aggregates compared with what its link
// allows. The training computation is left out on purpose: on a small machine eight real
// `qtrain` workers are CPU-bound long before the server's link is full.
//
// What one synthetic worker does (synchronous servers, `qserver --mode=sync`):
//   - Register with every shard (id --first_worker + i), wait until all --workers of the run
//     have registered (as the PS communicator does), send a heartbeat every second.
//   - Before timing: a P-parameter gradient (--params, values drawn from a fixed seed) is split
//     into buckets of --bucket_elements ("b0", "b1", ...; bucket i goes to shard i mod S) and
//     each bucket is encoded ONCE with the real codec (--codec, error feedback off), so no
//     per-step encode CPU competes with the server. Every worker pushes the same payloads.
//   - Per step, for every bucket: Push the pre-encoded payload (EncodedTensor with CRC-32) tagged
//     with the step, then Pull the step's result (long poll) until the server has closed the
//     round. --inflight lanes per worker run concurrently, lane t owning buckets t, t+K, ...: a
//     lane pushes bucket b of step s+1 as soon as it has pulled b's step s, so while one bucket
//     waits for the slowest worker others are on the wire and the link is never idle.
//   - --steps steps; the first --warmup_steps are not timed. The timed window runs from the
//     moment the worker has completed warmup_steps x buckets bucket-rounds to the last one.
//
// Check before figures (as the repository's benchmarks do): because every worker pushes the same
// payload, the mean is decode(payload), and for codecs that re-encode a decoded payload to itself
// (fp32, fp16, onebit, terngrad) the server's update must decode back to it: each worker checks
// the last step of every bucket (relative error <= 1e-5 of the bucket's largest value; qsgd's
// stochastic rounding and threshold's selection with the server's residual make their updates
// differ, so for them only that the update decodes). Also that every update of a fixed-size
// codec has the size of the first, and that every round closed with all workers
// (contributors == --workers, i.e. no round closed by the server's deadline). A failed check
// exits 1 without figures.
//
// Output, per worker: bytes up and down (payload = the codec's bytes: packed bits, scales,
// params; wire = the serialized EncodedTensor envelope that crosses the link), steps/s and
// goodput. Then every worker sends its figures to shard 0 in one COLLECTIVE_SUM, and the process
// that holds worker 0 prints the total: the server's receive and send rates, steps/s, and, with
// --link_mbit R, the link-rate bound of the same run,
//   bound steps/s = R / (8 x max(bytes the server receives per step, bytes it sends per step)),
// counting the wire bytes of every push and update (the shard's link is full duplex under tc, so
// receive and send limit separately), and the measured fraction of it. One "RESULT key=value ..."
// line carries the totals for scripts (deploy/ps-bandwidth-bench.sh).
//
//   qserver --workers=2 --codec=onebit --listen=127.0.0.1:7070 &
//   ps_load_bench --ps=127.0.0.1:7070 --workers=2 --local_workers=2 --params=25000000
//
// Exit status: 0 with figures; 1 on a protocol error, a timeout (--timeout) or a failed check;
// 2 on bad flags.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/malloc_tuning.h"
#include "common/status_macros.h"
#include "compression/codec.h"
#include "compression/rng.h"
#include "compression/wire.h"
#include "proto/ps.grpc.pb.h"
#include "worker/comm/bucket_codec.h"
#include "worker/comm/ps_rpc.h"

ABSL_FLAG(std::string, ps, "", "host:port of each qserver shard, in shard order (required).");
ABSL_FLAG(std::string, token, "", "The servers' --token.");
ABSL_FLAG(int, workers, 0, "Workers of the run: the servers' --workers (required; checked).");
ABSL_FLAG(int, local_workers, 1, "Synthetic workers in this process.");
ABSL_FLAG(int, first_worker, 0, "Worker id of this process's first worker (ids are consecutive).");
ABSL_FLAG(int64_t, params, 25'000'000, "Parameters of the synthetic model (P).");
ABSL_FLAG(int64_t, bucket_elements, 1 << 20, "Elements per bucket (the last may be shorter).");
ABSL_FLAG(int, inflight, 4, "Concurrent bucket lanes per worker.");
ABSL_FLAG(int, steps, 20, "Steps each worker runs (every worker of the run must run as many).");
ABSL_FLAG(int, warmup_steps, 2, "Leading steps that are not timed (< --steps).");
ABSL_FLAG(std::string, codec, "onebit", "Codec spec; must equal the servers' --codec.");
ABSL_FLAG(double, link_mbit, 0, "The server's link rate in Mbit/s for the yardstick (0: none).");
ABSL_FLAG(double, timeout, 120, "Seconds any one operation (with its retries) may take.");
ABSL_FLAG(double, rpc_timeout, 10, "Deadline of each RPC in seconds.");
ABSL_FLAG(double, max_message_mb, 64, "gRPC message limit in MiB (as the servers').");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the synthetic gradient.");

namespace qtrain::bench {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Whether encode(decode(t)) == t for this codec's payloads, so the server's re-encoded mean of
// identical pushes decodes to the pushed values (see the file comment).
bool ReencodesExactly(compression::CodecId id) {
  return id == compression::CodecId::kFp32 || id == compression::CodecId::kFp16 ||
         id == compression::CodecId::kOneBit || id == compression::CodecId::kTernGrad;
}

// CPU seconds (user + system) of this process so far, all threads.
double ProcessCpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

struct Options {
  std::vector<std::string> servers;
  std::string token;
  int world = 0;
  int local_workers = 1;
  int first_worker = 0;
  int64_t params = 0;
  int64_t bucket_elements = 0;
  int inflight = 1;
  int steps = 1;
  int warmup_steps = 0;
  std::string codec;
  double link_mbit = 0;
  double timeout = 120;
  double rpc_timeout = 10;
  uint64_t max_message_bytes = 0;
  uint64_t seed = 1;
};

// One bucket of the synthetic gradient, encoded once.
struct Bucket {
  uint32_t id = 0;
  int64_t elements = 0;
  pb::EncodedTensor encoded;   // with CRC-32, as the PS communicator sends it
  uint64_t payload_bytes = 0;  // the codec's bytes: payload + scales + params
  uint64_t wire_bytes = 0;     // encoded.ByteSizeLong()
};

// Figures of one worker, written by its lanes.
struct Counters {
  std::atomic<uint64_t> up_wire{0}, up_payload{0}, down_wire{0}, down_payload{0};
  std::atomic<uint64_t> pushes{0}, repushes{0}, stale{0}, polls{0};
  std::atomic<int64_t> rounds_done{0};
};

class Worker {
 public:
  Worker(const Options& o, int id, const std::vector<Bucket>& buckets,
         std::vector<std::unique_ptr<pb::ParameterServer::Stub>>* stubs)
      : o_(o), id_(id), buckets_(buckets), stubs_(*stubs), last_(buckets.size()) {}

  int id() const { return id_; }
  Counters& counters() { return counters_; }

  absl::Status Register() {
    for (size_t s = 0; s < stubs_.size(); ++s) {
      pb::RegisterRequest request;
      request.set_token(o_.token);
      request.set_worker_id(id_);
      request.set_shard(static_cast<uint32_t>(s));
      request.set_num_shards(static_cast<uint32_t>(stubs_.size()));
      request.set_codec_spec(o_.codec);
      pb::RegisterResponse response;
      RETURN_IF_ERROR(Retry("register", [&] {
        return comm::CallWithDeadline(o_.rpc_timeout, [&](grpc::ClientContext* c) {
          return stubs_[s]->Register(c, request, &response);
        });
      }));
      if (response.world_size() != o_.world) {
        return absl::FailedPreconditionError(
            absl::StrCat("server ", o_.servers[s], " runs --workers=", response.world_size(),
                         "; this benchmark was told --workers=", o_.world));
      }
      if (response.mode() != pb::PS_MODE_SYNC) {
        return absl::FailedPreconditionError(absl::StrCat(
            "server ", o_.servers[s], " is asynchronous; the benchmark needs --mode=sync"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Heartbeat() {
    for (size_t s = 0; s < stubs_.size(); ++s) {
      pb::HeartbeatRequest request;
      request.set_token(o_.token);
      request.set_worker_id(id_);
      request.set_shard(static_cast<uint32_t>(s));
      pb::HeartbeatResponse response;
      RETURN_IF_ERROR(comm::CallWithDeadline(2.0, [&](grpc::ClientContext* c) {
        return stubs_[s]->Heartbeat(c, request, &response);
      }));
    }
    return absl::OkStatus();
  }

  void Leave() {
    for (size_t s = 0; s < stubs_.size(); ++s) {
      pb::LeaveRequest request;
      request.set_token(o_.token);
      request.set_worker_id(id_);
      request.set_shard(static_cast<uint32_t>(s));
      pb::LeaveResponse response;
      (void)comm::CallWithDeadline(
          1.0, [&](grpc::ClientContext* c) { return stubs_[s]->Leave(c, request, &response); });
    }
  }

  // Runs every lane to the end. `start` is when timing may begin (all workers registered).
  absl::Status Run(Clock::time_point start) {
    window_start_ = start;
    cpu_start_ = ProcessCpuSeconds();
    const int64_t total = static_cast<int64_t>(buckets_.size());
    warmup_rounds_ = o_.warmup_steps * total;
    all_rounds_ = o_.steps * total;
    std::vector<std::thread> lanes;
    std::vector<absl::Status> results(static_cast<size_t>(o_.inflight));
    for (int t = 0; t < o_.inflight; ++t) {
      lanes.emplace_back([this, t, &results] { results[t] = Lane(t); });
    }
    for (std::thread& lane : lanes) lane.join();
    for (const absl::Status& s : results) RETURN_IF_ERROR(s);
    return absl::OkStatus();
  }

  double window_seconds() const {
    return std::chrono::duration<double>(window_end_ - window_start_).count();
  }
  // CPU seconds of the whole process during this worker's timed window.
  double window_cpu_seconds() const { return cpu_end_ - cpu_start_; }

  // The checks of the file comment, on the last pulled update of every bucket.
  absl::Status Verify(const comm::BucketCodec& codec) const {
    for (size_t i = 0; i < buckets_.size(); ++i) {
      const Bucket& b = buckets_[i];
      ASSIGN_OR_RETURN(compression::EncodedTensor pushed, compression::FromProto(b.encoded));
      ASSIGN_OR_RETURN(compression::EncodedTensor pulled, compression::FromProto(last_[i]));
      std::vector<float> want(static_cast<size_t>(b.elements), 0.0f);
      std::vector<float> got(want.size(), 0.0f);
      RETURN_IF_ERROR(codec.codec().DecodeAdd(pushed, want));
      RETURN_IF_ERROR(codec.codec().DecodeAdd(pulled, got));
      if (!ReencodesExactly(codec.codec().id())) continue;  // it decodes; that is all we know
      float scale = 0;
      for (float v : want) scale = std::max(scale, std::fabs(v));
      for (size_t k = 0; k < want.size(); ++k) {
        if (!(std::fabs(got[k] - want[k]) <= 1e-5f * scale)) {
          return absl::InternalError(absl::StrCat("worker ", id_, " bucket ", b.id, " element ", k,
                                                  ": the server's update decodes to ", got[k],
                                                  ", the mean of the pushes is ", want[k]));
        }
      }
    }
    if (short_rounds_.load() != 0) {
      return absl::InternalError(absl::StrCat(
          "worker ", id_, ": ", short_rounds_.load(), " rounds closed with fewer than ", o_.world,
          " contributors (by the server's --step_deadline): the figures would not be a full load"));
    }
    if (codec.fixed_size() && size_changes_.load() != 0) {
      return absl::InternalError(absl::StrCat("worker ", id_, ": ", size_changes_.load(),
                                              " updates differ in size from the first"));
    }
    return absl::OkStatus();
  }

 private:
  // Retries transient failures (and FUTURE_STEP) with backoff until --timeout.
  template <typename Fn>
  absl::Status Retry(const char* what, Fn fn) {
    const Clock::time_point start = Clock::now();
    double backoff = 0.01;
    for (;;) {
      absl::Status last = fn();
      if (last.ok()) return last;
      const pb::PsErrorReason reason = comm::ReasonOf(last);
      if (!comm::IsTransient(last) && reason != pb::FUTURE_STEP) return last;
      if (SecondsSince(start) > o_.timeout) {
        return absl::DeadlineExceededError(absl::StrCat("worker ", id_, ": ", what,
                                                        " gave up after ", o_.timeout,
                                                        " s (--timeout); last: ", last.ToString()));
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(backoff));
      backoff = std::min(1.0, backoff * 2);
    }
  }

  absl::Status Push(pb::PushRequest& push) {
    const int shard = static_cast<int>(push.shard());
    pb::PushResponse response;
    absl::Status s = Retry("push", [&] {
      return comm::CallWithDeadline(o_.rpc_timeout, [&](grpc::ClientContext* c) {
        return stubs_[shard]->Push(c, push, &response);
      });
    });
    counters_.pushes.fetch_add(1, std::memory_order_relaxed);
    counters_.up_wire.fetch_add(push.gradient().ByteSizeLong(), std::memory_order_relaxed);
    if (comm::ReasonOf(s) == pb::STALE_STEP) {
      counters_.stale.fetch_add(1, std::memory_order_relaxed);
      return absl::OkStatus();  // the round closed without us (deadline); pull it anyway
    }
    return s;
  }

  absl::Status Lane(int lane) {
    const int shards = static_cast<int>(stubs_.size());
    std::vector<pb::PushRequest> pushes;
    std::vector<size_t> mine;
    for (size_t i = static_cast<size_t>(lane); i < buckets_.size();
         i += static_cast<size_t>(o_.inflight)) {
      mine.push_back(i);
      pb::PushRequest& p = pushes.emplace_back();
      p.set_token(o_.token);
      p.set_worker_id(id_);
      p.set_shard(buckets_[i].id % static_cast<uint32_t>(shards));
      p.set_bucket(buckets_[i].id);
      *p.mutable_gradient() = buckets_[i].encoded;
    }
    for (int step = 0; step < o_.steps; ++step) {
      for (size_t k = 0; k < mine.size(); ++k) {
        const Bucket& b = buckets_[mine[k]];
        pb::PushRequest& push = pushes[k];
        push.set_step(step);
        RETURN_IF_ERROR(Push(push));
        counters_.up_payload.fetch_add(b.payload_bytes, std::memory_order_relaxed);
        pb::PullRequest pull;
        pull.set_token(o_.token);
        pull.set_worker_id(id_);
        pull.set_shard(push.shard());
        pull.set_step(step);
        pull.set_bucket(b.id);
        pull.set_wait_ms(1000);
        pb::PullResponse response;
        const Clock::time_point start = Clock::now();
        for (;;) {
          response.Clear();
          RETURN_IF_ERROR(Retry("pull", [&] {
            return comm::CallWithDeadline(o_.rpc_timeout, [&](grpc::ClientContext* c) {
              return stubs_[push.shard()]->Pull(c, pull, &response);
            });
          }));
          if (response.ready()) break;
          counters_.polls.fetch_add(1, std::memory_order_relaxed);
          if (response.need_push()) {
            counters_.repushes.fetch_add(1, std::memory_order_relaxed);
            RETURN_IF_ERROR(Push(push));
          }
          if (SecondsSince(start) > o_.timeout) {
            return absl::DeadlineExceededError(absl::StrCat(
                "worker ", id_, ": bucket ", b.id, " step ", step, " did not close within ",
                o_.timeout, " s (--timeout); are all --workers=", o_.world, " running?"));
          }
        }
        if (response.updates_size() != 1) {
          return absl::InternalError(absl::StrCat("worker ", id_, ": bucket ", b.id, " step ", step,
                                                  ": the server sent ", response.updates_size(),
                                                  " updates, want 1"));
        }
        const pb::EncodedTensor& update = response.updates(0);
        counters_.down_wire.fetch_add(update.ByteSizeLong(), std::memory_order_relaxed);
        counters_.down_payload.fetch_add(update.payload().size() +
                                             4 * uint64_t(update.scales_size()) +
                                             4 * uint64_t(update.params_size()),
                                         std::memory_order_relaxed);
        if (response.contributors() != o_.world) short_rounds_.fetch_add(1);
        pb::EncodedTensor& last = last_[mine[k]];
        if (step > 0 && last.ByteSizeLong() != update.ByteSizeLong()) size_changes_.fetch_add(1);
        if (step == 0 || step == o_.steps - 1) {
          last = update;  // step 0: the size reference; the last step: verified after timing
        }
        const int64_t done = counters_.rounds_done.fetch_add(1) + 1;
        if (done == warmup_rounds_ && o_.warmup_steps > 0) {
          window_start_ = Clock::now();
          cpu_start_ = ProcessCpuSeconds();
        }
        if (done == all_rounds_) {
          window_end_ = Clock::now();
          cpu_end_ = ProcessCpuSeconds();
        }
      }
    }
    return absl::OkStatus();
  }

  const Options& o_;
  const int id_;
  const std::vector<Bucket>& buckets_;
  std::vector<std::unique_ptr<pb::ParameterServer::Stub>>& stubs_;
  Counters counters_;
  // Written by the lane that completes the round in question; read after the lanes are joined.
  Clock::time_point window_start_, window_end_;
  double cpu_start_ = 0, cpu_end_ = 0;
  int64_t warmup_rounds_ = 0;
  int64_t all_rounds_ = 0;
  std::vector<pb::EncodedTensor> last_;  // per bucket: each index written by one lane only
  std::atomic<int64_t> short_rounds_{0};
  std::atomic<int64_t> size_changes_{0};
};

absl::StatusOr<std::vector<Bucket>> EncodeBuckets(const Options& o, comm::BucketCodec& codec) {
  std::vector<Bucket> buckets;
  compression::Rng rng(o.seed);
  std::vector<float> values;
  for (int64_t at = 0, i = 0; at < o.params; at += o.bucket_elements, ++i) {
    Bucket b;
    b.id = static_cast<uint32_t>(i);
    b.elements = std::min(o.bucket_elements, o.params - at);
    // Gradient-like values: symmetric, spread over three decades, never zero.
    values.resize(static_cast<size_t>(b.elements));
    const uint32_t sign_key = rng.NextStream(), size_key = rng.NextStream();
    for (size_t k = 0; k < values.size(); ++k) {
      const float magnitude =
          1e-3f * std::exp2(10.0f * compression::StreamUniform(size_key, k) - 5.0f);
      values[k] = compression::StreamUniform(sign_key, k) < 0.5f ? magnitude : -magnitude;
    }
    const std::string name = absl::StrCat("b", i);
    compression::EncodedTensor encoded;
    ASSIGN_OR_RETURN(float scale, codec.Prepare(name, values));
    RETURN_IF_ERROR(codec.Encode(name, values, scale, rng, &encoded));
    b.payload_bytes =
        encoded.payload.size() + 4 * encoded.scales.size() + 4 * encoded.params.size();
    b.encoded = compression::ToProto(encoded, compression::Checksum::kCrc32);
    b.wire_bytes = b.encoded.ByteSizeLong();
    if (b.wire_bytes + 4096 > o.max_message_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("a bucket of ", b.elements, " elements encodes to ", b.wire_bytes,
                       " bytes, over --max_message_mb; use a smaller --bucket_elements"));
    }
    buckets.push_back(std::move(b));
  }
  return buckets;
}

// Waits until every worker of the run has registered with every shard.
absl::Status WaitForAll(const Options& o,
                        std::vector<std::unique_ptr<pb::ParameterServer::Stub>>& stubs) {
  const Clock::time_point start = Clock::now();
  for (size_t s = 0; s < stubs.size(); ++s) {
    for (;;) {
      pb::StatusRequest request;
      request.set_token(o.token);
      pb::StatusResponse response;
      absl::Status st = comm::CallWithDeadline(o.rpc_timeout, [&](grpc::ClientContext* c) {
        return stubs[s]->Status(c, request, &response);
      });
      if (st.ok() && response.registered() >= o.world) break;
      if (!st.ok() && !comm::IsTransient(st)) return st;
      if (SecondsSince(start) > o.timeout) {
        return absl::DeadlineExceededError(absl::StrCat(
            "only ", response.registered(), " of ", o.world, " workers registered with ",
            o.servers[s], " within ", o.timeout, " s (--timeout)"));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  return absl::OkStatus();
}

std::string Mb(double bytes) { return absl::StrCat(std::round(bytes / 1e4) / 100); }

absl::Status Run(const Options& o) {
  ASSIGN_OR_RETURN(std::unique_ptr<comm::BucketCodec> codec,
                   comm::BucketCodec::Create(o.codec, comm::FeedbackChoice::kOff));
  const Clock::time_point encode_start = Clock::now();
  ASSIGN_OR_RETURN(std::vector<Bucket> buckets, EncodeBuckets(o, *codec));
  uint64_t step_wire = 0, step_payload = 0;
  for (const Bucket& b : buckets) {
    step_wire += b.wire_bytes;
    step_payload += b.payload_bytes;
  }
  std::printf(
      "ps_load_bench: %lld parameters in %zu buckets of <= %lld, codec %s: %llu payload "
      "bytes per worker and step (%llu on the wire), encoded once in %.2f s; workers "
      "%d..%d of %d, %d lanes each, %d steps (%d untimed)\n",
      static_cast<long long>(o.params), buckets.size(), static_cast<long long>(o.bucket_elements),
      codec->Describe().c_str(), static_cast<unsigned long long>(step_payload),
      static_cast<unsigned long long>(step_wire), SecondsSince(encode_start), o.first_worker,
      o.first_worker + o.local_workers - 1, o.world, o.inflight, o.steps, o.warmup_steps);
  std::fflush(stdout);

  comm::PsChannelOptions channel;
  channel.max_message_bytes = o.max_message_bytes;
  // One channel (one connection) per worker and server, as each qtrain process has.
  std::vector<std::vector<std::unique_ptr<pb::ParameterServer::Stub>>> stubs(
      static_cast<size_t>(o.local_workers));
  std::vector<std::unique_ptr<Worker>> workers;
  for (int w = 0; w < o.local_workers; ++w) {
    for (const std::string& target : o.servers) {
      ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> c, comm::NewPsChannel(target, channel));
      stubs[w].push_back(pb::ParameterServer::NewStub(c));
    }
    workers.push_back(std::make_unique<Worker>(o, o.first_worker + w, buckets, &stubs[w]));
    RETURN_IF_ERROR(workers.back()->Register());
  }
  RETURN_IF_ERROR(WaitForAll(o, stubs[0]));

  // Heartbeats keep the workers in the quorum while lanes wait (and during the final sum).
  std::mutex hb_mu;
  std::condition_variable hb_cv;
  bool stop = false;
  std::thread heartbeat([&] {
    std::unique_lock<std::mutex> lock(hb_mu);
    while (!hb_cv.wait_for(lock, std::chrono::seconds(1), [&] { return stop; })) {
      for (auto& w : workers) {
        absl::Status s = w->Heartbeat();
        if (!s.ok()) QTRAIN_LOG(WARNING) << "worker " << w->id() << ": heartbeat: " << s;
      }
    }
  });
  struct StopHeartbeat {
    std::mutex& mu;
    std::condition_variable& cv;
    bool& stop;
    std::thread& thread;
    ~StopHeartbeat() {
      {
        std::lock_guard<std::mutex> lock(mu);
        stop = true;
      }
      cv.notify_all();
      thread.join();
    }
  } stop_heartbeat{hb_mu, hb_cv, stop, heartbeat};

  const Clock::time_point start = Clock::now();
  std::vector<absl::Status> results(workers.size());
  {
    std::vector<std::thread> threads;
    for (size_t w = 0; w < workers.size(); ++w) {
      threads.emplace_back([&, w] { results[w] = workers[w]->Run(start); });
    }
    for (std::thread& t : threads) t.join();
  }
  for (const absl::Status& s : results) RETURN_IF_ERROR(s);
  for (auto& w : workers) RETURN_IF_ERROR(w->Verify(*codec));

  // Per worker, then the sum over the run's workers through shard 0.
  const int timed = o.steps - o.warmup_steps;
  std::vector<std::vector<double>> figures;
  for (auto& w : workers) {
    Counters& c = w->counters();
    const double seconds = w->window_seconds();
    const double rate = timed / seconds;
    const double up = static_cast<double>(c.up_wire.load()) / o.steps;
    const double down = static_cast<double>(c.down_wire.load()) / o.steps;
    // This worker's share of its process's CPU in the timed window, per timed step.
    const double cpu = w->window_cpu_seconds() / o.local_workers / timed;
    std::printf(
        "ps_load_bench: worker %d: %d steps (%d timed) in %.3f s = %.3f steps/s; up "
        "%llu bytes (payload %llu), down %llu bytes (payload %llu); per step up %s MB, "
        "down %s MB; goodput up %.1f Mbit/s, down %.1f Mbit/s; %llu pushes, %llu "
        "repeated, %llu stale, %llu polls; %.3f CPU s per step (its process / local workers)\n",
        w->id(), o.steps, timed, seconds, rate, static_cast<unsigned long long>(c.up_wire.load()),
        static_cast<unsigned long long>(c.up_payload.load()),
        static_cast<unsigned long long>(c.down_wire.load()),
        static_cast<unsigned long long>(c.down_payload.load()), Mb(up).c_str(), Mb(down).c_str(),
        up * rate * 8 / 1e6, down * rate * 8 / 1e6,
        static_cast<unsigned long long>(c.pushes.load()),
        static_cast<unsigned long long>(c.repushes.load()),
        static_cast<unsigned long long>(c.stale.load()),
        static_cast<unsigned long long>(c.polls.load()), cpu);
    figures.push_back({rate, up, down, up * rate, down * rate, seconds,
                       static_cast<double>(c.up_payload.load()) / o.steps,
                       static_cast<double>(c.down_payload.load()) / o.steps, cpu});
  }
  std::fflush(stdout);
  std::vector<absl::StatusOr<pb::CollectiveResponse>> sums(workers.size(),
                                                           absl::UnknownError("not run"));
  {
    std::vector<std::thread> threads;
    for (size_t w = 0; w < workers.size(); ++w) {
      threads.emplace_back([&, w] {
        pb::CollectiveRequest request;
        request.set_token(o.token);
        request.set_worker_id(workers[w]->id());
        request.set_shard(0);
        request.set_seq(0);
        request.set_kind(pb::COLLECTIVE_SUM);
        request.set_size(figures[w].size());
        request.mutable_values()->Assign(figures[w].begin(), figures[w].end());
        request.set_wait_ms(1000);
        const Clock::time_point begin = Clock::now();
        for (;;) {
          pb::CollectiveResponse response;
          absl::Status s = comm::CallWithDeadline(o.rpc_timeout, [&](grpc::ClientContext* c) {
            return stubs[w][0]->Collective(c, request, &response);
          });
          if (s.ok() && response.ready()) {
            sums[w] = response;
            return;
          }
          if (!s.ok() && !comm::IsTransient(s)) {
            sums[w] = s;
            return;
          }
          if (SecondsSince(begin) > o.timeout) {
            sums[w] = absl::DeadlineExceededError("the final sum of the figures did not close");
            return;
          }
        }
      });
    }
    for (std::thread& t : threads) t.join();
  }
  for (auto& s : sums) RETURN_IF_ERROR(s.status());
  for (auto& w : workers) w->Leave();
  if (o.first_worker != 0) return absl::OkStatus();

  const pb::CollectiveResponse& sum = *sums[0];
  if (sum.values_size() != 9 || sum.contributors() != o.world) {
    return absl::InternalError(
        absl::StrCat("the final sum has ", sum.contributors(), " contributors, want ", o.world));
  }
  const double steps_per_s = sum.values(0) / o.world;  // mean over workers
  const double in_step = sum.values(1), out_step = sum.values(2);
  const double in_rate = sum.values(3), out_rate = sum.values(4);
  const double window = sum.values(5) / o.world;
  const double workers_cpu = sum.values(8);
  std::printf(
      "ps_load_bench: total over %d workers: %.3f steps/s (mean timed window %.2f s); the "
      "servers receive %s MB and send %s MB per step (payload %s / %s MB); goodput in "
      "%.1f Mbit/s, out %.1f Mbit/s; the workers use %.3f CPU s per step\n",
      o.world, steps_per_s, window, Mb(in_step).c_str(), Mb(out_step).c_str(),
      Mb(sum.values(6)).c_str(), Mb(sum.values(7)).c_str(), in_rate * 8 / 1e6, out_rate * 8 / 1e6,
      workers_cpu);
  double bound = 0, fraction = 0;
  if (o.link_mbit > 0) {
    // Full duplex: receiving and sending each have the whole rate. With S shards each link
    // carries 1/S of the bytes (buckets are spread i mod S; exact when they divide evenly).
    const double per_link = std::max(in_step, out_step) / static_cast<double>(o.servers.size());
    bound = o.link_mbit * 1e6 / 8 / per_link;
    fraction = steps_per_s / bound;
    std::printf(
        "ps_load_bench: link-rate bound at %.0f Mbit/s per server: %.3f steps/s; "
        "measured %.3f steps/s = %.1f%% of the bound\n",
        o.link_mbit, bound, steps_per_s, 100 * fraction);
  }
  std::printf(
      "RESULT workers=%d servers=%zu params=%lld buckets=%zu inflight=%d steps=%d "
      "steps_per_s=%.4f in_bytes_per_step=%.0f out_bytes_per_step=%.0f "
      "in_mbit_s=%.2f out_mbit_s=%.2f link_mbit=%.0f bound_steps_per_s=%.4f "
      "fraction=%.4f workers_cpu_s_per_step=%.4f\n",
      o.world, o.servers.size(), static_cast<long long>(o.params), buckets.size(), o.inflight,
      o.steps, steps_per_s, in_step, out_step, in_rate * 8 / 1e6, out_rate * 8 / 1e6, o.link_mbit,
      bound, fraction, workers_cpu);
  std::fflush(stdout);
  return absl::OkStatus();
}

absl::StatusOr<Options> ReadFlags() {
  Options o;
  const std::string ps = absl::GetFlag(FLAGS_ps);
  for (const std::string& entry : std::vector<std::string>(absl::StrSplit(ps, ','))) {
    const size_t colon = entry.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == entry.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--ps must be host:port[,host:port...]; got '", ps, "'"));
    }
    o.servers.push_back(entry);
  }
  o.token = absl::GetFlag(FLAGS_token);
  o.world = absl::GetFlag(FLAGS_workers);
  o.local_workers = absl::GetFlag(FLAGS_local_workers);
  o.first_worker = absl::GetFlag(FLAGS_first_worker);
  o.params = absl::GetFlag(FLAGS_params);
  o.bucket_elements = absl::GetFlag(FLAGS_bucket_elements);
  o.inflight = absl::GetFlag(FLAGS_inflight);
  o.steps = absl::GetFlag(FLAGS_steps);
  o.warmup_steps = absl::GetFlag(FLAGS_warmup_steps);
  o.codec = absl::GetFlag(FLAGS_codec);
  o.link_mbit = absl::GetFlag(FLAGS_link_mbit);
  o.timeout = absl::GetFlag(FLAGS_timeout);
  o.rpc_timeout = absl::GetFlag(FLAGS_rpc_timeout);
  o.seed = absl::GetFlag(FLAGS_seed);
  const double mb = absl::GetFlag(FLAGS_max_message_mb);
  if (o.world < 1)
    return absl::InvalidArgumentError("--workers must be >= 1 (the servers' --workers)");
  if (o.local_workers < 1 || o.first_worker < 0 || o.first_worker + o.local_workers > o.world) {
    return absl::InvalidArgumentError(
        absl::StrCat("--first_worker=", o.first_worker, " --local_workers=", o.local_workers,
                     " must name ids inside [0, --workers=", o.world, ")"));
  }
  if (o.params < 1 || o.params > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError("--params must be in [1, 2^31 - 1]");
  }
  if (o.bucket_elements < 1) return absl::InvalidArgumentError("--bucket_elements must be >= 1");
  if (o.inflight < 1 || o.inflight > 64)
    return absl::InvalidArgumentError("--inflight must be in [1, 64]");
  if (o.steps < 1 || o.warmup_steps < 0 || o.warmup_steps >= o.steps) {
    return absl::InvalidArgumentError("need --steps >= 1 and 0 <= --warmup_steps < --steps");
  }
  if (!(o.link_mbit >= 0)) return absl::InvalidArgumentError("--link_mbit must be >= 0");
  if (!(o.timeout > 0) || !(o.rpc_timeout > 0)) {
    return absl::InvalidArgumentError("--timeout and --rpc_timeout must be > 0");
  }
  if (!(mb > 0) || mb > 2047)
    return absl::InvalidArgumentError("--max_message_mb must be in (0, 2047]");
  o.max_message_bytes = static_cast<uint64_t>(mb * 1024 * 1024);
  return o;
}

}  // namespace
}  // namespace qtrain::bench

int main(int argc, char** argv) {
  qtrain::KeepLargeAllocationsInHeap();  // common/malloc_tuning.h
  absl::SetProgramUsageMessage(
      "synthetic parameter-server workers: push a pre-encoded gradient and pull the update, "
      "pipelined, and print the rates against the server's link (see server/bench/"
      "ps_load_bench.cc).\n  ps_load_bench --ps=127.0.0.1:7070 --workers=2 --local_workers=2");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    std::fprintf(stderr, "ps_load_bench: unexpected argument '%s' (see --help)\n", positional[1]);
    return 2;
  }
  absl::StatusOr<qtrain::bench::Options> options = qtrain::bench::ReadFlags();
  if (!options.ok()) {
    std::fprintf(stderr, "ps_load_bench: %s\n", std::string(options.status().message()).c_str());
    return 2;
  }
  absl::Status status = qtrain::bench::Run(*options);
  if (!status.ok()) {
    std::fprintf(stderr, "ps_load_bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
