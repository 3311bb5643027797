#include "worker/train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace qtrain::train {

absl::Status ParseLrSchedule(std::string_view spec_in, LrScheduleOptions* options) {
  const absl::string_view spec(spec_in.data(), spec_in.size());
  if (spec == "constant") {
    options->decay = LrDecay::kConstant;
    return absl::OkStatus();
  }
  if (spec == "cosine") {
    options->decay = LrDecay::kCosine;
    return absl::OkStatus();
  }
  if (absl::StartsWith(spec, "step:")) {
    options->decay = LrDecay::kStep;
    options->milestones.clear();
    for (absl::string_view m : absl::StrSplit(spec.substr(5), ',', absl::SkipEmpty())) {
      double epoch = 0;
      if (!absl::SimpleAtod(m, &epoch) || !(epoch > 0) || !std::isfinite(epoch)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--lr_schedule: milestone '", m, "' is not a positive number of epochs"));
      }
      options->milestones.push_back(epoch);
    }
    if (options->milestones.empty()) {
      return absl::InvalidArgumentError("--lr_schedule: step: needs milestones, e.g. step:5,10");
    }
    std::sort(options->milestones.begin(), options->milestones.end());
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--lr_schedule: unknown schedule '", spec, "'; valid: constant, cosine, step:E1,E2,..."));
}

absl::StatusOr<LrSchedule> LrSchedule::Create(const LrScheduleOptions& o) {
  if (!(o.base_lr > 0) || !std::isfinite(o.base_lr)) {
    return absl::InvalidArgumentError(absl::StrCat("--lr must be positive, got ", o.base_lr));
  }
  if (!(o.warmup_epochs >= 0) || !(o.total_epochs > 0) || o.warmup_epochs > o.total_epochs) {
    return absl::InvalidArgumentError(absl::StrCat("--warmup_epochs (", o.warmup_epochs,
                                                   ") must be in [0, epochs (", o.total_epochs,
                                                   ")]"));
  }
  if (!(o.gamma > 0 && o.gamma <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--lr_gamma must be in (0, 1], got ", o.gamma));
  }
  if (!(o.final_fraction >= 0 && o.final_fraction <= 1)) {
    return absl::InvalidArgumentError("final lr fraction must be in [0, 1]");
  }
  return LrSchedule(o);
}

float LrSchedule::At(double t) const {
  const auto& o = options_;
  if (t < o.warmup_epochs) return static_cast<float>(o.base_lr * t / o.warmup_epochs);
  switch (o.decay) {
    case LrDecay::kConstant:
      return o.base_lr;
    case LrDecay::kStep: {
      double lr = o.base_lr;
      for (double m : o.milestones) {
        if (t >= m) lr *= o.gamma;
      }
      return static_cast<float>(lr);
    }
    case LrDecay::kCosine: {
      const double span = o.total_epochs - o.warmup_epochs;
      const double x = span > 0 ? std::clamp((t - o.warmup_epochs) / span, 0.0, 1.0) : 1.0;
      const double c = (1 + std::cos(std::numbers::pi * x)) / 2;
      return static_cast<float>(o.base_lr * (o.final_fraction + (1 - o.final_fraction) * c));
    }
  }
  return o.base_lr;
}

}  // namespace qtrain::train
