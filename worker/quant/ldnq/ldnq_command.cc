#include "worker/quant/ldnq/ldnq_command.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "common/timer.h"
#include "worker/data/batch.h"
#include "worker/data/data_spec.h"
#include "worker/data/load_dataset.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/batch_norm.h"
#include "worker/nn/loss.h"
#include "worker/nn/model.h"
#include "worker/nn/residual.h"
#include "worker/nn/sequential.h"
#include "worker/quant/ldnq/hessian.h"
#include "worker/quant/quant_factory.h"
#include "worker/train/checkpoint.h"
#include "worker/train/optimizer.h"

namespace qtrain::quant::ldnq {
namespace {

// Called with a weight layer's input at the start of its Forward, while set.
using Tap = std::function<void(nn::RunContext&, const nn::Tensor&)>;

class TappedConv2d : public nn::Conv2d {
 public:
  using nn::Conv2d::Conv2d;
  void Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) override {
    if (tap) tap(ctx, x);
    nn::Conv2d::Forward(ctx, x, y);
  }
  Tap tap;
};

class TappedLinear : public nn::Linear {
 public:
  using nn::Linear::Linear;
  void Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) override {
    if (tap) tap(ctx, x);
    nn::Linear::Forward(ctx, x, y);
  }
  Tap tap;
};

struct WeightLayer {
  TappedConv2d* conv = nullptr;  // exactly one of conv / linear
  TappedLinear* linear = nullptr;
  nn::WeightLayerRole role;
  Tap& tap() { return conv != nullptr ? conv->tap : linear->tap; }
  nn::Parameter& weight() { return conv != nullptr ? conv->weight() : linear->weight(); }
  bool has_bias() const { return conv != nullptr ? conv->options().bias : linear->options().bias; }
  nn::Parameter& bias() { return conv != nullptr ? conv->bias() : linear->bias(); }
  int64_t input_dim() const {
    if (conv != nullptr) {
      const nn::Conv2dOptions& o = conv->options();
      return o.in_channels * o.kernel * o.kernel;
    }
    return linear->options().in_features;
  }
  int64_t outputs() const {
    return conv != nullptr ? conv->options().out_channels : linear->options().out_features;
  }
  std::string name() {  // the weight's full name without ".weight"
    const std::string& n = weight().name;
    return n.size() > 7 ? n.substr(0, n.size() - 7) : n;
  }
};

// The plain layers, tapped, recorded in construction (= network) order.
class TappingFactory : public nn::LayerFactory {
 public:
  explicit TappingFactory(std::vector<WeightLayer>* layers) : layers_(layers) {}
  std::unique_ptr<nn::Conv2d> MakeConv2d(std::string name, const nn::Conv2dOptions& options,
                                         std::mt19937_64& rng,
                                         nn::WeightLayerRole role) const override {
    auto layer = std::make_unique<TappedConv2d>(std::move(name), options, rng);
    layers_->push_back(WeightLayer{.conv = layer.get(), .role = role});
    return layer;
  }
  std::unique_ptr<nn::Linear> MakeLinear(std::string name, const nn::LinearOptions& options,
                                         std::mt19937_64& rng,
                                         nn::WeightLayerRole role) const override {
    auto layer = std::make_unique<TappedLinear>(std::move(name), options, rng);
    layers_->push_back(WeightLayer{.linear = layer.get(), .role = role});
    return layer;
  }

 private:
  std::vector<WeightLayer>* layers_;
};

void CollectBatchNorms(nn::Layer* layer, std::vector<nn::BatchNorm2d*>* out) {
  if (auto* bn = dynamic_cast<nn::BatchNorm2d*>(layer)) {
    out->push_back(bn);
  } else if (auto* seq = dynamic_cast<nn::Sequential*>(layer)) {
    for (int i = 0; i < seq->num_children(); ++i) CollectBatchNorms(&seq->child(i), out);
  } else if (auto* res = dynamic_cast<nn::Residual*>(layer)) {
    out->push_back(res->bn1());
    out->push_back(res->bn2());
    if (res->shortcut_bn() != nullptr) out->push_back(res->shortcut_bn());
  }
}

// The value of "quant=..." in a settings line, or "".
std::string SettingsQuant(const std::string& settings) {
  for (size_t pos = settings.find("quant="); pos != std::string::npos;
       pos = settings.find("quant=", pos + 1)) {
    if (pos != 0 && settings[pos - 1] != ' ') continue;
    const size_t begin = pos + 6;
    const size_t end = settings.find(' ', begin);
    return settings.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
  }
  return "";
}

struct Calibration {
  std::vector<nn::Tensor> images;            // batches (every rank holds all of them)
  std::vector<std::vector<int32_t>> labels;  // per batch
  std::vector<nn::Tensor> reference;         // FP logits per batch
  int64_t count = 0;
};

// The ranks of a distributed calibration and how the work is split among them (one process when
// comm is null or has one rank): batch b belongs to rank b % size. Sums go through AllReduceSum
// (double), which leaves the same bits on every rank, so every decision taken from them is the
// same everywhere.
class Ranks {
 public:
  explicit Ranks(comm::Communicator* comm) : comm_(comm) {}
  int rank() const { return comm_ != nullptr ? comm_->rank() : 0; }
  int size() const { return comm_ != nullptr ? comm_->world_size() : 1; }
  bool distributed() const { return size() > 1; }
  bool Owns(size_t batch) const { return static_cast<int>(batch % size()) == rank(); }
  absl::Status Sum(std::span<double> values) const {
    return distributed() ? comm_->AllReduceSum(values) : absl::OkStatus();
  }
  comm::Communicator* comm() const { return comm_; }

 private:
  comm::Communicator* comm_;
};

absl::StatusOr<double> RelativeOutputError(nn::Sequential& model, nn::RunContext& ctx,
                                           const Calibration& calib, const Ranks& ranks) {
  ctx.mode = nn::Mode::kEval;
  double sums[2] = {0.0, 0.0};  // squared error, squared reference
  nn::Tensor logits;
  for (size_t b = 0; b < calib.images.size(); ++b) {
    if (!ranks.Owns(b)) continue;
    model.Forward(ctx, calib.images[b], &logits);
    const nn::Tensor& ref = calib.reference[b];
    for (int64_t i = 0; i < ref.size(); ++i) {
      const double d = static_cast<double>(logits[i]) - ref[i];
      sums[0] += d * d;
      sums[1] += static_cast<double>(ref[i]) * ref[i];
    }
  }
  RETURN_IF_ERROR(ranks.Sum(sums));
  return sums[1] > 0.0 ? sums[0] / sums[1] : sums[0];
}

// Every BN layer's running statistics become the average of its batch statistics over the
// calibration batches (train-mode passes; each pass's batch statistic is recovered from the
// running-average update and the running value restored), summed over the ranks' batches.
absl::Status RefreshBatchNorm(nn::Sequential& model, nn::RunContext& ctx, const Calibration& calib,
                              const std::vector<nn::BatchNorm2d*>& bns, const Ranks& ranks) {
  if (bns.empty()) return absl::OkStatus();
  std::vector<nn::Tensor*> stats;  // mean, var of each layer
  std::vector<nn::Tensor> before;
  std::vector<float> momentum;
  for (nn::BatchNorm2d* bn : bns) {
    for (nn::Tensor* t : {&bn->running_mean().value, &bn->running_var().value}) {
      stats.push_back(t);
      before.push_back(*t);
      momentum.push_back(bn->options().momentum);
    }
  }
  std::vector<size_t> offset(stats.size() + 1, 0);
  for (size_t i = 0; i < stats.size(); ++i) offset[i + 1] = offset[i] + stats[i]->size();
  std::vector<double> sums(offset.back() + 1, 0.0);  // the last: batches seen
  nn::Tensor y;
  ctx.mode = nn::Mode::kTrain;
  for (size_t b = 0; b < calib.images.size(); ++b) {
    if (!ranks.Owns(b)) continue;
    model.Forward(ctx, calib.images[b], &y);
    for (size_t i = 0; i < stats.size(); ++i) {
      const float m = momentum[i];
      const nn::Tensor& old = before[i];
      nn::Tensor& cur = *stats[i];
      for (int64_t c = 0; c < cur.size(); ++c) {
        sums[offset[i] + c] += m > 0.0f ? (cur[c] - (1.0 - m) * old[c]) / m : old[c];
      }
      cur = old;
    }
    sums.back() += 1.0;
  }
  ctx.mode = nn::Mode::kEval;
  RETURN_IF_ERROR(ranks.Sum(sums));
  if (!(sums.back() > 0.0)) return absl::OkStatus();
  for (size_t i = 0; i < stats.size(); ++i) {
    for (int64_t c = 0; c < stats[i]->size(); ++c) {
      (*stats[i])[c] = static_cast<float>(sums[offset[i] + c] / sums.back());
    }
  }
  return absl::OkStatus();
}

// SGD over `params` for `epochs` passes over the calibration batches; the loss is the MSE to the
// reference logits (labels == false) or softmax cross-entropy (labels == true). Eval-mode BN.
// Distributed, each step's gradient is computed by the rank that owns its batch and broadcast
// (exact), so every rank takes the steps one process would take, bit for bit. (Splitting each
// batch over the ranks and summing the gradients would run in parallel, but its float sums differ
// in the last bits from one process's, and ADMM's discrete projection of the next layer turned
// such differences into alphas 2% apart on the synthetic test of ldnq_mpi_test.sh.)
absl::Status Train(nn::Sequential& model, nn::RunContext& ctx, const Calibration& calib,
                   std::vector<nn::Parameter*> params, int epochs, double lr, bool labels,
                   uint64_t seed, const Ranks& ranks) {
  if (params.empty() || epochs <= 0) return absl::OkStatus();
  const std::vector<nn::Parameter*> trained = params;
  train::SgdOptions sgd_options;
  sgd_options.momentum = 0.9f;
  sgd_options.weight_decay = 0.0f;
  train::Sgd sgd(std::move(params), sgd_options);
  std::vector<size_t> order(calib.images.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::mt19937_64 rng(seed);
  nn::Tensor logits, dlogits;
  std::vector<float> grads;
  if (ranks.distributed()) {
    size_t n = 0;
    for (const nn::Parameter* p : trained) n += static_cast<size_t>(p->grad.size());
    grads.resize(n);
  }
  ctx.mode = nn::Mode::kEval;
  for (int e = 0; e < epochs; ++e) {
    std::shuffle(order.begin(), order.end(), rng);
    for (size_t b : order) {
      if (ranks.Owns(b)) {
        model.Forward(ctx, calib.images[b], &logits);
        if (labels) {
          absl::StatusOr<kernels::SoftmaxXentResult> r =
              nn::SoftmaxCrossEntropyLoss(ctx, logits, calib.labels[b], &dlogits);
          if (!r.ok()) return r.status();
        } else {
          const nn::Tensor& ref = calib.reference[b];
          dlogits.Resize(logits.shape());
          // Loss 1/2 * mean over images of |logits - reference|^2.
          const float scale = 1.0f / static_cast<float>(logits.dim(0));
          for (int64_t i = 0; i < logits.size(); ++i) dlogits[i] = scale * (logits[i] - ref[i]);
        }
        model.Backward(ctx, dlogits, nullptr);
      }
      if (ranks.distributed()) {
        size_t k = 0;
        for (const nn::Parameter* p : trained) {
          std::copy_n(p->grad.data(), p->grad.size(), grads.data() + k);
          k += static_cast<size_t>(p->grad.size());
        }
        RETURN_IF_ERROR(ranks.comm()->Broadcast(grads, static_cast<int>(b % ranks.size())));
        k = 0;
        for (nn::Parameter* p : trained) {
          std::copy_n(grads.data() + k, p->grad.size(), p->grad.data());
          k += static_cast<size_t>(p->grad.size());
        }
      }
      sgd.Step(ctx.cpu, static_cast<float>(lr));
    }
  }
  return absl::OkStatus();
}

// Test accuracy; distributed, each rank evaluates a contiguous share of the split.
absl::StatusOr<double> TestAccuracy(nn::Sequential& model, nn::RunContext& ctx,
                                    const data::Dataset& test, int64_t batch, const Ranks& ranks) {
  ctx.mode = nn::Mode::kEval;
  double correct = 0;
  nn::Tensor x, logits;
  std::vector<int32_t> labels;
  std::vector<int64_t> idx;
  const int64_t begin = test.size() * ranks.rank() / ranks.size();
  const int64_t end = test.size() * (ranks.rank() + 1) / ranks.size();
  for (int64_t b = begin; b < end; b += batch) {
    const int64_t m = std::min(batch, end - b);
    idx.resize(static_cast<size_t>(m));
    std::iota(idx.begin(), idx.end(), b);
    x.Resize({m, test.channels, test.height, test.width});
    labels.resize(static_cast<size_t>(m));
    RETURN_IF_ERROR(data::GatherBatch(test, idx, x.span(), labels));
    model.Forward(ctx, x, &logits);
    const int64_t classes = logits.dim(1);
    for (int64_t i = 0; i < m; ++i) {
      const float* row = logits.data() + i * classes;
      correct += (std::max_element(row, row + classes) - row) == labels[static_cast<size_t>(i)];
    }
  }
  RETURN_IF_ERROR(ranks.Sum(std::span<double>(&correct, 1)));
  return test.size() > 0 ? correct / static_cast<double>(test.size()) : 0.0;
}

// FNV-1a over the bits of every parameter and buffer: ranks that computed the same model agree.
uint64_t HashState(const std::vector<nn::Parameter*>& params,
                   const std::vector<nn::Buffer*>& buffers) {
  uint64_t h = 1469598103934665603ULL;
  auto add = [&](const nn::Tensor& t) {
    for (int64_t i = 0; i < t.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, t.data() + i, 4);
      for (int k = 0; k < 4; ++k) {
        h ^= (bits >> (8 * k)) & 0xFF;
        h *= 1099511628211ULL;
      }
    }
  };
  for (const nn::Parameter* p : params) add(p->value);
  for (const nn::Buffer* b : buffers) add(b->value);
  return h;
}

void AppendMetrics(const std::string& path, const std::string& line) {
  if (path.empty()) return;
  std::ofstream f(path, std::ios::app);
  f << line << "\n";
}

}  // namespace

absl::StatusOr<LdnqMethod> ParseLdnqMethod(absl::string_view name) {
  if (name == "ldnq") return LdnqMethod::kLdnq;
  if (name == "ldnq-") return LdnqMethod::kLdnqNoUpdate;
  if (name == "dq") return LdnqMethod::kDq;
  return absl::InvalidArgumentError(
      absl::StrCat("--method must be ldnq, ldnq- or dq; got '", name, "'"));
}

const char* LdnqMethodName(LdnqMethod method) {
  switch (method) {
    case LdnqMethod::kLdnq:
      return "ldnq";
    case LdnqMethod::kLdnqNoUpdate:
      return "ldnq-";
    case LdnqMethod::kDq:
      return "dq";
  }
  return "?";
}

absl::StatusOr<FirstLastPolicy> ParseFirstLastPolicy(absl::string_view name) {
  if (name == "quantize") return FirstLastPolicy::kQuantizeAll;
  if (name == "fp") return FirstLastPolicy::kKeepFirstLastFp;
  return absl::InvalidArgumentError(
      absl::StrCat("--ldnq_first_last must be quantize or fp; got '", name, "'"));
}

absl::Status ValidateLdnqOptions(const LdnqCommandOptions& o) {
  if (o.checkpoint_dir.empty()) {
    return absl::InvalidArgumentError("ldnq needs --checkpoint_dir (a full-precision run's)");
  }
  if (o.out_dir.empty()) return absl::InvalidArgumentError("ldnq needs --out (a directory)");
  if (!(o.calib > 0.0) || !std::isfinite(o.calib) ||
      (o.calib >= 1.0 && o.calib != std::floor(o.calib))) {
    return absl::InvalidArgumentError(
        absl::StrCat("--calib must be a fraction in (0, 1) or a whole count >= 1; got ", o.calib));
  }
  RETURN_IF_ERROR(LevelSet::FromCount(o.levels).status());
  RETURN_IF_ERROR(ValidateAdmmOptions(o.admm));
  if (o.batch_size < 1 || o.update_epochs < 0 || o.retrain_epochs < 0 || !(o.update_lr >= 0.0) ||
      !(o.retrain_lr >= 0.0)) {
    return absl::InvalidArgumentError(
        "ldnq: batch_size >= 1, update/retrain epochs >= 0 and learning rates >= 0 required");
  }
  if (o.source.quant != "none" || o.source.wq != "none" || o.source.aq != "none") {
    return absl::InvalidArgumentError(
        "ldnq quantizes a full-precision model: leave --quant, --wq and --aq at none");
  }
  return absl::OkStatus();
}

absl::StatusOr<LdnqReport> RunLdnq(const LdnqCommandOptions& options, comm::Communicator* comm) {
  RETURN_IF_ERROR(ValidateLdnqOptions(options));
  const Ranks ranks(comm);
  // Rank 0 speaks for the job: progress, metrics and the checkpoint.
  const bool print = options.print && ranks.rank() == 0;
  const std::string metrics_path = ranks.rank() == 0 ? options.metrics_path : "";
  Timer total;
  ASSIGN_OR_RETURN(LevelSet levels, LevelSet::FromCount(options.levels));
  ASSIGN_OR_RETURN(data::DataSpec spec, data::ParseDataSpec(options.source.data));
  data::LoadOptions load;
  load.max_train = options.source.max_train;
  load.max_test = options.source.max_test;
  ASSIGN_OR_RETURN(data::DataSplits splits, data::LoadDataset(spec, load));
  const data::Dataset& train_split = splits.train;

  // Threads.
  if (options.source.threads < 0) return absl::InvalidArgumentError("threads must be >= 0");
  const int threads = options.source.threads > 0
                          ? options.source.threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::unique_ptr<kernels::ThreadPool> pool;
  if (threads > 1) pool = std::make_unique<kernels::ThreadPool>(threads);
  nn::RunContext ctx;
  ctx.cpu.pool = pool.get();
  ctx.mode = nn::Mode::kEval;

  // The model, tapped, and its FP weights.
  std::vector<WeightLayer> layers;
  TappingFactory factory(&layers);
  nn::ModelSpec model_spec;
  model_spec.name = options.source.model;
  model_spec.input = {train_split.channels, train_split.height, train_split.width};
  model_spec.num_classes = train_split.num_classes;
  model_spec.resnet_shortcut = options.source.resnet_shortcut;
  model_spec.factory = &factory;
  ASSIGN_OR_RETURN(std::unique_ptr<nn::Sequential> model, nn::BuildModel(model_spec));
  const std::string ckpt_path =
      (std::filesystem::path(options.checkpoint_dir) / kCheckpointFileName).string();
  ASSIGN_OR_RETURN(pb::Checkpoint ckpt, train::ReadCheckpointFile(ckpt_path));
  {
    const nn::Shape input(ckpt.input_shape().begin(), ckpt.input_shape().end());
    if (ckpt.model() != model_spec.name || input != model_spec.input ||
        ckpt.num_classes() != model_spec.num_classes) {
      return absl::FailedPreconditionError(
          absl::StrCat("checkpoint ", ckpt_path, " holds model '", ckpt.model(), "' for input ",
                       nn::ShapeToString(input), " with ", ckpt.num_classes(),
                       " classes; the flags give '", model_spec.name, "' for ",
                       nn::ShapeToString(model_spec.input), " with ", model_spec.num_classes));
    }
    const std::string trained = SettingsQuant(ckpt.settings());
    if (!trained.empty() && trained != "fp32") {
      return absl::FailedPreconditionError(absl::StrCat("checkpoint ", ckpt_path,
                                                        " was trained with quant=", trained,
                                                        "; ldnq needs a full-precision model"));
    }
  }
  std::vector<nn::Parameter*> params;
  model->CollectParameters(&params);
  std::vector<nn::Buffer*> buffers;
  model->CollectBuffers(&buffers);
  RETURN_IF_ERROR(train::RestoreState(ckpt, params, buffers, nullptr));
  std::vector<nn::BatchNorm2d*> bns;
  CollectBatchNorms(model.get(), &bns);

  // Calibration subset: the first images of a seeded permutation of the training split.
  Calibration calib;
  {
    const int64_t n = train_split.size();
    int64_t want = options.calib < 1.0
                       ? static_cast<int64_t>(std::llround(options.calib * static_cast<double>(n)))
                       : static_cast<int64_t>(options.calib);
    want = std::max<int64_t>(1, std::min(want, n));
    if (n < 1) return absl::InvalidArgumentError("the training split is empty");
    std::vector<int64_t> perm(static_cast<size_t>(n));
    std::iota(perm.begin(), perm.end(), int64_t{0});
    std::mt19937_64 rng(options.seed);
    std::shuffle(perm.begin(), perm.end(), rng);
    calib.count = want;
    for (int64_t b = 0; b < want; b += options.batch_size) {
      const int64_t m = std::min(options.batch_size, want - b);
      nn::Tensor x({m, train_split.channels, train_split.height, train_split.width});
      std::vector<int32_t> labels(static_cast<size_t>(m));
      RETURN_IF_ERROR(data::GatherBatch(
          train_split, std::span<const int64_t>(perm.data() + b, static_cast<size_t>(m)), x.span(),
          labels));
      nn::Tensor logits;
      model->Forward(ctx, x, &logits);
      calib.images.push_back(std::move(x));
      calib.labels.push_back(std::move(labels));
      calib.reference.push_back(logits);
    }
  }

  LdnqReport report;
  report.calib_images = calib.count;
  if (options.evaluate_test && splits.test.size() > 0) {
    ASSIGN_OR_RETURN(report.fp_test_accuracy, TestAccuracy(*model, ctx, splits.test, 256, ranks));
  }
  const std::string method = LdnqMethodName(options.method);
  if (print) {
    std::printf("ldnq: %s %s, %zu weight layers, method %s, %d levels, %lld calibration images\n",
                options.source.model.c_str(), ckpt_path.c_str(), layers.size(), method.c_str(),
                options.levels, static_cast<long long>(calib.count));
    if (ranks.distributed()) {
      std::printf(
          "ldnq: %d ranks: calibration batch b on rank b %% %d; Hessian, BN and error sums "
          "allreduced, update gradients broadcast by their batch's rank\n",
          ranks.size(), ranks.size());
    }
    if (options.evaluate_test) {
      std::printf("ldnq: full-precision test accuracy %.2f%%\n", 100 * report.fp_test_accuracy);
    }
    std::fflush(stdout);
  }

  // Index in `params` just past each weight layer's own parameters (for "the layers above").
  std::vector<size_t> params_end(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    nn::Parameter* last = layers[l].has_bias() ? &layers[l].bias() : &layers[l].weight();
    params_end[l] =
        static_cast<size_t>(std::find(params.begin(), params.end(), last) - params.begin()) + 1;
  }
  std::vector<const nn::Parameter*> frozen;  // quantized weights (and their biases under dq)

  Timer loop;
  for (size_t l = 0; l < layers.size(); ++l) {
    WeightLayer& wl = layers[l];
    LdnqLayerReport lr;
    lr.name = wl.name();
    Timer layer_timer;
    const bool keep =
        options.first_last == FirstLastPolicy::kKeepFirstLastFp && (wl.role.first || wl.role.last);
    if (keep) {
      ASSIGN_OR_RETURN(lr.output_error, RelativeOutputError(*model, ctx, calib, ranks));
      report.layers.push_back(lr);
      if (print) std::printf("ldnq: [%zu] %s kept full precision\n", l, lr.name.c_str());
      continue;
    }
    // 1. The Hessian of the cascade input.
    HessianAccumulator acc(wl.input_dim(),
                           wl.has_bias() ? BiasColumn::kAppendOne : BiasColumn::kNone);
    wl.tap() = [&](nn::RunContext& c, const nn::Tensor& x) {
      if (wl.conv != nullptr) {
        const nn::Conv2dOptions& o = wl.conv->options();
        kernels::Conv2dShape s;
        s.batch = x.dim(0);
        s.in_channels = x.dim(1);
        s.in_height = x.dim(2);
        s.in_width = x.dim(3);
        s.out_channels = o.out_channels;
        s.kernel_h = s.kernel_w = o.kernel;
        s.stride_h = s.stride_w = o.stride;
        s.pad_h = s.pad_w = o.padding;
        acc.AddConvInput(c.cpu, s, x);
      } else {
        acc.AddLinearInput(c.cpu, x);
      }
    };
    {
      nn::Tensor logits;
      ctx.mode = nn::Mode::kEval;
      for (size_t b = 0; b < calib.images.size(); ++b) {
        if (ranks.Owns(b)) model->Forward(ctx, calib.images[b], &logits);
      }
    }
    wl.tap() = nullptr;
    if (ranks.distributed()) RETURN_IF_ERROR(AllReduceHessian(*ranks.comm(), &acc));
    LayerProblem problem;
    const int64_t d = acc.dim(), k = wl.outputs(), in = wl.input_dim();
    problem.layout = MatrixLayout{.rows = k, .cols = d, .quantized_cols = in};
    problem.h = acc.Mean();
    problem.w.assign(static_cast<size_t>(k * d), 0.0f);
    for (int64_t r = 0; r < k; ++r) {
      std::copy_n(wl.weight().value.data() + r * in, in, problem.w.data() + r * d);
      if (wl.has_bias()) problem.w[static_cast<size_t>(r * d + in)] = wl.bias().value[r];
    }
    // 2. Quantize.
    AdmmResult result;
    if (options.method == LdnqMethod::kDq) {
      result = DirectQuantize(ctx.cpu, problem, levels, options.admm.projection_rounds);
    } else {
      ASSIGN_OR_RETURN(result, SolveAdmm(ctx.cpu, problem, levels, options.admm));
    }
    for (int64_t r = 0; r < k; ++r) {
      std::copy_n(result.weights.data() + r * d, in, wl.weight().value.data() + r * in);
      if (wl.has_bias()) wl.bias().value[r] = result.weights[static_cast<size_t>(r * d + in)];
    }
    frozen.push_back(&wl.weight());
    lr.quantized = true;
    lr.hessian_dim = d;
    lr.samples = acc.samples();
    lr.iterations = result.iterations;
    lr.rho = result.rho;
    lr.alpha = result.alpha;
    const double ref = result.reference > 0.0 ? result.reference : 1.0;
    lr.dq_error = result.dq_error / ref;
    lr.error = result.error / ref;
    // 3. BN statistics from the cascade.
    if (options.refresh_bn) RETURN_IF_ERROR(RefreshBatchNorm(*model, ctx, calib, bns, ranks));
    // 4. Weights update of the layers above.
    ASSIGN_OR_RETURN(lr.output_error, RelativeOutputError(*model, ctx, calib, ranks));
    if (options.method == LdnqMethod::kLdnq && options.update_epochs > 0 &&
        params_end[l] < params.size()) {
      std::vector<nn::Parameter*> above(params.begin() + static_cast<std::ptrdiff_t>(params_end[l]),
                                        params.end());
      std::vector<nn::Tensor> saved;
      for (nn::Parameter* p : above) saved.push_back(p->value);
      RETURN_IF_ERROR(Train(*model, ctx, calib, above, options.update_epochs, options.update_lr,
                            /*labels=*/false, options.seed + l, ranks));
      ASSIGN_OR_RETURN(const double updated, RelativeOutputError(*model, ctx, calib, ranks));
      if (updated < lr.output_error) {
        lr.output_error = updated;
      } else {
        // The update made the output worse (too large a learning rate): undo it.
        lr.update_reverted = true;
        for (size_t i = 0; i < above.size(); ++i) above[i]->value = saved[i];
      }
    }
    lr.seconds = layer_timer.Seconds();
    if (print) {
      std::printf(
          "ldnq: [%zu] %-18s H %lldx%lld (%lld samples)  %3d iters  rho %.3g  alpha %.4g  layer "
          "error %.4f -> %.4f  output error %.4f%s  %.2fs\n",
          l, lr.name.c_str(), static_cast<long long>(d), static_cast<long long>(d),
          static_cast<long long>(lr.samples), lr.iterations, lr.rho, lr.alpha, lr.dq_error,
          lr.error, lr.output_error, lr.update_reverted ? " (update reverted)" : "", lr.seconds);
      std::fflush(stdout);
    }
    AppendMetrics(metrics_path,
                  absl::StrFormat("{\"ldnq_layer\":\"%s\",\"index\":%d,\"method\":\"%s\","
                                  "\"levels\":%d,\"hessian_dim\":%d,\"samples\":%d,"
                                  "\"iterations\":%d,\"rho\":%.6g,\"alpha\":%.8g,"
                                  "\"layer_error_before\":%.6g,\"layer_error_after\":%.6g,"
                                  "\"output_error\":%.6g,\"update_reverted\":%s,"
                                  "\"seconds\":%.4f}",
                                  lr.name, l, method, options.levels, d, lr.samples, lr.iterations,
                                  lr.rho, lr.alpha, lr.dq_error, lr.error, lr.output_error,
                                  lr.update_reverted ? "true" : "false", lr.seconds));
    report.layers.push_back(lr);
  }
  report.quantize_seconds = loop.Seconds();

  // Retrain with labels: everything but the quantized weights.
  if (options.retrain_epochs > 0) {
    Timer t;
    std::vector<nn::Parameter*> free_params;
    for (nn::Parameter* p : params) {
      if (std::find(frozen.begin(), frozen.end(), p) == frozen.end()) free_params.push_back(p);
    }
    RETURN_IF_ERROR(Train(*model, ctx, calib, std::move(free_params), options.retrain_epochs,
                          options.retrain_lr, /*labels=*/true, options.seed + 1000003, ranks));
    report.retrain_seconds = t.Seconds();
  }
  ASSIGN_OR_RETURN(report.final_output_error, RelativeOutputError(*model, ctx, calib, ranks));
  if (options.evaluate_test && splits.test.size() > 0) {
    report.has_test = true;
    ASSIGN_OR_RETURN(report.test_accuracy, TestAccuracy(*model, ctx, splits.test, 256, ranks));
  }

  // The checkpoint.
  pb::Checkpoint out;
  out.set_model(model_spec.name);
  for (int64_t v : model_spec.input) out.add_input_shape(v);
  out.set_num_classes(model_spec.num_classes);
  out.set_seed(ckpt.seed());
  out.set_settings(absl::StrCat(
      "model=", model_spec.name, " data=", options.source.data, " ldnq=method:", method,
      ",levels=", options.levels, ",calib=", calib.count,
      ",first_last=", options.first_last == FirstLastPolicy::kQuantizeAll ? "quantize" : "fp",
      ",retrain_epochs=", options.retrain_epochs, " from=", options.checkpoint_dir));
  // Every rank took the same decisions from the same sums, so all hold the same model.
  report.ranks = ranks.size();
  report.weights_hash = HashState(params, buffers);
  if (ranks.distributed()) {
    ASSIGN_OR_RETURN(std::vector<uint64_t> hashes, ranks.comm()->AllGatherU64(report.weights_hash));
    for (size_t r = 1; r < hashes.size(); ++r) {
      if (hashes[r] != hashes[0]) {
        return absl::InternalError(
            absl::StrFormat("ldnq: the ranks' quantized models differ: rank 0 has weights hash "
                            "%016x, rank %d %016x",
                            hashes[0], r, hashes[r]));
      }
    }
  }
  const std::string out_path =
      (std::filesystem::path(options.out_dir) / kCheckpointFileName).string();
  if (ranks.rank() == 0) {
    train::CaptureState(params, buffers, nullptr, &out);
    std::error_code ec;
    std::filesystem::create_directories(options.out_dir, ec);
    if (ec) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot create --out directory ", options.out_dir, ": ", ec.message()));
    }
    RETURN_IF_ERROR(train::WriteCheckpointFile(out_path, out));
  }
  report.seconds = total.Seconds();

  AppendMetrics(
      metrics_path,
      absl::StrFormat("{\"ldnq_summary\":\"%s\",\"method\":\"%s\",\"levels\":%d,"
                      "\"calib_images\":%d,\"final_output_error\":%.6g,"
                      "\"quantize_seconds\":%.3f,\"retrain_seconds\":%.3f,"
                      "\"seconds\":%.3f,\"fp_test_accuracy\":%.6f,"
                      "\"test_accuracy\":%.6f,\"checkpoint\":\"%s\"}",
                      options.source.model, method, options.levels, calib.count,
                      report.final_output_error, report.quantize_seconds, report.retrain_seconds,
                      report.seconds, report.fp_test_accuracy, report.test_accuracy, out_path));
  if (print) {
    if (ranks.distributed()) {
      std::printf("ldnq: weights hash %016llx identical on all %d ranks\n",
                  static_cast<unsigned long long>(report.weights_hash), ranks.size());
    }
    std::printf(
        "ldnq: done: final output error %.4f; quantization %.1fs, retrain %.1fs, total %.1fs; "
        "wrote %s\n",
        report.final_output_error, report.quantize_seconds, report.retrain_seconds, report.seconds,
        out_path.c_str());
    if (report.has_test) {
      std::printf("ldnq: test accuracy %.2f%% (full precision %.2f%%, change %+.2f)\n",
                  100 * report.test_accuracy, 100 * report.fp_test_accuracy,
                  100 * (report.test_accuracy - report.fp_test_accuracy));
    }
    std::printf(
        "ldnq: to pack it: qtrain export --checkpoint_dir=%s --wq=pow2:levels=%d "
        "--fp_first_last=%s (with this run's model and data flags)\n",
        options.out_dir.c_str(), options.levels,
        options.first_last == FirstLastPolicy::kQuantizeAll ? "false" : "true");
    std::fflush(stdout);
  }
  return report;
}

absl::Status RunLdnqCommand(const LdnqCommandOptions& options, comm::Communicator* comm) {
  LdnqCommandOptions o = options;
  o.print = true;
  return RunLdnq(o, comm).status();
}

}  // namespace qtrain::quant::ldnq
