// The NCCL adapter of Communicator: gradient averaging on GPU buffers, uncompressed through
// ncclAllReduce or compressed with the CUDA codecs (compression/cuda/cuda_codec.h), plus the
// start-up paths that get every rank the NCCL unique id. This header does not include nccl.h;
// nccl_communicator.cc is the only file of the project that does.
//
// Start-up (NcclBootstrap): rank 0 makes the 128-byte ncclUniqueId and `exchange_id` gives it to
// every rank; then every rank calls ncclCommInitRankConfig (non-blocking, polled until the
// timeout). BootstrapFromLaunchEnv carries the id over the TCP rendezvous of
// worker/comm/rendezvous.h (torchrun-style variables, deploy/launch-local.sh); under mpirun
// BootstrapOverCommunicator carries it over an existing communicator (MpiCommunicator), so this
// file needs no MPI. One CUDA device per rank: NCCL does not support two ranks of one
// communicator on the same device. Create sets NCCL_NVLS_ENABLE=0 in the process environment
// when it is unset (NVLink SHARP multicast needs fabric-manager support shared hosts often lack;
// the launchers export it too), once, before the first NCCL call.
//
// Algorithms for AllReduceMean(Device) — the MPI adapter's (mpi_communicator.h), on the device:
//   fp32 codec: one in-place ncclAllReduce. World size a power of two: with ncclAvg (NCCL 2.28
//     scales by 1/world, which is exact for 2^-k, so the result is bit for bit sum / world
//     outside subnormals, and no extra pass is needed); otherwise ncclSum, then element / world
//     in one small kernel (the CPU adapters' IEEE division; ncclAvg's rounded 1/world would
//     differ). NCCL gives every rank the same result (its ring and tree algorithms broadcast the
//     reduced chunks), so every rank gets the same bits.
//   kAllgather: each rank encodes its bucket with error feedback (residual key = bucket key) into
//     one blob (compression/packed_blob.h layout) behind a 16-byte slot header {bucket tag,
//     size or -1}. Fixed-size codecs (onebit, terngrad, qsgd dense, fp16): one ncclAllGather of
//     the slots (header + MaxBlobBytes). Threshold (data-dependent size): an ncclAllGather of the
//     headers, read on the host (one extra sync), then an ncclAllGather of max-size blobs. Every
//     rank zeroes the bucket, decodes-and-adds all W blobs in rank order and divides by W: the
//     same kernels on the same bytes, so the same bits on every rank.
//   kReduceScatter (CNTK's 1-bit SGD scheme): slice j = [j*n/W, (j+1)*n/W). Each rank encodes
//     slice j with residual "<bucket>/rs<j>" and sends it to rank j (ncclSend/ncclRecv in one
//     group; threshold first exchanges headers). Rank r decodes-and-adds every rank's slice r in
//     rank order, divides by W, re-encodes that mean with its aggregator residual "<bucket>/agg",
//     and the re-encoded slices are all-gathered and decoded into place by every rank (the owner
//     included), so all ranks get the same bits.
//   kAuto: kAllgather when world_size <= 4 or the bucket is under 1 MiB of fp32, else
//     kReduceScatter (the MPI adapter's rule; it depends only on world size and bucket size).
//   TernGrad: PrepareScale leaves each encoded tensor's local scale on the device, an
//     ncclAllReduce(ncclMax) makes it the shared maximum, and EncodeWithScale ternarizes with it
//     (the aggregator re-encode uses its local scale, as in the MPI adapter). Unlike the MPI
//     adapter, the W decoded ternary payloads are summed as floats (scale * t, in rank order), not
//     as integer counts: identical on every rank, but it may differ from the MPI result in the
//     last bit.
//   Randomness: rank r's stream keys come from Rng(RankSeed(seed, r)), one NextStream() per
//     encode: kAllgather once per bucket; kReduceScatter for the non-empty slices j = 0..W-1 in
//     order, then (if its own slice is non-empty) the aggregated slice.
//
// Streams and host synchronization. Work runs on the communicator's own CUDA stream (created with
// the device's highest priority, so buckets overlap the backward kernels on the caller's stream).
// AllReduceMeanDevice makes that stream wait (cudaStreamWaitEvent) for the caller's stream, where
// the gradient was produced, and makes the caller's stream wait for the result. The fp32 path
// never synchronizes the host. A compressed bucket synchronizes the host once, at its end: the
// decode kernels report bad payloads in device error words and the slot headers say whether a
// peer failed, and the host must read both to return the right Status (threshold adds one sync
// per exchange to learn the sizes). The host-span API (AllReduceMean, Broadcast, AllReduceSum,
// AllGatherU64, Barrier) copies through device buffers and waits for the result.
//
// StepStats. Times are measured with CUDA events recorded between phases on the communicator's
// stream (encode: encode kernels and headers; communicate: NCCL calls, including the time they
// wait for peers; decode: decode-add and division), read lazily: a compressed bucket's times are
// added to its own call's stats at its end-of-bucket sync; an fp32 bucket's (no sync) are added
// to the first later AllReduceMean(Device) call that finds its events complete. Bytes: fp32 4n
// each way (as the MPI adapter counts); compressed: the slot bytes this rank puts into / takes
// out of the collectives (header + blob, padded to 16 bytes: what crosses the links), not the
// small header and scale exchanges of threshold and TernGrad.
//
// Faults. Nothing waits forever: the NCCL communicator is non-blocking (config.blocking = 0);
// every host wait polls with a deadline of options.timeout_seconds from the start of the call,
// and a watchdog thread watches the completion events of calls that returned before their
// result existed (fp32 on the device). A deadline that passes, or an NCCL asynchronous error
// (e.g. a peer's socket closed), aborts the NCCL communicator (ncclCommAbort: the NCCL kernels
// return, so no stream stays blocked) and gives DEADLINE_EXCEEDED (timeout) or UNAVAILABLE
// (NCCL error) naming the operation, phase, bucket key, rank and step; every later call then
// returns FAILED_PRECONDITION with that first error (abort the job). A peer that failed its
// own part (an encode launch error, a bad payload it received while aggregating) marks its
// slot header and the others return ABORTED naming it; a corrupt payload is INVALID_ARGUMENT
// naming the source rank (the device decoder validates it and leaves the output unchanged);
// ranks exchanging different buckets get FAILED_PRECONDITION. After an error, the bucket and its
// residuals are unspecified.
//
// Residuals live on the device, one per residual key; ResidualKeys/Residual/SetResidual copy to
// and from the host (checkpoints), after waiting for the stream. The span Residual returns stays
// valid until the next call on this communicator.
//
// Cost: fp32: one ncclAllReduce (plus a division pass when world is not a power of two). Compressed: one fused encode-with-feedback
// pass, the collectives, and W (allgather) or 2 per slice (reduce-scatter) decode-add passes.
// Memory: device buffers sized for the largest bucket: about W x MaxBlobBytes(n) for allgather
// (plus the send blob for threshold), 3 x W slots of a slice plus n/W floats for reduce-scatter;
// one device residual per key. Thread-safety: not thread-safe (one thread at a time, any thread:
// every call selects the communicator's device). The destructor drains the stream (bounded by
// the timeout, then aborts) and destroys the NCCL communicator.
#ifndef QTRAIN_WORKER_COMM_NCCL_COMMUNICATOR_H_
#define QTRAIN_WORKER_COMM_NCCL_COMMUNICATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/comm/bucket_codec.h"
#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"

namespace qtrain::comm {

// The size of the NCCL unique id (NCCL_UNIQUE_ID_BYTES).
inline constexpr size_t kNcclIdBytes = 128;

// Who this rank is and how it learns rank 0's NCCL unique id.
struct NcclBootstrap {
  int rank = 0;
  int world_size = 1;
  // Rank among the ranks on this machine: picks the CUDA device when `device` is -1.
  int local_rank = 0;
  // CUDA device of this rank; -1: device 0 when one device is visible (a launcher that sets
  // CUDA_VISIBLE_DEVICES per rank), else local_rank (which must then be below the device count).
  int device = -1;
  // Called once on every rank with kNcclIdBytes bytes: on rank 0 they hold the id it made; on
  // the others they must be overwritten with rank 0's. Must not return before the others can get
  // the id. Required when world_size > 1.
  std::function<absl::Status(std::span<uint8_t> id)> exchange_id;
};

// The id travels through the TCP rendezvous of worker/comm/rendezvous.h (a Broadcast, then a
// Barrier so rank 0 closes its sockets only after everyone has it). Rank, world size and local
// rank come from `env`.
NcclBootstrap BootstrapFromLaunchEnv(const LaunchEnv& env, const RendezvousOptions& options = {});
// The id travels over an existing communicator (e.g. MpiCommunicator under mpirun) as 16
// AllGatherU64 calls of which rank 0's values count (exact for any bytes). Rank and world size
// come from `comm`, which must outlive the Create call.
NcclBootstrap BootstrapOverCommunicator(Communicator* comm, int local_rank);

// Test hook: what a rank is about to send. `d_blob` is the encoded blob in device memory and
// `d_blob_bytes` a device u64 holding its size (written by work already on `cuda_stream`).
struct NcclPayloadInfo {
  std::string_view what;  // "allgather", "slice" (to rank `slice`), "aggregate"
  int slice = -1;         // reduce-scatter: the slice index
  void* d_blob = nullptr;
  const uint64_t* d_blob_bytes = nullptr;
  uint64_t capacity = 0;
  void* cuda_stream = nullptr;  // the communicator's stream (cudaStream_t)
};

struct NcclOptions {
  // Codec spec (compression/codec_registry.h grammar): "fp32" (plain ncclAllReduce, the default),
  // "fp16", "onebit", "terngrad", "qsgd:levels=16" (dense coding only), "threshold:tau=0.01".
  std::string codec_spec = "fp32";
  // Error feedback: the spec's `ef` key or the codec's default, unless forced here.
  FeedbackChoice error_feedback = FeedbackChoice::kFromSpec;
  AllreduceAlgorithm algorithm = AllreduceAlgorithm::kAuto;
  // Longest any one call (and the start-up) may wait for its peers, in seconds (> 0). Default
  // 300, as the MPI adapter.
  double timeout_seconds = 300.0;
  // Seed of the stochastic codecs (see "Randomness" above).
  uint64_t seed = 1;
  // Test only: called for every blob this rank sends, after its encode is enqueued and before
  // the exchange (e.g. to read or corrupt it on `cuda_stream`).
  std::function<void(const NcclPayloadInfo& info)> payload_hook_for_testing;
};

class NcclCommunicator final : public Communicator {
 public:
  // Collective over the bootstrap's ranks. INVALID_ARGUMENT for bad options or codec spec
  // (UNIMPLEMENTED for a codec without a CUDA version, e.g. qsgd with Elias coding);
  // FAILED_PRECONDITION without a usable CUDA device; DEADLINE_EXCEEDED when the peers do not
  // all join within the timeout; UNAVAILABLE for NCCL errors; the bootstrap's own errors.
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(const NcclBootstrap& bootstrap,
                                                                 const NcclOptions& options);
  ~NcclCommunicator() override;

  int rank() const override;
  int world_size() const override;
  // The CUDA device this rank uses.
  int device() const;
  std::string Describe() const override;
  void SetStep(int64_t step) override;

  absl::Status AllReduceMean(std::string_view key, std::span<float> data,
                             StepStats* stats) override;
  bool SupportsDeviceBuffers() const override { return true; }
  absl::Status AllReduceMeanDevice(std::string_view key, float* d_data, size_t n,
                                   void* cuda_stream, StepStats* stats) override;
  absl::Status Broadcast(std::span<float> data, int root) override;
  absl::Status AllReduceSum(std::span<double> values) override;
  absl::StatusOr<std::vector<uint64_t>> AllGatherU64(uint64_t value) override;
  absl::Status Barrier() override;

  std::vector<std::string> ResidualKeys() const override;
  std::span<const float> Residual(std::string_view key) const override;
  absl::Status SetResidual(std::string_view key, std::span<const float> values) override;

  // Waits (up to the timeout) until everything enqueued on the communicator's stream is done,
  // and returns the first error the watchdog recorded, if any. For benchmarks and tests.
  absl::Status Synchronize();

 private:
  struct Impl;
  explicit NcclCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The factory the trainer uses (same as NcclCommunicator::Create).
absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    const NcclBootstrap& bootstrap, const NcclOptions& options);

}  // namespace qtrain::comm

#endif  // QTRAIN_WORKER_COMM_NCCL_COMMUNICATOR_H_
