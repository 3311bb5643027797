#include "worker/comm/ps_communicator.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/timer.h"
#include "compression/wire.h"
#include "grpcpp/grpcpp.h"
#include "proto/ps.grpc.pb.h"
#include "worker/comm/ps_rpc.h"

namespace qtrain::comm {
namespace {

using Clock = std::chrono::steady_clock;

absl::StatusOr<uint32_t> BucketIndex(std::string_view key) {
  uint32_t index = 0;
  if (key.size() < 2 || key[0] != 'b' || !absl::SimpleAtoi(std::string(key.substr(1)), &index)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PS mode averages buckets keyed b<index> (the trainer's); got '", std::string(key), "'"));
  }
  return index;
}

class PsCommunicator final : public Communicator {
 public:
  PsCommunicator(PsOptions options, std::unique_ptr<BucketCodec> codec)
      : options_(std::move(options)),
        codec_(std::move(codec)),
        rng_(RankSeed(options_.seed, 0)),
        id_(options_.worker_id) {}

  ~PsCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(hb_mu_);
      stop_ = true;
    }
    hb_cv_.notify_all();
    if (heartbeat_.joinable()) heartbeat_.join();
    for (size_t s = 0; s < stubs_.size() && registered_; ++s) {
      pb::LeaveRequest request;
      request.set_token(options_.token);
      request.set_worker_id(id_);
      request.set_shard(static_cast<uint32_t>(s));
      pb::LeaveResponse response;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(1));
      (void)stubs_[s]->Leave(&context, request, &response);
    }
  }

  absl::Status Connect() {
    PsChannelOptions channel;
    channel.max_message_bytes = options_.max_message_bytes;
    channel.tls_ca = options_.tls_ca;
    channel.tls_cert = options_.tls_cert;
    channel.tls_key = options_.tls_key;
    for (const std::string& target : options_.servers) {
      ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> c, NewPsChannel(target, channel));
      stubs_.push_back(pb::ParameterServer::NewStub(c));
    }
    // Shard 0 first: it may assign the id that the others then see.
    for (size_t s = 0; s < stubs_.size(); ++s) {
      RETURN_IF_ERROR(Retry("register", "", [&] { return Register(static_cast<int>(s)); }));
    }
    registered_ = true;
    rng_ = compression::Rng(RankSeed(options_.seed, id_));  // rank r's stream, as under MPI
    if (joining_) {
      QTRAIN_LOG(INFO) << "worker " << id_ << ": the job is already running; joining it (the "
                       << "state comes from a live worker at its next step boundary)";
    }
    // Wait until every worker of the run has registered, so that no round closes early.
    const Clock::time_point start = Clock::now();
    for (size_t s = 0; s < stubs_.size(); ++s) {
      for (;;) {
        pb::StatusRequest request;
        request.set_token(options_.token);
        pb::StatusResponse response;
        absl::Status st = Call(static_cast<int>(s), options_.rpc_timeout_seconds,
                               [&](grpc::ClientContext* c) {
                                 return stubs_[s]->Status(c, request, &response);
                               });
        if (st.ok() && response.registered() >= world_size_) break;
        if (!st.ok() && !IsTransient(st)) return st;
        if (std::chrono::duration<double>(Clock::now() - start).count() > options_.timeout_seconds) {
          return absl::DeadlineExceededError(absl::StrCat(
              "worker ", id_, ": only ", response.registered(), " of ", world_size_,
              " workers registered with ", options_.servers[s], " within ",
              options_.timeout_seconds, " s"));
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    heartbeat_ = std::thread([this] { HeartbeatLoop(); });
    if (!joining_) has_state_ = true;  // a fresh job: the trainer's start-up broadcast follows
    return absl::OkStatus();
  }

  absl::StatusOr<std::optional<JoinState>> JoinRunningJob() override {
    if (!joining_ || has_state_) return std::nullopt;
    pb::JoinRequest request;
    request.set_token(options_.token);
    request.set_worker_id(id_);
    request.set_shard(0);
    request.set_wait_ms(1000);
    pb::JoinResponse response;
    std::string bytes;
    uint32_t pieces = 1;
    for (uint32_t piece = 0; piece < pieces; ++piece) {
      request.set_piece(piece);
      RETURN_IF_ERROR(Retry("join", "", [&]() -> absl::Status {
        response.Clear();
        absl::Status s = Call(0, options_.rpc_timeout_seconds, [&](grpc::ClientContext* c) {
          return stubs_[0]->Join(c, request, &response);
        });
        if (!s.ok()) return s;
        if (response.ready()) return absl::OkStatus();
        return absl::UnavailableError("the state is not handed over yet");
      }));
      if (piece == 0) pieces = response.pieces();
      if (response.pieces() != pieces) {
        return absl::InternalError("join: the handed-over state changed while it was read");
      }
      bytes += response.data();
    }
    pb::WorkerHandover handover;
    if (!handover.ParseFromString(bytes) || handover.state().size() % 4 != 0 ||
        handover.epoch() < 0 || handover.step() < 0 || handover.step_in_epoch() < 0) {
      return absl::DataLossError(absl::StrCat("join: the state handed over by worker ",
                                              response.donor(), " does not parse"));
    }
    JoinState state;
    state.donor = handover.donor();
    state.epoch = handover.epoch();
    state.step = handover.step();
    state.step_in_epoch = handover.step_in_epoch();
    state.best_test_accuracy = handover.best_test_accuracy();
    state.state.resize(handover.state().size() / 4);
    std::memcpy(state.state.data(), handover.state().data(), handover.state().size());
    // The peers' positions: their next collective, and (async) each bucket's round.
    collective_seq_ = handover.collective_seq();
    async_rounds_.clear();
    for (const auto& [bucket, round] : handover.async_rounds()) async_rounds_[bucket] = round;
    step_ = state.step;
    has_state_ = true;
    return std::optional<JoinState>(std::move(state));
  }

  bool HandoverRequested() const override { return !handover_to_.empty(); }

  absl::Status Handover(const JoinState& state) override {
    pb::WorkerHandover handover;
    handover.set_donor(id_);
    handover.set_epoch(state.epoch);
    handover.set_step(state.step);
    handover.set_step_in_epoch(state.step_in_epoch);
    handover.set_best_test_accuracy(state.best_test_accuracy);
    handover.set_collective_seq(collective_seq_);
    for (const auto& [bucket, round] : async_rounds_) (*handover.mutable_async_rounds())[bucket] = round;
    handover.set_state(reinterpret_cast<const char*>(state.state.data()), 4 * state.state.size());
    const std::string bytes = handover.SerializeAsString();
    const size_t piece_bytes = std::max<size_t>(1, options_.max_message_bytes / 2);
    const uint32_t pieces =
        static_cast<uint32_t>(std::max<size_t>(1, (bytes.size() + piece_bytes - 1) / piece_bytes));
    const std::vector<int> joiners = std::move(handover_to_);
    handover_to_.clear();
    for (int joiner : joiners) {
      Timer timer;
      absl::Status s;
      for (uint32_t piece = 0; piece < pieces && s.ok(); ++piece) {
        pb::HandoverRequest request;
        request.set_token(options_.token);
        request.set_worker_id(id_);
        request.set_shard(0);
        request.set_joiner(joiner);
        request.set_piece(piece);
        request.set_pieces(pieces);
        const size_t at = size_t{piece} * piece_bytes;
        request.set_data(bytes.substr(at, std::min(piece_bytes, bytes.size() - at)));
        s = Retry("handover", "", [&] {
          pb::HandoverResponse response;
          return Call(0, options_.rpc_timeout_seconds, [&](grpc::ClientContext* c) {
            return stubs_[0]->Handover(c, request, &response);
          });
        });
      }
      if (s.ok()) {
        QTRAIN_LOG(INFO) << "worker " << id_ << ": handed the state at epoch " << state.epoch
                         << ", step " << state.step << " over to joining worker " << joiner << " ("
                         << bytes.size() << " bytes in " << pieces << " piece(s), "
                         << timer.Seconds() << " s)";
      } else if (s.code() == absl::StatusCode::kDeadlineExceeded) {
        return s;  // the server stayed unreachable: this worker's next step would fail too
      } else {
        // The joiner went away, another worker serves it, or the server refused the upload:
        // the joiner's problem (it times out), never a reason to stop this worker.
        QTRAIN_LOG(WARNING) << "worker " << id_ << ": no handover to worker " << joiner << ": "
                            << s.message();
      }
    }
    return absl::OkStatus();
  }

  int rank() const override { return id_; }
  int world_size() const override { return world_size_; }
  std::string Describe() const override {
    return absl::StrCat("ps: worker ", id_, " of ", world_size_, ", ", options_.servers.size(),
                        " server(s) (", async_ ? "async" : "sync", "), codec ",
                        codec_->Describe());
  }
  void SetStep(int64_t step) override { step_ = step; }

  absl::Status AllReduceMean(std::string_view key, std::span<float> data,
                             StepStats* stats) override {
    ASSIGN_OR_RETURN(uint32_t bucket, BucketIndex(key));
    StepStats local;
    local.calls = 1;
    if (data.empty()) return absl::InvalidArgumentError("AllReduceMean: empty bucket");
    const int shard = static_cast<int>(bucket % stubs_.size());
    Timer timer;
    compression::EncodedTensor encoded;
    ASSIGN_OR_RETURN(float scale, codec_->Prepare(key, data));
    RETURN_IF_ERROR(codec_->Encode(key, data, scale, rng_, &encoded));
    pb::PushRequest push;
    push.set_token(options_.token);
    push.set_worker_id(id_);
    push.set_shard(static_cast<uint32_t>(shard));
    int64_t& async_round = async_rounds_[bucket];
    push.set_step(async_ ? async_round : step_);
    push.set_bucket(bucket);
    *push.mutable_gradient() = compression::ToProto(encoded, compression::Checksum::kCrc32);
    local.encode_seconds = timer.Seconds();
    local.bytes_sent = push.gradient().ByteSizeLong();
    timer.Reset();
    started_training_ = true;

    RETURN_IF_ERROR(PushOnce(push, key));
    pb::PullRequest pull;
    pull.set_token(options_.token);
    pull.set_worker_id(id_);
    pull.set_shard(static_cast<uint32_t>(shard));
    pull.set_step(push.step());
    pull.set_bucket(bucket);
    pull.set_wait_ms(1000);
    pb::PullResponse response;
    RETURN_IF_ERROR(Retry("pull", key, [&]() -> absl::Status {
      response.Clear();
      absl::Status s = Call(shard, options_.rpc_timeout_seconds, [&](grpc::ClientContext* c) {
        return stubs_[shard]->Pull(c, pull, &response);
      });
      if (!s.ok()) return s;
      if (response.ready()) return absl::OkStatus();
      if (response.need_push()) RETURN_IF_ERROR(PushOnce(push, key));
      return absl::UnavailableError("the round is not closed yet");  // poll again
    }));
    local.communicate_seconds = timer.Seconds();
    timer.Reset();
    if (shard == 0) {
      handover_to_.assign(response.handover_to().begin(), response.handover_to().end());
    }
    if (response.updates_size() < 1) {
      return absl::InternalError(absl::StrCat("bucket '", std::string(key), "' step ", step_,
                                              ": the server's answer holds no update"));
    }
    std::fill(data.begin(), data.end(), 0.0f);
    for (const pb::EncodedTensor& update : response.updates()) {
      local.bytes_received += update.ByteSizeLong();
      absl::StatusOr<compression::EncodedTensor> tensor = compression::FromProto(update);
      absl::Status s = tensor.ok() ? codec_->codec().DecodeAdd(*tensor, data) : tensor.status();
      if (!s.ok()) {
        return absl::Status(s.code(), absl::StrCat("bucket '", std::string(key), "' step ", step_,
                                                   ": the server's update does not decode: ",
                                                   s.message()));
      }
    }
    if (async_) {
      if (response.updates_size() > 1) {
        const float inv = 1.0f / static_cast<float>(response.updates_size());
        for (float& v : data) v *= inv;
      }
      async_round += response.updates_size();
    }
    local.decode_seconds = timer.Seconds();
    if (stats != nullptr) *stats += local;
    return absl::OkStatus();
  }

  absl::Status Broadcast(std::span<float> data, int root) override {
    if (root < 0 || root >= world_size_) {
      return absl::InvalidArgumentError(absl::StrCat("Broadcast: root ", root, " is not a rank"));
    }
    // In pieces of at most half the message limit (a model's weights can exceed any one
    // message); every rank cuts at the same places because the sizes and the limit agree.
    const size_t piece = std::max<size_t>(1, options_.max_message_bytes / 8);
    for (size_t at = 0; at < data.size() || at == 0; at += piece) {
      const size_t n = std::min(piece, data.size() - at);
      pb::CollectiveRequest request;
      request.set_kind(pb::COLLECTIVE_BROADCAST);
      request.set_root(root);
      request.set_size(n);
      if (id_ == root) request.set_data(data.data() + at, 4 * n);
      ASSIGN_OR_RETURN(pb::CollectiveResponse response, RunCollective(request));
      if (response.data().size() != 4 * n) {
        return absl::InvalidArgumentError(absl::StrCat("Broadcast: got ", response.data().size(),
                                                       " bytes, expected ", 4 * n));
      }
      std::memcpy(data.data() + at, response.data().data(), response.data().size());
      if (data.empty()) break;
    }
    return absl::OkStatus();
  }

  absl::Status AllReduceSum(std::span<double> values) override {
    pb::CollectiveRequest request;
    request.set_kind(pb::COLLECTIVE_SUM);
    request.set_size(values.size());
    request.mutable_values()->Assign(values.begin(), values.end());
    ASSIGN_OR_RETURN(pb::CollectiveResponse response, RunCollective(request));
    if (static_cast<size_t>(response.values_size()) != values.size()) {
      return absl::InvalidArgumentError("AllReduceSum: the server's answer has another size");
    }
    std::copy(response.values().begin(), response.values().end(), values.begin());
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<uint64_t>> AllGatherU64(uint64_t value) override {
    pb::CollectiveRequest request;
    request.set_kind(pb::COLLECTIVE_GATHER_U64);
    request.set_value_u64(value);
    ASSIGN_OR_RETURN(pb::CollectiveResponse response, RunCollective(request));
    std::vector<uint64_t> all(response.gathered().begin(), response.gathered().end());
    if (static_cast<int>(all.size()) != world_size_) {
      return absl::InvalidArgumentError("AllGatherU64: the server's answer has another size");
    }
    if (async_ && started_training_) {
      std::string line;
      for (uint64_t v : all) absl::StrAppend(&line, " ", v);
      QTRAIN_LOG(INFO) << "async mode: gathered values (replicas differ by design):" << line;
      std::fill(all.begin(), all.end(), value);
    }
    return all;
  }

  absl::Status Barrier() override {
    pb::CollectiveRequest request;
    request.set_kind(pb::COLLECTIVE_BARRIER);
    return RunCollective(request).status();
  }

  std::vector<std::string> ResidualKeys() const override { return codec_->ResidualKeys(); }
  std::span<const float> Residual(std::string_view key) const override {
    return codec_->Residual(key);
  }
  absl::Status SetResidual(std::string_view key, std::span<const float> values) override {
    return codec_->SetResidual(key, values);
  }

 private:
  // One RPC with a deadline.
  template <typename Fn>
  absl::Status Call(int /*shard*/, double seconds, Fn fn) {
    return CallWithDeadline(seconds, fn);
  }

  // Runs `fn` until it succeeds, retrying transient failures with backoff and re-registering
  // when told NOT_REGISTERED, for at most timeout_seconds.
  template <typename Fn>
  absl::Status Retry(const char* what, std::string_view key, Fn fn) {
    const Clock::time_point start = Clock::now();
    double backoff = 0.05;
    absl::Status last;
    for (;;) {
      last = fn();
      if (last.ok()) return last;
      const pb::PsErrorReason reason = ReasonOf(last);
      const std::string message(last.message());
      const bool polling = message == "the round is not closed yet" ||
                           message == "the collective is not closed yet" ||
                           message == "the state is not handed over yet";
      if (reason == pb::WORKER_LIVE) {
        if (!warned_live_) {
          QTRAIN_LOG(WARNING) << "worker " << id_ << ": " << last.message() << "; waiting";
          warned_live_ = true;
        }
      } else if (reason == pb::NOT_REGISTERED) {
        QTRAIN_LOG(WARNING) << "worker " << id_ << ": " << last.message() << "; registering again";
        for (size_t s = 0; s < stubs_.size(); ++s) (void)Register(static_cast<int>(s));
      } else if (!IsTransient(last) && reason != pb::FUTURE_STEP) {
        return last;
      }
      const double spent = std::chrono::duration<double>(Clock::now() - start).count();
      if (spent > options_.timeout_seconds) {
        return absl::DeadlineExceededError(absl::StrCat(
            "ps ", what, key.empty() ? "" : " of bucket '", std::string(key),
            key.empty() ? "" : "'", ": worker ", id_, " at step ", step_, " gave up after ",
            static_cast<int>(spent), " s (--comm_timeout); last: ", last.ToString()));
      }
      if (polling) {
        backoff = 0.05;
        continue;  // the server already held the call; ask again at once
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(backoff));
      backoff = std::min(2.0, backoff * 2);
    }
  }

  absl::Status PushOnce(const pb::PushRequest& push, std::string_view key) {
    const int shard = static_cast<int>(push.shard());
    absl::Status s = Retry("push", key, [&] {
      pb::PushResponse response;
      return Call(shard, options_.rpc_timeout_seconds, [&](grpc::ClientContext* c) {
        return stubs_[shard]->Push(c, push, &response);
      });
    });
    if (ReasonOf(s) == pb::STALE_STEP) {
      if (!warned_stale_) {
        QTRAIN_LOG(WARNING) << "worker " << id_ << ": " << s.message()
                            << " (this worker's gradient missed the round; it pulls the result)";
        warned_stale_ = true;
      }
      return absl::OkStatus();
    }
    return s;
  }

  absl::StatusOr<pb::CollectiveResponse> RunCollective(pb::CollectiveRequest request) {
    request.set_token(options_.token);
    request.set_worker_id(id_);
    request.set_shard(0);
    request.set_seq(collective_seq_++);
    request.set_wait_ms(1000);
    pb::CollectiveResponse response;
    RETURN_IF_ERROR(Retry(pb::CollectiveKind_Name(request.kind()).c_str(), "", [&]() -> absl::Status {
      response.Clear();
      absl::Status s = Call(0, options_.rpc_timeout_seconds, [&](grpc::ClientContext* c) {
        return stubs_[0]->Collective(c, request, &response);
      });
      if (!s.ok()) return s;
      if (response.ready()) return absl::OkStatus();
      return absl::UnavailableError("the collective is not closed yet");
    }));
    return response;
  }

  absl::Status Register(int shard) {
    std::lock_guard<std::mutex> lock(register_mu_);
    pb::RegisterRequest request;
    request.set_token(options_.token);
    request.set_worker_id(id_);
    request.set_shard(static_cast<uint32_t>(shard));
    request.set_num_shards(static_cast<uint32_t>(stubs_.size()));
    request.set_codec_spec(options_.codec_spec);
    request.set_joining(!has_state_);
    pb::RegisterResponse response;
    RETURN_IF_ERROR(Call(shard, options_.rpc_timeout_seconds, [&](grpc::ClientContext* c) {
      return stubs_[shard]->Register(c, request, &response);
    }));
    if (id_ >= 0 && response.worker_id() != id_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "server ", options_.servers[shard], " registered this worker as ", response.worker_id(),
          ", shard 0 as ", id_));
    }
    if (world_size_ > 0 && response.world_size() != world_size_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "servers disagree on --workers: ", world_size_, " and ", response.world_size(), " (",
          options_.servers[shard], ")"));
    }
    id_ = response.worker_id();
    world_size_ = response.world_size();
    async_ = response.mode() == pb::PS_MODE_ASYNC;
    if (response.in_progress()) joining_ = true;
    return absl::OkStatus();
  }

  void HeartbeatLoop() {
    std::vector<bool> warned(stubs_.size(), false);
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(hb_mu_);
        hb_cv_.wait_for(lock, std::chrono::duration<double>(options_.heartbeat_interval_seconds),
                        [this] { return stop_; });
        if (stop_) return;
      }
      for (size_t s = 0; s < stubs_.size(); ++s) {
        pb::HeartbeatRequest request;
        request.set_token(options_.token);
        request.set_worker_id(id_);
        request.set_shard(static_cast<uint32_t>(s));
        pb::HeartbeatResponse response;
        absl::Status st = Call(static_cast<int>(s), std::min(2.0, options_.rpc_timeout_seconds),
                               [&](grpc::ClientContext* c) {
                                 return stubs_[s]->Heartbeat(c, request, &response);
                               });
        if (ReasonOf(st) == pb::NOT_REGISTERED) {
          QTRAIN_LOG(WARNING) << "worker " << id_ << ": server " << options_.servers[s]
                              << " dropped this worker; registering again";
          st = Register(static_cast<int>(s));
        }
        if (!st.ok() && !warned[s]) {
          QTRAIN_LOG(WARNING) << "worker " << id_ << ": heartbeat to " << options_.servers[s]
                              << " failed: " << st.ToString();
        }
        warned[s] = !st.ok();
      }
    }
  }

  const PsOptions options_;
  std::unique_ptr<BucketCodec> codec_;
  compression::Rng rng_;
  std::vector<std::unique_ptr<pb::ParameterServer::Stub>> stubs_;
  std::mutex register_mu_;
  int id_ = -1;
  int world_size_ = 0;
  bool async_ = false;
  bool registered_ = false;
  bool started_training_ = false;
  bool warned_stale_ = false;
  bool warned_live_ = false;
  // Joining: the servers said the job was running when this process registered (joining_); the
  // process holds the run's state (has_state_: a fresh job's start, or the handover received).
  // Registrations are `joining` until then.
  std::atomic<bool> joining_{false};
  std::atomic<bool> has_state_{false};
  // Joining workers that wait for this worker's state (shard 0's last pull answer).
  std::vector<int> handover_to_;
  int64_t step_ = 0;
  uint64_t collective_seq_ = 0;
  std::map<uint32_t, int64_t> async_rounds_;

  std::mutex hb_mu_;
  std::condition_variable hb_cv_;
  bool stop_ = false;
  std::thread heartbeat_;
};

}  // namespace

absl::StatusOr<std::vector<std::string>> ParsePsServers(std::string_view list) {
  std::vector<std::string> out;
  const std::string joined(list);
  for (const std::string& entry : std::vector<std::string>(absl::StrSplit(joined, ','))) {
    const size_t colon = entry.rfind(':');
    uint32_t port = 0;
    if (entry.empty() || colon == std::string::npos || colon == 0 ||
        !absl::SimpleAtoi(entry.substr(colon + 1), &port) || port == 0 || port > 65535) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--ps must be host:port[,host:port...] with ports in [1, 65535]; got '",
          std::string(list), "'"));
    }
    out.emplace_back(entry);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreatePsCommunicator(const PsOptions& options) {
  if (options.servers.empty()) return absl::InvalidArgumentError("--ps: no server given");
  if (!(options.timeout_seconds > 0) || !(options.rpc_timeout_seconds > 0) ||
      !(options.heartbeat_interval_seconds > 0)) {
    return absl::InvalidArgumentError("PS timeouts and the heartbeat interval must be > 0");
  }
  if (options.worker_id < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--worker_id must be >= 0 (or -1: assigned), got ", options.worker_id));
  }
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    return absl::InvalidArgumentError("--ps_tls_cert and --ps_tls_key go together");
  }
  if (!options.tls_cert.empty() && options.tls_ca.empty()) {
    return absl::InvalidArgumentError("--ps_tls_cert needs --ps_tls_ca");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<BucketCodec> codec,
                   BucketCodec::Create(options.codec_spec, options.error_feedback));
  auto comm = std::make_unique<PsCommunicator>(options, std::move(codec));
  RETURN_IF_ERROR(comm->Connect());
  return std::unique_ptr<Communicator>(std::move(comm));
}

}  // namespace qtrain::comm
