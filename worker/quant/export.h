// Export of a trained quantized model to a packed-model file (format: packed_format.h): every
// quantized weight as codes packed at its bit width with per-row scales, everything else at full
// precision, so that packed inference (packed_model.h) reproduces the fake-quantized model.
//
// Weight codes. For each quantized layer the codes and per-row affine map w = wscale * code +
// wzero (DequantizeAffine) come from the layer's quantized_weight() (weight_scale() included)
// and its quantizer's codebook:
//   DoReFa  2j/n - 1, j = 0..n (n = 2^k - 1)       wscale = 2/n, wzero = -1  (times weight_scale)
//   SAWB    j * 2alpha/n - alpha, j = 0..n          wscale = 2alpha/n, wzero = -alpha
//   QIL     j/q, j = -q..q (q = 2^(k-1) - 1)        code j + q, wscale = 1/q, wzero = -1 (times ws)
//   binary  -alpha_c, +alpha_c per row              wscale = 2alpha_c, wzero = -alpha_c (1 bit)
//   ternary -alpha, 0, alpha                         wscale = alpha, wzero = -alpha (2 bits)
//   pow2    alpha * {0, +-1, ..., +-2^b}             code = index of the level (ceil(log2 L) bits),
//           code_values = the small integers {-2^b, ..., 2^b}, wscale = alpha, wzero = 0; the
//           packed model multiplies with them as integers (packed_model.h)
// Export then VERIFIES that the stored representation gives back quantized_weight() bit for bit,
// element by element (INTERNAL naming the layer otherwise); the one latitude is the sign of zero:
// QIL's sign(w) * 0 gives -0 and +0 for the same level, stored as +0 (no product or sum tells
// them apart). Where float rounding makes the affine
// map inexact (DoReFa's and QIL's levels are j/n rounded, then scaled by weight_scale), export
// first searches nearby float (wscale, wzero) for an exact pair and, failing that, stores the
// exact level table (2^k floats per layer, or per row): dequantized weights then come from the
// table, while the low-bit GEMM uses the affine map, which differs from the table by a few ulps
// (ExportStats::max_affine_error), far below the float summation error of the FP32 forward.
//
// Thread-safety: reads the model; one thread at a time. Cost: a few passes over every weight.
#ifndef QTRAIN_WORKER_QUANT_EXPORT_H_
#define QTRAIN_WORKER_QUANT_EXPORT_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/nn/model.h"
#include "worker/nn/sequential.h"
#include "worker/quant/quant_factory.h"

namespace qtrain::quant {

// What rebuilds the model: nn::BuildModel with a QuantLayerFactory made from `quant`.
struct ModelDescription {
  std::string name;  // "mlp", "cnn" or "resnet20"
  nn::Shape input;   // one example, {C, H, W}
  int num_classes = 10;
  nn::ShortcutKind resnet_shortcut = nn::ShortcutKind::kZeroPad;
  QuantConfig quant;
  std::string settings;  // free-form, kept in the file for humans
  bool scalar_layer = false;  // the model ends with nn::ScalarLayer
};

struct ExportStats {
  int64_t file_bytes = 0;   // the packed file on disk
  int64_t parameters = 0;   // nn::CountParameters of the model
  int64_t fp32_bytes = 0;   // 4 * parameters: the FP32 model
  int packed_layers = 0;    // quantized weight layers stored as codes
  int64_t packed_weights = 0;  // weights stored as codes
  int level_table_layers = 0;  // packed layers that needed an exact level table
  // Largest |affine value - exact level| / max |level| of its row over the rows with a level
  // table (0 when every affine map is exact).
  double max_affine_error = 0.0;
  double ratio() const { return file_bytes > 0 ? static_cast<double>(fp32_bytes) / file_bytes : 0; }
};

// Runs the model forward in eval mode on `batch` ([N, C, H, W]) so that every quantizer's state
// (quantized weights, QIL's lazily initialised interval) is current. Call it after training or
// restoring and before ExportPackedModel. Cost: one forward pass.
void SettleQuantizers(nn::Sequential& model, const kernels::CpuContext& cpu,
                      const nn::Tensor& batch);

// Writes `model` (built from `description`) to `path` atomically and fills *stats (may be null).
// Precondition: a Forward has run since the weights last changed (SettleQuantizers), so that
// quantized_weight() is Q(current weights): FAILED_PRECONDITION naming the layer if a quantized
// layer has not run. INTERNAL naming the layer if its quantized weights are not on the codebook
// or the packed representation does not reproduce them exactly; UNIMPLEMENTED for a quantizer
// this format does not know; UNAVAILABLE if the file cannot be written.
absl::Status ExportPackedModel(nn::Sequential& model, const ModelDescription& description,
                               const std::string& path, ExportStats* stats);

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_EXPORT_H_
