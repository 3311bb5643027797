// Training schedules for low-bit networks (Zhuang, Shen, Tan, Liu and Reid, "Towards Effective
// Low-bitwidth Convolutional Neural Networks", CVPR 2018): a run is a list of phases, each a
// number of epochs trained with its own quantization (QuantConfig).
//
//   ts     two-stage optimisation: stage 1 quantizes the weights only (activations full precision,
//          or at a higher bit-width K = ts_act_bits with the target's activation method); stage 2
//          quantizes both, as the target. --stage_epochs=E1,E2.
//   pq     progressive quantization: --bits=32,8,4,2 from high to low, one phase per entry
//          (32 = full precision; b < 32: weights and activations at max(b, target bits) with the
//          target's methods). The last entry must give the target. --stage_epochs: one per entry.
//   pq+ts  pq with two-stage inside every quantized step: a step b < 32 becomes (weights b,
//          activations FP or K if K > b) then (weights b, activations b). --stage_epochs: one per
//          phase (1 for a 32 entry, 2 for every other).
// The target (the base quantizer) is --quant/--wq/--aq. For pq with a full-precision target the
// base quantizer defaults to DoReFa (the paper's) at the last --bits; ts needs a quantized target.
//
// Each phase starts from the previous phase's model: the trainer rebuilds the model with the
// phase's factory and copies every parameter and buffer whose name and shape match
// (CopyStateByName: the full-precision master weights, batch-norm statistics, and quantizer
// parameters such as PACT's alpha where present in both). What the copy cannot carry restarts:
// SGD momentum (zero), the learning-rate schedule (each phase runs --lr_schedule over its own
// epochs, as the paper trains each stage with its own schedule), and new quantizer parameters
// (their initial value). Phase boundaries are epochs, so every rank changes phase at the same step.
//
// Thread-safety: pure functions; CopyStateByName touches only its arguments. Cost: negligible
// except CopyStateByName (one copy of the model's state).
#ifndef QTRAIN_WORKER_TRAIN_SCHEDULE_H_
#define QTRAIN_WORKER_TRAIN_SCHEDULE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/nn/layer.h"
#include "worker/quant/quant_factory.h"

namespace qtrain::train {

enum class ScheduleKind { kNone, kTwoStage, kProgressive, kProgressiveTwoStage };

struct ScheduleOptions {
  ScheduleKind kind = ScheduleKind::kNone;
  std::vector<int64_t> stage_epochs;  // epochs per phase, in order
  std::vector<int> bits;              // pq, pq+ts: the precision sequence (32 = full precision)
  int ts_act_bits = 32;               // ts, pq+ts: stage-1 activation bits (32 = full precision)
};

struct SchedulePhase {
  std::string name;  // "ts1", "ts2", "pq8", "pq4.ts1", ...
  int64_t epochs = 0;
  quant::QuantConfig quant;
};

// "none" | "ts" | "pq" | "pq+ts". INVALID_ARGUMENT otherwise.
absl::StatusOr<ScheduleKind> ParseScheduleKind(absl::string_view text);
// "1,2,3" -> {1,2,3}; INVALID_ARGUMENT naming `flag` for an empty list or a bad number.
absl::StatusOr<std::vector<int64_t>> ParseIntList(absl::string_view flag, absl::string_view text);

// The phases for `options` and the target quantization. INVALID_ARGUMENT for inconsistent flags
// (epoch count per phase, a non-decreasing --bits, a K not above the target, a phase no factory
// can build, ...); the message names the flag.
absl::StatusOr<std::vector<SchedulePhase>> MakeSchedule(const ScheduleOptions& options,
                                                        const quant::QuantConfig& target);

// "ts1:2:w=...;a=...|ts2:2:..." — recorded in checkpoints; --resume rejects a different one.
std::string ScheduleToString(const std::vector<SchedulePhase>& phases);

struct CopyCounts {
  int parameters = 0;        // copied
  int parameters_total = 0;  // in `to`
  int buffers = 0;
  int buffers_total = 0;
};
// Copies every parameter value and buffer of `from` into the parameter / buffer of `to` with the
// same name and shape; the rest of `to` is left as it is. Gradients are not copied.
CopyCounts CopyStateByName(nn::Layer& from, nn::Layer& to);

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_SCHEDULE_H_
