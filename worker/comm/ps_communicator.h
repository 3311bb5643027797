// The parameter-server adapter of Communicator: a worker of `qtrain --ps=host:port[,...]` that
// averages its gradients through `qserver` processes (server/ps_core.h has the server side and
// the layout rule). This header does not include gRPC; ps_communicator.cc and ps_rpc.h/.cc (its
// channel and status helpers, shared with the load generator server/bench/ps_load_bench.cc) are
// the only worker files that do.
//
// AllReduceMean(key "b<i>", data) at training step s (SetStep):
//   1. encode data with the bucket's error-feedback residual (BucketCodec, as LocalCommunicator
//      and MpiCommunicator do; residual key = bucket key; TernGrad uses its local scale),
//   2. Push it (EncodedTensor with CRC-32) to shard i mod S, tagged with step s,
//   3. Pull step s of bucket i until the server has closed the round: the mean of the pushes it
//      received, encoded ONCE by the server with its own residual (compressed downlink),
//   4. decode that into `data` (zeroed first). Every worker decodes the same bytes, so every
//      worker gets the same bits and replicas stay identical.
//   A push refused as STALE_STEP (the round closed without this worker, e.g. after a deadline or
//   while it was dropped) is not an error: the worker pulls the round's result anyway and stays
//   in step with the others; its gradient for that round is lost. A pull told need_push (the
//   server restarted and lost the push) pushes the same bytes again.
// Asynchronous servers (qserver --mode=async): the push carries the round of the bucket this
// worker last pulled; the pull returns every update since then and `data` becomes their mean.
// Replicas then differ by design: AllGatherU64 calls after the first AllReduceMean return this
// worker's own value in every slot, so the trainer's end-of-run identical-weights check passes
// vacuously (the hashes are logged instead).
//
// The other collectives go through shard 0's Collective RPC, numbered by call order (every
// worker calls them in the same order): Broadcast (the root uploads its floats; this is how the
// first worker seeds every replica's initial state), AllReduceSum (sum in worker-id order; when
// workers were dropped it is scaled by world_size / contributors, so the trainer's division by
// world_size still gives a mean), AllGatherU64 (a dropped worker's slot holds the lowest
// contributing rank's value, so the weight-hash check compares exactly the workers still there;
// a worker whose value arrives after the gather closed sees its own value in its own slot),
// Barrier. rank() is the worker id, world_size() the server's --workers.
//
// Membership and faults. Create registers with every server (the id comes from --worker_id or
// from shard 0), then waits until all world_size workers have registered (bounded by
// timeout_seconds). A background thread sends a heartbeat to every server each
// heartbeat_interval_seconds; a NOT_REGISTERED answer (the worker was dropped, or the server
// restarted without it) makes it register again with the same id (rejoin). Every RPC has a
// deadline of rpc_timeout_seconds (long polls ask the server to answer within 1 s); UNAVAILABLE
// and DEADLINE_EXCEEDED are retried with exponential backoff (50 ms doubling to 2 s) until the
// call has taken timeout_seconds, then DEADLINE_EXCEEDED names the operation, bucket, worker and
// step and the last error. The destructor sends Leave to every server (best effort, 1 s).
//
// A stopped or partitioned worker re-registers and catches up by pulling the rounds it missed
// (the server keeps --history of them). A killed worker's new process (the same command again,
// or --worker_id=-1 to replace the lowest gone id) joins the running job: every registration is
// `joining` until the process holds the run's state; the server answers in_progress when the job
// had started (every id registered once), and refuses WORKER_LIVE, retried here, while the old
// process of that id is not yet dropped. JoinRunningJob then asks shard 0 (Join) for the state;
// the donor (the lowest live worker) sees the request in its shard-0 pull answers
// (HandoverRequested), and its trainer hands over its parameters, buffers and momentum with its
// epoch, step, batch within the epoch, best accuracy, and this adapter's collective number and
// async rounds (pb::WorkerHandover, in pieces of half the message limit) before its next step.
// The joiner sets its collective number and async rounds to the donor's, so its collectives line
// up with its peers' (those that closed while it caught up give it their result), its
// error-feedback residuals start at zero, and its STALE_STEP pushes catch it up until its first
// accepted push puts it back in the quorum. A job with no live worker left gives NO_DONOR.
//
// Cost: one encode, one push and one pull (one decode) per bucket; bytes: the payload up, the
// server's payload down (StepStats counts both). Memory: the residuals (one float per element).
// Thread-safety: not thread-safe (see Communicator); the heartbeat thread is internal.
#ifndef QTRAIN_WORKER_COMM_PS_COMMUNICATOR_H_
#define QTRAIN_WORKER_COMM_PS_COMMUNICATOR_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/comm/bucket_codec.h"
#include "worker/comm/communicator.h"

namespace qtrain::comm {

struct PsOptions {
  // host:port of each server, in shard order (shard s = servers[s]). At least one.
  std::vector<std::string> servers;
  // The servers' --token ("" when they accept any).
  std::string token;
  // This worker's rank in [0, world_size), or -1 to be assigned the lowest unused one.
  int worker_id = -1;
  // Codec spec; must equal the servers' --codec.
  std::string codec_spec = "onebit";
  FeedbackChoice error_feedback = FeedbackChoice::kFromSpec;
  uint64_t seed = 1;
  // Longest one collective (with its retries) may take, in seconds (> 0).
  double timeout_seconds = 120.0;
  // Deadline of each RPC, in seconds (> 0).
  double rpc_timeout_seconds = 10.0;
  // Seconds between heartbeats (> 0); keep it well under the servers' --heartbeat_timeout.
  double heartbeat_interval_seconds = 1.0;
  // gRPC send / receive limit in bytes (size it to the model like the servers' --max_message_mb).
  uint64_t max_message_bytes = uint64_t{64} << 20;
  // TLS: with tls_ca the channel is TLS and trusts that CA; tls_cert/tls_key add a client
  // certificate (for servers started with --tls_ca).
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
};

// "h1:p1,h2:p2" -> {"h1:p1", "h2:p2"}; INVALID_ARGUMENT for an empty list or entry without port.
absl::StatusOr<std::vector<std::string>> ParsePsServers(std::string_view list);

// Connects, registers and waits for every worker (see the file comment). UNAVAILABLE or
// DEADLINE_EXCEEDED when the servers cannot be reached in time; the servers' refusals otherwise
// (UNAUTHENTICATED for a wrong token, INVALID_ARGUMENT for another codec or shard count).
absl::StatusOr<std::unique_ptr<Communicator>> CreatePsCommunicator(const PsOptions& options);

}  // namespace qtrain::comm

#endif  // QTRAIN_WORKER_COMM_PS_COMMUNICATOR_H_
