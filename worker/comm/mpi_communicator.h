// The MPI adapter of Communicator: gradient averaging over MPI, uncompressed or with any codec of
// compression/, plus process-level MPI start-up helpers for main.cc. This header does not include
// mpi.h; mpi_communicator.cc is the only file of the project that does.
//
// Algorithms for AllReduceMean (chosen per bucket by MpiOptions::algorithm):
//   fp32 codec: MPI_Iallreduce(MPI_SUM) of the raw floats, then each element / world_size.
//     Bit-identity across ranks relies on the MPI library giving every rank the same sum (Open
//     MPI's allreduce algorithms do; the MPI standard only recommends it). The end-of-run weight
//     hash check (AllGatherU64) catches a library that does not.
//   kAllgather: every rank encodes its bucket with error feedback (residual key = bucket key),
//     serializes it (compression/wire.h), the int64 sizes are all-gathered and then the bytes
//     (MPI_Iallgatherv). Every rank parses, validates and decodes-and-adds all payloads in rank
//     order into `data` (zeroed), then divides by world_size: all ranks do the same float
//     operations on the same bytes, so all get the same bits.
//   kReduceScatter (the CNTK 1-bit SGD scheme): the bucket is split into world_size contiguous
//     slices, slice j = [j*n/W, (j+1)*n/W). Each rank encodes slice j with its own residual
//     (key "<bucket>/rs<j>") and sends it to rank j (sizes by MPI_Ialltoall, bytes by
//     MPI_Ialltoallv). Rank r decodes-and-adds all ranks' slice r in rank order, divides by
//     world_size, re-encodes that mean with its aggregator residual (key "<bucket>/agg"), and the
//     re-encoded slices are all-gathered (sizes, then MPI_Iallgatherv). Every rank, the owner
//     included, decodes each re-encoded slice into place, so all ranks get the same bits.
//     Traffic per rank ~2x a payload of n elements instead of world_size x.
//   kAuto: kAllgather when world_size <= 4 or the bucket is under 1 MiB of fp32 (allgather is
//     one round and its decode cost, world_size payloads, is small there); kReduceScatter
//     otherwise. The choice depends only on world_size and the bucket size, so it is the same on
//     every rank and for every step of a bucket (its residual keys stay stable).
//   Sizes are exchanged even for codecs of fixed payload size: the 16 bytes per rank also carry
//   a rank's local encode failure (a negative size), so that every rank fails the same call
//   (ABORTED on the others) instead of waiting for a payload that never comes, and a tag of
//   (bucket key, size), so that ranks calling collectives in different orders get
//   FAILED_PRECONDITION instead of decoding each other's buckets. (The fp32 path has no such
//   check: mismatched sizes there give an MPI error or a timeout.)
//   TernGrad ("terngrad", with or without shared=1): the ranks first agree on one scale per
//   encoded tensor, the maximum of their local scales of gradient + residual
//   (MPI_Iallreduce(MPI_MAX)), and ternarize with it; the ternary values are summed as integers
//   (TernGradCodec::AccumulateTernary) and element i becomes (float(sum_i) * scale) / world_size.
//   (The aggregator re-encode of kReduceScatter has one encoder per slice: it uses its local
//   scale.)
//
// Randomness: rank r's stochastic codecs draw from Rng(RankSeed(options.seed, r)) (bucket_codec.h),
// one stream per Encode: kAllgather encodes once per bucket; kReduceScatter encodes the non-empty
// slices j = 0..W-1 in order, then (if its own slice is non-empty) the aggregated slice.
//
// Byte counts (StepStats): serialized payload bytes this rank sends to / receives from other
// ranks (fp32: 4n each way); sizes and scale exchanges are not counted.
//
// Faults. Every collective is nonblocking (MPI_Iallreduce, MPI_Iallgather(v), MPI_Ialltoall(v),
// MPI_Ibcast, MPI_Ibarrier) and polled with MPI_Test until MpiOptions::timeout_seconds after the
// call began; then the call returns DEADLINE_EXCEEDED naming the operation, phase, bucket key,
// local rank and step (print it, then MPI_Abort). A dead peer under Open MPI usually makes mpirun
// kill the whole job (ORTE/PRRTE notices the process exit) before any timeout; the timeout covers
// a stalled or diverged peer (stopped, deadlocked, or calling collectives in another order). The
// communicator (a dup of MPI_COMM_WORLD) uses MPI_ERRORS_RETURN, so MPI errors become Status
// (MPI_Error_string text; UNAVAILABLE, or INVALID_ARGUMENT for argument errors). Received payloads
// are parsed and validated before decoding: a corrupt one is INVALID_ARGUMENT naming the source
// rank (never a crash). After a timeout the request stays outstanding (MPI cannot cancel a
// collective): every later call returns FAILED_PRECONDITION until WaitPending() completes it.
// The `data` span is never touched after a call returns (MPI works on internal buffers).
//
// Cost: fp32: one copy in and one scaled copy out around the allreduce. Compressed: one encode,
// serialize, and world_size (allgather) or 2 (reduce-scatter, per slice) parse+decode passes.
// Memory: internal buffers of the largest bucket: n floats plus the payload bytes of all ranks.
// Thread-safety: not thread-safe; one thread at a time (InitMpi asks for MPI_THREAD_SERIALIZED).
// Create and the destructor are collective over MPI_COMM_WORLD (MPI_Comm_dup / MPI_Comm_free)
// and must run between InitMpi and FinalizeMpi.
#ifndef QTRAIN_WORKER_COMM_MPI_COMMUNICATOR_H_
#define QTRAIN_WORKER_COMM_MPI_COMMUNICATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/wire.h"
#include "worker/comm/bucket_codec.h"
#include "worker/comm/communicator.h"

namespace qtrain::comm {

struct MpiOptions {
  // Codec spec (compression/codec_registry.h grammar): "fp32", "fp16", "onebit", "terngrad",
  // "qsgd:levels=16", "threshold:tau=0.01", ... Default "fp32" (plain MPI allreduce).
  std::string codec_spec = "fp32";
  // Error feedback: the spec's `ef` key or the codec's default, unless forced here.
  FeedbackChoice error_feedback = FeedbackChoice::kFromSpec;
  AllreduceAlgorithm algorithm = AllreduceAlgorithm::kAuto;
  // Longest any one call may wait for its peers, in seconds (> 0). Default 300: generous for a
  // large bucket on a slow network, still no silent hang.
  double timeout_seconds = 300.0;
  // Seed of the stochastic codecs (see "Randomness" above).
  uint64_t seed = 1;
  // CRC-32 of each payload, checked by the receivers (DATA_LOSS on mismatch). Default off: MPI
  // transports are reliable.
  compression::Checksum checksum = compression::Checksum::kNone;
  // Longest sleep between two MPI_Test polls, in microseconds (polls start back to back and back
  // off exponentially to this). 0 spins, which is fastest on dedicated cores; the default 200
  // leaves the CPU to peers when ranks outnumber cores.
  int max_poll_sleep_us = 200;
  // Test only: if set, called on every serialized payload this rank sends (e.g. to corrupt it).
  std::function<void(std::string* bytes)> payload_hook_for_testing;
  // Warm start: AllReduceMean at training steps below this (SetStep) averages in fp32 (plain
  // MPI_Allreduce) even with a codec, and leaves the residuals alone; compression starts at this
  // step. 1-bit SGD's warm start (CNTK) and 1-bit Adam's full-precision warm-up. Every rank
  // passes the same value (>= 0; 0: compress from the first step).
  int64_t fp32_warmup_steps = 0;
};

class MpiCommunicator final : public Communicator {
 public:
  // Collective over MPI_COMM_WORLD. INVALID_ARGUMENT for a bad codec spec or option;
  // FAILED_PRECONDITION if MPI is not initialized; UNAVAILABLE for an MPI failure.
  static absl::StatusOr<std::unique_ptr<MpiCommunicator>> Create(const MpiOptions& options);
  // Frees the MPI communicator. If a timed-out request is still outstanding its buffers are
  // deliberately leaked (MPI may still write them).
  ~MpiCommunicator() override;

  int rank() const override;
  int world_size() const override;
  std::string Describe() const override;
  void SetStep(int64_t step) override;

  absl::Status AllReduceMean(std::string_view key, std::span<float> data,
                             StepStats* stats) override;
  absl::Status Broadcast(std::span<float> data, int root) override;
  absl::Status AllReduceSum(std::span<double> values) override;
  absl::StatusOr<std::vector<uint64_t>> AllGatherU64(uint64_t value) override;
  absl::Status Barrier() override;

  std::vector<std::string> ResidualKeys() const override;
  std::span<const float> Residual(std::string_view key) const override;
  absl::Status SetResidual(std::string_view key, std::span<const float> values) override;

  // After a DEADLINE_EXCEEDED: waits up to `timeout_seconds` more for the outstanding request to
  // complete (the late peer joins). OK leaves the communicator usable again (the timed-out call's
  // result is lost); DEADLINE_EXCEEDED again if it still does not complete. OK when nothing is
  // outstanding. For an operation of several phases only the stalled phase is completed, so this
  // is for single-phase collectives (fp32 AllReduceMean, Broadcast, AllReduceSum, AllGatherU64,
  // Barrier) and for tests; otherwise abort the job.
  absl::Status WaitPending(double timeout_seconds);

 private:
  struct Impl;
  explicit MpiCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The factory the trainer uses (same as MpiCommunicator::Create).
absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(const MpiOptions& options);

// MPI_Init_thread asking for MPI_THREAD_SERIALIZED (a warning is logged if the library offers
// less: then call communicators only from the main thread). OK if MPI is already initialized.
absl::Status InitMpi(int* argc, char*** argv);
// MPI_Finalize if initialized and not yet finalized. Destroy every MpiCommunicator first.
absl::Status FinalizeMpi();
// Ends the whole MPI job: MPI_Abort(MPI_COMM_WORLD, code), which makes the launcher kill every
// rank (so no peer waits for this one), then _Exit(code) should MPI_Abort return. Without an
// initialized MPI it is just _Exit(code). For main.cc after a fatal error: never returns.
[[noreturn]] void AbortMpi(int code);
// True when the environment shows an MPI launcher (Open MPI's OMPI_COMM_WORLD_SIZE, or PMI_SIZE /
// PMI_RANK / PMIX_RANK of MPICH, Slurm and PMIx launchers). main.cc uses it to choose between
// MpiCommunicator and LocalCommunicator without calling MPI_Init in a plain run.
bool LaunchedByMpirun();

}  // namespace qtrain::comm

#endif  // QTRAIN_WORKER_COMM_MPI_COMMUNICATOR_H_
