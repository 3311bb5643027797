// The `qtrain export` and `qtrain eval [--packed]` commands, as library calls main.cc wires to
// flags: export a trained checkpoint to a packed-model file, and evaluate the checkpoint's
// fake-quantized model and/or a packed model on the test split, comparing their predictions.
//
// Both rebuild the model exactly as training does (the same --model / --data / --wq / --aq /
// --quant / --fp_first_last / --fpsc flags; --max_train too, because the normalization statistics
// come from the training split) and read <checkpoint_dir>/checkpoint.qtrn with the checkpoint
// reader; a checkpoint trained with another quantization config (its settings record
// "quant=...") is FAILED_PRECONDITION naming both. An L-DNQ result (`qtrain ldnq`; settings
// "ldnq=...,levels=L,...,first_last=quantize|fp") is exported with the power-of-two quantizer
// that reproduces it, --wq=pow2:levels=L --aq=none --fp_first_last=false (true for
// first_last=fp), and evaluated with those flags or none; other flags are FAILED_PRECONDITION
// naming the right ones.
//
// Thread-safety: each call owns everything it uses. Cost: loading the data set and the model,
// plus one forward pass over a batch (export) or over the test split per model (eval).
#ifndef QTRAIN_WORKER_QUANT_EXPORT_COMMAND_H_
#define QTRAIN_WORKER_QUANT_EXPORT_COMMAND_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/nn/residual.h"
#include "worker/quant/export.h"

namespace qtrain::quant {

// The checkpoint file name inside --checkpoint_dir (as the trainer writes it).
inline constexpr char kCheckpointFileName[] = "checkpoint.qtrn";

// What identifies the model and its data: the training flags of the same names.
struct ModelSource {
  std::string model = "cnn";
  std::string data = "fashion-mnist";
  std::string quant = "none";
  std::string wq = "none";
  std::string aq = "none";
  bool fp_first_last = true;
  bool fpsc = true;
  bool scalar_layer = false;  // --scalar_layer: the model ends with the scalar layer
  nn::ShortcutKind resnet_shortcut = nn::ShortcutKind::kZeroPad;  // training's (no flag)
  int64_t max_train = 0;  // as in training (normalization statistics); 0 = all
  int64_t max_test = 0;   // test images to use; 0 = all
  int threads = 0;        // compute threads; 0 = every core
};

struct ExportCommandOptions {
  ModelSource source;
  std::string checkpoint_dir;  // required: reads <checkpoint_dir>/checkpoint.qtrn
  std::string output;          // the packed file; empty = <checkpoint_dir>/model.qpack
  int64_t settle_batch = 128;  // test images run in eval mode before export (SettleQuantizers)
};

struct EvalCommandOptions {
  ModelSource source;
  std::string checkpoint_dir;  // empty: skip the fake-quantized model
  std::string packed;          // empty: skip the packed model
  int64_t batch_size = 256;    // images per forward pass
};

struct EvalReport {
  int64_t images = 0;
  bool has_fake = false;
  double fake_accuracy = 0.0;
  double fake_images_per_second = 0.0;
  bool has_packed = false;
  double packed_accuracy = 0.0;
  double packed_images_per_second = 0.0;
  // With both models: test images whose predicted class differs, and the largest logit
  // difference relative to the largest |logit| of that image.
  int64_t differing_predictions = 0;
  double max_relative_logit_diff = 0.0;
};

// Export without printing; the stats of the written file.
absl::StatusOr<ExportStats> RunExport(const ExportCommandOptions& options);
// RunExport, then prints
//   export: <path> <bytes> bytes, fp32 model <bytes> bytes (<ratio>x smaller)
absl::Status RunExportCommand(const ExportCommandOptions& options);

// Evaluation without printing. INVALID_ARGUMENT when neither a checkpoint nor a packed file is
// given, or when the packed file's model, input shape, classes or quantization config differ
// from the flags (naming both).
absl::StatusOr<EvalReport> RunEval(const EvalCommandOptions& options);
// RunEval, then prints each model's accuracy and images/s and, with both, the number of
// differing predictions.
absl::Status RunEvalCommand(const EvalCommandOptions& options);

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_EXPORT_COMMAND_H_
