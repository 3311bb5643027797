#include "worker/train/trainer.h"

#include <cmath>
#include <filesystem>
#include <random>

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

namespace qtrain::train {
namespace {

constexpr char kCheckpointFile[] = "checkpoint.qtrn";

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
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", o.rank, " is not in [0, world size ", o.world_size, ")"));
  }
  return ValidateSgdOptions(o.sgd);
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(nn::Layer* model, ModelInfo info,
                                                        const data::DataSplits* data,
                                                        const data::AugmentOptions& augment,
                                                        const TrainerOptions& options,
                                                        kernels::CpuContext cpu) {
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
  model->CollectParameters(&t->params_);
  model->CollectBuffers(&t->buffers_);
  t->sgd_ = std::make_unique<Sgd>(t->params_, options.sgd);
  return t;
}

std::string Trainer::CheckpointPath() const {
  return (std::filesystem::path(options_.checkpoint_dir) / kCheckpointFile).string();
}

absl::Status Trainer::SaveCheckpoint(int64_t next_epoch, int64_t step, double best) {
  if (options_.checkpoint_dir.empty() || options_.rank != 0) return absl::OkStatus();
  std::error_code ec;
  std::filesystem::create_directories(options_.checkpoint_dir, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot create --checkpoint_dir ", options_.checkpoint_dir, ": ", ec.message()));
  }
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
  return WriteCheckpointFile(CheckpointPath(), ckpt);
}

absl::Status Trainer::MaybeResume(int64_t* epoch, int64_t* step, double* best) {
  if (!options_.resume) return absl::OkStatus();
  const std::string path = CheckpointPath();
  if (!std::filesystem::exists(path)) {
    QTRAIN_LOG(INFO) << "--resume: no checkpoint at " << path << ", starting from scratch";
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(pb::Checkpoint ckpt, ReadCheckpointFile(path));
  const std::vector<int64_t> input(ckpt.input_shape().begin(), ckpt.input_shape().end());
  if (ckpt.model() != info_.name || input != info_.input || ckpt.num_classes() != info_.num_classes) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint ", path, " holds model '", ckpt.model(), "' for input ",
        nn::ShapeToString(input), " with ", ckpt.num_classes(), " classes; this run trains '",
        info_.name, "' for ", nn::ShapeToString(info_.input), " with ", info_.num_classes));
  }
  if (ckpt.epoch() < 0 || ckpt.step() < 0) {
    return absl::DataLossError(absl::StrCat("checkpoint ", path, " has negative progress"));
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
  return absl::OkStatus();
}

absl::StatusOr<EvalResult> Trainer::Evaluate(const data::Dataset& dataset) {
  ctx_.mode = nn::Mode::kEval;
  const int64_t n = dataset.size();
  const int64_t bs = options_.eval_batch_size;
  nn::Tensor x, logits;
  std::vector<int32_t> labels;
  std::vector<int64_t> idx;
  EvalResult result;
  double loss_sum = 0;
  int64_t correct = 0;
  for (int64_t begin = 0; begin < n; begin += bs) {
    const int64_t m = std::min(bs, n - begin);
    idx.resize(static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) idx[static_cast<size_t>(i)] = begin + i;
    x.Resize({m, dataset.channels, dataset.height, dataset.width});
    labels.resize(static_cast<size_t>(m));
    RETURN_IF_ERROR(data::GatherBatch(dataset, idx, x.span(), labels));
    model_->Forward(ctx_, x, &logits);
    ASSIGN_OR_RETURN(auto r, kernels::SoftmaxCrossEntropy(ctx_.cpu, m, logits.dim(1), logits.data(),
                                                          labels.data(), nullptr));
    loss_sum += r.mean_loss * static_cast<double>(m);
    correct += r.correct;
  }
  result.examples = n;
  result.loss = loss_sum / static_cast<double>(n);
  result.accuracy = static_cast<double>(correct) / static_cast<double>(n);
  return result;
}

absl::StatusOr<TrainSummary> Trainer::Run() {
  const data::Dataset& train = data_->train;
  ASSIGN_OR_RETURN(LrSchedule schedule, LrSchedule::Create(options_.lr));
  ASSIGN_OR_RETURN(data::ShardedSampler sampler,
                   data::ShardedSampler::Create(train.size(), options_.rank, options_.world_size,
                                                options_.seed));
  ASSIGN_OR_RETURN(MetricsLog metrics, MetricsLog::Open(options_.metrics_path));
  int64_t start_epoch = 0, step = 0;
  double best = 0;
  RETURN_IF_ERROR(MaybeResume(&start_epoch, &step, &best));

  int64_t steps_per_epoch = sampler.BatchesPerEpoch(options_.batch_size);
  if (options_.max_steps_per_epoch > 0) {
    steps_per_epoch = std::min(steps_per_epoch, options_.max_steps_per_epoch);
  }
  if (steps_per_epoch < 1) {
    return absl::InvalidArgumentError(absl::StrCat("the training split (", train.size(),
                                                   " examples) gives no batch of size ",
                                                   options_.batch_size));
  }
  ProgressLine progress(options_.progress);
  TrainSummary summary;
  summary.best_test_accuracy = best;
  nn::Tensor x, logits, dlogits;
  std::vector<int32_t> labels;
  double train_seconds = 0;
  int64_t train_images = 0;
  const int64_t total_steps = options_.epochs * steps_per_epoch;

  for (int64_t epoch = start_epoch; epoch < options_.epochs; ++epoch) {
    Timer epoch_timer;
    const std::vector<int64_t> indices = sampler.EpochIndices(epoch);
    std::mt19937_64 augment_rng(DeriveSeed(options_.seed, 1, static_cast<uint64_t>(epoch)));
    double loss_sum = 0, window_loss = 0;
    int64_t correct_sum = 0, seen = 0, window_correct = 0, window_seen = 0;
    double window_seconds = 0;
    Timer log_timer;
    for (int64_t b = 0; b < steps_per_epoch; ++b) {
      Timer step_timer;
      auto batch = data::ShardedSampler::BatchOf(indices, b, options_.batch_size);
      const int64_t m = static_cast<int64_t>(batch.size());
      x.Resize({m, train.channels, train.height, train.width});
      labels.resize(batch.size());
      RETURN_IF_ERROR(data::GatherBatch(train, batch, augment_, augment_rng, x.span(), labels));
      const double progress_epochs = epoch + static_cast<double>(b) / steps_per_epoch;
      const float lr = schedule.At(progress_epochs);

      ctx_.mode = nn::Mode::kTrain;
      model_->Forward(ctx_, x, &logits);
      dlogits.Resize(logits.shape());
      ASSIGN_OR_RETURN(auto r, kernels::SoftmaxCrossEntropy(ctx_.cpu, m, logits.dim(1),
                                                            logits.data(), labels.data(),
                                                            dlogits.data()));
      if (!std::isfinite(r.mean_loss)) {
        progress.Finish();
        return absl::FailedPreconditionError(absl::StrCat(
            "training diverged: loss is ", r.mean_loss, " at epoch ", epoch, " step ", step,
            " (learning rate ", lr, "); try a smaller --lr or a warm-up"));
      }
      model_->Backward(ctx_, dlogits, nullptr);
      sgd_->Step(ctx_.cpu, lr);
      ++step;

      const double step_seconds = step_timer.Seconds();
      train_seconds += step_seconds;
      train_images += m;
      loss_sum += r.mean_loss * m;
      correct_sum += r.correct;
      seen += m;
      window_loss += r.mean_loss * m;
      window_correct += r.correct;
      window_seen += m;
      window_seconds += step_seconds;

      const bool last = b + 1 == steps_per_epoch;
      if ((step % options_.log_every) == 0 || last) {
        StepMetrics sm;
        sm.epoch = epoch;
        sm.step = step;
        sm.loss = window_loss / window_seen;
        sm.accuracy = static_cast<double>(window_correct) / window_seen;
        sm.lr = lr;
        sm.images_per_second = window_seen / std::max(window_seconds, 1e-9);
        sm.seconds_compute = window_seconds;
        RETURN_IF_ERROR(metrics.Write(sm));
        window_loss = 0;
        window_correct = window_seen = 0;
        window_seconds = 0;
      }
      if (log_timer.Seconds() > 0.5 || last) {
        log_timer.Reset();
        const double rate = train_images / std::max(train_seconds, 1e-9);
        const int64_t steps_left = total_steps - (epoch * steps_per_epoch + b + 1);
        const double eta = steps_left * (train_seconds / std::max<int64_t>(1, train_images)) *
                           options_.batch_size;
        progress.Update(absl::StrFormat(
            "epoch %d/%d  step %d/%d  loss %.4f  acc %.2f%%  lr %.4g  %.0f img/s  ETA %s",
            epoch + 1, options_.epochs, b + 1, steps_per_epoch, loss_sum / seen,
            100.0 * correct_sum / seen, lr, rate, FormatDuration(eta)));
      }
    }
    progress.Finish();
    ASSIGN_OR_RETURN(EvalResult test, Evaluate(data_->test));
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
    summary.final_test_accuracy = test.accuracy;
    summary.final_test_loss = test.loss;
    summary.best_test_accuracy = best;
    ++summary.epochs_run;
    if ((epoch + 1) % options_.checkpoint_every == 0 || epoch + 1 == options_.epochs) {
      RETURN_IF_ERROR(SaveCheckpoint(epoch + 1, step, best));
    }
  }
  if (summary.epochs_run == 0) {
    // Resumed from a finished run: report the restored model's accuracy.
    ASSIGN_OR_RETURN(EvalResult test, Evaluate(data_->test));
    summary.final_test_accuracy = test.accuracy;
    summary.final_test_loss = test.loss;
  }
  summary.steps = step;
  summary.seconds = train_seconds;
  summary.images_per_second = train_images / std::max(train_seconds, 1e-9);
  return summary;
}

}  // namespace qtrain::train
