// qtrain: the worker binary. Flags are parsed here and only here; everything else takes
// options structs. `qtrain --help` lists every flag with its default.
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/timer.h"
#include "worker/data/data_spec.h"
#include "worker/data/load_dataset.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/model.h"
#include "worker/quant/quant_factory.h"
#include "worker/train/trainer.h"

ABSL_FLAG(std::string, model, "cnn", "Model: mlp, cnn or resnet20.");
ABSL_FLAG(std::string, data, "fashion-mnist",
          "Data set: fashion-mnist (/usr/share/datasets/fashion-mnist), fashion-mnist:<dir>, "
          "idx:<dir>, cifar10:<dir>, synthetic[:n=..,test=..,classes=..,shape=CxHxW,seed=..,noise=..].");
ABSL_FLAG(int64_t, epochs, 15, "Training epochs.");
ABSL_FLAG(int64_t, batch_size, 128, "Mini-batch size per worker.");
ABSL_FLAG(double, lr, 0.05, "Base learning rate.");
ABSL_FLAG(std::string, lr_schedule, "cosine", "Learning-rate decay: constant, cosine or step:E1,E2,...");
ABSL_FLAG(double, lr_gamma, 0.1, "Factor applied at each step:... milestone.");
ABSL_FLAG(double, warmup_epochs, 0, "Linear warm-up from 0 to --lr over this many epochs.");
ABSL_FLAG(double, momentum, 0.9, "SGD momentum (0 disables).");
ABSL_FLAG(double, weight_decay, 5e-4, "L2 weight decay on weights (not biases or BN).");
ABSL_FLAG(bool, nesterov, false, "Nesterov momentum.");
ABSL_FLAG(int, threads, 0, "Compute threads (0 = every core of the machine).");
ABSL_FLAG(uint64_t, seed, 1, "Seed for initialization, shuffling and augmentation.");
ABSL_FLAG(int64_t, max_train, 0, "Use only the first N training examples (0 = all).");
ABSL_FLAG(int64_t, max_test, 0, "Use only the first N test examples (0 = all).");
ABSL_FLAG(int64_t, max_steps_per_epoch, 0, "Cap the steps of each epoch (0 = whole epochs).");
ABSL_FLAG(std::string, metrics, "", "Append JSON-lines metrics (steps and epochs) to this file.");
ABSL_FLAG(int64_t, log_every, 50, "Steps between step records in --metrics.");
ABSL_FLAG(std::string, checkpoint_dir, "", "Write checkpoint.qtrn here (atomically).");
ABSL_FLAG(int64_t, checkpoint_every, 1, "Epochs between checkpoints.");
ABSL_FLAG(bool, resume, false, "Continue from --checkpoint_dir/checkpoint.qtrn if it exists.");
ABSL_FLAG(bool, progress, true, "Show the progress line on stderr.");
ABSL_FLAG(std::string, wq, "none",
          "Weight quantizer: none | dorefa:bits=K | sawb:bits=K | qil:bits=K[,gamma=G] | binary | "
          "ternary (K in 1..8; qil 2..8).");
ABSL_FLAG(std::string, aq, "none",
          "Activation quantizer: none | dorefa:bits=K | pact:bits=K[,alpha=A][,l2=L] | "
          "qil:bits=K. Replaces the ReLU in front of each quantized layer.");
ABSL_FLAG(std::string, quant, "none",
          "One method for weights and activations, e.g. qil:w=3,a=3 or dorefa:w=2,a=2 (instead "
          "of --wq/--aq).");
ABSL_FLAG(bool, fp_first_last, true,
          "Keep the first and the last weight layer (and the classifier's input) full precision.");
ABSL_FLAG(bool, fpsc, true,
          "resnet20: full-precision shortcuts (PACT's fpsc); conv1 of each block reads a quantized "
          "copy of the block input.");
ABSL_FLAG(double, quantizer_lr_scale, 1.0,
          "Extra learning-rate factor for quantizer parameters (PACT alpha, QIL c/d/gamma; QIL's "
          "own 1/100 applies on top).");

namespace qtrain {
namespace {

absl::Status RunTraining() {
  // Flags first, so that a bad spec fails before the data is read.
  ASSIGN_OR_RETURN(quant::QuantConfig quant_config,
                   quant::MakeQuantConfig(absl::GetFlag(FLAGS_quant), absl::GetFlag(FLAGS_wq),
                                          absl::GetFlag(FLAGS_aq), absl::GetFlag(FLAGS_fp_first_last),
                                          absl::GetFlag(FLAGS_fpsc)));
  ASSIGN_OR_RETURN(auto quant_factory, quant::QuantLayerFactory::Create(quant_config));
  ASSIGN_OR_RETURN(data::DataSpec spec, data::ParseDataSpec(absl::GetFlag(FLAGS_data)));
  data::LoadOptions load;
  load.max_train = absl::GetFlag(FLAGS_max_train);
  load.max_test = absl::GetFlag(FLAGS_max_test);
  Timer load_timer;
  ASSIGN_OR_RETURN(data::DataSplits splits, data::LoadDataset(spec, load));
  QTRAIN_LOG(INFO) << "data " << data::DataSpecToString(spec) << ": " << splits.train.size()
                   << " train, " << splits.test.size() << " test, " << splits.train.channels << "x"
                   << splits.train.height << "x" << splits.train.width << ", "
                   << splits.train.num_classes << " classes (" << load_timer.Seconds() << " s)";

  int threads = absl::GetFlag(FLAGS_threads);
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0");
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  kernels::ThreadPool pool(threads);
  kernels::CpuContext cpu;
  cpu.pool = &pool;

  nn::ModelSpec model_spec;
  model_spec.name = absl::GetFlag(FLAGS_model);
  model_spec.input = {splits.train.channels, splits.train.height, splits.train.width};
  model_spec.num_classes = splits.train.num_classes;
  model_spec.seed = absl::GetFlag(FLAGS_seed);
  model_spec.factory = quant_factory.get();
  ASSIGN_OR_RETURN(auto model, nn::BuildModel(model_spec));
  QTRAIN_LOG(INFO) << "model " << model_spec.name << ", " << nn::CountParameters(*model)
                   << " parameters, " << threads << " threads, quantization "
                   << quant_config.ToString();

  train::TrainerOptions options;
  options.epochs = absl::GetFlag(FLAGS_epochs);
  options.batch_size = absl::GetFlag(FLAGS_batch_size);
  options.max_steps_per_epoch = absl::GetFlag(FLAGS_max_steps_per_epoch);
  options.lr.base_lr = static_cast<float>(absl::GetFlag(FLAGS_lr));
  RETURN_IF_ERROR(train::ParseLrSchedule(absl::GetFlag(FLAGS_lr_schedule), &options.lr));
  options.lr.gamma = static_cast<float>(absl::GetFlag(FLAGS_lr_gamma));
  options.lr.warmup_epochs = absl::GetFlag(FLAGS_warmup_epochs);
  options.sgd.momentum = static_cast<float>(absl::GetFlag(FLAGS_momentum));
  options.sgd.weight_decay = static_cast<float>(absl::GetFlag(FLAGS_weight_decay));
  options.sgd.nesterov = absl::GetFlag(FLAGS_nesterov);
  options.sgd.quantizer_lr_scale = static_cast<float>(absl::GetFlag(FLAGS_quantizer_lr_scale));
  options.log_every = absl::GetFlag(FLAGS_log_every);
  options.metrics_path = absl::GetFlag(FLAGS_metrics);
  options.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  options.checkpoint_every = absl::GetFlag(FLAGS_checkpoint_every);
  options.resume = absl::GetFlag(FLAGS_resume);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.progress = absl::GetFlag(FLAGS_progress);
  options.settings = absl::StrCat("model=", model_spec.name, " data=", absl::GetFlag(FLAGS_data),
                                  " epochs=", options.epochs, " batch_size=", options.batch_size,
                                  " lr=", options.lr.base_lr, " seed=", options.seed,
                                  " quant=", quant_config.ToString());

  train::ModelInfo info{model_spec.name, model_spec.input, model_spec.num_classes};
  ASSIGN_OR_RETURN(auto trainer, train::Trainer::Create(model.get(), info, &splits,
                                                        data::TrainAugmentation(spec), options, cpu));
  ASSIGN_OR_RETURN(train::TrainSummary s, trainer->Run());
  std::printf(
      "summary: model=%s quant=%s data=%s epochs=%lld steps=%lld final_test_accuracy=%.2f%% "
      "best_test_accuracy=%.2f%% test_loss=%.4f train_time=%s images_per_second=%.0f\n",
      model_spec.name.c_str(), quant_config.ToString().c_str(), data::DataSpecToString(spec).c_str(),
      static_cast<long long>(s.epochs_run), static_cast<long long>(s.steps),
      100 * s.final_test_accuracy, 100 * s.best_test_accuracy, s.final_test_loss,
      absl::StrFormat("%.1fs", s.seconds).c_str(), s.images_per_second);
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "worker/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  usage.normalize_filename = [](absl::string_view file) { return std::string(file); };
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "trains a (quantized) network on its own CPU kernels.\n"
      "  qtrain [--flags]            train (defaults: cnn on Fashion-MNIST)\n"
      "Every flag is listed below with its default.");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    std::fprintf(stderr, "qtrain: unexpected argument '%s' (see --help)\n", positional[1]);
    return 2;
  }
  absl::Status status = qtrain::RunTraining();
  if (!status.ok()) {
    std::fprintf(stderr, "qtrain: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
