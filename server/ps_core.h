// The parameter server's logic, without any network: one shard's buckets, the worker table, the
// synchronous and asynchronous aggregation, the auxiliary collectives, and checkpoints. The gRPC
// service (server/ps_service.h) is a thin shell around it, so every rule here is unit-tested
// in-process (tests/unit/server/ps_core_test.cc).
//
// Layout rule. The trainer averages gradients in buckets keyed "b<i>" (worker/train/
// gradient_buckets.h). With S servers, bucket i belongs to shard (i mod S): every worker and
// server computes it from i alone. (A range rule over element offsets would need the whole bucket
// plan before the first push; the Communicator interface only reveals buckets as they are
// averaged.) A server learns a bucket's element count from its first accepted push and refuses
// any later push of another count.
//
// Design: the server aggregates GRADIENTS; the workers keep the weights. In synchronous mode,
// round s of bucket i (training step s) collects one push per live worker: each push is
// validated, then decoded-and-added into the round's sum (Codec::DecodeAdd: a bad payload leaves
// the sum untouched). The round closes when every live worker has pushed, or when
// step_deadline_seconds have passed since its first push (stragglers' later pushes are
// STALE_STEP and they pull the result anyway). Closing: mean = sum / pushes (float division per
// element); the mean is encoded ONCE with the server's codec and its own error-feedback residual
// per bucket (the compressed downlink, residual = mean + old residual - decode(encoded)) and the
// serialized result is kept for the last `history` rounds. Every worker decodes the same bytes
// and applies its own SGD step (worker/train/optimizer.h), so replicas stay bit-identical, and a
// worker that fell behind (dropped, then back) catches up by pulling the rounds it missed.
// version = rounds closed by this server (all buckets).
//
// Asynchronous mode: a push for bucket i carries the round the worker last pulled (its base);
// pushes with base < open - staleness are STALE_STEP, base > open is FUTURE_STEP. Each accepted
// push closes one round on its own (its gradient, re-encoded with the downlink residual). A pull
// from round r returns every kept result of rounds [r, open). Replicas then differ across workers
// (each applies a different sequence); see worker/comm/ps_communicator.h.
//
// Membership. Workers register with an id in [0, world_size) (or get the lowest unused one).
// A worker is live until it leaves or sends no request for heartbeat_timeout_seconds; then it is
// dropped from the quorum (rounds and collectives stop waiting for it) and gets NOT_REGISTERED
// until it registers again (rejoin: same id, then it pulls what it missed). Until world_size
// workers have registered, rounds close only by deadline, so a fresh or restarted server does not
// close a round on the first worker's push alone.
//
// Joining a job in progress. A process that holds no state of the run yet registers with
// `joining`. If the job is in progress (every id in [0, world_size) has registered once) the
// worker becomes JOINING, not live: rounds and collectives do not wait for it, but it may pull,
// heartbeat, contribute to collectives (closed ones give it their result) and call Join. If its
// id is still live (a killed process not yet dropped) the registration is refused as WORKER_LIVE
// and changes nothing: the client retries until the old process is dropped, so two processes
// never share an id. Worker id -1 joining a full job gets the lowest id that is neither live nor
// joining (a replacement for a dead worker); the world size never grows, since every worker's
// data shard depends on it. Shard 0 hands the state over: the joiner's first Join picks a donor
// (the lowest live worker), every Pull answer of the donor lists the joiners waiting for it
// (handover_to), the donor uploads its pb::WorkerHandover in pieces (Handover) at its next step
// boundary, and Join returns the pieces once all are there. If the donor goes (dropped or left)
// before it finished, the next Tick picks another one; with no live worker left, Join is
// FAILED_PRECONDITION (NO_DONOR). The joiner then runs from the donor's step: its pushes of
// closed rounds are STALE_STEP and it pulls their results, so it applies exactly the updates
// the others applied and catches up; its first ACCEPTED push makes it live (on that server) and
// shard 0 frees the handed-over bytes. A joining worker that goes silent is dropped like a live
// one. Memory: the handed-over bytes (about twice the model) per joiner, until it is live.
//
// Checkpoints (checkpoint_dir non-empty): every `checkpoint_every` closed rounds (version
// multiple) and at Shutdown, a pb::PsCheckpoint framed by common/framed_file.h (magic "QTRNPSCK",
// version 1, CRC-32, atomic rename) at <checkpoint_dir>/qserver.shard<s>.ckpt: version, each
// bucket's element count, open round, last 16 closed results and downlink residual, and the
// registered workers. Between checkpoints every closed round is appended to a journal,
// <checkpoint_dir>/qserver.shard<s>.journal (records: magic, length, CRC-32, a pb::PsRound),
// with one write() while the lock is held, i.e. before any worker can pull it; a checkpoint
// empties the journal. At start the checkpoint is restored when present and the journal replayed
// on top: every round any worker may have applied is served again with the same bytes, and each
// bucket's open round is exact, so workers that were at different rounds when the server died
// stay bit-identical. A torn last record (killed mid-write, never served) is dropped with a
// warning; any other damage is DATA_LOSS. The workers are live again (fresh heartbeat clock);
// what is lost is the downlink residual's updates since the checkpoint and the open rounds'
// partial sums (the workers push again). A process kill loses nothing else; a machine crash can
// lose journal records the OS had not written (the journal is not fsynced per round).
//
// Requests that must change nothing when malformed: a wrong token is UNAUTHENTICATED; an
// unknown or dropped worker FAILED_PRECONDITION (NOT_REGISTERED); a wrong shard, a bucket not
// owned, an unknown codec or another codec than the server's, a wrong element count, an
// oversized or truncated payload, a bad checksum (DATA_LOSS), a negative step INVALID_ARGUMENT;
// a closed or not yet open round FAILED_PRECONDITION (STALE_STEP / FUTURE_STEP). Each refusal's
// message starts with its pb::PsErrorReason name. Nothing is CHECKed on request data.
//
// Time is injected (ServerCoreOptions::clock) so tests drive deadlines without sleeping; Tick()
// applies deadlines and heartbeat timeouts (the service calls it every 50 ms).
//
// Thread-safety: every public method is thread-safe (one mutex for the state, plus one per bucket
// for its sum: a synchronous round's second and later pushes are checksummed and decoded outside
// the state mutex, so pushes of different buckets decode in parallel while pulls and heartbeats
// go on; the round closes only after its last decode). WaitForChange lets the service hold a
// Pull or Collective until something changes. Cost: a push costs one CRC pass and one DecodeAdd
// into the round sum; closing costs one encode of the bucket and one pass to zero the sum; memory
// is one float per owned element for the sum (kept between rounds), one for the residual, plus
// `history` encoded results per bucket.
#ifndef QTRAIN_SERVER_PS_CORE_H_
#define QTRAIN_SERVER_PS_CORE_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/rng.h"
#include "proto/ps.pb.h"
#include "worker/comm/bucket_codec.h"

namespace qtrain::server {

enum class PsMode { kSync, kAsync };

struct ServerCoreOptions {
  int shard = 0;               // this server's shard, in [0, num_shards)
  int num_shards = 1;
  int world_size = 1;          // workers of the run (ranks 0..world_size-1)
  // Codec of the pushes and of the downlink (compression/codec_registry.h grammar). Workers
  // must register with the same spec.
  std::string codec_spec = "onebit";
  comm::FeedbackChoice downlink_feedback = comm::FeedbackChoice::kFromSpec;
  PsMode mode = PsMode::kSync;
  double step_deadline_seconds = 30.0;     // a round closes at most this long after its first push
  double heartbeat_timeout_seconds = 10.0; // silent this long: dropped from the quorum
  int64_t staleness = 4;                   // async: accepted lag in rounds
  std::string token;                       // "" accepts any token; otherwise must match
  // Upper bound of any request's tensor bytes (the gRPC limit is set from it too).
  uint64_t max_message_bytes = uint64_t{64} << 20;
  std::string checkpoint_dir;              // "" = no checkpoints
  int64_t checkpoint_every = 100;          // closed rounds between checkpoints (> 0)
  int history = 256;                       // closed round results kept per bucket (> 0)
  int collective_history = 32;             // closed collective results kept
  uint64_t seed = 1;                       // stochastic downlink codecs
  // Seconds on a monotonic clock; default: steady_clock. Tests inject a fake.
  std::function<double()> clock;
};

absl::Status ValidateServerCoreOptions(const ServerCoreOptions& options);

// The path of shard `shard`'s checkpoint (and round journal) inside `dir`.
std::string ServerCheckpointPath(const std::string& dir, int shard);
std::string ServerJournalPath(const std::string& dir, int shard);

class ServerCore {
 public:
  // Restores <checkpoint_dir>/qserver.shard<s>.ckpt when it exists (a corrupt one is DATA_LOSS,
  // one of another shard, codec or layout FAILED_PRECONDITION). INVALID_ARGUMENT for bad options.
  static absl::StatusOr<std::unique_ptr<ServerCore>> Create(const ServerCoreOptions& options);
  ~ServerCore();

  absl::Status Register(const pb::RegisterRequest& request, pb::RegisterResponse* response);
  absl::Status Push(const pb::PushRequest& request, pb::PushResponse* response);
  // Never blocks: response->ready is false when the result is not there yet.
  absl::Status Pull(const pb::PullRequest& request, pb::PullResponse* response);
  absl::Status Heartbeat(const pb::HeartbeatRequest& request, pb::HeartbeatResponse* response);
  absl::Status Leave(const pb::LeaveRequest& request, pb::LeaveResponse* response);
  absl::Status GetStatus(const pb::StatusRequest& request, pb::StatusResponse* response);
  // Contributes (once per worker and seq) and returns the result when closed (ready).
  absl::Status Collective(const pb::CollectiveRequest& request, pb::CollectiveResponse* response);
  // Shard 0: a joining worker asks for the handed-over state (ready when every piece is there).
  absl::Status Join(const pb::JoinRequest& request, pb::JoinResponse* response);
  // Shard 0: the donor uploads one piece of its state for a joining worker.
  absl::Status Handover(const pb::HandoverRequest& request, pb::HandoverResponse* response);

  // Applies round deadlines and heartbeat timeouts at the current clock.
  void Tick();
  // A counter bumped by every state change.
  uint64_t change_count() const;
  // Blocks until change_count() != seen or `seconds` pass (real time). Returns the new count.
  uint64_t WaitForChange(uint64_t seen, double seconds);

  // Writes a checkpoint now (no-op without checkpoint_dir).
  absl::Status WriteCheckpoint();
  const ServerCoreOptions& options() const { return options_; }
  bool restored() const { return restored_; }

 private:
  struct Round {
    int64_t step = 0;
    std::string encoded;  // serialized pb::EncodedTensor
    int contributors = 0;
  };
  struct Bucket {
    int64_t elements = 0;          // 0: not known yet
    int64_t open_step = -1;        // -1: no round yet (set by the first push)
    std::vector<float> sum;        // the open round's sum; zeros between rounds (kept allocated)
    std::set<int> pushed;
    std::set<int> decoding;        // sync: pushes being decoded outside mu_ (see Push)
    // Held while adding into `sum`; taken after mu_ or alone, never the other way round.
    std::shared_ptr<std::mutex> sum_mu = std::make_shared<std::mutex>();
    double opened_at = -1;         // clock at the round's first push; -1: none yet
    std::deque<Round> history;     // oldest first
  };
  struct Worker {
    bool live = false;
    bool joining = false;  // registered into a job in progress; waited for once handed its state,
                          // live at its first accepted push
    double last_seen = 0;
  };
  // Shard 0: the state handed over to one joining worker.
  struct HandoverState {
    int donor = -1;                  // -1: none picked (no live worker)
    uint32_t pieces = 0;             // announced by the donor's first piece; 0: none yet
    uint32_t received = 0;
    uint64_t bytes = 0;
    std::vector<std::string> data;  // by piece
    std::vector<bool> have;
  };
  struct CollectiveState {
    pb::CollectiveKind kind = pb::COLLECTIVE_UNSPECIFIED;
    int root = 0;
    uint64_t size = 0;
    std::map<int, pb::CollectiveRequest> contributions;
    std::set<int> contributors;    // who is in the result
    double opened_at = 0;
    bool closed = false;
    absl::Status error;            // when closing failed (e.g. the root never came)
    pb::CollectiveResponse result;
  };

  explicit ServerCore(const ServerCoreOptions& options);
  double Now() const { return options_.clock(); }
  absl::Status CheckToken(const std::string& token) const;
  // NOT_REGISTERED unless `id` is a live or joining worker; refreshes its heartbeat clock.
  absl::Status CheckWorker(int id);
  // The lowest live worker other than `joiner`, or -1.
  int PickDonorLocked(int joiner) const;
  // Re-picks donors that are no longer live and forgets joiners that are gone (Tick, Leave).
  bool ReviewHandoversLocked();
  absl::Status CheckShard(uint32_t shard) const;
  // What every RPC that only shard 0 serves (collectives, the join handover) checks first: the
  // token, the shard, that this is shard 0 (else WRONG_SHARD with `refusal`), and the worker.
  absl::Status CheckShardZeroRequest(const std::string& token, uint32_t shard, int worker,
                                     const char* refusal);
  int LiveCount() const;
  bool QuorumReady() const;  // world_size workers have registered at least once
  absl::Status CloseRound(uint32_t bucket_id, Bucket& bucket);
  void MaybeCloseSync(uint32_t bucket_id, Bucket& bucket, bool deadline_only);
  // A joining worker's first accepted push puts it back in the quorum. Caller holds mu_.
  void MarkJoined(int worker, uint32_t bucket_id, int64_t step);
  // True once a joining worker's state handover is complete (every piece uploaded).
  bool HandedOver(int worker) const;
  void MaybeCloseCollective(uint64_t seq, CollectiveState& c, bool deadline_passed);
  void Changed();
  absl::Status WriteCheckpointLocked();
  absl::Status Restore();
  absl::Status ReplayJournalLocked();
  absl::Status OpenJournalLocked();
  void AppendJournalLocked(uint32_t bucket_id, const Bucket& b, const Round& round);
  uint64_t StateHashLocked() const;
  absl::Status Reject(absl::Status status);

  const ServerCoreOptions options_;
  std::unique_ptr<comm::BucketCodec> codec_;  // decodes pushes; encodes the downlink
  compression::Rng rng_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t changes_ = 0;
  uint64_t version_ = 0;
  uint64_t rejected_ = 0;
  uint64_t checkpoints_ = 0;
  bool restored_ = false;
  int journal_fd_ = -1;  // the round journal (append-only), -1 without checkpoint_dir
  std::map<uint32_t, Bucket> buckets_;
  std::map<int, Worker> workers_;
  std::map<uint64_t, CollectiveState> collectives_;
  std::map<int, HandoverState> handovers_;  // by joining worker id (shard 0)
};

}  // namespace qtrain::server

#endif  // QTRAIN_SERVER_PS_CORE_H_
