// Learning-rate schedules as a function of training progress measured in epochs (fractional),
// so they do not depend on how many steps an epoch has:
//
//   warm-up:  lr = base * t / warmup_epochs                         for t < warmup_epochs
//   constant: lr = base
//   step:     lr = base * gamma^(number of milestones <= t)
//   cosine:   lr = base * (f + (1 - f) * (1 + cos(pi * (t - w) / (total - w))) / 2), f = final_fraction
//
// Spec strings (the --lr_schedule flag): "constant", "cosine", "step:M1,M2,..." (milestones in
// epochs). Thread-safe (immutable).
#ifndef QTRAIN_WORKER_TRAIN_LR_SCHEDULE_H_
#define QTRAIN_WORKER_TRAIN_LR_SCHEDULE_H_

#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace qtrain::train {

enum class LrDecay { kConstant, kStep, kCosine };

struct LrScheduleOptions {
  float base_lr = 0.1f;
  LrDecay decay = LrDecay::kCosine;
  std::vector<double> milestones;  // kStep: epochs at which lr is multiplied by gamma
  float gamma = 0.1f;
  double warmup_epochs = 0;
  double total_epochs = 1;         // kCosine reaches final_fraction * base here
  float final_fraction = 0.0f;
};

// Parses the decay part ("constant", "cosine", "step:5,10") into `options`.
absl::Status ParseLrSchedule(std::string_view spec, LrScheduleOptions* options);

class LrSchedule {
 public:
  static absl::StatusOr<LrSchedule> Create(const LrScheduleOptions& options);
  // The learning rate after `epochs` epochs of progress (may be fractional).
  float At(double epochs) const;

 private:
  explicit LrSchedule(const LrScheduleOptions& options) : options_(options) {}
  LrScheduleOptions options_;
};

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_LR_SCHEDULE_H_
