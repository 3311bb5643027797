// The training loop: epochs of shuffled (sharded) mini-batches, forward, softmax cross-entropy,
// backward, gradient averaging across data-parallel ranks, SGD; evaluation on the test split
// after every epoch; a progress line, a JSON-lines metrics file, periodic checkpoints and
// resumption; a summary at the end.
//
// Data parallelism. The trainer runs the same on every rank of its Communicator (rank and world
// size come from it). Each rank trains on its own shard (data::ShardedSampler). During Backward
// the gradients are bucketed in reverse layer order and averaged on a communication thread
// (worker/train/gradient_buckets.h) that overlaps the rest of backward; the SGD step waits for
// the mean. Every parameter is averaged, quantizer parameters (ParamKind::kQuantizer) included.
// With a communicator whose AllReduceMean is the identity (Communicator::IsIdentity: one process,
// no codec) nothing is bucketed and a step costs nothing extra.
//   - Start (and after --resume): rank 0's parameters, buffers and momentum are broadcast to
//     every rank, so all start from the same bits even if their initializations differed, and
//     the ranks check that they resumed at the same epoch and step.
//   - Joining a running job (Communicator::JoinRunningJob; today a restarted parameter-server
//     worker): instead of the broadcast (and of --resume), the worker takes a live peer's
//     parameters, buffers and momentum at a step boundary and starts at that peer's epoch, step
//     and batch within the epoch, so its sampler gives it its own disjoint shard of the batches
//     its peers are at (the augmentation stream of that epoch restarts, which only changes its
//     own gradients). Its error-feedback residuals start at zero. The position must fit this
//     run's flags (epochs, steps per epoch), else FAILED_PRECONDITION. Every rank checks
//     Communicator::HandoverRequested before each step and, when asked, hands its state over
//     (ServeJoiners). The joiner then applies the same averaged updates as its peers and ends
//     with the same weights; its batch-norm statistics join theirs at the next epoch end.
//   - Batch-norm running statistics (buffers) are not gradients: each rank's follow its own
//     shard. At each epoch end, before evaluation and checkpointing, they are averaged across
//     ranks (exactly, in double, through AllReduceSum), so every rank evaluates and saves the
//     same model.
//   - Evaluation: rank r evaluates the contiguous shard [r*n/W, (r+1)*n/W) of the test set and
//     the loss and correct sums are all-reduced, so every rank reports the same test accuracy.
//     The epoch's train loss and accuracy are summed over all ranks the same way.
//   - Rank 0 alone shows progress, writes metrics and the checkpoint; every rank reads the
//     checkpoint on --resume. Each rank writes its communicator's error-feedback residuals (if
//     any) to its own sidecar, checkpoint.rank<r>.qtrn (same framing as checkpoint.qtrn: a
//     pb::Checkpoint holding only identification, progress and residuals, settings =
//     TrainerOptions::comm_settings). On resume a rank restores its residuals only if its
//     sidecar's epoch and step equal the checkpoint's and its settings equal this run's comm
//     settings; otherwise it logs a warning and its residuals start at zero (error feedback then
//     merely restarts; the run stays correct).
//   - End: every rank hashes its parameters and buffers (64-bit FNV-1a over the raw float bytes,
//     in CollectParameters / CollectBuffers order) and the hashes are all-gathered; ranks that
//     differ from rank 0 make Run fail with INTERNAL naming them.
// A failing collective (a stalled or dead peer: DEADLINE_EXCEEDED, UNAVAILABLE, ...) makes Run
// return that error, prefixed with this rank and the step; the caller must then abort the job
// (under MPI, comm::AbortMpi) so the other ranks do not wait.
//
// Reproducible: the same seed, flags, thread count and rank count give the same weights on the
// same machine (sampler, augmentation and initialization are all seeded; kernels split work
// deterministically; the communicators give every rank the same bits).
//
// Thread-safety: a Trainer is driven by one thread; kernels use the pool in its CpuContext; the
// communicator is used by the bucketer's thread during a step and by the trainer's thread
// between steps, never by both at once.
#ifndef QTRAIN_WORKER_TRAIN_TRAINER_H_
#define QTRAIN_WORKER_TRAIN_TRAINER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/comm/communicator.h"
#include "worker/data/augment.h"
#include "worker/data/dataset.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/nn/layer.h"
#include "worker/train/lr_schedule.h"
#include "worker/train/gradient_buckets.h"
#include "worker/train/guided.h"
#include "worker/train/optimizer.h"
#include "worker/train/step_engine.h"

namespace qtrain::train {

struct TrainerOptions {
  int64_t epochs = 15;
  int64_t batch_size = 128;
  int64_t eval_batch_size = 500;
  // > 0 caps the steps of every epoch (smoke tests and quick looks); 0 runs whole epochs.
  int64_t max_steps_per_epoch = 0;
  LrScheduleOptions lr;
  SgdOptions sgd;
  // A step record goes to the metrics file every `log_every` steps (and the last of an epoch).
  int64_t log_every = 50;
  std::string metrics_path;     // "" = no metrics file
  std::string checkpoint_dir;   // "" = no checkpoints
  int64_t checkpoint_every = 1; // epochs between checkpoints (the last epoch always writes one)
  bool resume = false;          // continue from checkpoint_dir/checkpoint.qtrn if it exists
  // A run that starts from scratch (nothing resumed) first copies the parameters and buffers of
  // this checkpoint (a checkpoint.qtrn or the directory holding one; same model, input and
  // classes) by name and shape: fine-tuning, e.g. a quantized model from a full-precision one.
  // Tensors it lacks (quantizer parameters) keep their initial values; momentum starts at zero;
  // a guided run's full-precision twin starts from it too. "" = off.
  std::string init_from;
  uint64_t seed = 1;
  bool progress = true;         // the progress line on stderr
  std::string settings;         // recorded in checkpoints, for humans
  // Gradient bucket size in bytes of fp32 (> 0; default 4 MiB).
  int64_t bucket_bytes = int64_t{4} << 20;
  // The communicator's per-call timeout in seconds (> 0): the trainer waits for a step's gradient
  // averaging at most (buckets + 1) times this before it gives up.
  double comm_timeout_seconds = 120.0;
  // The communication settings that shape the residuals (codec, error feedback, algorithm, bucket
  // size, world size), recorded in the per-rank residual sidecars and compared on resume.
  std::string comm_settings;
  // Test only: rank `stall_rank_for_testing` sleeps `stall_seconds_for_testing` seconds at the
  // start of global step `stall_step_for_testing` (0-based), to exercise the peers' timeouts.
  int stall_rank_for_testing = -1;
  int64_t stall_step_for_testing = -1;
  double stall_seconds_for_testing = 3600.0;
  // Test only: > 0 makes Run return after this many epochs of this run (after their checkpoint),
  // as if the job had been killed there.
  int64_t stop_after_epochs_for_testing = 0;
  // Where the step runs: empty = the CPU layers; otherwise the factory builds the engine for each
  // model the trainer attaches (qtrain --device=cuda passes the CUDA engine's). See step_engine.h
  // for when the trainer pushes and pulls state. Guided training needs the CPU layers.
  StepEngineFactory engine;
};

absl::Status ValidateTrainerOptions(const TrainerOptions& options);

// A multi-phase run (worker/train/schedule.h makes the phases from the flags). At the first step
// of the first epoch of phase i > 0 the trainer builds phase i's model, copies the previous
// model's parameters and buffers into it by name where the shapes match (CopyStateByName),
// restarts SGD momentum at zero and the learning-rate schedule (each phase runs
// TrainerOptions::lr over its own epochs), then continues. The same happens on every rank at the
// same step (phases are whole epochs). Error-feedback residuals are kept across a phase change
// when the gradient bucket plan is unchanged, else the changed buckets' residuals restart at zero.
// Checkpoints record the phase (pb::Checkpoint::phase) and `description`; --resume rebuilds the
// recorded phase's model and rejects a checkpoint with a different description.
struct PhasePlan {
  std::vector<std::string> names;
  std::vector<int64_t> epochs;              // per phase (>= 1); the sum is TrainerOptions::epochs
  std::vector<quant::QuantSpec> activation; // per phase: the activation quantizer (for Guide's Q)
  std::string description;
  // Builds phase i's model from scratch (seeded: the same every call).
  std::function<absl::StatusOr<std::unique_ptr<nn::Layer>>(int phase)> build;
};

struct ModelInfo {
  std::string name;              // "cnn", for checkpoints
  std::vector<int64_t> input;    // C, H, W
  int num_classes = 0;
};

struct EvalResult {
  double loss = 0;
  double accuracy = 0;
  int64_t examples = 0;
};

struct TrainSummary {
  int64_t epochs_run = 0;
  int64_t steps = 0;
  double final_test_accuracy = 0;
  double final_test_loss = 0;
  double best_test_accuracy = 0;
  double seconds = 0;             // rank 0's training time (steps, without evaluation)
  double images_per_second = 0;   // training images of all ranks per second of training time
  int ranks = 1;
  uint64_t weights_hash = 0;      // FNV-1a of parameters and buffers, identical on all ranks
  // This rank's gradient traffic over the run (comm::StepStats), and what the fp32 allreduce
  // would have sent (4 bytes per parameter per step; 0 in a one-process run).
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
  uint64_t fp32_bytes_sent = 0;
  double encode_seconds = 0;
  double communicate_seconds = 0;
  double decode_seconds = 0;
  // Phased runs: the global step at which each phase change (model rebuild) happened in this run.
  std::vector<int64_t> phase_change_steps;
  int final_phase = 0;
  // Guided runs: the full-precision twin's final test accuracy and loss, and the mean guidance
  // loss R of the last epoch.
  double fp_test_accuracy = 0;
  double fp_test_loss = 0;
  double guidance_loss = 0;
};

class Trainer {
 public:
  // `model`, `data` and `comm` must outlive the trainer; `comm` is not null.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(nn::Layer* model, ModelInfo info,
                                                         const data::DataSplits* data,
                                                         const data::AugmentOptions& augment,
                                                         const TrainerOptions& options,
                                                         kernels::CpuContext cpu,
                                                         comm::Communicator* comm);

  // A phased (and optionally guided) run: the trainer builds and owns the model of each phase
  // (see PhasePlan). `guide` (may be null) is the full-precision twin for guided training (its
  // gradients are averaged too; on a step engine the engine runs it).
  static absl::StatusOr<std::unique_ptr<Trainer>> CreatePhased(PhasePlan plan,
                                                               std::unique_ptr<Guide> guide,
                                                               ModelInfo info,
                                                               const data::DataSplits* data,
                                                               const data::AugmentOptions& augment,
                                                               const TrainerOptions& options,
                                                               kernels::CpuContext cpu,
                                                               comm::Communicator* comm);

  // Collective: every rank calls it.
  absl::StatusOr<TrainSummary> Run();
  // Collective: every rank evaluates its shard of `dataset`; all get the totals.
  absl::StatusOr<EvalResult> Evaluate(const data::Dataset& dataset);

  // Checkpoint file inside checkpoint_dir, and this rank's residual sidecar.
  std::string CheckpointPath() const;
  std::string ResidualPath() const;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  // The model being trained (a phased run's current phase's model), and the phase index.
  nn::Layer* model() const { return model_; }
  int phase() const { return phase_; }
  Guide* guide() const { return guide_.get(); }
  // The bucket plan (empty when nothing is bucketed).
  std::vector<GradientBucket> Buckets() const;

 private:
  Trainer() = default;
  absl::Status SaveCheckpoint(int64_t next_epoch, int64_t step, double best);
  absl::Status MaybeResume(int64_t* epoch, int64_t* step, double* best);
  absl::Status InitFrom(const std::string& where);
  // Restores this rank's residuals from its sidecar if it matches (see the file comment).
  void MaybeRestoreResiduals(int64_t epoch, int64_t step);
  // Rank 0's parameters, buffers and momentum to every rank; checks all agree on the progress.
  absl::Status SyncInitialState(int64_t epoch, int64_t step);
  // Parameters, buffers and momentum as one vector (in CollectParameters / CollectBuffers
  // order), and back (FAILED_PRECONDITION when the size is not this model's).
  std::vector<float> FlattenState() const;
  absl::Status UnflattenState(std::span<const float> flat);
  // A joining worker: checks the job's position against this run's flags, enters its phase and
  // takes the donor's state.
  absl::Status ApplyJoinState(const comm::JoinState& join, int64_t steps_per_epoch);
  // A donor: hands this worker's state at the boundary before `step` to the joining workers.
  absl::Status ServeJoiners(int64_t epoch, int64_t step_in_epoch, int64_t step, double best);
  // Averages `buffers` (batch-norm running statistics) across ranks.
  absl::Status AverageBuffers(const std::vector<nn::Buffer*>& buffers);
  // Guided training with a non-identity communicator: averages the full-precision twin's
  // gradients, bucketed like the low-bit model's under keys b<kTwinBucketBase + i>, on the
  // calling thread after the low-bit buckets are done (no overlap with backward).
  absl::Status AverageTwinGradients(comm::StepStats* stats);
  absl::StatusOr<uint64_t> CheckWeightsIdentical();
  // Create without AttachModel: checks the arguments and fills in everything but the model.
  static absl::StatusOr<std::unique_ptr<Trainer>> CreateDetached(
      nn::Layer* model, ModelInfo info, const data::DataSplits* data,
      const data::AugmentOptions& augment, const TrainerOptions& options, kernels::CpuContext cpu,
      comm::Communicator* comm);
  // Makes `model` the trained model: parameters, buffers, a fresh SGD and bucketer (or engine).
  absl::Status AttachModel(nn::Layer* model);
  // Builds phase `phase`'s model, copying the current one's state into it if `copy_state`.
  absl::Status EnterPhase(int phase, bool copy_state);
  int PhaseOfEpoch(int64_t epoch) const;
  absl::StatusOr<EvalResult> EvaluateModel(nn::Layer* model, const data::Dataset& dataset);
  // Prefixes a collective's error with this rank and the step.
  absl::Status RankError(const absl::Status& status, int64_t step) const;

  nn::Layer* model_ = nullptr;
  ModelInfo info_;
  const data::DataSplits* data_ = nullptr;
  data::AugmentOptions augment_;
  TrainerOptions options_;
  nn::RunContext ctx_;
  std::vector<nn::Parameter*> params_;
  std::vector<nn::Buffer*> buffers_;
  std::unique_ptr<Sgd> sgd_;
  comm::Communicator* comm_ = nullptr;
  int rank_ = 0;
  int world_size_ = 1;
  // Phased runs: the plan, the model the trainer owns, the current phase and the first epoch of
  // each phase; guided runs: the twin.
  std::unique_ptr<PhasePlan> plan_;
  std::vector<int64_t> phase_begin_epoch_;
  int phase_ = 0;
  std::unique_ptr<nn::Layer> owned_model_;
  std::unique_ptr<Guide> guide_;
  std::unique_ptr<GradientBucketer> bucketer_;  // null when the communicator is the identity
  std::vector<GradientBucket> engine_buckets_;   // the plan handed to a step engine
                                                // or an engine runs the step
  std::unique_ptr<StepEngine> engine_;          // null: the CPU layers run the step
  std::vector<GradientBucket> twin_buckets_;    // guided runs with a communicator
  TwinInputs twin_inputs_;                      // guided runs on a step engine
  std::vector<float> twin_flat_;
};

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_TRAINER_H_
