// The packed-model file (`qtrain export` writes it, `qtrain eval --packed` runs it) and the
// network walk that export and packed inference share.
//
// File layout, format version 2: the framing of common/framed_file.h with the magic "QTRNPACK"
// (bytes 0..7), uint32 version 2, uint32 CRC-32 of the body, uint64 body length, then the body:
// a serialized pb::PackedModel (proto/packed_model.proto), whose comments define every field.
// In short: the model name, input shape, class count and quantization config (enough to rebuild
// the network with nn::BuildModel + QuantLayerFactory), then one PackedLayer per layer that holds
// something, in network order (ListNetwork below):
//   FULL_PRECISION        plain Conv2d / Linear (the first and last layers), batch norm (raw, not
//                         folded, so inference reproduces the fake-quantized model exactly): its
//                         parameters and buffers under their full names.
//   PACKED_CONV2D/LINEAR  a quantized weight as bits-wide codes, densely bit-packed, with a
//                         per-row affine map (and, where that map is not bit-exact, a level
//                         table, or since version 2 the small integers the codes stand for:
//                         PackedWeight.code_values, power-of-two weights), the bias, and the
//                         codebook of the layer's input activation.
//   ACTIVATION_QUANTIZER  PACT / DoReFa / QIL: its parameters (alpha; c, d) and output codebook.
// Reading checks the framing (DATA_LOSS for a wrong magic, truncation, a length or checksum
// mismatch or an unparseable body, naming the file; FAILED_PRECONDITION for a newer version).
// Version 1 files (no code_values) read unchanged; version 2 is written because a version 1
// reader would take the level indices of power-of-two weights for affine codes.
//
// Thread-safety: pure functions. Cost: one serialization / parse and one CRC pass.
#ifndef QTRAIN_WORKER_QUANT_PACKED_FORMAT_H_
#define QTRAIN_WORKER_QUANT_PACKED_FORMAT_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/packed_model.pb.h"
#include "worker/nn/layer.h"
#include "worker/nn/residual.h"
#include "worker/nn/sequential.h"
#include "worker/quant/activation_quantizer.h"

namespace qtrain::quant {

inline constexpr char kPackedModelMagic[8] = {'Q', 'T', 'R', 'N', 'P', 'A', 'C', 'K'};
inline constexpr uint32_t kPackedModelVersion = 2;
inline constexpr uint64_t kMaxPackedModelBytes = uint64_t{2} << 30;

absl::Status WritePackedModelFile(const std::string& path, const pb::PackedModel& model);
absl::StatusOr<pb::PackedModel> ReadPackedModelFile(const std::string& path,
                                                    uint64_t max_bytes = kMaxPackedModelBytes);

// Dense bit packing of codes (see PackedWeight.codes): ceil(count * bits / 8) bytes.
int64_t DenseCodeBytes(int64_t count, int bits);
// Precondition: 1 <= bits <= 8, every code < 2^bits.
std::string PackCodesDense(std::span<const uint8_t> codes, int bits);
// False (codes untouched) when bytes.size() != DenseCodeBytes(count, bits).
bool UnpackCodesDense(absl::string_view bytes, int64_t count, int bits, uint8_t* codes);

// The value of `code` under a row's affine map: fl(fl(wscale * code) + wzero), in float
// arithmetic without FMA (the project builds with -ffp-contract=off). Exact for SAWB, binary and
// ternary, whose quantizers compute their levels the same way.
inline float DequantizeAffine(float wscale, float wzero, int code) {
  const float scaled = wscale * static_cast<float>(code);
  return scaled + wzero;
}

// The codebook of a quantized activation: value = scale * code, code in [0, 2^bits - 1], and
// code 0 is the value 0 (so zero padding is code 0). bits == 0: a full-precision activation.
struct ActCodebook {
  int bits = 0;
  float scale = 0.0f;
  bool quantized() const { return bits > 0; }
  int max_code() const { return (1 << bits) - 1; }
};

// The codebook of an activation quantizer's current output: PACT alpha/(2^k-1) (alpha clamped as
// Forward clamps it), DoReFa and QIL 1/(2^k-1) (QIL's (x - c)/(2d) + 1/2 is applied before the
// rounding, so its outputs are j/(2^k-1) like DoReFa's). UNIMPLEMENTED for another quantizer.
absl::StatusOr<ActCodebook> ActivationCodebookOf(ActivationQuantizer& quantizer);

// The code of an activation value on `codebook`: round(value / scale), clamped to the codes.
// Exact for every level the quantizers produce (checked at export).
inline uint8_t ActivationCode(float value, float inv_scale, int max_code) {
  const float v = value * inv_scale + 0.5f;
  const int code = v > 0.0f ? static_cast<int>(v) : 0;
  return static_cast<uint8_t>(code < max_code ? code : max_code);
}

enum class EntryKind { kFullPrecision, kPackedConv2d, kPackedLinear, kActivationQuantizer };

// One layer that holds something (parameters, buffers, a quantized weight, a quantizer).
struct NetworkEntry {
  std::string path;  // child names joined by '.', e.g. "layer1.0.conv1", "relu1.aq"
  EntryKind kind = EntryKind::kFullPrecision;
  nn::Layer* layer = nullptr;
  // kPacked*: the codebook of the layer's input (not quantized when it reads a full-precision
  // activation). kActivationQuantizer: the codebook of its output.
  ActCodebook codebook;
};

// Walks the model in Forward order (Sequential children in turn; a Residual's in_quant, conv1,
// bn1, act1, conv2, bn2, shortcut_conv, shortcut_bn) and lists its entries, tracking which
// activations are on a quantizer's codebook: an activation quantizer's output is; ReLU, max
// pooling and flattening keep it; everything else (batch norm, average pooling, weight layers,
// residual adds) does not. Layers without parameters or buffers are not listed.
// UNIMPLEMENTED for an activation quantizer of unknown type.
absl::StatusOr<std::vector<NetworkEntry>> ListNetwork(nn::Sequential& model);

const char* EntryKindName(EntryKind kind);

// "zero-pad" / "projection" (PackedModel.resnet_shortcut) and back; INVALID_ARGUMENT otherwise.
const char* ShortcutKindName(nn::ShortcutKind kind);
absl::StatusOr<nn::ShortcutKind> ParseShortcutKind(absl::string_view name);

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_PACKED_FORMAT_H_
