// `qtrain ldnq`: layer-wise post-training quantization of a full-precision checkpoint by L-DNQ
// (Chen, Wang and Pan, AAAI 2019) from a small calibration subset of the training split, with the
// paper's baselines DQ and L-DNQ- on the same data.
//
// Flow (RunLdnq). The FP model (default layer factory, weight layers tapped so their inputs can be
// read) is restored from <checkpoint_dir>/checkpoint.qtrn; its logits on the calibration images
// are the reference. Then every Conv2d / Linear, in network order (for resnet20: conv1, each
// block's conv1, conv2 [, shortcut conv], fc), is quantized on the cascade, i.e. the calibration
// images run through the layers already quantized:
//   1. Hessian of its input (hessian.h), from an eval-mode pass over the calibration set;
//   2. method ldnq / ldnq-: ADMM (admm.h) on alpha * {0, +-2^0..+-2^b}; method dq: the direct
//      projection (nearest level, best Euclidean alpha);
//   3. batch-norm running statistics refreshed from the cascade: an exact average of the batch
//      statistics over the calibration set (train-mode passes), every BN layer of the network;
//   4. method ldnq only, the weights update: the parameters above the layer (weights, biases and
//      BN affine parameters of the layers not yet quantized) are trained by SGD (eval-mode BN, no
//      labels) to make the final logits match the reference logits: loss 1/2 mean over images of
//      the squared distance of the logit vectors. An update that does not lower that error on
//      the calibration set is undone (reported as reverted).
// A layer's bias (fc layers; convolutions have none) stays full precision: ADMM optimises it
// jointly as a free coordinate, DQ leaves it. Afterwards, with retrain_epochs > 0, the
// not-quantized parameters (BN affine, biases, full-precision layers) are fine-tuned with labels
// (softmax cross-entropy) on the calibration images, for every method alike.
//
// First/last layer policy: kQuantizeAll (the default, as the paper) quantizes every weight layer;
// kKeepFirstLastFp leaves the network's first and last weight layer at full precision (the
// convention of the training-time quantizers' --fp_first_last).
//
// The result is a training checkpoint (same format, same parameter names) written to
// <out_dir>/checkpoint.qtrn whose quantized weights already lie on their layer's levels, so
// `qtrain eval --checkpoint_dir=<out_dir>` with the model flags runs it; its settings line records
// "ldnq=...,levels=L,...,first_last=..." and no "quant=". `qtrain export` / `eval --packed` run it
// on the packed low-bit path with --wq=pow2:levels=L --fp_first_last=false (pow2.h reproduces the
// weights bit for bit; export_command.h checks the flags against the settings).
//
// Thread-safety: each call owns everything it uses. Cost: per weight layer one forward pass over
// the calibration set (Hessian), one BN refresh pass, the ADMM solve, and for ldnq
// update_epochs forward+backward passes.
#ifndef QTRAIN_WORKER_QUANT_LDNQ_LDNQ_COMMAND_H_
#define QTRAIN_WORKER_QUANT_LDNQ_LDNQ_COMMAND_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/comm/communicator.h"
#include "worker/quant/export_command.h"
#include "worker/quant/ldnq/admm.h"

namespace qtrain::quant::ldnq {

enum class LdnqMethod {
  kLdnq,          // ADMM + weights update
  kLdnqNoUpdate,  // "L-DNQ-": ADMM without the weights update
  kDq,            // direct quantization
};
// "ldnq" | "ldnq-" | "dq".
absl::StatusOr<LdnqMethod> ParseLdnqMethod(absl::string_view name);
const char* LdnqMethodName(LdnqMethod method);

enum class FirstLastPolicy { kQuantizeAll, kKeepFirstLastFp };
// "quantize" | "fp".
absl::StatusOr<FirstLastPolicy> ParseFirstLastPolicy(absl::string_view name);

struct LdnqCommandOptions {
  ModelSource source;          // model / data flags as for training (quant flags must be none)
  std::string checkpoint_dir;  // the FP run: <checkpoint_dir>/checkpoint.qtrn
  std::string out_dir;         // writes <out_dir>/checkpoint.qtrn
  // Calibration images from the training split: < 1 a fraction of it, >= 1 a count. They are the
  // first ones of a permutation drawn with `seed`.
  double calib = 0.01;
  uint64_t seed = 1;
  int levels = 3;  // 3, 5, 7 or 9
  LdnqMethod method = LdnqMethod::kLdnq;
  FirstLastPolicy first_last = FirstLastPolicy::kQuantizeAll;
  AdmmOptions admm;
  int64_t batch_size = 100;  // calibration images per forward pass
  bool refresh_bn = true;    // step 3 above
  int update_epochs = 1;     // ldnq: passes over the calibration set per layer
  double update_lr = 0.001;  // SGD (momentum 0.9) learning rate of the weights update
  int retrain_epochs = 0;
  double retrain_lr = 0.01;
  bool evaluate_test = true;  // test accuracy of the FP and the quantized model
  std::string metrics_path;   // JSON lines appended: one per layer and a summary; "" = none
  bool print = true;          // progress lines on stdout
};

struct LdnqLayerReport {
  std::string name;        // "layer2.0.conv1"
  bool quantized = false;  // false: kept full precision by the first/last policy
  int64_t hessian_dim = 0;
  int64_t samples = 0;  // input vectors (patches) the Hessian averages
  int iterations = 0;
  double rho = 0.0;
  float alpha = 0.0f;
  double dq_error = 0.0;         // relative layer error of direct projection (before)
  double error = 0.0;            // relative layer error of the chosen weights (after)
  double output_error = 0.0;     // relative squared error of the final logits after this layer
  bool update_reverted = false;  // ldnq: the weights update raised the output error, so undone
  double seconds = 0.0;
};

struct LdnqReport {
  std::vector<LdnqLayerReport> layers;
  int64_t calib_images = 0;
  double final_output_error = 0.0;  // after retraining, if any
  double quantize_seconds = 0.0;    // the layer loop (without loading, retrain, evaluation)
  double retrain_seconds = 0.0;
  double seconds = 0.0;  // all of it
  bool has_test = false;
  double fp_test_accuracy = 0.0;
  double test_accuracy = 0.0;
  int ranks = 1;
  uint64_t weights_hash = 0;  // FNV-1a of every parameter and buffer (the same on every rank)
};

absl::Status ValidateLdnqOptions(const LdnqCommandOptions& options);
// The whole run without printing (unless options.print). Errors: INVALID_ARGUMENT for bad options,
// NOT_FOUND / DATA_LOSS / FAILED_PRECONDITION from the checkpoint as in `qtrain eval`.
//
// Distributed calibration: with `comm` of W > 1 ranks (under mpirun), every rank calls RunLdnq
// with the same options (collective, like every Communicator call). All ranks load the data and
// draw the same calibration set; its batch b belongs to rank b % W, which alone runs it through
// the Hessian, BN-refresh and output-error passes. Hessian sums and sample counts
// (AllReduceHessian), BN statistic sums, error sums and test-accuracy counts (each rank a
// contiguous share of the test split) are allreduced (AllReduceSum, double), so every rank solves
// the same ADMM problems and takes the same decisions. The weights update and the retrain are
// sequential SGD: each step's gradient comes from the batch's rank by an exact Broadcast, so
// every rank takes one process's steps (and only the forward-heavy passes run in parallel). The
// result is the one-process result on the same data up to the order of the double additions of
// the sums (in practice the same bits: the per-batch float sums add exactly in double). Each rank
// also computes the FP reference logits of every calibration image (one forward pass). At the end
// the ranks compare a hash of their models (INTERNAL if they differ); rank 0 alone prints, appends
// the metrics and writes the checkpoint. Errors of a collective come back as its Status
// (DEADLINE_EXCEEDED when a peer is gone): end the job. comm null or of one rank: one process.
absl::StatusOr<LdnqReport> RunLdnq(const LdnqCommandOptions& options,
                                   comm::Communicator* comm = nullptr);
// RunLdnq with printing (rank 0 only).
absl::Status RunLdnqCommand(const LdnqCommandOptions& options, comm::Communicator* comm = nullptr);

}  // namespace qtrain::quant::ldnq

#endif  // QTRAIN_WORKER_QUANT_LDNQ_LDNQ_COMMAND_H_
