// A training step that runs somewhere other than the CPU layers: the CUDA engine
// (worker/nn/cuda/cuda_engine.h) implements it. The trainer stays the owner of everything around
// the step (data, schedules, metrics, checkpoints, evaluation bookkeeping, rank checks); an
// engine owns its own copy of the model's state and the arithmetic of a step.
//
// State. The host model (its nn::Parameter values, nn::Buffer values and the Sgd momentum) is the
// record the trainer reads and writes between steps. The trainer calls
//   PushState()  after it changed host state (initial broadcast, resume, buffer averaging), and
//   PullState()  before it reads host state (buffer averaging, checkpoints, the weights hash).
// Between those calls the engine's copy is the live one.
//
// Gradients. TrainStep averages the step's gradients through the communicator it was created with
// (skipping it when Communicator::IsIdentity()), bucket by bucket in the plan it was given, under
// the plan's keys, so error-feedback residuals and traffic are those of the CPU path.
//
// Guided training (train/guided.h). With StepEngineInputs::twin set, the engine also holds the
// full-precision twin: TrainStep runs both networks, the guidance loss between their guidance
// points, both backward passes, averages both gradient sets (the twin's under its own bucket keys)
// and steps both optimizers; PushState / PullState cover the twin (its Sgd momentum included).
//
// Thread-safety: driven by the trainer's thread only.
#ifndef QTRAIN_WORKER_TRAIN_STEP_ENGINE_H_
#define QTRAIN_WORKER_TRAIN_STEP_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/comm/communicator.h"
#include "worker/kernels/cpu/softmax_xent.h"
#include "worker/nn/layer.h"
#include "worker/train/gradient_buckets.h"
#include "worker/train/guided.h"
#include "worker/train/optimizer.h"

namespace qtrain::train {

class StepEngine {
 public:
  virtual ~StepEngine() = default;
  // One line for logs, e.g. "cuda: NVIDIA H200 (sm_90, 139.8 GiB), step graph on".
  virtual std::string Describe() const = 0;

  virtual absl::Status PushState() = 0;
  virtual absl::Status PullState() = 0;

  // Forward, softmax cross-entropy, backward, gradient averaging and the SGD update at `lr` on a
  // batch x [m, C, H, W] (host memory) with `labels` (m values). Returns the batch's mean loss and
  // correct count. `stats` gets the communication figures; `wait_seconds` the seconds spent
  // waiting for gradient averaging.
  virtual absl::StatusOr<kernels::SoftmaxXentResult> TrainStep(const nn::Tensor& x,
                                                               std::span<const int32_t> labels,
                                                               float lr, comm::StepStats* stats,
                                                               double* wait_seconds) = 0;
  // Forward in evaluation mode: mean loss and correct count of the batch.
  virtual absl::StatusOr<kernels::SoftmaxXentResult> EvalBatch(
      const nn::Tensor& x, std::span<const int32_t> labels) = 0;

  // With a twin: the last TrainStep's cross-entropies of both networks and R (without lambda).
  virtual GuidedStepResult LastGuidedStep() const { return {}; }
  // With a twin: the twin's forward in evaluation mode. FAILED_PRECONDITION without one.
  virtual absl::StatusOr<kernels::SoftmaxXentResult> EvalTwinBatch(
      const nn::Tensor& /*x*/, std::span<const int32_t> /*labels*/) {
    return absl::FailedPreconditionError("this step engine has no full-precision twin");
  }
};

// The full-precision twin of guided training: its host model (a Sequential of the low-bit
// model's architecture), parameters, buffers and optimizer (options as the low-bit model's), its
// gradient buckets (keys apart from the low-bit model's; empty when the communicator is the
// identity), the guidance points (direct children of both Sequentials) and lambda. Q at a point
// is the low-bit network's own activation quantizer there (its parameters shared, its parameter
// gradients from the guidance term discarded), the identity where that child is not one.
struct TwinInputs {
  nn::Layer* model = nullptr;
  std::vector<nn::Parameter*> params;
  std::vector<nn::Buffer*> buffers;
  Sgd* sgd = nullptr;
  std::vector<GradientBucket> buckets;
  std::vector<std::string> taps;
  float lambda = 1.0f;
};

// What an engine is built from: the host model, its parameters and buffers (CollectParameters /
// CollectBuffers order), its optimizer (momentum and options), the communicator and the bucket
// plan (empty when the communicator is the identity), and the largest batch it will see.
struct StepEngineInputs {
  nn::Layer* model = nullptr;
  std::vector<nn::Parameter*> params;
  std::vector<nn::Buffer*> buffers;
  Sgd* sgd = nullptr;
  SgdOptions sgd_options;
  comm::Communicator* comm = nullptr;
  std::vector<GradientBucket> buckets;
  std::vector<int64_t> input_chw;  // C, H, W
  int num_classes = 0;
  int64_t max_batch = 0;
  const TwinInputs* twin = nullptr;  // guided training; null otherwise
};

using StepEngineFactory =
    std::function<absl::StatusOr<std::unique_ptr<StepEngine>>(const StepEngineInputs&)>;

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_STEP_ENGINE_H_
