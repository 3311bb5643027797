// The training loop: epochs of shuffled (sharded) mini-batches, forward, softmax cross-entropy,
// backward, SGD; evaluation on the test split after every epoch; a progress line, a JSON-lines
// metrics file, periodic checkpoints and resumption; a summary at the end.
//
// Reproducible: the same seed, flags and thread count give the same weights on the same
// machine (sampler, augmentation and initialization are all seeded; kernels split work
// deterministically).
//
// Thread-safety: a Trainer is driven by one thread; kernels use the pool in its CpuContext.
#ifndef QTRAIN_WORKER_TRAIN_TRAINER_H_
#define QTRAIN_WORKER_TRAIN_TRAINER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/data/augment.h"
#include "worker/data/dataset.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/nn/layer.h"
#include "worker/train/lr_schedule.h"
#include "worker/train/optimizer.h"

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
  uint64_t seed = 1;
  bool progress = true;         // the progress line on stderr
  std::string settings;         // recorded in checkpoints, for humans
  int rank = 0;                 // this worker's rank and the worker count (data sharding)
  int world_size = 1;
};

absl::Status ValidateTrainerOptions(const TrainerOptions& options);

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
  double seconds = 0;
  double images_per_second = 0;  // training images per second of training time
};

class Trainer {
 public:
  // `model` and `data` must outlive the trainer.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(nn::Layer* model, ModelInfo info,
                                                         const data::DataSplits* data,
                                                         const data::AugmentOptions& augment,
                                                         const TrainerOptions& options,
                                                         kernels::CpuContext cpu);

  absl::StatusOr<TrainSummary> Run();
  absl::StatusOr<EvalResult> Evaluate(const data::Dataset& dataset);

  // Checkpoint file inside checkpoint_dir.
  std::string CheckpointPath() const;

 private:
  Trainer() = default;
  absl::Status SaveCheckpoint(int64_t next_epoch, int64_t step, double best);
  absl::Status MaybeResume(int64_t* epoch, int64_t* step, double* best);

  nn::Layer* model_ = nullptr;
  ModelInfo info_;
  const data::DataSplits* data_ = nullptr;
  data::AugmentOptions augment_;
  TrainerOptions options_;
  nn::RunContext ctx_;
  std::vector<nn::Parameter*> params_;
  std::vector<nn::Buffer*> buffers_;
  std::unique_ptr<Sgd> sgd_;
};

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_TRAINER_H_
