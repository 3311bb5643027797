#include "worker/train/schedule.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"

namespace qtrain::train {
namespace {

using quant::Method;
using quant::QuantConfig;
using quant::QuantSpec;

bool HasBitsKnob(Method m) {
  return m == Method::kDorefa || m == Method::kPact || m == Method::kSawb || m == Method::kQil;
}

QuantSpec WithBits(QuantSpec spec, int bits) {
  if (bits >= 32) return QuantSpec{};  // full precision
  spec.bits = bits;
  return spec;
}

}  // namespace

absl::StatusOr<ScheduleKind> ParseScheduleKind(absl::string_view text) {
  if (text.empty() || text == "none") return ScheduleKind::kNone;
  if (text == "ts") return ScheduleKind::kTwoStage;
  if (text == "pq") return ScheduleKind::kProgressive;
  if (text == "pq+ts") return ScheduleKind::kProgressiveTwoStage;
  return absl::InvalidArgumentError(
      absl::StrCat("--schedule must be none, ts, pq or pq+ts; got '", text, "'"));
}

absl::StatusOr<std::vector<int64_t>> ParseIntList(absl::string_view flag, absl::string_view text) {
  std::vector<int64_t> out;
  if (text.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, " is empty"));
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(part, &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": '", part, "' is not an integer (in '", text, "')"));
    }
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<std::vector<SchedulePhase>> MakeSchedule(const ScheduleOptions& options,
                                                        const QuantConfig& target_in) {
  std::vector<SchedulePhase> phases;
  if (options.kind == ScheduleKind::kNone) return phases;
  QuantConfig target = target_in;
  const bool two_stage = options.kind == ScheduleKind::kTwoStage ||
                         options.kind == ScheduleKind::kProgressiveTwoStage;
  const int k = options.ts_act_bits;
  if (two_stage && (k < 1 || (k > 8 && k != 32))) {
    return absl::InvalidArgumentError(
        absl::StrCat("--ts_act_bits must be in 1..8 or 32 (full precision), got ", k));
  }
  // Stage 1 of a two-stage step whose stage 2 is `stage2`: weights as stage 2, activations full
  // precision or at K bits (if K is above stage 2's activation bits).
  auto stage1 = [&](const QuantConfig& stage2) -> absl::StatusOr<QuantConfig> {
    QuantConfig c = stage2;
    if (k == 32 || stage2.activation.method == Method::kNone) {
      c.activation = QuantSpec{};
    } else if (k <= stage2.activation.bits) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--ts_act_bits=", k, " must exceed the target activation bits (",
          stage2.activation.bits, ") or be 32 (full-precision activations in stage 1)"));
    } else {
      c.activation = WithBits(stage2.activation, k);
    }
    return c;
  };

  if (options.kind == ScheduleKind::kTwoStage) {
    if (target.weight.method == Method::kNone || target.activation.method == Method::kNone) {
      return absl::InvalidArgumentError(
          "--schedule=ts needs a target that quantizes weights and activations (--quant, e.g. "
          "dorefa:w=2,a=2, or --wq and --aq)");
    }
    ASSIGN_OR_RETURN(QuantConfig s1, stage1(target));
    phases.push_back({"ts1", 0, s1});
    phases.push_back({"ts2", 0, target});
  } else {
    if (options.bits.empty()) {
      return absl::InvalidArgumentError("--schedule=pq needs --bits, e.g. 32,8,4,2");
    }
    for (size_t i = 0; i < options.bits.size(); ++i) {
      const int b = options.bits[i];
      if (b < 1 || (b > 8 && b != 32)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--bits entries must be in 1..8 or 32, got ", b));
      }
      if (i > 0 && b >= options.bits[i - 1]) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--bits must decrease from high to low precision, got ", options.bits[i - 1], " then ", b));
      }
    }
    if (!target.quantizes()) {  // the paper's base quantizer
      target.weight = QuantSpec{Method::kDorefa, options.bits.back()};
      target.activation = QuantSpec{Method::kDorefa, options.bits.back()};
    }
    for (const QuantSpec* s : {&target.weight, &target.activation}) {
      if (s->method != Method::kNone && !HasBitsKnob(s->method)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--schedule=pq needs quantizers with a bit-width (dorefa, pact, sawb, qil); ",
            quant::MethodName(s->method), " has none"));
      }
    }
    for (int b : options.bits) {
      QuantConfig step = target;
      if (b == 32) {
        step.weight = QuantSpec{};
        step.activation = QuantSpec{};
        phases.push_back({"pq32", 0, step});
        continue;
      }
      if (step.weight.method != Method::kNone) {
        step.weight = WithBits(step.weight, std::max(b, target.weight.bits));
      }
      if (step.activation.method != Method::kNone) {
        step.activation = WithBits(step.activation, std::max(b, target.activation.bits));
      }
      const std::string name = absl::StrCat("pq", b);
      if (options.kind == ScheduleKind::kProgressiveTwoStage &&
          step.activation.method != Method::kNone) {
        QuantConfig s1 = step;
        if (k == 32 || k <= step.activation.bits) {
          s1.activation = QuantSpec{};
        } else {
          s1.activation = WithBits(step.activation, k);
        }
        phases.push_back({name + ".ts1", 0, s1});
        phases.push_back({name + ".ts2", 0, step});
      } else {
        phases.push_back({name, 0, step});
      }
    }
    if (phases.back().quant.ToString() != target.ToString()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the last --bits entry (", options.bits.back(), ") gives ",
          phases.back().quant.ToString(), ", not the target ", target.ToString()));
    }
  }
  if (options.stage_epochs.size() != phases.size()) {
    std::string names;
    for (const SchedulePhase& p : phases) absl::StrAppend(&names, names.empty() ? "" : ",", p.name);
    return absl::InvalidArgumentError(absl::StrCat(
        "--stage_epochs needs one entry per phase (", phases.size(), ": ", names, "), got ",
        options.stage_epochs.size()));
  }
  for (size_t i = 0; i < phases.size(); ++i) {
    if (options.stage_epochs[i] < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--stage_epochs entries must be >= 1, got ", options.stage_epochs[i]));
    }
    phases[i].epochs = options.stage_epochs[i];
    absl::StatusOr<std::unique_ptr<quant::QuantLayerFactory>> f =
        quant::QuantLayerFactory::Create(phases[i].quant);
    if (!f.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("schedule phase ", phases[i].name, " (",
                                                     phases[i].quant.ToString(),
                                                     "): ", f.status().message()));
    }
  }
  return phases;
}

std::string ScheduleToString(const std::vector<SchedulePhase>& phases) {
  std::string out;
  for (const SchedulePhase& p : phases) {
    absl::StrAppend(&out, out.empty() ? "" : "|", p.name, ":", p.epochs, ":", p.quant.ToString());
  }
  return out;
}

CopyCounts CopyStateByName(nn::Layer& from, nn::Layer& to) {
  CopyCounts counts;
  std::vector<nn::Parameter*> from_params, to_params;
  std::vector<nn::Buffer*> from_buffers, to_buffers;
  from.CollectParameters(&from_params);
  to.CollectParameters(&to_params);
  from.CollectBuffers(&from_buffers);
  to.CollectBuffers(&to_buffers);
  std::map<std::string, const nn::Tensor*> src;
  for (const nn::Parameter* p : from_params) src[p->name] = &p->value;
  for (nn::Parameter* p : to_params) {
    ++counts.parameters_total;
    auto it = src.find(p->name);
    if (it == src.end() || it->second->shape() != p->value.shape()) continue;
    std::copy(it->second->data(), it->second->data() + p->value.size(), p->value.data());
    ++counts.parameters;
  }
  src.clear();
  for (const nn::Buffer* b : from_buffers) src[b->name] = &b->value;
  for (nn::Buffer* b : to_buffers) {
    ++counts.buffers_total;
    auto it = src.find(b->name);
    if (it == src.end() || it->second->shape() != b->value.shape()) continue;
    std::copy(it->second->data(), it->second->data() + b->value.size(), b->value.data());
    ++counts.buffers;
  }
  return counts;
}

}  // namespace qtrain::train
