// The transport-neutral collective interface the trainer uses to average gradients across
// data-parallel workers, plus the small collectives a run needs around it (initial weights,
// metric sums, the end-of-run weight hash check). Adapters: LocalCommunicator (one process, no
// MPI), MpiCommunicator (worker/comm/mpi_communicator.h), NcclCommunicator
// (worker/comm/nccl_communicator.h, also on device buffers) and the parameter-server client follow
// the same contract.
//
// Contract. Every rank calls the same collectives in the same order with the same sizes and keys
// (as with MPI). AllReduceMean leaves the same bits in `data` on every rank: an adapter that
// cannot promise that says so in its header. Compressing adapters keep one error-feedback
// residual per bucket key (compression/error_feedback.h); the residual accessors below expose
// them for checkpoints. A residual key is an adapter-defined name derived from the bucket key
// (one bucket may own several residuals), so restore residuals into an adapter configured like the
// one that saved them (same codec, algorithm and world size).
//
// Errors: absl::Status from every collective. DEADLINE_EXCEEDED when a peer did not join within
// the adapter's timeout (the message names the operation, bucket key, local rank and step: print
// it and abort the job), INVALID_ARGUMENT for bad arguments or a corrupt peer payload (naming the
// source rank), FAILED_PRECONDITION for a call on a communicator left unusable by an earlier
// failure or by ranks calling collectives in different orders, ABORTED when a peer failed its part
// of the same call (that peer's own error says why). After an error, `data` and the residuals of
// the failed bucket are unspecified.
//
// Thread-safety: not thread-safe. One thread at a time drives a Communicator (the trainer's
// communication thread); it may be a thread other than the one that created it.
// Cost: see each adapter.
#ifndef QTRAIN_WORKER_COMM_COMMUNICATOR_H_
#define QTRAIN_WORKER_COMM_COMMUNICATOR_H_

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain::comm {

// Time and traffic of AllReduceMean calls; each call adds to it (the trainer resets it per step).
// Bytes count what this rank puts into / takes out of the collective at the algorithm's level
// (serialized payloads, or 4 bytes per element for the fp32 allreduce), not the extra forwarding
// an MPI implementation does inside a collective.
struct StepStats {
  double encode_seconds = 0.0;       // encode (with error feedback), serialize
  double communicate_seconds = 0.0;  // waiting for collectives to complete
  double decode_seconds = 0.0;       // parse, validate, decode-and-add, average
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
  int64_t calls = 0;  // AllReduceMean calls accumulated

  StepStats& operator+=(const StepStats& other);
};

// How a compressed AllReduceMean is carried out (--allreduce), by the MPI and NCCL adapters
// alike: each rank's payload all-gathered, or a reduce-scatter with decode-sum-recompress
// followed by an all-gather. kAuto: kAllgather when world_size <= 4 or the bucket is under 1 MiB
// of fp32, else kReduceScatter (a rule of world size and bucket size only, so ranks agree).
enum class AllreduceAlgorithm { kAuto, kAllgather, kReduceScatter };

// "auto" | "allgather" | "reduce_scatter"; INVALID_ARGUMENT lists them otherwise.
absl::StatusOr<AllreduceAlgorithm> ParseAllreduceAlgorithm(std::string_view name);
const char* AllreduceAlgorithmName(AllreduceAlgorithm algorithm);
// The algorithm a compressed bucket of n floats runs (kAuto resolved).
AllreduceAlgorithm ResolveAllreduceAlgorithm(AllreduceAlgorithm requested, int world_size,
                                             uint64_t n);

// A job in progress, as a worker that joins it late (a restarted process) starts from it: the
// position every worker is at and one live worker's trainer state at that step boundary.
struct JoinState {
  int donor = -1;                  // the rank whose state this is
  int64_t epoch = 0;               // the epoch of `step`
  int64_t step = 0;                // the global step about to run
  int64_t step_in_epoch = 0;       // its index within the epoch (the sampler position)
  double best_test_accuracy = 0;
  std::vector<float> state;        // the trainer's flattened state (Trainer defines the order)
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // One line for logs, e.g. "mpi: 4 ranks, codec onebit, error feedback on, algorithm auto".
  virtual std::string Describe() const = 0;

  // Records the training step for error messages (a timeout names it). Costs nothing.
  virtual void SetStep(int64_t step) = 0;

  // True when AllReduceMean leaves `data` unchanged and exchanges nothing (one process without a
  // codec): callers may skip it, and its bucketing, altogether.
  virtual bool IsIdentity() const { return false; }

  // Averages `data` (this rank's gradients of bucket `key`) across ranks, in place. All ranks pass
  // the same key and size; the key must be non-empty. A compressing adapter encodes data plus the
  // key's residual, keeps what the codec dropped in the residual, and leaves the average of all
  // ranks' decoded payloads. `stats` may be null.
  virtual absl::Status AllReduceMean(std::string_view key, std::span<float> data,
                                     StepStats* stats) = 0;

  // Device buffers (adapters that keep gradients on a GPU; today NcclCommunicator). When true,
  // AllReduceMeanDevice does what AllReduceMean does on `n` floats of device memory: `d_data` is
  // read after the work already enqueued on `cuda_stream` (a cudaStream_t, passed as void* so
  // this header needs no CUDA) and holds the mean once later work on that stream runs; the call
  // may return before the result is there (the adapter orders its own stream after the caller's
  // and the caller's after its own). The caller must not touch `d_data` outside that stream
  // order until then. Same keys, errors and residuals as AllReduceMean.
  virtual bool SupportsDeviceBuffers() const { return false; }
  // Default: UNIMPLEMENTED.
  virtual absl::Status AllReduceMeanDevice(std::string_view key, float* d_data, size_t n,
                                           void* cuda_stream, StepStats* stats);

  // Copies `root`'s data into every rank's `data` (same size on all ranks). Exact (no codec).
  virtual absl::Status Broadcast(std::span<float> data, int root) = 0;

  // Element-wise sum across ranks, in place, in double (loss sums, correct and example counts).
  // Every rank gets the same bits.
  virtual absl::Status AllReduceSum(std::span<double> values) = 0;

  // Every rank's value, indexed by rank (the end-of-run weight-hash check).
  virtual absl::StatusOr<std::vector<uint64_t>> AllGatherU64(uint64_t value) = 0;

  virtual absl::Status Barrier() = 0;

  // Residual keys (sorted); empty when no codec with error feedback is set.
  virtual std::vector<std::string> ResidualKeys() const = 0;
  // The residual of `key`; empty when there is none.
  virtual std::span<const float> Residual(std::string_view key) const = 0;
  // Replaces (or creates) the residual of `key` (checkpoint restore). FAILED_PRECONDITION when
  // error feedback is off.
  virtual absl::Status SetResidual(std::string_view key, std::span<const float> values) = 0;

  // Joining a running job. The trainer calls it once, before its first step, where it would
  // otherwise broadcast rank 0's initial state. nullopt: start as planned (from step 0 or the
  // trainer's --resume checkpoint); that is every adapter but the parameter-server one, and that
  // one too unless this process registered into a job that was already running. Otherwise the
  // job's position and a live peer's state at that step boundary: the adapter has aligned its
  // own numbering of collectives with the peers', and its error-feedback residuals are zero.
  virtual absl::StatusOr<std::optional<JoinState>> JoinRunningJob() { return std::nullopt; }
  // True when a joining worker waits for this worker's state: the trainer then calls Handover
  // between two steps. Cheap (a flag set by earlier collectives). Default: false.
  virtual bool HandoverRequested() const { return false; }
  // Gives `state` (this worker's, at the boundary before state.step) to the joining workers that
  // wait for it. A joiner that went away meanwhile, or a refused upload, is logged, not an
  // error; an error means the adapter's peers or servers are unreachable. Default: nothing.
  virtual absl::Status Handover(const JoinState& state) {
    (void)state;
    return absl::OkStatus();
  }

  // Convenience: the sum of one scalar across ranks.
  absl::StatusOr<double> AllReduceSumScalar(double value);
};

}  // namespace qtrain::comm

#endif  // QTRAIN_WORKER_COMM_COMMUNICATOR_H_
