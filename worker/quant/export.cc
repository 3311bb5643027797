#include "worker/quant/export.h"

#include <sys/stat.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/quant/binary.h"
#include "worker/quant/dorefa.h"
#include "worker/quant/packed_format.h"
#include "worker/quant/pow2.h"
#include "worker/quant/qil.h"
#include "worker/quant/quantized_layers.h"
#include "worker/quant/sawb.h"
#include "worker/quant/ternary.h"
#include "worker/train/checkpoint.h"

namespace qtrain::quant {
namespace {

// The parts of a QuantizedConv2d / QuantizedLinear export reads.
struct WeightLayerView {
  const WeightQuantizer* quantizer = nullptr;
  float weight_scale = 1.0f;
  const nn::Tensor* master = nullptr;
  const nn::Tensor* quantized = nullptr;
  const nn::Parameter* bias = nullptr;  // null when the layer has none
};

WeightLayerView ViewOf(nn::Layer* layer) {
  WeightLayerView v;
  if (auto* conv = dynamic_cast<QuantizedConv2d*>(layer)) {
    v = {&conv->quantizer(), conv->weight_scale(), &conv->weight().value,
         &conv->quantized_weight(), conv->options().bias ? &conv->bias() : nullptr};
  } else if (auto* fc = dynamic_cast<QuantizedLinear*>(layer)) {
    v = {&fc->quantizer(), fc->weight_scale(), &fc->weight().value, &fc->quantized_weight(),
         fc->options().bias ? &fc->bias() : nullptr};
  }
  return v;
}

// A row's nominal codebook: level(code) ~= zero + scale * code, code in [0, 2^bits).
struct Affine {
  double scale = 0.0;
  double zero = 0.0;
};

absl::StatusOr<std::vector<Affine>> NominalAffine(const std::string& path, const WeightQuantizer& q,
                                                  double ws, int64_t rows) {
  const int bits = q.bits();
  const double n = static_cast<double>((1 << bits) - 1);
  if (dynamic_cast<const DorefaWeightQuantizer*>(&q) != nullptr) {
    return std::vector<Affine>(rows, Affine{2.0 / n * ws, -ws});
  }
  if (const auto* sawb = dynamic_cast<const SawbWeightQuantizer*>(&q)) {
    const double alpha = sawb->alpha();
    return std::vector<Affine>(rows, Affine{2.0 * alpha / n * ws, -alpha * ws});
  }
  if (dynamic_cast<const QilWeightQuantizer*>(&q) != nullptr) {
    const double half = static_cast<double>((1 << (bits - 1)) - 1);
    return std::vector<Affine>(rows, Affine{ws / half, -ws});
  }
  if (const auto* binary = dynamic_cast<const BinaryWeightQuantizer*>(&q)) {
    const std::vector<float>& scales = binary->channel_scales();
    if (static_cast<int64_t>(scales.size()) != rows) {
      return absl::FailedPreconditionError(
          absl::StrCat("layer '", path, "': the binary quantizer has ", scales.size(),
                       " channel scales for ", rows, " rows; run a forward pass before export"));
    }
    std::vector<Affine> out;
    for (float a : scales) out.push_back({2.0 * a * ws, -static_cast<double>(a) * ws});
    return out;
  }
  if (const auto* ternary = dynamic_cast<const TernaryWeightQuantizer*>(&q)) {
    const double alpha = ternary->scale();
    return std::vector<Affine>(rows, Affine{alpha * ws, -alpha * ws});
  }
  return absl::UnimplementedError(absl::StrCat("layer '", path, "': weight quantizer ", q.Describe(),
                                               " has no packed representation"));
}

bool SameBits(float a, float b) { return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b); }

// Bitwise equality, except that -0 and +0 are one level: QIL writes sign(w) * 0, so a layer's zero
// level comes with both signs, which no product or sum can tell apart (except the sign of an
// all-zero sum). Export stores +0.
bool SameLevel(float a, float b) { return SameBits(a, b) || (a == 0.0f && b == 0.0f); }

// Searches float (wscale, wzero) near the nominal ones for a map that gives every used level
// exactly. Returns false if none does.
bool FindExactAffine(const std::vector<float>& level, const std::vector<bool>& used,
                     const Affine& nominal, float* wscale, float* wzero) {
  const int levels = static_cast<int>(level.size());
  std::vector<float> zeros = {static_cast<float>(nominal.zero)};
  if (used[0]) zeros.insert(zeros.begin(), level[0]);
  int top = -1;
  for (int j = levels - 1; j > 0; --j) {
    if (used[j]) {
      top = j;
      break;
    }
  }
  for (float z : zeros) {
    std::vector<float> bases = {static_cast<float>(nominal.scale)};
    if (top > 0) bases.push_back(static_cast<float>((static_cast<double>(level[top]) - z) / top));
    for (float base : bases) {
      // base, then 1, 2, 3 ulps either side.
      float up = base, down = base;
      for (int step = 0; step <= 3; ++step) {
        for (float s : {up, down}) {
          bool exact = true;
          for (int j = 0; j < levels && exact; ++j) {
            if (used[j] && !SameLevel(DequantizeAffine(s, z, j), level[j])) exact = false;
          }
          if (exact) {
            *wscale = s;
            *wzero = z;
            return true;
          }
        }
        up = std::nextafter(up, std::numeric_limits<float>::infinity());
        down = std::nextafter(down, -std::numeric_limits<float>::infinity());
      }
    }
  }
  return false;
}

absl::Status CheckSettled(const std::string& path, const WeightLayerView& view) {
  const nn::Tensor& wq = *view.quantized;
  const nn::Tensor& w = *view.master;
  if (wq.shape() != w.shape() || wq.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "layer '", path, "' has no quantized weight of shape ", nn::ShapeToString(w.shape()),
        " (got ", nn::ShapeToString(wq.shape()), "): run a forward pass before export"));
  }
  return absl::OkStatus();
}

// Power-of-two weights (pow2.h): each weight is alpha * q with q in {0, +-1, +-2, ..., +-2^b}.
// The code is q's index among the unit levels (ascending, ceil(log2 L) bits), code_values lists
// the q of every index, wscale = alpha and wzero = 0 on every row: alpha * q is exact in float.
absl::Status EncodePow2Weight(const std::string& path, const WeightLayerView& view,
                              const Pow2WeightQuantizer& q, pb::PackedWeight* weight,
                              ExportStats* stats) {
  const nn::Tensor& wq = *view.quantized;
  const nn::Tensor& w = *view.master;
  const int64_t rows = w.dim(0);
  const int64_t cols = w.size() / rows;
  const float alpha = q.alpha() * view.weight_scale;
  const std::vector<float> unit = q.level_set().UnitLevels();
  std::vector<int> values(unit.size());
  for (size_t j = 0; j < unit.size(); ++j) values[j] = static_cast<int>(unit[j]);
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float v = wq[i];
    int found = -1;
    for (size_t j = 0; j < values.size() && found < 0; ++j) {
      if (SameLevel(DequantizeAffine(alpha, 0.0f, values[j]), v)) found = static_cast<int>(j);
    }
    if (found < 0) {
      return absl::InternalError(absl::StrCat("layer '", path, "': quantized weight ", v,
                                              " at row ", i / cols, " column ", i % cols,
                                              " is not on ", q.Describe(), " with alpha ", alpha));
    }
    codes[static_cast<size_t>(i)] = static_cast<uint8_t>(found);
  }
  const int bits = q.bits();
  weight->set_bits(bits);
  weight->set_rows(rows);
  weight->set_cols(cols);
  weight->mutable_shape()->Assign(w.shape().begin(), w.shape().end());
  weight->set_codes(PackCodesDense(codes, bits));
  const std::vector<float> wscale(static_cast<size_t>(rows), alpha);
  const std::vector<float> wzero(static_cast<size_t>(rows), 0.0f);
  weight->mutable_wscale()->Assign(wscale.begin(), wscale.end());
  weight->mutable_wzero()->Assign(wzero.begin(), wzero.end());
  weight->mutable_code_values()->Assign(values.begin(), values.end());
  ++stats->packed_layers;
  stats->packed_weights += rows * cols;
  return absl::OkStatus();
}

// Fills weight from the quantized weights of one layer and verifies it bit for bit.
absl::Status EncodeWeight(const std::string& path, const WeightLayerView& view,
                          pb::PackedWeight* weight, ExportStats* stats) {
  RETURN_IF_ERROR(CheckSettled(path, view));
  if (const auto* pow2 = dynamic_cast<const Pow2WeightQuantizer*>(view.quantizer)) {
    return EncodePow2Weight(path, view, *pow2, weight, stats);
  }
  const nn::Tensor& wq = *view.quantized;
  const nn::Tensor& w = *view.master;
  const int bits = view.quantizer->bits();
  const int levels = 1 << bits;
  const int64_t rows = w.dim(0);
  const int64_t cols = w.size() / rows;
  ASSIGN_OR_RETURN(std::vector<Affine> nominal,
                   NominalAffine(path, *view.quantizer, view.weight_scale, rows));

  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  std::vector<float> wscale(rows), wzero(rows);
  std::vector<std::vector<float>> row_levels(rows, std::vector<float>(levels, 0.0f));
  std::vector<std::vector<bool>> row_used(rows, std::vector<bool>(levels, false));
  std::vector<bool> row_exact(rows, true);
  for (int64_t r = 0; r < rows; ++r) {
    const Affine a = nominal[r];
    std::vector<float>& level = row_levels[r];
    std::vector<bool>& used = row_used[r];
    for (int64_t k = 0; k < cols; ++k) {
      const float v = wq[r * cols + k];
      int code = 0;
      if (a.scale > 0.0) {
        const double c = std::nearbyint((static_cast<double>(v) - a.zero) / a.scale);
        code = static_cast<int>(std::clamp(c, 0.0, static_cast<double>(levels - 1)));
      }
      const double expected = a.zero + a.scale * code;
      const double tolerance = a.scale > 0.0 ? 0.01 * a.scale : 1e-6 * std::fabs(a.zero);
      if (!(std::fabs(v - expected) <= tolerance)) {
        return absl::InternalError(absl::StrCat(
            "layer '", path, "': quantized weight ", v, " at row ", r, " column ", k,
            " is not on the ", view.quantizer->Describe(), " codebook (nearest level ", expected,
            ")"));
      }
      if (used[code] && !SameLevel(level[code], v)) {
        return absl::InternalError(absl::StrCat("layer '", path, "': row ", r, " holds both ",
                                                level[code], " and ", v, " for code ", code));
      }
      used[code] = true;
      level[code] = v == 0.0f ? 0.0f : v;
      codes[static_cast<size_t>(r * cols + k)] = static_cast<uint8_t>(code);
    }
    if (!FindExactAffine(level, used, a, &wscale[r], &wzero[r])) {
      row_exact[r] = false;
      wscale[r] = static_cast<float>(a.scale);
      wzero[r] = static_cast<float>(a.zero);
    }
    // Unused codes take the affine value, so a table is complete.
    for (int j = 0; j < levels; ++j) {
      if (!used[j]) level[j] = DequantizeAffine(wscale[r], wzero[r], j);
    }
  }

  const bool all_exact = std::all_of(row_exact.begin(), row_exact.end(), [](bool b) { return b; });
  std::vector<float> table;  // empty, [levels] shared, or [rows * levels]
  if (!all_exact) {
    // Shared when every row that uses a code agrees on its value.
    std::vector<float> shared(levels, 0.0f);
    std::vector<bool> have(levels, false);
    bool agree = true;
    for (int64_t r = 0; r < rows && agree; ++r) {
      for (int j = 0; j < levels; ++j) {
        if (!row_used[r][j]) continue;
        if (have[j] && !SameBits(shared[j], row_levels[r][j])) agree = false;
        have[j] = true;
        shared[j] = row_levels[r][j];
      }
    }
    if (agree) {
      for (int j = 0; j < levels; ++j) {
        if (!have[j]) shared[j] = DequantizeAffine(wscale[0], wzero[0], j);
      }
      table = std::move(shared);
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        table.insert(table.end(), row_levels[r].begin(), row_levels[r].end());
      }
    }
    // How far the GEMM's affine map is from the exact levels.
    for (int64_t r = 0; r < rows; ++r) {
      const float* t = table.size() == static_cast<size_t>(levels) ? table.data()
                                                                  : table.data() + r * levels;
      double max_level = 0.0, max_err = 0.0;
      for (int j = 0; j < levels; ++j) {
        if (!row_used[r][j]) continue;
        max_level = std::max(max_level, std::fabs(static_cast<double>(t[j])));
        max_err = std::max(
            max_err, std::fabs(static_cast<double>(DequantizeAffine(wscale[r], wzero[r], j)) - t[j]));
      }
      if (max_level > 0.0) stats->max_affine_error = std::max(stats->max_affine_error, max_err / max_level);
    }
    ++stats->level_table_layers;
  }

  // The verification: what inference will dequantize equals quantized_weight() bit for bit.
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) {
      const int code = codes[static_cast<size_t>(r * cols + k)];
      float v;
      if (table.empty()) {
        v = DequantizeAffine(wscale[r], wzero[r], code);
      } else if (table.size() == static_cast<size_t>(levels)) {
        v = table[code];
      } else {
        v = table[r * levels + code];
      }
      if (!SameLevel(v, wq[r * cols + k])) {
        return absl::InternalError(absl::StrCat("layer '", path, "': the packed weight at row ", r,
                                                " column ", k, " dequantizes to ", v,
                                                ", the fake-quantized model uses ",
                                                wq[r * cols + k]));
      }
    }
  }

  weight->set_bits(bits);
  weight->set_rows(rows);
  weight->set_cols(cols);
  weight->mutable_shape()->Assign(w.shape().begin(), w.shape().end());
  weight->set_codes(PackCodesDense(codes, bits));
  weight->mutable_wscale()->Assign(wscale.begin(), wscale.end());
  weight->mutable_wzero()->Assign(wzero.begin(), wzero.end());
  weight->mutable_levels()->Assign(table.begin(), table.end());
  ++stats->packed_layers;
  stats->packed_weights += rows * cols;
  return absl::OkStatus();
}

// Every activation level must map back to its own code, and code 0 must be the value 0.
absl::Status CheckActivationCodebook(const std::string& path, ActivationQuantizer& q,
                                     const ActCodebook& cb) {
  const std::vector<float> levels = q.Levels();
  if (static_cast<int>(levels.size()) != cb.max_code() + 1 || levels[0] != 0.0f) {
    return absl::InternalError(absl::StrCat("activation quantizer '", path, "' (", q.Describe(),
                                            ") has ", levels.size(), " levels starting at ",
                                            levels.empty() ? 0.0f : levels[0], "; expected ",
                                            cb.max_code() + 1, " starting at 0"));
  }
  const float inv = 1.0f / cb.scale;
  for (int j = 0; j <= cb.max_code(); ++j) {
    if (ActivationCode(levels[j], inv, cb.max_code()) != j) {
      return absl::InternalError(absl::StrCat("activation quantizer '", path, "': level ",
                                              levels[j], " does not map back to code ", j,
                                              " with scale ", cb.scale));
    }
  }
  return absl::OkStatus();
}

void SetCodebook(const ActCodebook& cb, pb::ActivationCodebook* out) {
  out->set_bits(cb.bits);
  out->set_scale(cb.scale);
}

}  // namespace

void SettleQuantizers(nn::Sequential& model, const kernels::CpuContext& cpu,
                      const nn::Tensor& batch) {
  nn::RunContext ctx;
  ctx.cpu = cpu;
  ctx.mode = nn::Mode::kEval;
  nn::Tensor logits;
  model.Forward(ctx, batch, &logits);
}

absl::Status ExportPackedModel(nn::Sequential& model, const ModelDescription& description,
                               const std::string& path, ExportStats* stats) {
  ExportStats local;
  ExportStats* st = stats != nullptr ? stats : &local;
  *st = ExportStats{};
  ASSIGN_OR_RETURN(std::vector<NetworkEntry> entries, ListNetwork(model));

  pb::PackedModel out;
  out.set_model(description.name);
  out.mutable_input_shape()->Assign(description.input.begin(), description.input.end());
  out.set_num_classes(description.num_classes);
  out.set_quant_config(description.quant.ToString());
  out.set_weight_spec(description.quant.weight.ToString());
  out.set_activation_spec(description.quant.activation.ToString());
  out.set_keep_first_last_fp(description.quant.keep_first_last_fp);
  out.set_full_precision_shortcut(description.quant.full_precision_shortcut);
  out.set_resnet_shortcut(ShortcutKindName(description.resnet_shortcut));
  out.set_settings(description.settings);
  out.set_scalar_layer(description.scalar_layer);

  for (const NetworkEntry& e : entries) {
    pb::PackedLayer* layer = out.add_layers();
    layer->set_name(e.path);
    layer->set_describe(e.layer->Describe());
    switch (e.kind) {
      case EntryKind::kFullPrecision: {
        layer->set_kind(pb::PackedLayer::FULL_PRECISION);
        std::vector<nn::Parameter*> params;
        e.layer->CollectParameters(&params);
        for (const nn::Parameter* p : params) {
          train::ToNamedTensor(p->name, p->value, layer->add_tensors());
        }
        std::vector<nn::Buffer*> buffers;
        e.layer->CollectBuffers(&buffers);
        for (const nn::Buffer* b : buffers) {
          train::ToNamedTensor(b->name, b->value, layer->add_tensors());
        }
        break;
      }
      case EntryKind::kPackedConv2d:
      case EntryKind::kPackedLinear: {
        layer->set_kind(e.kind == EntryKind::kPackedConv2d ? pb::PackedLayer::PACKED_CONV2D
                                                           : pb::PackedLayer::PACKED_LINEAR);
        const WeightLayerView view = ViewOf(e.layer);
        RETURN_IF_ERROR(EncodeWeight(e.path, view, layer->mutable_weight(), st));
        if (view.bias != nullptr) {
          train::ToNamedTensor(view.bias->name, view.bias->value, layer->add_tensors());
        }
        SetCodebook(e.codebook, layer->mutable_activation());
        break;
      }
      case EntryKind::kActivationQuantizer: {
        layer->set_kind(pb::PackedLayer::ACTIVATION_QUANTIZER);
        auto& q = static_cast<ActivationQuantizer&>(*e.layer);
        RETURN_IF_ERROR(CheckActivationCodebook(e.path, q, e.codebook));
        std::vector<nn::Parameter*> params;
        q.CollectParameters(&params);
        for (const nn::Parameter* p : params) {
          train::ToNamedTensor(p->name, p->value, layer->add_tensors());
        }
        SetCodebook(e.codebook, layer->mutable_activation());
        break;
      }
    }
  }
  RETURN_IF_ERROR(WritePackedModelFile(path, out));
  struct stat sb;
  if (::stat(path.c_str(), &sb) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot stat the packed model ", path));
  }
  st->file_bytes = sb.st_size;
  st->parameters = nn::CountParameters(model);
  st->fp32_bytes = 4 * st->parameters;
  return absl::OkStatus();
}

}  // namespace qtrain::quant
