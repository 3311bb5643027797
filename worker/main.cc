// qtrain: the worker binary. Flags are parsed here and only here; everything else takes
// options structs. `qtrain --help` lists every flag with its default.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/malloc_tuning.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/timer.h"
#ifdef QTRAIN_HAVE_CUDA
#include "worker/nn/cuda/cuda_engine.h"
#include "worker/nn/scalar_layer.h"
#endif
#ifdef QTRAIN_HAVE_NCCL
#include "worker/comm/nccl_communicator.h"
#include "worker/comm/rendezvous.h"
#endif
#include "worker/comm/bucket_codec.h"
#include "worker/comm/local_communicator.h"
#include "worker/comm/mpi_communicator.h"
#include "worker/comm/ps_communicator.h"
#include "worker/data/data_spec.h"
#include "worker/data/load_dataset.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/model.h"
#include "worker/quant/export_command.h"
#include "worker/quant/ldnq/ldnq_command.h"
#include "worker/quant/quant_factory.h"
#include "worker/train/guided.h"
#include "worker/train/schedule.h"
#include "worker/train/trainer.h"

ABSL_FLAG(std::string, model, "cnn", "Model: mlp, cnn, resnet20 or mlp-wide.");
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
ABSL_FLAG(std::string, device, "cpu",
          "Where the training step runs: cpu, or cuda (one GPU per process: LOCAL_RANK's, else 0).");
ABSL_FLAG(bool, cuda_graphs, true, "--device=cuda: capture each step in CUDA graphs.");
ABSL_FLAG(bool, nccl, true,
          "--device=cuda with several ranks: average gradients on the GPUs through NCCL (ranks "
          "from mpirun, or from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as deploy/launch-local.sh "
          "and torchrun set them); false: through MPI on host copies.");
ABSL_FLAG(uint64_t, seed, 1, "Seed for initialization, shuffling and augmentation.");
ABSL_FLAG(int64_t, max_train, 0, "Use only the first N training examples (0 = all).");
ABSL_FLAG(int64_t, max_test, 0, "Use only the first N test examples (0 = all).");
ABSL_FLAG(int64_t, max_steps_per_epoch, 0, "Cap the steps of each epoch (0 = whole epochs).");
ABSL_FLAG(std::string, metrics, "", "Append JSON-lines metrics (steps and epochs) to this file.");
ABSL_FLAG(int64_t, log_every, 50, "Steps between step records in --metrics.");
ABSL_FLAG(std::string, checkpoint_dir, "", "Write checkpoint.qtrn here (atomically).");
ABSL_FLAG(int64_t, checkpoint_every, 1, "Epochs between checkpoints.");
ABSL_FLAG(bool, resume, false, "Continue from --checkpoint_dir/checkpoint.qtrn if it exists.");
ABSL_FLAG(std::string, init_from, "",
          "Fine-tune: a run that does not resume starts from this checkpoint's weights (a "
          "checkpoint.qtrn or its directory, same model), copied by name and shape; quantizer "
          "parameters it lacks keep their initial values.");
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
ABSL_FLAG(std::string, schedule, "none",
          "Training schedule of Zhuang et al. 2018 toward the --quant/--wq/--aq target: none | ts "
          "(two-stage: weights first, then activations) | pq (progressive, --bits) | pq+ts. Each "
          "phase starts from the previous model; momentum and the --lr_schedule restart per phase.");
ABSL_FLAG(std::string, stage_epochs, "",
          "--schedule: epochs of each phase, e.g. 8,8 for ts (replaces --epochs: their sum).");
ABSL_FLAG(std::string, bits, "",
          "--schedule=pq|pq+ts: precision sequence from high to low, e.g. 32,8,4,2 (32 = full "
          "precision); the last must give the target.");
ABSL_FLAG(int, ts_act_bits, 32,
          "--schedule=ts|pq+ts: activation bits of stage 1 (32 = full precision; else K above the "
          "target's).");
ABSL_FLAG(bool, scalar_layer, false,
          "Append Zhuang et al. 2018's scalar layer after the classifier: one trainable scalar "
          "multiplying the logits, initialised to 0.01 (kept in full precision).");
ABSL_FLAG(bool, guided, false,
          "Guided training: a full-precision twin trained jointly; both minimise CE + "
          "lambda/2 ||Q(mu) - nu||^2 at --guide_layers. One process only for now.");
ABSL_FLAG(double, lambda, 0.001,
          "--guided: weight of the guidance loss R, which sums over every element of the guided "
          "maps (cnn on Fashion-MNIST: 0.001 works, 1 collapses the twin).");
ABSL_FLAG(std::string, guide_layers, "",
          "--guided: guidance points, layer names (default: resnet20 layer2.2,layer3.2; cnn "
          "relu4,relu5; mlp relu1,relu2).");

ABSL_FLAG(std::string, out, "",
          "qtrain export: the packed model file to write (default <checkpoint_dir>/model.qpack); "
          "qtrain ldnq: the directory of the quantized checkpoint.");
ABSL_FLAG(std::string, packed, "",
          "qtrain eval: also evaluate this packed model file (from qtrain export) on the low-bit "
          "kernels and compare its predictions with the checkpoint's.");
ABSL_FLAG(std::string, calib, "0.01",
          "qtrain ldnq: calibration images from the training split, a fraction (< 1) or a count.");
ABSL_FLAG(int, levels, 3, "qtrain ldnq: weight levels per layer, alpha*{0,+-2^0..+-2^b}: 3, 5, 7 or 9.");
ABSL_FLAG(std::string, method, "ldnq",
          "qtrain ldnq: ldnq (ADMM + weights update), ldnq- (ADMM only) or dq (direct projection).");
ABSL_FLAG(std::string, ldnq_first_last, "quantize",
          "qtrain ldnq: quantize (every weight layer, as the paper) or fp (keep the first and last "
          "weight layer full precision).");
ABSL_FLAG(int64_t, retrain_epochs, 0,
          "qtrain ldnq: epochs of label fine-tuning of the unquantized parameters on the "
          "calibration images.");
ABSL_FLAG(double, retrain_lr, 0.01, "qtrain ldnq: SGD learning rate of --retrain_epochs.");
ABSL_FLAG(int64_t, update_epochs, 1,
          "qtrain ldnq: epochs of the weights update (layers above, MSE to the FP logits) after "
          "each layer.");
ABSL_FLAG(double, update_lr, 0.001, "qtrain ldnq: SGD learning rate of the weights update.");
ABSL_FLAG(bool, refresh_bn, true,
          "qtrain ldnq: after each layer, recompute the batch-norm statistics from the partially "
          "quantized cascade (every --method; false with --method=dq is the paper's DQ: the "
          "projection alone).");
ABSL_FLAG(double, admm_rho, 0,
          "qtrain ldnq: ADMM penalty rho (0: each of --admm_rho_scale times H[0][0]).");
ABSL_FLAG(std::string, admm_rho_scale, "1,0.1",
          "qtrain ldnq: when --admm_rho is 0, ADMM runs with rho = s * H[0][0] for each s of this "
          "comma-separated list and keeps the lowest layer error (the authors' code: 1).");
ABSL_FLAG(int, admm_alpha_starts, 4,
          "qtrain ldnq: ADMM runs from this many initial alphas (mean|W| * 2^t, t in [-(b+1), 1]) "
          "and keeps the best (the authors' code: 1).");
ABSL_FLAG(int, admm_iters, 200, "qtrain ldnq: ADMM iteration limit per layer and alpha start.");
ABSL_FLAG(int, admm_patience, 20,
          "qtrain ldnq: stop ADMM after this many iterations without a lower objective.");

ABSL_FLAG(std::string, codec, "fp32",
          "Gradient codec for data-parallel averaging: fp32 (plain allreduce) | fp16 | onebit | "
          "terngrad | qsgd:levels=16 | threshold:tau=T | ... (compression registry spec; a bad "
          "spec lists the valid ones). Without mpirun a codec still compresses the one process's "
          "gradients (what an MPI run with it would see).");
ABSL_FLAG(std::string, error_feedback, "auto",
          "Error feedback for --codec: auto (the spec's ef key, else the codec's default), on or off.");
ABSL_FLAG(std::string, allreduce, "auto",
          "Compressed allreduce under mpirun: auto (allgather up to 4 ranks or for buckets under "
          "1 MiB, reduce_scatter otherwise), allgather or reduce_scatter.");
ABSL_FLAG(int64_t, codec_warmup_steps, 0,
          "Warm start: average the first N training steps in fp32 (uncompressed), then --codec "
          "(1-bit SGD's warm start, 1-bit Adam's warm-up). mpirun and single-process runs; not "
          "--ps or NCCL.");
ABSL_FLAG(double, bucket_mb, 4,
          "Gradient bucket size in MiB: gradients are averaged in buckets of about this size, in "
          "reverse layer order, overlapping the rest of backward.");
ABSL_FLAG(double, comm_timeout, 120,
          "Seconds any one collective may wait for its peers under mpirun; then the run ends with "
          "an error naming the rank, step and operation (never a silent hang).");
ABSL_FLAG(std::string, ps, "",
          "Parameter-server mode: host:port of each qserver, in shard order (h1:p1,h2:p2). The "
          "workers push --codec gradients and pull the servers' mean (see qserver --help).");
ABSL_FLAG(std::string, ps_token, "", "--ps: the servers' shared --token.");
ABSL_FLAG(int, worker_id, -1,
          "--ps: this worker's rank in [0, workers) (-1: the server assigns the lowest unused one, "
          "or, joining a running job, the lowest one whose worker is gone).");
ABSL_FLAG(std::string, ps_tls_ca, "", "--ps: PEM CA the servers' TLS certificates chain to (TLS on).");
ABSL_FLAG(std::string, ps_tls_cert, "", "--ps: PEM client certificate (servers with --tls_ca).");
ABSL_FLAG(std::string, ps_tls_key, "", "--ps: PEM private key of --ps_tls_cert.");
ABSL_FLAG(double, ps_max_message_mb, 64, "--ps: gRPC message limit in MiB (as the servers').");

namespace qtrain {
namespace {

// Test-only knobs from the environment, read here and passed down as options:
// QTRAIN_TEST_STALL_RANK=r QTRAIN_TEST_STALL_STEP=s makes rank r sleep at global step s.
void ReadTestEnvironment(train::TrainerOptions* options) {
  const char* rank = std::getenv("QTRAIN_TEST_STALL_RANK");
  const char* step = std::getenv("QTRAIN_TEST_STALL_STEP");
  if (rank != nullptr && step != nullptr) {
    options->stall_rank_for_testing = std::atoi(rank);
    options->stall_step_for_testing = std::atoll(step);
  }
}

absl::StatusOr<comm::FeedbackChoice> ParseFeedback(const std::string& value) {
  if (value == "auto") return comm::FeedbackChoice::kFromSpec;
  if (value == "on") return comm::FeedbackChoice::kOn;
  if (value == "off") return comm::FeedbackChoice::kOff;
  return absl::InvalidArgumentError(
      absl::StrCat("--error_feedback must be auto, on or off; got '", value, "'"));
}

// The communication flags, validated before MPI starts (so a bad flag fails every rank alike,
// without a collective).
struct CommConfig {
  std::string codec;
  comm::FeedbackChoice feedback = comm::FeedbackChoice::kFromSpec;
  comm::AllreduceAlgorithm algorithm = comm::AllreduceAlgorithm::kAuto;
  double bucket_mb = 4;
  double timeout_seconds = 120;
  int64_t warmup_steps = 0;  // --codec_warmup_steps
};

absl::StatusOr<CommConfig> ReadCommFlags() {
  CommConfig c;
  c.codec = absl::GetFlag(FLAGS_codec);
  ASSIGN_OR_RETURN(c.feedback, ParseFeedback(absl::GetFlag(FLAGS_error_feedback)));
  ASSIGN_OR_RETURN(c.algorithm, comm::ParseAllreduceAlgorithm(absl::GetFlag(FLAGS_allreduce)));
  c.bucket_mb = absl::GetFlag(FLAGS_bucket_mb);
  if (!(c.bucket_mb > 0) || c.bucket_mb > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("--bucket_mb must be in (0, 4096], got ", c.bucket_mb));
  }
  c.timeout_seconds = absl::GetFlag(FLAGS_comm_timeout);
  if (!(c.timeout_seconds > 0) || !std::isfinite(c.timeout_seconds)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--comm_timeout must be a number of seconds > 0, got ", c.timeout_seconds));
  }
  if (c.codec.empty()) return absl::InvalidArgumentError("--codec must not be empty (fp32 is the default)");
  absl::StatusOr<std::unique_ptr<comm::BucketCodec>> codec =
      comm::BucketCodec::Create(c.codec, c.feedback);
  if (!codec.ok()) {
    return absl::Status(codec.status().code(),
                        absl::StrCat("--codec: ", codec.status().message()));
  }
  c.warmup_steps = absl::GetFlag(FLAGS_codec_warmup_steps);
  if (c.warmup_steps < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--codec_warmup_steps must be >= 0, got ", c.warmup_steps));
  }
  if (c.warmup_steps > 0 && (*codec)->passthrough()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--codec_warmup_steps needs a compressing --codec (got '", c.codec, "')"));
  }
  if (c.warmup_steps > 0 && !absl::GetFlag(FLAGS_ps).empty()) {
    return absl::InvalidArgumentError(
        "--codec_warmup_steps is not supported with --ps (the servers compress every step)");
  }
  return c;
}

quant::ModelSource ModelSourceFromFlags() {
  quant::ModelSource source;
  source.model = absl::GetFlag(FLAGS_model);
  source.data = absl::GetFlag(FLAGS_data);
  source.quant = absl::GetFlag(FLAGS_quant);
  source.wq = absl::GetFlag(FLAGS_wq);
  source.aq = absl::GetFlag(FLAGS_aq);
  source.fp_first_last = absl::GetFlag(FLAGS_fp_first_last);
  source.fpsc = absl::GetFlag(FLAGS_fpsc);
  source.scalar_layer = absl::GetFlag(FLAGS_scalar_layer);
  source.max_train = absl::GetFlag(FLAGS_max_train);
  source.max_test = absl::GetFlag(FLAGS_max_test);
  source.threads = absl::GetFlag(FLAGS_threads);
  return source;
}

// `qtrain ldnq` under mpirun: distributed calibration (ldnq_command.h) over an fp32
// MpiCommunicator, of which it uses the exact collectives (AllReduceSum, AllGatherU64). Any error
// ends the whole job (MPI_Abort), so that no rank waits for a peer that has given up.
absl::Status RunLdnqUnderMpi(const quant::ldnq::LdnqCommandOptions& options, int* argc,
                             char*** argv) {
  comm::MpiOptions mpi;  // codec fp32
  mpi.timeout_seconds = absl::GetFlag(FLAGS_comm_timeout);
  if (!(mpi.timeout_seconds > 0) || !std::isfinite(mpi.timeout_seconds)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--comm_timeout must be a number of seconds > 0, got ", mpi.timeout_seconds));
  }
  RETURN_IF_ERROR(comm::InitMpi(argc, argv));
  {
    absl::StatusOr<std::unique_ptr<comm::Communicator>> communicator =
        comm::CreateMpiCommunicator(mpi);
    absl::Status status = communicator.status();
    if (communicator.ok()) {
      if ((*communicator)->rank() != 0) SetMinLogSeverity(LogSeverity::kWarning);
      status = quant::ldnq::RunLdnqCommand(options, communicator->get());
    }
    if (!status.ok()) {
      std::fprintf(stderr, "qtrain: %s\n", status.ToString().c_str());
      comm::AbortMpi(1);
    }
  }  // the communicator is freed before MPI_Finalize
  return comm::FinalizeMpi();
}

// `qtrain export` and `qtrain eval`: the packed low-bit model (worker/quant/export_command.h);
// `qtrain ldnq`: L-DNQ post-training quantization (worker/quant/ldnq/ldnq_command.h), distributed
// under mpirun. argc / argv: for MPI_Init.
absl::Status RunSubcommand(const std::string& command, int* argc, char*** argv) {
  if (command == "export") {
    quant::ExportCommandOptions options;
    options.source = ModelSourceFromFlags();
    options.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
    options.output = absl::GetFlag(FLAGS_out);
    if (options.checkpoint_dir.empty()) {
      return absl::InvalidArgumentError("qtrain export needs --checkpoint_dir (a training run's)");
    }
    return quant::RunExportCommand(options);
  }
  if (command == "eval") {
    quant::EvalCommandOptions options;
    options.source = ModelSourceFromFlags();
    options.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
    options.packed = absl::GetFlag(FLAGS_packed);
    return quant::RunEvalCommand(options);
  }
  if (command == "ldnq") {
    quant::ldnq::LdnqCommandOptions options;
    options.source = ModelSourceFromFlags();
    options.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
    options.out_dir = absl::GetFlag(FLAGS_out);
    if (!absl::SimpleAtod(absl::GetFlag(FLAGS_calib), &options.calib)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--calib must be a number; got '", absl::GetFlag(FLAGS_calib), "'"));
    }
    options.seed = absl::GetFlag(FLAGS_seed);
    options.levels = absl::GetFlag(FLAGS_levels);
    ASSIGN_OR_RETURN(options.method, quant::ldnq::ParseLdnqMethod(absl::GetFlag(FLAGS_method)));
    ASSIGN_OR_RETURN(options.first_last,
                     quant::ldnq::ParseFirstLastPolicy(absl::GetFlag(FLAGS_ldnq_first_last)));
    options.retrain_epochs = static_cast<int>(absl::GetFlag(FLAGS_retrain_epochs));
    options.retrain_lr = absl::GetFlag(FLAGS_retrain_lr);
    options.update_epochs = static_cast<int>(absl::GetFlag(FLAGS_update_epochs));
    options.update_lr = absl::GetFlag(FLAGS_update_lr);
    options.refresh_bn = absl::GetFlag(FLAGS_refresh_bn);
    options.admm.rho = absl::GetFlag(FLAGS_admm_rho);
    options.admm.rho_scales.clear();
    for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_admm_rho_scale), ',')) {
      double scale = 0.0;
      if (!absl::SimpleAtod(part, &scale) || !(scale > 0.0) || !std::isfinite(scale)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--admm_rho_scale: '", std::string(part),
            "' is not a positive number (want a comma-separated list such as 1,0.1)"));
      }
      options.admm.rho_scales.push_back(scale);
    }
    options.admm.alpha_starts = absl::GetFlag(FLAGS_admm_alpha_starts);
    options.admm.max_iterations = absl::GetFlag(FLAGS_admm_iters);
    options.admm.patience = absl::GetFlag(FLAGS_admm_patience);
    options.metrics_path = absl::GetFlag(FLAGS_metrics);
    if (comm::LaunchedByMpirun()) return RunLdnqUnderMpi(options, argc, argv);
    return quant::ldnq::RunLdnqCommand(options);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown command '", command, "'; commands: export, eval, ldnq (none: train)"));
}

absl::Status RunTraining(const CommConfig& comm_config, comm::Communicator* communicator) {
  // Flags first, so that a bad spec fails before the data is read.
  ASSIGN_OR_RETURN(quant::QuantConfig quant_config,
                   quant::MakeQuantConfig(absl::GetFlag(FLAGS_quant), absl::GetFlag(FLAGS_wq),
                                          absl::GetFlag(FLAGS_aq), absl::GetFlag(FLAGS_fp_first_last),
                                          absl::GetFlag(FLAGS_fpsc)));
  ASSIGN_OR_RETURN(auto quant_factory, quant::QuantLayerFactory::Create(quant_config));
  // Training schedules and guided training (worker/train/schedule.h, guided.h).
  train::ScheduleOptions schedule_options;
  ASSIGN_OR_RETURN(schedule_options.kind, train::ParseScheduleKind(absl::GetFlag(FLAGS_schedule)));
  std::vector<train::SchedulePhase> phases;
  if (schedule_options.kind != train::ScheduleKind::kNone) {
    ASSIGN_OR_RETURN(schedule_options.stage_epochs,
                     train::ParseIntList("stage_epochs", absl::GetFlag(FLAGS_stage_epochs)));
    if (schedule_options.kind != train::ScheduleKind::kTwoStage) {
      ASSIGN_OR_RETURN(std::vector<int64_t> bits,
                       train::ParseIntList("bits", absl::GetFlag(FLAGS_bits)));
      schedule_options.bits.assign(bits.begin(), bits.end());
    }
    schedule_options.ts_act_bits = absl::GetFlag(FLAGS_ts_act_bits);
    ASSIGN_OR_RETURN(phases, train::MakeSchedule(schedule_options, quant_config));
    quant_config = phases.back().quant;  // the target (pq's default base quantizer filled in)
  } else if (!absl::GetFlag(FLAGS_stage_epochs).empty() || !absl::GetFlag(FLAGS_bits).empty()) {
    return absl::InvalidArgumentError("--stage_epochs and --bits need --schedule");
  }
  const bool guided = absl::GetFlag(FLAGS_guided);
  if (!guided && (absl::GetFlag(FLAGS_lambda) != 0.001 || !absl::GetFlag(FLAGS_guide_layers).empty())) {
    return absl::InvalidArgumentError("--lambda and --guide_layers need --guided");
  }
  if (guided && phases.empty()) {  // one phase: the target, for --epochs
    phases.push_back({"guided", absl::GetFlag(FLAGS_epochs), quant_config});
  }
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
  if (absl::GetFlag(FLAGS_scalar_layer)) model_spec.scalar_layer = nn::ScalarLayer::kPaperInit;
  ASSIGN_OR_RETURN(auto model, nn::BuildModel(model_spec));
  QTRAIN_LOG(INFO) << "model " << model_spec.name << ", " << nn::CountParameters(*model)
                   << " parameters, " << threads << " threads, quantization "
                   << quant_config.ToString();

  train::TrainerOptions options;
  options.epochs = absl::GetFlag(FLAGS_epochs);
  if (!phases.empty()) {
    options.epochs = 0;
    for (const train::SchedulePhase& p : phases) options.epochs += p.epochs;
  }
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
  options.init_from = absl::GetFlag(FLAGS_init_from);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.progress = absl::GetFlag(FLAGS_progress);
  options.bucket_bytes =
      std::max<int64_t>(1, static_cast<int64_t>(comm_config.bucket_mb * 1024 * 1024));
  options.comm_timeout_seconds = comm_config.timeout_seconds;
  options.comm_settings = absl::StrCat(
      "codec=", comm_config.codec, " error_feedback=", absl::GetFlag(FLAGS_error_feedback),
      " allreduce=", comm::AllreduceAlgorithmName(comm_config.algorithm), " bucket_bytes=",
      options.bucket_bytes, " world_size=", communicator->world_size());
  ReadTestEnvironment(&options);
  options.settings = absl::StrCat("model=", model_spec.name, " data=", absl::GetFlag(FLAGS_data),
                                  " epochs=", options.epochs, " batch_size=", options.batch_size,
                                  " lr=", options.lr.base_lr, " seed=", options.seed,
                                  " quant=", quant_config.ToString());

  const std::string device = absl::GetFlag(FLAGS_device);
  if (device == "cuda") {
#ifdef QTRAIN_HAVE_CUDA
    nn::cuda::CudaEngineOptions engine_options;
    engine_options.graphs = absl::GetFlag(FLAGS_cuda_graphs);
    options.engine = nn::cuda::CudaEngineFactory(engine_options);
#else
    return absl::FailedPreconditionError(
        "--device=cuda: this qtrain was built without CUDA (build where nvcc is found, "
        "QTRAIN_CUDA=AUTO or ON)");
#endif
  } else if (device != "cpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be cpu or cuda, got '", device, "'"));
  }

  train::ModelInfo info{model_spec.name, model_spec.input, model_spec.num_classes};
  std::unique_ptr<train::Trainer> trainer;
  if (phases.empty()) {
    ASSIGN_OR_RETURN(trainer, train::Trainer::Create(model.get(), info, &splits,
                                                     data::TrainAugmentation(spec), options, cpu,
                                                     communicator));
  } else {
    model.reset();  // the trainer builds each phase's model
    train::PhasePlan plan;
    plan.description = train::ScheduleToString(phases);
    for (const train::SchedulePhase& p : phases) {
      plan.names.push_back(p.name);
      plan.epochs.push_back(p.epochs);
      plan.activation.push_back(p.quant.activation);
    }
    plan.build = [phases, model_spec](int i) -> absl::StatusOr<std::unique_ptr<nn::Layer>> {
      ASSIGN_OR_RETURN(auto factory,
                       quant::QuantLayerFactory::Create(phases[static_cast<size_t>(i)].quant));
      nn::ModelSpec s = model_spec;
      s.factory = factory.get();
      ASSIGN_OR_RETURN(auto m, nn::BuildModel(s));
      return std::unique_ptr<nn::Layer>(std::move(m));
    };
    std::unique_ptr<train::Guide> guide;
    if (guided) {
      train::GuideOptions g;
      g.lambda = static_cast<float>(absl::GetFlag(FLAGS_lambda));
      g.layers = train::DefaultGuideLayers(model_spec.name);
      if (!absl::GetFlag(FLAGS_guide_layers).empty()) {
        g.layers = absl::StrSplit(absl::GetFlag(FLAGS_guide_layers), ',');
      }
      g.sgd = options.sgd;
      nn::ModelSpec fp_spec = model_spec;  // the same seed: the twin starts from the same weights
      fp_spec.factory = nullptr;
      ASSIGN_OR_RETURN(auto fp_model, nn::BuildModel(fp_spec));
      ASSIGN_OR_RETURN(guide, train::Guide::Create(g, std::move(fp_model)));
      absl::StrAppend(&plan.description, ";guided lambda=", g.lambda, " layers=",
                      absl::StrJoin(g.layers, ","));
    }
    absl::StrAppend(&options.settings, " schedule=", plan.description);
    QTRAIN_LOG(INFO) << "schedule: " << plan.description << " (" << options.epochs << " epochs)";
    ASSIGN_OR_RETURN(trainer, train::Trainer::CreatePhased(std::move(plan), std::move(guide), info,
                                                           &splits, data::TrainAugmentation(spec),
                                                           options, cpu, communicator));
  }
  if (!communicator->IsIdentity()) {
    QTRAIN_LOG(INFO) << communicator->Describe() << "; " << trainer->Buckets().size()
                     << " gradient buckets of up to " << comm_config.bucket_mb << " MiB";
  }
  ASSIGN_OR_RETURN(train::TrainSummary s, trainer->Run());
  if (communicator->rank() != 0) {
    // Every rank's own hash (rank 0 prints the checked one below): a worker that joined late
    // shows that it ends with the others' weights.
    std::printf("rank %d final weights hash %016llx\n", communicator->rank(),
                static_cast<unsigned long long>(s.weights_hash));
    return absl::OkStatus();
  }
  std::printf("weights hash: %016llx identical on all %d ranks\n",
              static_cast<unsigned long long>(s.weights_hash), s.ranks);
  std::string traffic = absl::StrCat("bytes_sent=", s.bytes_sent, " (fp32 would send ",
                                     s.fp32_bytes_sent);
  if (s.bytes_sent > 0 && s.fp32_bytes_sent > 0) {
    absl::StrAppendFormat(&traffic, ", ratio %.1fx", static_cast<double>(s.fp32_bytes_sent) /
                                                         static_cast<double>(s.bytes_sent));
  }
  absl::StrAppend(&traffic, ")");
  std::printf(
      "summary: model=%s quant=%s data=%s epochs=%lld steps=%lld final_test_accuracy=%.2f%% "
      "best_test_accuracy=%.2f%% test_loss=%.4f train_time=%s images_per_second=%.0f ranks=%d "
      "codec=%s %s encode=%.2fs communicate=%.2fs decode=%.2fs\n",
      model_spec.name.c_str(), quant_config.ToString().c_str(), data::DataSpecToString(spec).c_str(),
      static_cast<long long>(s.epochs_run), static_cast<long long>(s.steps),
      100 * s.final_test_accuracy, 100 * s.best_test_accuracy, s.final_test_loss,
      absl::StrFormat("%.1fs", s.seconds).c_str(), s.images_per_second, s.ranks,
      comm_config.codec.c_str(), traffic.c_str(), s.encode_seconds, s.communicate_seconds,
      s.decode_seconds);
  if (guided) {
    std::printf("guided: full-precision twin final_test_accuracy=%.2f%% test_loss=%.4f "
                "guidance_loss=%.5g\n",
                100 * s.fp_test_accuracy, s.fp_test_loss, s.guidance_loss);
  }
  std::fflush(stdout);
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

namespace qtrain {

// Runs the training with `communicator`, printing the error; returns the exit code.
int RunOrReport(const CommConfig& config, comm::Communicator* communicator) {
  const absl::Status status = RunTraining(config, communicator);
  if (!status.ok()) {
    std::fprintf(stderr, "qtrain: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}

#ifdef QTRAIN_HAVE_NCCL
absl::StatusOr<std::unique_ptr<comm::Communicator>> CreateNccl(const CommConfig& config,
                                                               const comm::NcclBootstrap& boot) {
  if (config.warmup_steps > 0) {
    return absl::InvalidArgumentError(
        "--codec_warmup_steps is not supported with NCCL (--device=cuda with several ranks)");
  }
  comm::NcclOptions nccl;
  nccl.codec_spec = config.codec;
  nccl.error_feedback = config.feedback;
  nccl.algorithm = config.algorithm;
  nccl.timeout_seconds = config.timeout_seconds;
  nccl.seed = absl::GetFlag(FLAGS_seed);
  return comm::CreateNcclCommunicator(boot, nccl);
}
#endif

// True when --device=cuda ranks should average through NCCL.
bool UseNccl() {
#ifdef QTRAIN_HAVE_NCCL
  return absl::GetFlag(FLAGS_device) == "cuda" && absl::GetFlag(FLAGS_nccl);
#else
  return false;
#endif
}

}  // namespace qtrain

int main(int argc, char** argv) {
  qtrain::KeepLargeAllocationsInHeap();  // common/malloc_tuning.h
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "worker/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  usage.normalize_filename = [](absl::string_view file) { return std::string(file); };
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "trains a (quantized) network on its own CPU kernels, alone or data-parallel under mpirun.\n"
      "  qtrain [--flags]            train (defaults: cnn on Fashion-MNIST)\n"
      "  mpirun -np 4 qtrain --codec=onebit [--flags]   4 ranks averaging 1-bit gradients\n"
      "  qtrain export --checkpoint_dir=D [--out=F] [model/quant flags]   packed low-bit model\n"
      "  qtrain eval --checkpoint_dir=D [--packed=F] [model/quant flags]  test accuracy of both\n"
      "  qtrain ldnq --checkpoint_dir=D --out=O [--calib=600 --levels=3 --method=ldnq]  L-DNQ\n"
      "  mpirun -np 4 qtrain ldnq [--flags]   L-DNQ with the calibration work split over 4 ranks\n"
      "Every flag is listed below with its default.");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 2) {
    std::fprintf(stderr, "qtrain: unexpected argument '%s' (see --help)\n", positional[2]);
    return 2;
  }
  if (positional.size() == 2) {
    absl::Status status = qtrain::RunSubcommand(positional[1], &argc, &argv);
    if (!status.ok()) {
      std::fprintf(stderr, "qtrain: %s\n", status.ToString().c_str());
      return 1;
    }
    return 0;
  }
  absl::StatusOr<qtrain::CommConfig> config = qtrain::ReadCommFlags();
  if (!config.ok()) {
    std::fprintf(stderr, "qtrain: %s\n", config.status().ToString().c_str());
    return 1;
  }
  if (!absl::GetFlag(FLAGS_ps).empty()) {
    // Parameter-server mode (worker/comm/ps_communicator.h).
    qtrain::comm::PsOptions ps;
    ps.token = absl::GetFlag(FLAGS_ps_token);
    ps.worker_id = absl::GetFlag(FLAGS_worker_id);
    ps.codec_spec = config->codec;
    ps.error_feedback = config->feedback;
    ps.seed = absl::GetFlag(FLAGS_seed);
    ps.timeout_seconds = config->timeout_seconds;
    ps.tls_ca = absl::GetFlag(FLAGS_ps_tls_ca);
    ps.tls_cert = absl::GetFlag(FLAGS_ps_tls_cert);
    ps.tls_key = absl::GetFlag(FLAGS_ps_tls_key);
    ps.max_message_bytes =
        static_cast<uint64_t>(std::clamp(absl::GetFlag(FLAGS_ps_max_message_mb), 1.0, 2047.0) *
                              1024 * 1024);
    absl::StatusOr<std::vector<std::string>> servers =
        qtrain::comm::ParsePsServers(absl::GetFlag(FLAGS_ps));
    absl::Status status = servers.status();
    if (servers.ok()) {
      ps.servers = *servers;
      absl::StatusOr<std::unique_ptr<qtrain::comm::Communicator>> communicator =
          qtrain::comm::CreatePsCommunicator(ps);
      if (communicator.ok() && (*communicator)->rank() != 0) {
        qtrain::SetMinLogSeverity(qtrain::LogSeverity::kWarning);
      }
      status = communicator.ok() ? qtrain::RunTraining(*config, communicator->get())
                                 : communicator.status();
    }
    if (!status.ok()) {
      std::fprintf(stderr, "qtrain: %s\n", status.ToString().c_str());
      return 1;
    }
    return 0;
  }
#ifdef QTRAIN_HAVE_NCCL
  if (qtrain::UseNccl() && !qtrain::comm::LaunchedByMpirun() && std::getenv("RANK") != nullptr &&
      std::getenv("WORLD_SIZE") != nullptr) {
    // Launched torchrun-style (deploy/launch-local.sh): NCCL bootstraps over the TCP rendezvous.
    absl::StatusOr<qtrain::comm::LaunchEnv> env = qtrain::comm::LaunchEnvFromEnvironment();
    absl::StatusOr<std::unique_ptr<qtrain::comm::Communicator>> communicator =
        env.ok() ? qtrain::CreateNccl(*config, qtrain::comm::BootstrapFromLaunchEnv(*env))
                 : env.status();
    if (!communicator.ok()) {
      std::fprintf(stderr, "qtrain: %s\n", communicator.status().ToString().c_str());
      return 1;
    }
    if ((*communicator)->rank() != 0) qtrain::SetMinLogSeverity(qtrain::LogSeverity::kWarning);
    return qtrain::RunOrReport(*config, communicator->get());
  }
#endif
  if (!qtrain::comm::LaunchedByMpirun()) {
    qtrain::comm::LocalOptions local;
    local.codec_spec = config->codec;
    local.error_feedback = config->feedback;
    local.seed = absl::GetFlag(FLAGS_seed);
    local.fp32_warmup_steps = config->warmup_steps;
    absl::StatusOr<std::unique_ptr<qtrain::comm::LocalCommunicator>> communicator =
        qtrain::comm::LocalCommunicator::Create(local);
    if (!communicator.ok()) {
      std::fprintf(stderr, "qtrain: %s\n", communicator.status().ToString().c_str());
      return 1;
    }
    return qtrain::RunOrReport(*config, communicator->get());
  }

  // Under mpirun: one MpiCommunicator; any error ends the whole job (MPI_Abort) so that no
  // peer waits for this rank.
  if (absl::Status s = qtrain::comm::InitMpi(&argc, &argv); !s.ok()) {
    std::fprintf(stderr, "qtrain: %s\n", s.ToString().c_str());
    return 1;
  }
  qtrain::comm::MpiOptions mpi;
  mpi.codec_spec = config->codec;
  mpi.error_feedback = config->feedback;
  mpi.algorithm = config->algorithm;
  mpi.timeout_seconds = config->timeout_seconds;
  mpi.seed = absl::GetFlag(FLAGS_seed);
  mpi.fp32_warmup_steps = config->warmup_steps;
  absl::Status status;
  {
    absl::StatusOr<std::unique_ptr<qtrain::comm::Communicator>> communicator =
        qtrain::comm::CreateMpiCommunicator(mpi);
    if (communicator.ok()) {
      // Rank 0 speaks for the job; the others report warnings and errors only.
      if ((*communicator)->rank() != 0) qtrain::SetMinLogSeverity(qtrain::LogSeverity::kWarning);
#ifdef QTRAIN_HAVE_NCCL
      if (qtrain::UseNccl()) {
        // MPI carries NCCL's unique id; the gradients then travel through NCCL.
        const char* local_rank = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
        absl::StatusOr<std::unique_ptr<qtrain::comm::Communicator>> nccl = qtrain::CreateNccl(
            *config, qtrain::comm::BootstrapOverCommunicator(
                         communicator->get(), local_rank != nullptr ? std::atoi(local_rank) : 0));
        status = nccl.ok() ? qtrain::RunTraining(*config, nccl->get()) : nccl.status();
      } else {
        status = qtrain::RunTraining(*config, communicator->get());
      }
#else
      status = qtrain::RunTraining(*config, communicator->get());
#endif
    } else {
      status = communicator.status();
    }
    if (!status.ok()) {
      std::fprintf(stderr, "qtrain: %s\n", status.ToString().c_str());
      qtrain::comm::AbortMpi(1);
    }
  }  // the communicator is freed before MPI_Finalize
  if (absl::Status s = qtrain::comm::FinalizeMpi(); !s.ok()) {
    std::fprintf(stderr, "qtrain: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
