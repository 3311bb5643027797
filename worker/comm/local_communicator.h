// A Communicator for a run of one process (qtrain started without mpirun): world_size 1, no MPI.
//
// AllReduceMean is a no-op without a codec (spec "" or "fp32"). With a codec it still encodes the
// bucket with error feedback and decodes it back into `data`, so a one-process run sees the same
// compression (and residuals) as an MPI run with that codec: the same BucketCodec steps, the same
// Rng seeding (RankSeed(seed, 0)) and one Rng stream per bucket, as MpiCommunicator's allgather
// algorithm at world size 1. Broadcast, AllReduceSum, AllGatherU64 and Barrier are trivial.
//
// Cost: with a codec, one encode and one decode of each bucket (the payload is not serialized).
// Thread-safety: not thread-safe (see Communicator).
#ifndef QTRAIN_WORKER_COMM_LOCAL_COMMUNICATOR_H_
#define QTRAIN_WORKER_COMM_LOCAL_COMMUNICATOR_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "compression/codec.h"
#include "compression/rng.h"
#include "worker/comm/bucket_codec.h"
#include "worker/comm/communicator.h"

namespace qtrain::comm {

struct LocalOptions {
  // Codec spec (compression/codec_registry.h grammar). "" or "fp32": AllReduceMean does nothing.
  std::string codec_spec;
  FeedbackChoice error_feedback = FeedbackChoice::kFromSpec;
  // Seed of the stochastic codecs' Rng (the rank-0 seed is RankSeed(seed, 0)).
  uint64_t seed = 1;
  // Steps (SetStep) below this skip the codec, as MpiOptions::fp32_warmup_steps (>= 0).
  int64_t fp32_warmup_steps = 0;
};

class LocalCommunicator final : public Communicator {
 public:
  // INVALID_ARGUMENT for a bad codec spec.
  static absl::StatusOr<std::unique_ptr<LocalCommunicator>> Create(const LocalOptions& options);

  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string Describe() const override;
  void SetStep(int64_t step) override { step_ = step; }
  // True without a codec (spec "" or "fp32").
  bool IsIdentity() const override { return codec_ == nullptr; }

  absl::Status AllReduceMean(std::string_view key, std::span<float> data,
                             StepStats* stats) override;
  // INVALID_ARGUMENT unless root == 0.
  absl::Status Broadcast(std::span<float> data, int root) override;
  absl::Status AllReduceSum(std::span<double> values) override { return absl::OkStatus(); }
  absl::StatusOr<std::vector<uint64_t>> AllGatherU64(uint64_t value) override {
    return std::vector<uint64_t>{value};
  }
  absl::Status Barrier() override { return absl::OkStatus(); }

  std::vector<std::string> ResidualKeys() const override;
  std::span<const float> Residual(std::string_view key) const override;
  absl::Status SetResidual(std::string_view key, std::span<const float> values) override;

 private:
  LocalCommunicator(std::unique_ptr<BucketCodec> codec, const LocalOptions& options)
      : codec_(std::move(codec)),
        rng_(RankSeed(options.seed, 0)),
        fp32_warmup_steps_(options.fp32_warmup_steps) {}

  std::unique_ptr<BucketCodec> codec_;  // null: no codec (or fp32)
  compression::Rng rng_;
  int64_t fp32_warmup_steps_;
  compression::EncodedTensor encoded_;  // reused across calls
  int64_t step_ = 0;
};

}  // namespace qtrain::comm

#endif  // QTRAIN_WORKER_COMM_LOCAL_COMMUNICATOR_H_
