#include "worker/quant/export_command.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "common/timer.h"
#include "worker/data/batch.h"
#include "worker/data/data_spec.h"
#include "worker/data/load_dataset.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/model.h"
#include "worker/nn/scalar_layer.h"
#include "worker/quant/packed_model.h"
#include "worker/train/checkpoint.h"

namespace qtrain::quant {
namespace {

// The model of the flags, its data, and a thread pool.
struct Setup {
  QuantConfig config;
  std::unique_ptr<QuantLayerFactory> factory;
  data::DataSplits splits;
  std::unique_ptr<kernels::ThreadPool> pool;
  kernels::CpuContext cpu;
  ModelDescription description;
  std::unique_ptr<nn::Sequential> model;
};

absl::StatusOr<std::unique_ptr<Setup>> MakeSetup(const ModelSource& source) {
  auto s = std::make_unique<Setup>();
  ASSIGN_OR_RETURN(s->config, MakeQuantConfig(source.quant, source.wq, source.aq,
                                              source.fp_first_last, source.fpsc));
  ASSIGN_OR_RETURN(s->factory, QuantLayerFactory::Create(s->config));
  ASSIGN_OR_RETURN(data::DataSpec spec, data::ParseDataSpec(source.data));
  data::LoadOptions load;
  load.max_train = source.max_train;
  load.max_test = source.max_test;
  ASSIGN_OR_RETURN(s->splits, data::LoadDataset(spec, load));
  if (source.threads < 0) return absl::InvalidArgumentError("threads must be >= 0");
  const int threads = source.threads > 0
                          ? source.threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (threads > 1) s->pool = std::make_unique<kernels::ThreadPool>(threads);
  s->cpu.pool = s->pool.get();
  const data::Dataset& test = s->splits.test;
  s->description.name = source.model;
  s->description.input = {test.channels, test.height, test.width};
  s->description.num_classes = test.num_classes;
  s->description.resnet_shortcut = source.resnet_shortcut;
  s->description.quant = s->config;
  s->description.scalar_layer = source.scalar_layer;
  nn::ModelSpec model_spec;
  model_spec.name = source.model;
  model_spec.input = s->description.input;
  model_spec.num_classes = test.num_classes;
  model_spec.resnet_shortcut = source.resnet_shortcut;
  model_spec.factory = s->factory.get();
  if (source.scalar_layer) model_spec.scalar_layer = nn::ScalarLayer::kPaperInit;
  ASSIGN_OR_RETURN(s->model, nn::BuildModel(model_spec));
  return s;
}

// The value of "quant=..." in a checkpoint's settings line, or "" if absent.
std::string SettingsQuant(const std::string& settings) {
  for (size_t pos = settings.find("quant="); pos != std::string::npos;
       pos = settings.find("quant=", pos + 1)) {
    if (pos != 0 && settings[pos - 1] != ' ') continue;  // e.g. "max_quant="
    const size_t begin = pos + 6;
    const size_t end = settings.find(' ', begin);
    return settings.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
  }
  return "";
}

// What `qtrain ldnq` records in its checkpoint's settings: "ldnq=method:ldnq,levels=3,calib=600,
// first_last=quantize,retrain_epochs=0".
struct LdnqOrigin {
  int levels = 0;
  bool first_last_fp = false;
};

std::optional<LdnqOrigin> LdnqOriginOf(const std::string& settings) {
  size_t pos = settings.rfind(" ldnq=");
  if (pos != std::string::npos) {
    ++pos;
  } else if (settings.rfind("ldnq=", 0) == 0) {
    pos = 0;
  } else {
    return std::nullopt;
  }
  const size_t begin = pos + 5;
  const size_t end = settings.find(' ', begin);
  const std::string value =
      settings.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
  LdnqOrigin origin;
  for (absl::string_view item : absl::StrSplit(value, ',')) {
    if (absl::ConsumePrefix(&item, "levels=")) {
      if (!absl::SimpleAtoi(item, &origin.levels)) origin.levels = 0;
    } else if (absl::ConsumePrefix(&item, "first_last=")) {
      origin.first_last_fp = item == "fp";
    }
  }
  return origin;
}

enum class RestoreFor { kExport, kEval };

// An L-DNQ result is a plain checkpoint whose weights lie on power-of-two levels: `eval` runs it
// as it is or with the matching pow2 quantizer (same predictions), `export` only with the latter
// (else nothing would be packed). Other flags are FAILED_PRECONDITION naming the right ones.
absl::Status CheckLdnqFlags(const std::string& path, const std::string& settings,
                            const QuantConfig& config, RestoreFor use) {
  const std::optional<LdnqOrigin> origin = LdnqOriginOf(settings);
  if (!origin) return absl::OkStatus();
  const bool matches = config.weight.method == Method::kPow2 &&
                       config.weight.pow2_levels == origin->levels &&
                       config.activation.method == Method::kNone &&
                       config.keep_first_last_fp == origin->first_last_fp;
  if (matches || (use == RestoreFor::kEval && !config.quantizes())) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "checkpoint ", path, " is a `qtrain ldnq` result (", origin->levels, " levels, first/last ",
      origin->first_last_fp ? "full precision" : "quantized", "); ",
      use == RestoreFor::kExport ? "export" : "evaluate", " it with --wq=pow2:levels=",
      origin->levels, " --aq=none --fp_first_last=", origin->first_last_fp ? "true" : "false",
      use == RestoreFor::kEval ? " (or no quantization flags)" : "", "; the flags give quant=",
      config.ToString()));
}

absl::Status RestoreCheckpoint(const std::string& dir, Setup* s, RestoreFor use) {
  const std::string path = (std::filesystem::path(dir) / kCheckpointFileName).string();
  ASSIGN_OR_RETURN(pb::Checkpoint ckpt, train::ReadCheckpointFile(path));
  const nn::Shape input(ckpt.input_shape().begin(), ckpt.input_shape().end());
  if (ckpt.model() != s->description.name || input != s->description.input ||
      ckpt.num_classes() != s->description.num_classes) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint ", path, " holds model '", ckpt.model(), "' for input ",
        nn::ShapeToString(input), " with ", ckpt.num_classes(), " classes; the flags give '",
        s->description.name, "' for ", nn::ShapeToString(s->description.input), " with ",
        s->description.num_classes));
  }
  const std::string trained = SettingsQuant(ckpt.settings());
  if (!trained.empty() && trained != s->config.ToString()) {
    return absl::FailedPreconditionError(absl::StrCat("checkpoint ", path,
                                                      " was trained with quant=", trained,
                                                      "; the flags give quant=",
                                                      s->config.ToString()));
  }
  RETURN_IF_ERROR(CheckLdnqFlags(path, ckpt.settings(), s->config, use));
  std::vector<nn::Parameter*> params;
  s->model->CollectParameters(&params);
  std::vector<nn::Buffer*> buffers;
  s->model->CollectBuffers(&buffers);
  absl::Status st = train::RestoreState(ckpt, params, buffers, nullptr);
  if (!st.ok()) {
    return absl::Status(st.code(), absl::StrCat(st.message(), " (checkpoint ", path, ")"));
  }
  s->description.settings = ckpt.settings();
  return absl::OkStatus();
}

// Images [begin, begin + count) of the test split into *x.
absl::Status Gather(const data::Dataset& test, int64_t begin, int64_t count, nn::Tensor* x,
                    std::vector<int32_t>* labels) {
  std::vector<int64_t> idx(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) idx[static_cast<size_t>(i)] = begin + i;
  x->Resize({count, test.channels, test.height, test.width});
  labels->resize(static_cast<size_t>(count));
  return data::GatherBatch(test, idx, x->span(), *labels);
}

int64_t Argmax(const float* row, int64_t n) {
  return std::max_element(row, row + n) - row;
}

}  // namespace

absl::StatusOr<ExportStats> RunExport(const ExportCommandOptions& options) {
  if (options.checkpoint_dir.empty()) {
    return absl::InvalidArgumentError("export needs a checkpoint directory");
  }
  if (options.settle_batch < 1) return absl::InvalidArgumentError("settle_batch must be >= 1");
  ASSIGN_OR_RETURN(std::unique_ptr<Setup> s, MakeSetup(options.source));
  RETURN_IF_ERROR(RestoreCheckpoint(options.checkpoint_dir, s.get(), RestoreFor::kExport));
  const data::Dataset& test = s->splits.test;
  if (test.size() < 1) return absl::InvalidArgumentError("the test split is empty");
  nn::Tensor x;
  std::vector<int32_t> labels;
  RETURN_IF_ERROR(Gather(test, 0, std::min(options.settle_batch, test.size()), &x, &labels));
  SettleQuantizers(*s->model, s->cpu, x);
  const std::string path =
      options.output.empty()
          ? (std::filesystem::path(options.checkpoint_dir) / "model.qpack").string()
          : options.output;
  ExportStats stats;
  RETURN_IF_ERROR(ExportPackedModel(*s->model, s->description, path, &stats));
  return stats;
}

absl::Status RunExportCommand(const ExportCommandOptions& options) {
  ASSIGN_OR_RETURN(ExportStats stats, RunExport(options));
  const std::string path =
      options.output.empty()
          ? (std::filesystem::path(options.checkpoint_dir) / "model.qpack").string()
          : options.output;
  std::printf("export: %s %lld bytes, fp32 model %lld bytes (%.1fx smaller)\n", path.c_str(),
              static_cast<long long>(stats.file_bytes), static_cast<long long>(stats.fp32_bytes),
              stats.ratio());
  std::printf(
      "export: %d packed layers (%lld weights), %d with an exact level table (affine map within "
      "%.2g of the levels)\n",
      stats.packed_layers, static_cast<long long>(stats.packed_weights), stats.level_table_layers,
      stats.max_affine_error);
  return absl::OkStatus();
}

absl::StatusOr<EvalReport> RunEval(const EvalCommandOptions& options) {
  if (options.checkpoint_dir.empty() && options.packed.empty()) {
    return absl::InvalidArgumentError("eval needs a checkpoint directory, a packed model, or both");
  }
  if (options.batch_size < 1) return absl::InvalidArgumentError("batch_size must be >= 1");
  ASSIGN_OR_RETURN(std::unique_ptr<Setup> s, MakeSetup(options.source));
  const data::Dataset& test = s->splits.test;
  const int64_t n = test.size();
  const int64_t classes = test.num_classes;
  EvalReport report;
  report.images = n;
  if (n < 1) return absl::InvalidArgumentError("the test split is empty");
  nn::Tensor x, logits;
  std::vector<int32_t> labels;
  std::vector<float> fake_logits;

  if (!options.checkpoint_dir.empty()) {
    RETURN_IF_ERROR(RestoreCheckpoint(options.checkpoint_dir, s.get(), RestoreFor::kEval));
    fake_logits.resize(static_cast<size_t>(n * classes));
    nn::RunContext ctx;
    ctx.cpu = s->cpu;
    ctx.mode = nn::Mode::kEval;
    int64_t correct = 0;
    double seconds = 0.0;
    for (int64_t b = 0; b < n; b += options.batch_size) {
      const int64_t m = std::min(options.batch_size, n - b);
      RETURN_IF_ERROR(Gather(test, b, m, &x, &labels));
      Timer timer;
      s->model->Forward(ctx, x, &logits);
      seconds += timer.Seconds();
      std::copy(logits.data(), logits.data() + m * classes, fake_logits.data() + b * classes);
      for (int64_t i = 0; i < m; ++i) {
        correct += Argmax(logits.data() + i * classes, classes) == labels[static_cast<size_t>(i)];
      }
    }
    report.has_fake = true;
    report.fake_accuracy = static_cast<double>(correct) / n;
    report.fake_images_per_second = n / std::max(seconds, 1e-9);
  }

  if (!options.packed.empty()) {
    ASSIGN_OR_RETURN(std::unique_ptr<PackedModel> packed, LoadPackedModel(options.packed));
    if (packed->model_name() != s->description.name ||
        packed->input_shape() != s->description.input || packed->num_classes() != classes ||
        packed->quant_config() != s->config.ToString()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "packed model ", options.packed, " holds '", packed->model_name(), "' for input ",
          nn::ShapeToString(packed->input_shape()), " with ", packed->num_classes(),
          " classes and quant=", packed->quant_config(), "; the flags give '",
          s->description.name, "' for ", nn::ShapeToString(s->description.input), " with ",
          classes, " classes and quant=", s->config.ToString()));
    }
    std::vector<float> out(static_cast<size_t>(options.batch_size * classes));
    int64_t correct = 0;
    double seconds = 0.0;
    for (int64_t b = 0; b < n; b += options.batch_size) {
      const int64_t m = std::min(options.batch_size, n - b);
      RETURN_IF_ERROR(Gather(test, b, m, &x, &labels));
      Timer timer;
      packed->Predict(s->cpu, x.data(), m, out.data());
      seconds += timer.Seconds();
      for (int64_t i = 0; i < m; ++i) {
        const float* row = out.data() + i * classes;
        const int64_t pred = Argmax(row, classes);
        correct += pred == labels[static_cast<size_t>(i)];
        if (!report.has_fake) continue;
        const float* ref = fake_logits.data() + (b + i) * classes;
        report.differing_predictions += pred != Argmax(ref, classes);
        double scale = 1e-30, diff = 0.0;
        for (int64_t c = 0; c < classes; ++c) {
          scale = std::max(scale, std::fabs(static_cast<double>(ref[c])));
          diff = std::max(diff, std::fabs(static_cast<double>(row[c]) - ref[c]));
        }
        report.max_relative_logit_diff = std::max(report.max_relative_logit_diff, diff / scale);
      }
    }
    report.has_packed = true;
    report.packed_accuracy = static_cast<double>(correct) / n;
    report.packed_images_per_second = n / std::max(seconds, 1e-9);
  }
  return report;
}

absl::Status RunEvalCommand(const EvalCommandOptions& options) {
  ASSIGN_OR_RETURN(EvalReport r, RunEval(options));
  const std::string quant =
      MakeQuantConfig(options.source.quant, options.source.wq, options.source.aq,
                      options.source.fp_first_last, options.source.fpsc)
          ->ToString();
  if (r.has_fake) {
    std::printf("eval: fake-quantized %s quant=%s: accuracy %.2f%% on %lld test images, %.0f images/s\n",
                options.source.model.c_str(), quant.c_str(), 100 * r.fake_accuracy,
                static_cast<long long>(r.images), r.fake_images_per_second);
  }
  if (r.has_packed) {
    std::printf("eval: packed %s: accuracy %.2f%% on %lld test images, %.0f images/s",
                options.packed.c_str(), 100 * r.packed_accuracy, static_cast<long long>(r.images),
                r.packed_images_per_second);
    if (r.has_fake) {
      std::printf(" (%.2fx the fake-quantized model)\n", r.packed_images_per_second /
                                                            std::max(r.fake_images_per_second, 1e-9));
      std::printf(
          "eval: %lld of %lld predictions differ between the packed and the fake-quantized "
          "model; largest logit difference %.2g (relative to the image's largest |logit|)\n",
          static_cast<long long>(r.differing_predictions), static_cast<long long>(r.images),
          r.max_relative_logit_diff);
    } else {
      std::printf("\n");
    }
  }
  return absl::OkStatus();
}

}  // namespace qtrain::quant
