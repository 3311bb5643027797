#include "worker/quant/packed_format.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "common/framed_file.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "worker/nn/flatten.h"
#include "worker/nn/max_pool.h"
#include "worker/nn/relu.h"
#include "worker/nn/residual.h"
#include "worker/quant/dorefa.h"
#include "worker/quant/pact.h"
#include "worker/quant/qil.h"
#include "worker/quant/quantized_layers.h"

namespace qtrain::quant {
namespace {

constexpr FrameFormat kFormat{kPackedModelMagic, kPackedModelVersion, "packed model"};

bool HoldsState(nn::Layer& layer) {
  std::vector<nn::Parameter*> params;
  layer.CollectParameters(&params);
  std::vector<nn::Buffer*> buffers;
  layer.CollectBuffers(&buffers);
  return !params.empty() || !buffers.empty();
}

std::string Join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : absl::StrCat(prefix, ".", name);
}

class Walker {
 public:
  explicit Walker(std::vector<NetworkEntry>* out) : out_(out) {}

  // Lists `layer` and returns the codebook of its output given that of its input.
  absl::StatusOr<ActCodebook> Visit(nn::Layer& layer, const std::string& path, ActCodebook in) {
    if (auto* seq = dynamic_cast<nn::Sequential*>(&layer)) {
      ActCodebook cur = in;
      for (int i = 0; i < seq->num_children(); ++i) {
        nn::Layer& child = seq->child(i);
        ASSIGN_OR_RETURN(cur, Visit(child, Join(path, child.name()), cur));
      }
      return cur;
    }
    if (auto* res = dynamic_cast<nn::Residual*>(&layer)) {
      ActCodebook conv1_in = in;
      if (res->in_quant() != nullptr) {
        ASSIGN_OR_RETURN(conv1_in,
                         Visit(*res->in_quant(), Join(path, res->in_quant()->name()), in));
      }
      RETURN_IF_ERROR(Visit(*res->conv1(), Join(path, res->conv1()->name()), conv1_in).status());
      RETURN_IF_ERROR(Visit(*res->bn1(), Join(path, res->bn1()->name()), {}).status());
      ActCodebook conv2_in;
      if (res->act1() != nullptr) {
        ASSIGN_OR_RETURN(conv2_in, Visit(*res->act1(), Join(path, res->act1()->name()), {}));
      }
      RETURN_IF_ERROR(Visit(*res->conv2(), Join(path, res->conv2()->name()), conv2_in).status());
      RETURN_IF_ERROR(Visit(*res->bn2(), Join(path, res->bn2()->name()), {}).status());
      if (res->shortcut_conv() != nullptr) {
        RETURN_IF_ERROR(
            Visit(*res->shortcut_conv(), Join(path, res->shortcut_conv()->name()), in).status());
        RETURN_IF_ERROR(
            Visit(*res->shortcut_bn(), Join(path, res->shortcut_bn()->name()), {}).status());
      }
      return ActCodebook{};  // relu(main + shortcut) is not on a codebook
    }
    if (dynamic_cast<QuantizedConv2d*>(&layer) != nullptr) {
      out_->push_back({path, EntryKind::kPackedConv2d, &layer, in});
      return ActCodebook{};
    }
    if (dynamic_cast<QuantizedLinear*>(&layer) != nullptr) {
      out_->push_back({path, EntryKind::kPackedLinear, &layer, in});
      return ActCodebook{};
    }
    if (auto* aq = dynamic_cast<ActivationQuantizer*>(&layer)) {
      ASSIGN_OR_RETURN(ActCodebook cb, ActivationCodebookOf(*aq));
      out_->push_back({path, EntryKind::kActivationQuantizer, &layer, cb});
      return cb;
    }
    // Order-preserving maps of non-negative values keep every value on its codebook.
    if (dynamic_cast<nn::Relu*>(&layer) != nullptr || dynamic_cast<nn::MaxPool2d*>(&layer) != nullptr ||
        dynamic_cast<nn::Flatten*>(&layer) != nullptr) {
      return in;
    }
    if (HoldsState(layer)) out_->push_back({path, EntryKind::kFullPrecision, &layer, {}});
    return ActCodebook{};
  }

 private:
  std::vector<NetworkEntry>* out_;
};

}  // namespace

absl::Status WritePackedModelFile(const std::string& path, const pb::PackedModel& model) {
  std::string body;
  if (!model.SerializeToString(&body)) {
    return absl::InternalError(absl::StrCat("cannot serialize the packed model for ", path));
  }
  return WriteFramedFile(path, kFormat, body);
}

absl::StatusOr<pb::PackedModel> ReadPackedModelFile(const std::string& path, uint64_t max_bytes) {
  ASSIGN_OR_RETURN(FramedBody framed, ReadFramedFile(path, kFormat, max_bytes));
  pb::PackedModel model;
  if (framed.body.size() > static_cast<size_t>(std::numeric_limits<int>::max()) ||
      !model.ParseFromString(framed.body)) {
    return absl::DataLossError(absl::StrCat("packed model ", path, " body does not parse"));
  }
  return model;
}

int64_t DenseCodeBytes(int64_t count, int bits) { return (count * bits + 7) / 8; }

std::string PackCodesDense(std::span<const uint8_t> codes, int bits) {
  QTRAIN_CHECK(bits >= 1 && bits <= 8) << "bits " << bits;
  const int64_t count = static_cast<int64_t>(codes.size());
  std::string out(static_cast<size_t>(DenseCodeBytes(count, bits)), '\0');
  uint64_t bit = 0;
  for (int64_t i = 0; i < count; ++i, bit += static_cast<uint64_t>(bits)) {
    const uint32_t code = codes[static_cast<size_t>(i)];
    QTRAIN_CHECK(code < (1u << bits)) << "code " << code << " does not fit " << bits << " bits";
    const uint32_t shifted = code << (bit % 8);  // spans at most two bytes (bits <= 8)
    out[bit / 8] = static_cast<char>(static_cast<uint8_t>(out[bit / 8]) | (shifted & 0xFF));
    if ((shifted >> 8) != 0) {
      out[bit / 8 + 1] =
          static_cast<char>(static_cast<uint8_t>(out[bit / 8 + 1]) | (shifted >> 8));
    }
  }
  return out;
}

bool UnpackCodesDense(absl::string_view bytes, int64_t count, int bits, uint8_t* codes) {
  if (bits < 1 || bits > 8 || count < 0 ||
      static_cast<int64_t>(bytes.size()) != DenseCodeBytes(count, bits)) {
    return false;
  }
  const auto* in = reinterpret_cast<const uint8_t*>(bytes.data());
  const uint32_t mask = (1u << bits) - 1;
  uint64_t bit = 0;
  for (int64_t i = 0; i < count; ++i, bit += static_cast<uint64_t>(bits)) {
    const uint64_t byte = bit / 8;
    uint32_t v = in[byte];
    if (byte + 1 < bytes.size()) v |= uint32_t{in[byte + 1]} << 8;
    codes[i] = static_cast<uint8_t>((v >> (bit % 8)) & mask);
  }
  return true;
}

absl::StatusOr<ActCodebook> ActivationCodebookOf(ActivationQuantizer& quantizer) {
  const int bits = quantizer.bits();
  const float n = NumSteps(bits);
  if (auto* pact = dynamic_cast<PactActivationQuantizer*>(&quantizer)) {
    return ActCodebook{bits, pact->effective_alpha() / n};  // Forward's step = alpha / n
  }
  if (dynamic_cast<DorefaActivationQuantizer*>(&quantizer) != nullptr ||
      dynamic_cast<QilActivationQuantizer*>(&quantizer) != nullptr) {
    return ActCodebook{bits, 1.0f / n};
  }
  return absl::UnimplementedError(absl::StrCat("activation quantizer '", quantizer.name(), "' (",
                                               quantizer.Describe(),
                                               ") has no packed representation"));
}

absl::StatusOr<std::vector<NetworkEntry>> ListNetwork(nn::Sequential& model) {
  std::vector<NetworkEntry> entries;
  Walker walker(&entries);
  RETURN_IF_ERROR(walker.Visit(model, "", ActCodebook{}).status());
  return entries;
}

const char* EntryKindName(EntryKind kind) {
  switch (kind) {
    case EntryKind::kFullPrecision:
      return "full-precision";
    case EntryKind::kPackedConv2d:
      return "packed conv2d";
    case EntryKind::kPackedLinear:
      return "packed linear";
    case EntryKind::kActivationQuantizer:
      return "activation quantizer";
  }
  return "?";
}

const char* ShortcutKindName(nn::ShortcutKind kind) {
  return kind == nn::ShortcutKind::kProjection ? "projection" : "zero-pad";
}

absl::StatusOr<nn::ShortcutKind> ParseShortcutKind(absl::string_view name) {
  if (name == "zero-pad") return nn::ShortcutKind::kZeroPad;
  if (name == "projection") return nn::ShortcutKind::kProjection;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown resnet shortcut '", name, "'; valid: zero-pad, projection"));
}

}  // namespace qtrain::quant
