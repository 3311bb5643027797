#include "worker/train/trainer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/timer.h"
#include "proto/checkpoint.pb.h"
#include "worker/data/batch.h"
#include "worker/data/sampler.h"
#include "worker/kernels/cpu/softmax_xent.h"
#include "worker/train/checkpoint.h"
#include "worker/train/metrics.h"
#include "worker/train/schedule.h"

namespace qtrain::train {
namespace {

// The full-precision twin's gradient buckets (guided training) are keyed b<kTwinBucketBase + i>,
// apart from the low-bit model's b<i> whatever a phase change does to their count.
constexpr int64_t kTwinBucketBase = int64_t{1} << 20;

constexpr char kCheckpointFile[] = "checkpoint.qtrn";

// FAILED_PRECONDITION unless `ckpt` (read from `path`) holds the model `info` describes.
absl::Status CheckSameModel(const pb::Checkpoint& ckpt, const std::string& path,
                            const ModelInfo& info) {
  const std::vector<int64_t> input(ckpt.input_shape().begin(), ckpt.input_shape().end());
  if (ckpt.model() != info.name || input != info.input || ckpt.num_classes() != info.num_classes) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint ", path, " holds model '", ckpt.model(), "' for input ",
        nn::ShapeToString(input), " with ", ckpt.num_classes(), " classes; this run trains '",
        info.name, "' for ", nn::ShapeToString(info.input), " with ", info.num_classes));
  }
  return absl::OkStatus();
}

// 64-bit FNV-1a over raw bytes.
constexpr uint64_t kFnvOffset = 14695981039346656037ull;
constexpr uint64_t kFnvPrime = 1099511628211ull;
uint64_t Fnv1a(uint64_t h, const void* data, size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < size; ++i) h = (h ^ p[i]) * kFnvPrime;
  return h;
}

std::string FormatBytes(double bytes) {
  if (bytes >= 1e9) return absl::StrFormat("%.2fGB", bytes / 1e9);
  if (bytes >= 1e6) return absl::StrFormat("%.1fMB", bytes / 1e6);
  if (bytes >= 1e3) return absl::StrFormat("%.1fkB", bytes / 1e3);
  return absl::StrFormat("%.0fB", bytes);
}

// Seeds derived from the run seed, one stream per purpose and epoch.
uint64_t DeriveSeed(uint64_t seed, uint64_t purpose, uint64_t epoch) {
  std::seed_seq seq{uint32_t(seed), uint32_t(seed >> 32), uint32_t(purpose), uint32_t(epoch)};
  uint64_t out[1];
  seq.generate(reinterpret_cast<uint32_t*>(out), reinterpret_cast<uint32_t*>(out) + 2);
  return out[0];
}

}  // namespace

absl::Status ValidateTrainerOptions(const TrainerOptions& o) {
  if (o.epochs < 1) return absl::InvalidArgumentError(absl::StrCat("--epochs must be >= 1, got ", o.epochs));
  if (o.batch_size < 1 || o.batch_size > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("--batch_size must be in [1, 65536], got ", o.batch_size));
  }
  if (o.eval_batch_size < 1) return absl::InvalidArgumentError("eval batch size must be >= 1");
  if (o.max_steps_per_epoch < 0) {
    return absl::InvalidArgumentError("--max_steps_per_epoch must be >= 0");
  }
  if (o.log_every < 1) return absl::InvalidArgumentError("--log_every must be >= 1");
  if (o.checkpoint_every < 1) return absl::InvalidArgumentError("--checkpoint_every must be >= 1");
  if (o.resume && o.checkpoint_dir.empty()) {
    return absl::InvalidArgumentError("--resume needs --checkpoint_dir");
  }
  if (o.bucket_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--bucket_mb must be > 0 (bucket of ", o.bucket_bytes, " bytes)"));
  }
  if (!(o.comm_timeout_seconds > 0) || !std::isfinite(o.comm_timeout_seconds)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--comm_timeout must be a number of seconds > 0, got ", o.comm_timeout_seconds));
  }
  return ValidateSgdOptions(o.sgd);
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(nn::Layer* model, ModelInfo info,
                                                        const data::DataSplits* data,
                                                        const data::AugmentOptions& augment,
                                                        const TrainerOptions& options,
                                                        kernels::CpuContext cpu,
                                                        comm::Communicator* comm) {
  ASSIGN_OR_RETURN(std::unique_ptr<Trainer> t,
                   CreateDetached(model, std::move(info), data, augment, options, cpu, comm));
  RETURN_IF_ERROR(t->AttachModel(model));
  return t;
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::CreateDetached(
    nn::Layer* model, ModelInfo info, const data::DataSplits* data,
    const data::AugmentOptions& augment, const TrainerOptions& options, kernels::CpuContext cpu,
    comm::Communicator* comm) {
  if (comm == nullptr) return absl::InvalidArgumentError("Trainer::Create: null communicator");
  RETURN_IF_ERROR(ValidateTrainerOptions(options));
  if (data->train.size() == 0 || data->test.size() == 0) {
    return absl::InvalidArgumentError("the data set has an empty train or test split");
  }
  const std::vector<int64_t> input = {data->train.channels, data->train.height, data->train.width};
  if (input != info.input || data->train.num_classes != info.num_classes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model ", info.name, " was built for input ", nn::ShapeToString(info.input), " and ",
        info.num_classes, " classes; the data has ", nn::ShapeToString(input), " and ",
        data->train.num_classes));
  }
  std::unique_ptr<Trainer> t(new Trainer());
  t->model_ = model;
  t->info_ = std::move(info);
  t->data_ = data;
  t->augment_ = augment;
  t->options_ = options;
  t->options_.lr.total_epochs = static_cast<double>(options.epochs);
  t->ctx_.cpu = cpu;
  t->comm_ = comm;
  t->rank_ = comm->rank();
  t->world_size_ = comm->world_size();
  if (t->rank_ != 0) t->options_.progress = false;
  return t;
}

absl::Status Trainer::AttachModel(nn::Layer* model) {
  bucketer_.reset();  // it points into the previous model's parameters
  engine_.reset();
  engine_buckets_.clear();
  ctx_.on_grads_ready = nullptr;
  model_ = model;
  params_.clear();
  buffers_.clear();
  model->CollectParameters(&params_);
  model->CollectBuffers(&buffers_);
  sgd_ = std::make_unique<Sgd>(params_, options_.sgd);
  StepEngineInputs engine_inputs;
  if (!comm_->IsIdentity()) {
    BucketOptions bucket_options;
    bucket_options.bucket_bytes = options_.bucket_bytes;
    ASSIGN_OR_RETURN(std::vector<GradientBucket> plan,
                     PlanGradientBuckets(params_, options_.bucket_bytes));
    bucket_options.wait_timeout_seconds =
        options_.comm_timeout_seconds * static_cast<double>(plan.size() + 1);
    // After a phase change: a residual whose bucket changed size restarts at zero.
    for (const GradientBucket& b : plan) {
      std::span<const float> old = comm_->Residual(b.key);
      if (!old.empty() && static_cast<int64_t>(old.size()) != b.elements) {
        std::vector<float> zeros(static_cast<size_t>(b.elements), 0.0f);
        RETURN_IF_ERROR(comm_->SetResidual(b.key, zeros));
      }
    }
    if (options_.engine) {
      engine_buckets_ = plan;
      engine_inputs.buckets = std::move(plan);
    } else {
      ASSIGN_OR_RETURN(bucketer_, GradientBucketer::Create(params_, comm_, bucket_options));
      GradientBucketer* bucketer = bucketer_.get();
      ctx_.on_grads_ready = [bucketer](std::span<nn::Parameter* const> ready) {
        bucketer->OnGradsReady(ready);
      };
    }
  }
  if (options_.engine) {
    engine_inputs.model = model;
    engine_inputs.params = params_;
    engine_inputs.buffers = buffers_;
    engine_inputs.sgd = sgd_.get();
    engine_inputs.sgd_options = options_.sgd;
    engine_inputs.comm = comm_;
    engine_inputs.input_chw = info_.input;
    engine_inputs.num_classes = info_.num_classes;
    engine_inputs.max_batch = std::max(options_.batch_size, options_.eval_batch_size);
    if (twin_inputs_.model != nullptr) engine_inputs.twin = &twin_inputs_;
    ASSIGN_OR_RETURN(engine_, options_.engine(engine_inputs));
    if (rank_ == 0) QTRAIN_LOG(INFO) << "step engine: " << engine_->Describe();
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::CreatePhased(
    PhasePlan plan, std::unique_ptr<Guide> guide, ModelInfo info, const data::DataSplits* data,
    const data::AugmentOptions& augment, const TrainerOptions& options, kernels::CpuContext cpu,
    comm::Communicator* comm) {
  if (comm == nullptr) return absl::InvalidArgumentError("Trainer::CreatePhased: null communicator");
  const size_t n = plan.epochs.size();
  if (n == 0 || plan.names.size() != n || plan.activation.size() != n || !plan.build) {
    return absl::InvalidArgumentError("Trainer::CreatePhased: an empty or inconsistent plan");
  }
  int64_t total = 0;
  for (int64_t e : plan.epochs) {
    if (e < 1) return absl::InvalidArgumentError("every schedule phase needs >= 1 epoch");
    total += e;
  }
  if (total != options.epochs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the schedule's phases sum to ", total, " epochs but --epochs is ", options.epochs));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<nn::Layer> first, plan.build(0));
  // Attached below, once the guide (and the engine's twin) is known: the engine is built once.
  ASSIGN_OR_RETURN(std::unique_ptr<Trainer> t, CreateDetached(first.get(), std::move(info), data,
                                                              augment, options, cpu, comm));
  t->owned_model_ = std::move(first);
  t->plan_ = std::make_unique<PhasePlan>(std::move(plan));
  int64_t begin = 0;
  for (int64_t e : t->plan_->epochs) {
    t->phase_begin_epoch_.push_back(begin);
    begin += e;
  }
  t->guide_ = std::move(guide);
  if (t->guide_ != nullptr && !comm->IsIdentity()) {
    ASSIGN_OR_RETURN(t->twin_buckets_,
                     PlanGradientBuckets(t->guide_->fp_params(), options.bucket_bytes));
    for (size_t i = 0; i < t->twin_buckets_.size(); ++i) {
      t->twin_buckets_[i].key = absl::StrCat("b", kTwinBucketBase + static_cast<int64_t>(i));
    }
  }
  if (t->guide_ != nullptr) {
    RETURN_IF_ERROR(t->guide_->Bind(t->model_, t->plan_->activation[0]));
    if (options.engine) {  // the engine runs the twin too
      TwinInputs& twin = t->twin_inputs_;
      twin.model = t->guide_->fp_model();
      twin.params = t->guide_->fp_params();
      twin.buffers = t->guide_->fp_buffers();
      twin.sgd = &t->guide_->fp_sgd();
      twin.buckets = t->twin_buckets_;
      twin.taps = t->guide_->options().layers;
      twin.lambda = t->guide_->options().lambda;
    }
  }
  RETURN_IF_ERROR(t->AttachModel(t->model_));
  return t;
}

int Trainer::PhaseOfEpoch(int64_t epoch) const {
  int phase = 0;
  for (size_t i = 0; i < phase_begin_epoch_.size(); ++i) {
    if (epoch >= phase_begin_epoch_[i]) phase = static_cast<int>(i);
  }
  return phase;
}

absl::Status Trainer::EnterPhase(int phase, bool copy_state) {
  ASSIGN_OR_RETURN(std::unique_ptr<nn::Layer> next, plan_->build(phase));
  CopyCounts counts;
  if (copy_state) counts = CopyStateByName(*model_, *next);
  RETURN_IF_ERROR(AttachModel(next.get()));
  owned_model_ = std::move(next);
  phase_ = phase;
  if (guide_ != nullptr) RETURN_IF_ERROR(guide_->Bind(model_, plan_->activation[phase]));
  if (copy_state) {
    QTRAIN_LOG(INFO) << "schedule: phase " << phase + 1 << "/" << plan_->epochs.size() << " ("
                     << plan_->names[phase] << ", " << plan_->epochs[phase]
                     << " epochs): model rebuilt; copied " << counts.parameters << "/"
                     << counts.parameters_total << " parameters and " << counts.buffers << "/"
                     << counts.buffers_total
                     << " buffers by name; SGD momentum and the learning-rate schedule restart";
  }
  return absl::OkStatus();
}

std::vector<GradientBucket> Trainer::Buckets() const {
  if (options_.engine) return engine_buckets_;
  if (bucketer_ == nullptr) return {};
  return bucketer_->buckets();
}

absl::Status Trainer::RankError(const absl::Status& status, int64_t step) const {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat("rank ", rank_, " of ", world_size_,
                                                  " at step ", step, ": ", status.message()));
}

std::string Trainer::ResidualPath() const {
  return (std::filesystem::path(options_.checkpoint_dir) /
          absl::StrCat("checkpoint.rank", rank_, ".qtrn"))
      .string();
}

std::vector<float> Trainer::FlattenState() const {
  std::vector<float> flat;
  auto append = [&flat](const nn::Tensor& t) { flat.insert(flat.end(), t.data(), t.data() + t.size()); };
  for (const nn::Parameter* p : params_) append(p->value);
  for (const nn::Buffer* b : buffers_) append(b->value);
  for (const nn::Tensor& m : sgd_->momentum()) append(m);
  return flat;
}

absl::Status Trainer::UnflattenState(std::span<const float> flat) {
  size_t expected = 0;
  for (const nn::Parameter* p : params_) expected += static_cast<size_t>(p->value.size());
  for (const nn::Buffer* b : buffers_) expected += static_cast<size_t>(b->value.size());
  for (const nn::Tensor& m : sgd_->momentum()) expected += static_cast<size_t>(m.size());
  if (flat.size() != expected) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the state holds ", flat.size(), " floats; this model's parameters, buffers and momentum "
        "are ", expected, " (start every worker with the same model and quantization flags)"));
  }
  size_t at = 0;
  auto extract = [&flat, &at](nn::Tensor& t) {
    std::copy(flat.begin() + at, flat.begin() + at + t.size(), t.data());
    at += t.size();
  };
  for (nn::Parameter* p : params_) extract(p->value);
  for (nn::Buffer* b : buffers_) extract(b->value);
  for (nn::Tensor& m : sgd_->momentum()) extract(m);
  return absl::OkStatus();
}

absl::Status Trainer::ApplyJoinState(const comm::JoinState& join, int64_t steps_per_epoch) {
  if (guide_ != nullptr) {
    return absl::FailedPreconditionError("guided training cannot join a running job");
  }
  if (join.epoch >= options_.epochs || join.step_in_epoch >= steps_per_epoch ||
      join.step != join.epoch * steps_per_epoch + join.step_in_epoch) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the running job is at epoch ", join.epoch, ", step ", join.step, " (", join.step_in_epoch,
        " of its epoch); with this worker's flags a run has ", options_.epochs, " epochs of ",
        steps_per_epoch, " steps (start every worker with the same flags)"));
  }
  if (plan_ != nullptr && PhaseOfEpoch(join.epoch) != phase_) {
    RETURN_IF_ERROR(EnterPhase(PhaseOfEpoch(join.epoch), /*copy_state=*/false));
  }
  return UnflattenState(join.state);
}

absl::Status Trainer::ServeJoiners(int64_t epoch, int64_t step_in_epoch, int64_t step,
                                   double best) {
  // The engine keeps the live state on its device; the host copy is refreshed first.
  if (engine_ != nullptr) RETURN_IF_ERROR(engine_->PullState());
  comm::JoinState state;
  state.donor = rank_;
  state.epoch = epoch;
  state.step = step;
  state.step_in_epoch = step_in_epoch;
  state.best_test_accuracy = best;
  state.state = FlattenState();
  return comm_->Handover(state);
}

absl::Status Trainer::SyncInitialState(int64_t epoch, int64_t step) {
  if (world_size_ == 1) return absl::OkStatus();
  // The same progress everywhere (a checkpoint directory that is not shared would break this).
  for (auto [what, value] : {std::pair<const char*, int64_t>{"epoch", epoch}, {"step", step}}) {
    ASSIGN_OR_RETURN(std::vector<uint64_t> all, comm_->AllGatherU64(static_cast<uint64_t>(value)));
    for (int r = 1; r < world_size_; ++r) {
      if (all[r] != all[0]) {
        return absl::FailedPreconditionError(absl::StrCat(
            "rank ", r, " starts at ", what, " ", static_cast<int64_t>(all[r]), " but rank 0 at ",
            static_cast<int64_t>(all[0]),
            ": every rank must read the same checkpoint (share --checkpoint_dir)"));
      }
    }
  }
  std::vector<float> flat = FlattenState();
  RETURN_IF_ERROR(comm_->Broadcast(flat, 0));
  return UnflattenState(flat);
}

absl::Status Trainer::AverageBuffers(const std::vector<nn::Buffer*>& buffers) {
  if (world_size_ == 1 || buffers.empty()) return absl::OkStatus();
  std::vector<double> sums;
  for (const nn::Buffer* b : buffers) sums.insert(sums.end(), b->value.data(), b->value.data() + b->value.size());
  RETURN_IF_ERROR(comm_->AllReduceSum(sums));
  size_t at = 0;
  for (nn::Buffer* b : buffers) {
    float* v = b->value.data();
    for (int64_t i = 0; i < b->value.size(); ++i) {
      v[i] = static_cast<float>(sums[at++] / world_size_);
    }
  }
  return absl::OkStatus();
}

absl::Status Trainer::AverageTwinGradients(comm::StepStats* stats) {
  const std::vector<nn::Parameter*> params = guide_->fp_params();
  for (const GradientBucket& b : twin_buckets_) {
    twin_flat_.resize(static_cast<size_t>(b.elements));
    for (size_t k = 0; k < b.params.size(); ++k) {
      const nn::Tensor& g = params[b.params[k]]->grad;
      std::copy(g.data(), g.data() + g.size(), twin_flat_.data() + b.offsets[k]);
    }
    RETURN_IF_ERROR(comm_->AllReduceMean(b.key, twin_flat_, stats));
    for (size_t k = 0; k < b.params.size(); ++k) {
      nn::Tensor& g = params[b.params[k]]->grad;
      std::copy(twin_flat_.data() + b.offsets[k], twin_flat_.data() + b.offsets[k] + g.size(),
                g.data());
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Trainer::CheckWeightsIdentical() {
  uint64_t h = kFnvOffset;
  for (const nn::Parameter* p : params_) h = Fnv1a(h, p->value.data(), 4 * p->value.size());
  for (const nn::Buffer* b : buffers_) h = Fnv1a(h, b->value.data(), 4 * b->value.size());
  if (guide_ != nullptr) {  // the full-precision twin must agree too
    for (const nn::Parameter* p : guide_->fp_params()) {
      h = Fnv1a(h, p->value.data(), 4 * p->value.size());
    }
    for (const nn::Buffer* b : guide_->fp_buffers()) {
      h = Fnv1a(h, b->value.data(), 4 * b->value.size());
    }
  }
  ASSIGN_OR_RETURN(std::vector<uint64_t> all, comm_->AllGatherU64(h));
  std::string differ;
  for (int r = 1; r < static_cast<int>(all.size()); ++r) {
    if (all[r] != all[0]) {
      absl::StrAppend(&differ, differ.empty() ? "" : ", ", "rank ", r, " (",
                      absl::StrFormat("%016x", all[r]), ")");
    }
  }
  if (!differ.empty()) {
    return absl::InternalError(absl::StrCat(
        "weights differ across ranks after training: rank 0 has hash ",
        absl::StrFormat("%016x", all[0]), "; differing: ", differ));
  }
  return h;
}

std::string Trainer::CheckpointPath() const {
  return (std::filesystem::path(options_.checkpoint_dir) / kCheckpointFile).string();
}

absl::Status Trainer::SaveCheckpoint(int64_t next_epoch, int64_t step, double best) {
  if (options_.checkpoint_dir.empty()) return absl::OkStatus();
  const std::vector<std::string> residual_keys = comm_->ResidualKeys();
  if (rank_ != 0 && residual_keys.empty()) return absl::OkStatus();
  std::error_code ec;
  std::filesystem::create_directories(options_.checkpoint_dir, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot create --checkpoint_dir ", options_.checkpoint_dir, ": ", ec.message()));
  }
  if (!residual_keys.empty()) {
    // This rank's error-feedback residuals, first: a crash between the two files leaves a
    // sidecar whose step does not match the checkpoint, which resume detects.
    pb::Checkpoint side;
    side.set_model(info_.name);
    side.mutable_input_shape()->Assign(info_.input.begin(), info_.input.end());
    side.set_num_classes(info_.num_classes);
    side.set_epoch(next_epoch);
    side.set_step(step);
    side.set_seed(options_.seed);
    side.set_settings(options_.comm_settings);
    for (const std::string& key : residual_keys) {
      std::span<const float> r = comm_->Residual(key);
      pb::NamedTensor* t = side.add_residuals();
      t->set_name(key);
      t->add_shape(static_cast<int64_t>(r.size()));
      t->mutable_values()->Assign(r.begin(), r.end());
    }
    RETURN_IF_ERROR(WriteCheckpointFile(ResidualPath(), side));
  }
  if (rank_ != 0) return absl::OkStatus();
  pb::Checkpoint ckpt;
  ckpt.set_model(info_.name);
  ckpt.mutable_input_shape()->Assign(info_.input.begin(), info_.input.end());
  ckpt.set_num_classes(info_.num_classes);
  ckpt.set_epoch(next_epoch);
  ckpt.set_step(step);
  ckpt.set_seed(options_.seed);
  ckpt.set_settings(options_.settings);
  ckpt.set_best_test_accuracy(best);
  CaptureState(params_, buffers_, &sgd_->momentum(), &ckpt);
  if (plan_ != nullptr) {
    ckpt.set_phase(phase_);
    ckpt.set_schedule(plan_->description);
  }
  if (guide_ != nullptr) {
    CaptureState(guide_->fp_params(), guide_->fp_buffers(), &guide_->fp_sgd().momentum(),
                 ckpt.mutable_guide());
  }
  return WriteCheckpointFile(CheckpointPath(), ckpt);
}

absl::Status Trainer::MaybeResume(int64_t* epoch, int64_t* step, double* best) {
  if (!options_.resume) return InitFrom(options_.init_from);
  const std::string path = CheckpointPath();
  if (!std::filesystem::exists(path)) {
    QTRAIN_LOG(INFO) << "--resume: no checkpoint at " << path << ", starting from scratch";
    return InitFrom(options_.init_from);
  }
  if (!options_.init_from.empty()) {
    QTRAIN_LOG(INFO) << "--resume found " << path << "; --init_from=" << options_.init_from
                     << " is not used";
  }
  ASSIGN_OR_RETURN(pb::Checkpoint ckpt, ReadCheckpointFile(path));
  RETURN_IF_ERROR(CheckSameModel(ckpt, path, info_));
  if (ckpt.epoch() < 0 || ckpt.step() < 0) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, " has negative progress"));
  }
  const std::string this_schedule = plan_ != nullptr ? plan_->description : std::string();
  if (ckpt.schedule() != this_schedule) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint ", path, " was written by schedule '", ckpt.schedule(),
        "'; this run's schedule is '", this_schedule, "' (resume with the same schedule flags)"));
  }
  if (plan_ != nullptr) {
    if (ckpt.phase() < 0 || ckpt.phase() >= static_cast<int>(plan_->epochs.size())) {
      return absl::DataLossError(absl::StrCat("checkpoint ", path, " has phase ", ckpt.phase()));
    }
    if (ckpt.phase() != phase_) RETURN_IF_ERROR(EnterPhase(ckpt.phase(), /*copy_state=*/false));
  }
  if (guide_ != nullptr) {
    RETURN_IF_ERROR(RestoreState(ckpt.guide(), guide_->fp_params(), guide_->fp_buffers(),
                                 &guide_->fp_sgd().momentum()));
  }
  if (absl::Status s = RestoreState(ckpt, params_, buffers_, &sgd_->momentum()); !s.ok()) {
    // Usually a different quantization: say what the checkpoint was trained with.
    return absl::Status(s.code(), absl::StrCat(s.message(), " (checkpoint ", path, " settings: ",
                                               ckpt.settings(), ")"));
  }
  *epoch = ckpt.epoch();
  *step = ckpt.step();
  *best = ckpt.best_test_accuracy();
  QTRAIN_LOG(INFO) << "resumed from " << path << " at epoch " << *epoch << ", step " << *step;
  MaybeRestoreResiduals(*epoch, *step);
  return absl::OkStatus();
}

absl::Status Trainer::InitFrom(const std::string& where) {
  if (where.empty()) return absl::OkStatus();
  const std::string path = std::filesystem::is_directory(where)
                               ? (std::filesystem::path(where) / kCheckpointFile).string()
                               : where;
  absl::StatusOr<pb::Checkpoint> ckpt = ReadCheckpointFile(path);
  if (!ckpt.ok()) {
    return absl::Status(ckpt.status().code(),
                        absl::StrCat("--init_from: ", ckpt.status().message()));
  }
  RETURN_IF_ERROR(CheckSameModel(*ckpt, path, info_));
  ASSIGN_OR_RETURN(MatchCounts counts, CopyMatchingState(*ckpt, params_, buffers_));
  if (counts.parameters == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--init_from: no parameter of ", path, " matches this model by name and shape"));
  }
  if (guide_ != nullptr) {
    RETURN_IF_ERROR(CopyMatchingState(*ckpt, guide_->fp_params(), guide_->fp_buffers()).status());
  }
  QTRAIN_LOG(INFO) << "--init_from: copied " << counts.parameters << "/"
                   << counts.parameters_total << " parameters and " << counts.buffers << "/"
                   << counts.buffers_total << " buffers from " << path
                   << " (the rest keep their initial values)";
  return absl::OkStatus();
}

void Trainer::MaybeRestoreResiduals(int64_t epoch, int64_t step) {
  const std::string path = ResidualPath();
  if (!std::filesystem::exists(path)) return;  // nothing saved: no error feedback then
  absl::StatusOr<pb::Checkpoint> side = ReadCheckpointFile(path);
  std::string why;
  if (!side.ok()) {
    why = std::string(side.status().message());
  } else if (side->epoch() != epoch || side->step() != step) {
    why = absl::StrCat("it is from epoch ", side->epoch(), " step ", side->step(),
                       ", the checkpoint from epoch ", epoch, " step ", step);
  } else if (side->settings() != options_.comm_settings) {
    why = absl::StrCat("it was written with '", side->settings(), "', this run uses '",
                       options_.comm_settings, "'");
  } else {
    for (const pb::NamedTensor& t : side->residuals()) {
      std::vector<float> values(t.values().begin(), t.values().end());
      if (absl::Status s = comm_->SetResidual(t.name(), values); !s.ok()) {
        why = std::string(s.message());
        break;
      }
    }
    if (why.empty()) {
      QTRAIN_LOG(INFO) << "rank " << rank_ << ": restored " << side->residuals_size()
                       << " error-feedback residuals from " << path;
      return;
    }
  }
  QTRAIN_LOG(WARNING) << "rank " << rank_ << ": not restoring error-feedback residuals from "
                      << path << " (" << why << "); they start at zero";
}

absl::StatusOr<EvalResult> Trainer::Evaluate(const data::Dataset& dataset) {
  return EvaluateModel(model_, dataset);
}

absl::StatusOr<EvalResult> Trainer::EvaluateModel(nn::Layer* model, const data::Dataset& dataset) {
  ctx_.mode = nn::Mode::kEval;
  const int64_t n = dataset.size();
  // This rank's contiguous shard.
  const int64_t first = n * rank_ / world_size_;
  const int64_t end = n * (rank_ + 1) / world_size_;
  const int64_t bs = options_.eval_batch_size;
  nn::Tensor x, logits;
  std::vector<int32_t> labels;
  std::vector<int64_t> idx;
  EvalResult result;
  double loss_sum = 0;
  int64_t correct = 0;
  for (int64_t begin = first; begin < end; begin += bs) {
    const int64_t m = std::min(bs, end - begin);
    idx.resize(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) idx[static_cast<size_t>(i)] = begin + i;
    x.Resize({m, dataset.channels, dataset.height, dataset.width});
    labels.resize(static_cast<size_t>(m));
    RETURN_IF_ERROR(data::GatherBatch(dataset, idx, x.span(), labels));
    kernels::SoftmaxXentResult r;
    if (engine_ != nullptr && model == model_) {
      ASSIGN_OR_RETURN(r, engine_->EvalBatch(x, labels));
    } else if (engine_ != nullptr && guide_ != nullptr && model == guide_->fp_model()) {
      ASSIGN_OR_RETURN(r, engine_->EvalTwinBatch(x, labels));
    } else {
      model->Forward(ctx_, x, &logits);
      ASSIGN_OR_RETURN(r, kernels::SoftmaxCrossEntropy(ctx_.cpu, m, logits.dim(1), logits.data(),
                                                       labels.data(), nullptr));
    }
    loss_sum += r.mean_loss * static_cast<double>(m);
    correct += r.correct;
  }
  if (world_size_ > 1) {
    double sums[2] = {loss_sum, static_cast<double>(correct)};
    RETURN_IF_ERROR(comm_->AllReduceSum(sums));
    loss_sum = sums[0];
    correct = static_cast<int64_t>(sums[1]);
  }
  result.examples = n;
  result.loss = loss_sum / static_cast<double>(n);
  result.accuracy = static_cast<double>(correct) / static_cast<double>(n);
  return result;
}

absl::StatusOr<TrainSummary> Trainer::Run() {
  const data::Dataset& train = data_->train;
  ASSIGN_OR_RETURN(LrSchedule schedule, LrSchedule::Create(options_.lr));
  std::vector<LrSchedule> phase_lr;  // phased runs: one schedule per phase, over its epochs
  if (plan_ != nullptr) {
    for (int64_t e : plan_->epochs) {
      LrScheduleOptions o = options_.lr;
      o.total_epochs = static_cast<double>(e);
      ASSIGN_OR_RETURN(LrSchedule s, LrSchedule::Create(o));
      phase_lr.push_back(s);
    }
  }
  ASSIGN_OR_RETURN(data::ShardedSampler sampler,
                   data::ShardedSampler::Create(train.size(), rank_, world_size_, options_.seed));
  ASSIGN_OR_RETURN(MetricsLog metrics,
                   MetricsLog::Open(rank_ == 0 ? options_.metrics_path : std::string()));
  int64_t steps_per_epoch = sampler.BatchesPerEpoch(options_.batch_size);
  if (options_.max_steps_per_epoch > 0) {
    steps_per_epoch = std::min(steps_per_epoch, options_.max_steps_per_epoch);
  }
  if (steps_per_epoch < 1) {
    return absl::InvalidArgumentError(absl::StrCat("the training split (", train.size(),
                                                   " examples) gives no batch of size ",
                                                   options_.batch_size));
  }
  int64_t start_epoch = 0, step = 0, start_batch = 0;
  double best = 0;
  // A worker that joins a running job (a restarted PS worker) starts where its peers are, from
  // a live peer's state; everyone else from step 0 or the checkpoint, with rank 0's state.
  absl::StatusOr<std::optional<comm::JoinState>> join = comm_->JoinRunningJob();
  if (!join.ok()) return RankError(join.status(), step);
  if (join->has_value()) {
    const comm::JoinState& j = **join;
    RETURN_IF_ERROR(RankError(ApplyJoinState(j, steps_per_epoch), j.step));
    start_epoch = j.epoch;
    step = j.step;
    start_batch = j.step_in_epoch;
    best = j.best_test_accuracy;
    // A warning: ranks other than 0 log only warnings, and a rejoin is a fault's recovery.
    QTRAIN_LOG(WARNING) << "rank " << rank_ << " rejoined the running job at epoch " << start_epoch
                     << ", step " << step << " (batch " << start_batch << " of the epoch) with "
                     << "the weights, buffers and momentum of rank " << j.donor
                     << "; its error-feedback residuals start at zero";
    comm_->SetStep(step);
  } else {
    RETURN_IF_ERROR(MaybeResume(&start_epoch, &step, &best));
    comm_->SetStep(step);
    RETURN_IF_ERROR(RankError(SyncInitialState(start_epoch, step), step));
  }
  if (engine_ != nullptr) RETURN_IF_ERROR(engine_->PushState());
  int64_t param_elements = 0;
  for (const nn::Parameter* p : params_) param_elements += p->value.size();
  ProgressLine progress(options_.progress);
  TrainSummary summary;
  summary.ranks = world_size_;
  summary.best_test_accuracy = best;
  nn::Tensor x, logits, dlogits;
  std::vector<int32_t> labels;
  double train_seconds = 0;
  int64_t train_images = 0;
  comm::StepStats run_stats;
  const int64_t total_steps = options_.epochs * steps_per_epoch;

  for (int64_t epoch = start_epoch; epoch < options_.epochs; ++epoch) {
    if (plan_ != nullptr && PhaseOfEpoch(epoch) != phase_) {
      RETURN_IF_ERROR(EnterPhase(PhaseOfEpoch(epoch), /*copy_state=*/true));
      summary.phase_change_steps.push_back(step);
    }
    double guidance_sum = 0;
    Timer epoch_timer;
    const std::vector<int64_t> indices = sampler.EpochIndices(epoch);
    std::mt19937_64 augment_rng(DeriveSeed(options_.seed, 1, static_cast<uint64_t>(epoch)));
    double loss_sum = 0, window_loss = 0;
    int64_t correct_sum = 0, seen = 0, window_correct = 0, window_seen = 0;
    double window_seconds = 0, window_compute = 0;
    comm::StepStats epoch_stats, window_stats;
    double epoch_compute = 0;
    int64_t epoch_steps = 0;
    Timer log_timer;
    for (int64_t b = epoch == start_epoch ? start_batch : 0; b < steps_per_epoch; ++b) {
      if (comm_->HandoverRequested()) {
        // A joining worker waits for this state (the communication thread is idle here).
        RETURN_IF_ERROR(RankError(ServeJoiners(epoch, b, step, best), step));
      }
      if (rank_ == options_.stall_rank_for_testing && step == options_.stall_step_for_testing) {
        std::fprintf(stderr, "qtrain: rank %d stalling at step %lld for %.0f s (test only)\n",
                     rank_, static_cast<long long>(step), options_.stall_seconds_for_testing);
        std::this_thread::sleep_for(
            std::chrono::duration<double>(options_.stall_seconds_for_testing));
      }
      Timer step_timer;
      auto batch = data::ShardedSampler::BatchOf(indices, b, options_.batch_size);
      const int64_t m = static_cast<int64_t>(batch.size());
      x.Resize({m, train.channels, train.height, train.width});
      labels.resize(batch.size());
      RETURN_IF_ERROR(data::GatherBatch(train, batch, augment_, augment_rng, x.span(), labels));
      const double progress_epochs = epoch + static_cast<double>(b) / steps_per_epoch;
      const float lr =
          plan_ != nullptr
              ? phase_lr[static_cast<size_t>(phase_)].At(
                    progress_epochs - static_cast<double>(phase_begin_epoch_[phase_]))
              : schedule.At(progress_epochs);

      ctx_.mode = nn::Mode::kTrain;
      kernels::SoftmaxXentResult r;
      comm::StepStats step_stats;
      double wait_seconds = 0;
      if (engine_ != nullptr) {
        absl::StatusOr<kernels::SoftmaxXentResult> e =
            engine_->TrainStep(x, labels, lr, &step_stats, &wait_seconds);
        if (!e.ok()) {
          progress.Finish();
          return RankError(e.status(), step);
        }
        r = *e;
        if (guide_ != nullptr) {
          const GuidedStepResult g = engine_->LastGuidedStep();
          guidance_sum += g.guidance;
          if (!std::isfinite(g.fp.mean_loss) || !std::isfinite(g.guidance)) r.mean_loss = NAN;
        }
      } else if (guide_ != nullptr) {
        // Both networks forward and backward (the low-bit one's gradients reach the bucketer).
        if (bucketer_ != nullptr) bucketer_->BeginStep(step);
        absl::StatusOr<GuidedStepResult> g = guide_->ForwardBackward(ctx_, x, labels);
        if (!g.ok()) return g.status();
        r = g->lowbit;
        guidance_sum += g->guidance;
        if (!std::isfinite(g->fp.mean_loss) || !std::isfinite(g->guidance)) r.mean_loss = NAN;
      } else {
        model_->Forward(ctx_, x, &logits);
        dlogits.Resize(logits.shape());
        ASSIGN_OR_RETURN(r, kernels::SoftmaxCrossEntropy(ctx_.cpu, m, logits.dim(1),
                                                         logits.data(), labels.data(),
                                                         dlogits.data()));
      }
      if (!std::isfinite(r.mean_loss)) {
        progress.Finish();
        return absl::FailedPreconditionError(absl::StrCat(
            "training diverged: loss is ", r.mean_loss, " at epoch ", epoch, " step ", step,
            " on rank ", rank_, " (learning rate ", lr, "); try a smaller --lr or a warm-up"));
      }
      if (engine_ == nullptr && guide_ == nullptr) {
        if (bucketer_ != nullptr) bucketer_->BeginStep(step);
        model_->Backward(ctx_, dlogits, nullptr);
      }
      if (bucketer_ != nullptr) {
        absl::Status s = bucketer_->FinishStep(&step_stats, &wait_seconds);
        if (!s.ok()) {
          progress.Finish();
          return RankError(s, step);
        }
      }
      if (guide_ != nullptr && bucketer_ != nullptr) {
        Timer twin_timer;
        absl::Status s = AverageTwinGradients(&step_stats);
        wait_seconds += twin_timer.Seconds();
        if (!s.ok()) {
          progress.Finish();
          return RankError(s, step);
        }
      }
      if (engine_ == nullptr) sgd_->Step(ctx_.cpu, lr);
      if (guide_ != nullptr && engine_ == nullptr) guide_->StepFp(ctx_.cpu, lr);
      ++step;

      const double step_seconds = step_timer.Seconds();
      const double compute_seconds = std::max(0.0, step_seconds - wait_seconds);
      train_seconds += step_seconds;
      train_images += m;
      loss_sum += r.mean_loss * m;
      correct_sum += r.correct;
      seen += m;
      window_loss += r.mean_loss * m;
      window_correct += r.correct;
      window_seen += m;
      window_seconds += step_seconds;
      window_compute += compute_seconds;
      window_stats += step_stats;
      epoch_stats += step_stats;
      epoch_compute += compute_seconds;
      ++epoch_steps;

      const bool last = b + 1 == steps_per_epoch;
      if ((step % options_.log_every) == 0 || last) {
        StepMetrics sm;
        sm.epoch = epoch;
        sm.step = step;
        sm.loss = window_loss / window_seen;
        sm.accuracy = static_cast<double>(window_correct) / window_seen;
        sm.lr = lr;
        sm.images_per_second = window_seen / std::max(window_seconds, 1e-9);
        sm.seconds_compute = window_compute;
        sm.seconds_encode = window_stats.encode_seconds;
        sm.seconds_communicate = window_stats.communicate_seconds;
        sm.seconds_decode = window_stats.decode_seconds;
        sm.bytes_sent = window_stats.bytes_sent;
        sm.bytes_received = window_stats.bytes_received;
        RETURN_IF_ERROR(metrics.Write(sm));
        window_loss = 0;
        window_correct = window_seen = 0;
        window_seconds = window_compute = 0;
        window_stats = comm::StepStats();
      }
      if (options_.progress && (log_timer.Seconds() > 0.5 || last)) {
        log_timer.Reset();
        const double rate = train_images / std::max(train_seconds, 1e-9);
        const int64_t steps_left = total_steps - (epoch * steps_per_epoch + b + 1);
        const double eta = steps_left * (train_seconds / std::max<int64_t>(1, train_images)) *
                           options_.batch_size;
        std::string line = absl::StrFormat(
            "epoch %d/%d  step %d/%d  loss %.4f  acc %.2f%%  lr %.4g  %.0f img/s  ETA %s",
            epoch + 1, options_.epochs, b + 1, steps_per_epoch, loss_sum / seen,
            100.0 * correct_sum / seen, lr, rate, FormatDuration(eta));
        if (bucketer_ != nullptr || (engine_ != nullptr && !comm_->IsIdentity())) {
          // Per-step means over the epoch so far.
          const double k = 1000.0 / static_cast<double>(epoch_steps);
          absl::StrAppendFormat(
              &line, "  | ms/step compute %.1f enc %.1f comm %.1f dec %.1f | sent %s recv %s /step",
              epoch_compute * k, epoch_stats.encode_seconds * k,
              epoch_stats.communicate_seconds * k, epoch_stats.decode_seconds * k,
              FormatBytes(static_cast<double>(epoch_stats.bytes_sent) / epoch_steps),
              FormatBytes(static_cast<double>(epoch_stats.bytes_received) / epoch_steps));
        }
        progress.Update(line);
      }
    }
    progress.Finish();
    run_stats += epoch_stats;
    comm_->SetStep(step);
    // Every rank's running statistics and train sums (the communication thread is idle here).
    if (engine_ != nullptr) RETURN_IF_ERROR(RankError(engine_->PullState(), step));
    RETURN_IF_ERROR(RankError(AverageBuffers(buffers_), step));
    if (guide_ != nullptr) RETURN_IF_ERROR(RankError(AverageBuffers(guide_->fp_buffers()), step));
    if (engine_ != nullptr && world_size_ > 1) {
      RETURN_IF_ERROR(RankError(engine_->PushState(), step));
    }
    if (world_size_ > 1) {
      double sums[3] = {loss_sum, static_cast<double>(correct_sum), static_cast<double>(seen)};
      RETURN_IF_ERROR(RankError(comm_->AllReduceSum(sums), step));
      loss_sum = sums[0];
      correct_sum = static_cast<int64_t>(sums[1]);
      seen = static_cast<int64_t>(sums[2]);
    }
    absl::StatusOr<EvalResult> evaluated = Evaluate(data_->test);
    if (!evaluated.ok()) return RankError(evaluated.status(), step);
    const EvalResult& test = *evaluated;
    best = std::max(best, test.accuracy);
    EpochMetrics em;
    em.epoch = epoch;
    em.step = step;
    em.train_loss = loss_sum / seen;
    em.train_accuracy = static_cast<double>(correct_sum) / seen;
    em.test_loss = test.loss;
    em.test_accuracy = test.accuracy;
    em.seconds = epoch_timer.Seconds();
    em.images_per_second = seen / std::max(em.seconds, 1e-9);
    RETURN_IF_ERROR(metrics.Write(em));
    if (options_.progress) {
      std::fprintf(stderr,
                   "epoch %lld/%lld done: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%% "
                   "| %s\n",
                   static_cast<long long>(epoch + 1), static_cast<long long>(options_.epochs),
                   em.train_loss, 100 * em.train_accuracy, test.loss, 100 * test.accuracy,
                   FormatDuration(em.seconds).c_str());
    }
    if (guide_ != nullptr) {
      absl::StatusOr<EvalResult> fp = EvaluateModel(guide_->fp_model(), data_->test);
      if (!fp.ok()) return RankError(fp.status(), step);
      summary.fp_test_accuracy = fp->accuracy;
      summary.fp_test_loss = fp->loss;
      summary.guidance_loss = guidance_sum / static_cast<double>(std::max<int64_t>(1, epoch_steps));
      QTRAIN_LOG(INFO) << absl::StrFormat(
          "guided: epoch %d full-precision twin test acc %.2f%% (loss %.4f), mean R %.5g",
          epoch + 1, 100 * fp->accuracy, fp->loss, summary.guidance_loss);
    }
    summary.final_test_accuracy = test.accuracy;
    summary.final_test_loss = test.loss;
    summary.best_test_accuracy = best;
    ++summary.epochs_run;
    if ((epoch + 1) % options_.checkpoint_every == 0 || epoch + 1 == options_.epochs) {
      RETURN_IF_ERROR(SaveCheckpoint(epoch + 1, step, best));
    }
    if (summary.epochs_run == options_.stop_after_epochs_for_testing) break;
  }
  comm_->SetStep(step);
  if (summary.epochs_run == 0) {
    // Resumed from a finished run: report the restored model's accuracy.
    absl::StatusOr<EvalResult> evaluated = Evaluate(data_->test);
    if (!evaluated.ok()) return RankError(evaluated.status(), step);
    summary.final_test_accuracy = evaluated->accuracy;
    summary.final_test_loss = evaluated->loss;
  }
  absl::StatusOr<uint64_t> hash = CheckWeightsIdentical();
  if (!hash.ok()) return RankError(hash.status(), step);
  summary.weights_hash = *hash;
  summary.steps = step;
  summary.final_phase = phase_;
  summary.seconds = train_seconds;
  summary.images_per_second =
      static_cast<double>(train_images) * world_size_ / std::max(train_seconds, 1e-9);
  summary.bytes_sent = run_stats.bytes_sent;
  summary.bytes_received = run_stats.bytes_received;
  summary.encode_seconds = run_stats.encode_seconds;
  summary.communicate_seconds = run_stats.communicate_seconds;
  summary.decode_seconds = run_stats.decode_seconds;
  const int64_t steps_run = summary.epochs_run * steps_per_epoch;
  summary.fp32_bytes_sent =
      world_size_ > 1 ? static_cast<uint64_t>(4 * param_elements * steps_run) : 0;
  return summary;
}

}  // namespace qtrain::train
