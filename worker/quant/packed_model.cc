#include "worker/quant/packed_model.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "worker/kernels/cpu/activation.h"
#include "worker/kernels/cpu/elementwise.h"
#include "worker/kernels/cpu/lowbit_gemm.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/conv2d.h"
#include "worker/nn/linear.h"
#include "worker/nn/model.h"
#include "worker/nn/residual.h"
#include "worker/nn/scalar_layer.h"
#include "worker/quant/packed_format.h"
#include "worker/quant/quant_factory.h"
#include "worker/quant/quantized_layers.h"

namespace qtrain::quant {

// One quantized Conv2d / Linear of the packed model: codes in the GEMM's layout when its input is
// on an activation codebook, else a plain FP32 layer holding the dequantized weight.
class PackedWeightOp {
 public:
  std::string name;
  bool conv = false;
  nn::Conv2dOptions conv_options;  // conv only
  int wbits = 0;                   // of the GEMM's codes
  int code_values = 0;             // > 0: the stored codes stand for that many integers (pow2)
  int64_t rows = 0;                // output channels / features
  int64_t cols = 0;                // fan-in
  ActCodebook input;
  bool lowbit = false;
  kernels::CodeLayout layout = kernels::CodeLayout::kBytes;
  kernels::PackedCodes w;
  std::vector<float> wscale, wzero, bias;
  std::unique_ptr<nn::Layer> fp;  // full-precision input: nn::Conv2d / nn::Linear

  void Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y);
  std::string Describe() const;

 private:
  // Packs a [nrows, cols] activation code matrix into a_, 16-row blocks split over the pool:
  // gen(r0, r1, dst, stride) writes rows [r0, r1) of codes into dst (row stride `stride`,
  // pre-zeroed), which are then stored straight into the GEMM's layout.
  template <class Gen>
  void PackRows(const kernels::CpuContext& cpu, int64_t nrows, Gen gen);

  std::vector<uint8_t> xcodes_;
  kernels::PackedCodes a_;
  std::vector<float> out_rows_;
};

namespace {

constexpr int64_t kRowBlock = 16;  // a multiple of both layouts' row blocks (8 and 16)

}  // namespace

namespace {

// Writes rows [r0, r1) of the row-major codes in `src` (row stride `stride`, zero past cols) into
// a PackedCodes' storage, in the layout lowbit_gemm.h documents. r0 is a multiple of kRowBlock.
// Bit planes are gathered eight codes at a time: with t holding bit i of 8 codes in its bytes'
// low bits, (t * 0x0102040810204080) >> 56 has bit j = byte j's bit (the partial products land
// on distinct bit positions, so nothing carries).
void StoreRows(const uint8_t* src, int64_t stride, int64_t r0, int64_t r1, int64_t cols, int bits,
               kernels::CodeLayout layout, uint64_t* storage) {
  if (layout == kernels::CodeLayout::kBitPlanes) {
    const int64_t words = (cols + 63) / 64;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = src + (r - r0) * stride;
      uint64_t* block = storage + (r / 8) * bits * words * 8 + r % 8;
      for (int64_t g = 0; g < words; ++g) {
        uint64_t octets[8];
        std::memcpy(octets, row + g * 64, sizeof(octets));
        for (int i = 0; i < bits; ++i) {
          uint64_t word = 0;
          for (int o = 0; o < 8; ++o) {
            const uint64_t t = (octets[o] >> i) & 0x0101010101010101ULL;
            word |= ((t * 0x0102040810204080ULL) >> 56) << (8 * o);
          }
          block[(i * words + g) * 8] = word;
        }
      }
    }
    return;
  }
  const int64_t kp = (cols + 3) / 4 * 4;
  auto* bytes = reinterpret_cast<uint8_t*>(storage);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = src + (r - r0) * stride;
    uint8_t* base = bytes + (r / 16) * 16 * kp + (r % 16) * 4;
    for (int64_t q = 0; q < kp / 4; ++q) std::memcpy(base + q * 64, row + 4 * q, 4);
  }
}

}  // namespace

template <class Gen>
void PackedWeightOp::PackRows(const kernels::CpuContext& cpu, int64_t nrows, Gen gen) {
  const int abits = input.bits;
  a_.bits = abits;
  a_.rows = nrows;
  a_.cols = cols;
  a_.layout = layout;
  a_.storage.resize(static_cast<size_t>(kernels::PackedStorageWords(layout, abits, nrows, cols)));
  // Rows past nrows in the last block must be zero codes.
  const int64_t padded_rows = (nrows + kRowBlock - 1) / kRowBlock * kRowBlock;
  const int64_t tail = kernels::PackedStorageWords(layout, abits, nrows / kRowBlock * kRowBlock, cols);
  std::fill(a_.storage.begin() + tail, a_.storage.end(), 0);
  // Row stride: cols rounded up to 64 (whole bit-plane words), zero past cols.
  const int64_t stride = (cols + 63) / 64 * 64;
  const int64_t blocks = padded_rows / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / (kRowBlock * cols + 1));
  uint64_t* storage = a_.storage.data();
  kernels::ParallelFor(cpu.pool, blocks, grain, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<uint8_t> buf;
    buf.resize(static_cast<size_t>(kRowBlock * stride));
    for (int64_t r = 0; r < kRowBlock; ++r) {  // gen writes [0, cols) of each row
      std::memset(buf.data() + r * stride + cols, 0, static_cast<size_t>(stride - cols));
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock;
      const int64_t r1 = std::min(nrows, r0 + kRowBlock);
      gen(r0, r1, buf.data(), stride);
      StoreRows(buf.data(), stride, r0, r1, cols, abits, layout, storage);
    }
  });
}

void PackedWeightOp::Forward(nn::RunContext& ctx, const nn::Tensor& x, nn::Tensor* y) {
  if (!lowbit) {
    fp->Forward(ctx, x, y);
    return;
  }
  const float inv = 1.0f / input.scale;
  const int max_code = input.max_code();
  const kernels::LowbitLinearParams params{wscale.data(), wzero.data(),
                                           bias.empty() ? nullptr : bias.data(), input.scale};
  const int64_t n = x.dim(0);
  if (!conv) {
    const float* src = x.data();
    PackRows(ctx.cpu, n, [&](int64_t r0, int64_t r1, uint8_t* dst, int64_t stride) {
      for (int64_t r = r0; r < r1; ++r, dst += stride) {
        const float* row = src + r * cols;
        for (int64_t i = 0; i < cols; ++i) dst[i] = ActivationCode(row[i], inv, max_code);
      }
    });
    y->Resize({n, rows});
    kernels::LowbitLinearForward(ctx.cpu, w, a_, params, y->data());
    return;
  }
  const int64_t c_in = x.dim(1), h = x.dim(2), wd = x.dim(3);
  const int64_t k = conv_options.kernel, s = conv_options.stride, pad = conv_options.padding;
  const int64_t oh = (h + 2 * pad - k) / s + 1;
  const int64_t ow = (wd + 2 * pad - k) / s + 1;
  const int64_t plane = oh * ow;
  // Codes of the input into a zero-bordered copy (padding is code 0, the value 0), then im2col
  // on codes without bounds checks.
  const int64_t hp = h + 2 * pad, wp = wd + 2 * pad;
  xcodes_.assign(static_cast<size_t>(n * c_in * hp * wp), 0);
  {
    const float* src = x.data();
    uint8_t* dst = xcodes_.data();
    kernels::ParallelFor(ctx.cpu.pool, n * c_in * h, std::max<int64_t>(1, 4096 / wd),
                         [&](int64_t b, int64_t e) {
                           for (int64_t q = b; q < e; ++q) {
                             const int64_t chan = q / h, yy = q % h;
                             const float* in_row = src + q * wd;
                             uint8_t* out_row = dst + (chan * hp + yy + pad) * wp + pad;
                             for (int64_t i = 0; i < wd; ++i) {
                               out_row[i] = ActivationCode(in_row[i], inv, max_code);
                             }
                           }
                         });
  }
  const uint8_t* xc = xcodes_.data();
  PackRows(ctx.cpu, n * plane, [&](int64_t r0, int64_t r1, uint8_t* row_dst, int64_t stride) {
    for (int64_t r = r0; r < r1; ++r, row_dst += stride) {
      uint8_t* dst = row_dst;
      const int64_t img = r / plane, p = r % plane;
      const int64_t oy = p / ow, ox = p % ow;
      const uint8_t* base = xc + img * c_in * hp * wp + (oy * s) * wp + ox * s;
      for (int64_t c = 0; c < c_in; ++c) {
        const uint8_t* win = base + c * hp * wp;
        for (int64_t ky = 0; ky < k; ++ky) {
          const uint8_t* src = win + ky * wp;
          for (int64_t kx = 0; kx < k; ++kx) *dst++ = src[kx];
        }
      }
    }
  });
  out_rows_.resize(static_cast<size_t>(n * plane * rows));
  kernels::LowbitLinearForward(ctx.cpu, w, a_, params, out_rows_.data());
  // [N * OH * OW, K] -> [N, K, OH, OW].
  y->Resize({n, rows, oh, ow});
  const float* in = out_rows_.data();
  float* out = y->data();
  const int64_t m = rows;
  kernels::ParallelFor(ctx.cpu.pool, n * m, std::max<int64_t>(1, 4096 / plane),
                       [&](int64_t b, int64_t e) {
                         for (int64_t q = b; q < e; ++q) {
                           const int64_t img = q / m, ch = q % m;
                           const float* src = in + img * plane * m + ch;
                           float* dst = out + q * plane;
                           for (int64_t p = 0; p < plane; ++p) dst[p] = src[p * m];
                         }
                       });
}

std::string PackedWeightOp::Describe() const {
  if (!lowbit) {
    return absl::StrCat(
        name, ": fp32 on the dequantized ",
        code_values > 0 ? absl::StrCat(code_values, "-level") : absl::StrCat(wbits, "-bit"),
        " weight [", rows, "x", cols,
                        "] (", input.quantized() ? "fan-in above the integer GEMM's depth"
                                                 : "full-precision input",
                        ")");
  }
  return absl::StrCat(name, ": lowbit W", wbits, "A", input.bits, " ",
                      layout == kernels::CodeLayout::kBitPlanes ? "popcount" : "integer", " [",
                      rows, "x", cols, "]",
                      code_values > 0 ? absl::StrCat(" (", code_values, " integer levels)") : "");
}

PackedModel::PackedModel() = default;
PackedModel::~PackedModel() = default;

std::vector<nn::Tensor>& PackedModel::Scratch(const nn::Layer* layer, size_t count) {
  std::vector<nn::Tensor>& t = scratch_[layer];
  if (t.size() < count) t.resize(count);
  return t;
}

void PackedModel::Run(nn::RunContext& ctx, nn::Layer& layer, const nn::Tensor& x, nn::Tensor* y) {
  if (auto it = ops_.find(&layer); it != ops_.end()) {
    it->second->Forward(ctx, x, y);
    return;
  }
  if (auto* seq = dynamic_cast<nn::Sequential*>(&layer)) {
    const int k = seq->num_children();
    std::vector<nn::Tensor>& acts = Scratch(&layer, static_cast<size_t>(k));
    const nn::Tensor* cur = &x;
    for (int i = 0; i < k; ++i) {
      nn::Tensor* out = i == k - 1 ? y : &acts[static_cast<size_t>(i)];
      Run(ctx, seq->child(i), *cur, out);
      cur = out;
    }
    return;
  }
  if (dynamic_cast<nn::Residual*>(&layer) != nullptr) {
    RunResidual(ctx, layer, x, y);
    return;
  }
  // Quantized layers all have ops (checked at load), so this never runs a master weight.
  layer.Forward(ctx, x, y);
}

// nn::Residual::Forward, with its convolutions going through Run.
void PackedModel::RunResidual(nn::RunContext& ctx, nn::Layer& layer, const nn::Tensor& x,
                              nn::Tensor* y) {
  auto& r = static_cast<nn::Residual&>(layer);
  std::vector<nn::Tensor>& t = Scratch(&layer, 7);
  const nn::Tensor* conv1_in = &x;
  if (r.in_quant() != nullptr) {
    Run(ctx, *r.in_quant(), x, &t[0]);
    conv1_in = &t[0];
  }
  Run(ctx, *r.conv1(), *conv1_in, &t[1]);
  if (r.act1() != nullptr) {
    Run(ctx, *r.bn1(), t[1], &t[2]);
    Run(ctx, *r.act1(), t[2], &t[3]);
  } else {
    Run(ctx, *r.bn1(), t[1], &t[3]);
    kernels::ReluForward(ctx.cpu, t[3].size(), t[3].data(), t[3].data());
  }
  Run(ctx, *r.conv2(), t[3], &t[4]);
  Run(ctx, *r.bn2(), t[4], y);
  const nn::Tensor* projected = nullptr;
  if (r.shortcut_conv() != nullptr) {
    Run(ctx, *r.shortcut_conv(), x, &t[5]);
    Run(ctx, *r.shortcut_bn(), t[5], &t[6]);
    projected = &t[6];
  }
  r.AddShortcutAndRelu(ctx, x, projected, y);
}

void PackedModel::Predict(const kernels::CpuContext& cpu, const float* images, int64_t n,
                          float* logits) {
  QTRAIN_CHECK(n >= 1 && images != nullptr && logits != nullptr) << "Predict: n " << n;
  nn::Shape shape = {n};
  shape.insert(shape.end(), input_.begin(), input_.end());
  input_tensor_.Resize(shape);
  std::memcpy(input_tensor_.data(), images, sizeof(float) * input_tensor_.size());
  nn::RunContext ctx;
  ctx.cpu = cpu;
  ctx.mode = nn::Mode::kEval;
  Run(ctx, *net_, input_tensor_, &logits_);
  QTRAIN_CHECK(logits_.size() == n * num_classes()) << nn::ShapeToString(logits_.shape());
  std::memcpy(logits, logits_.data(), sizeof(float) * logits_.size());
}

std::string PackedModel::Describe() const {
  std::string out;
  for (const PackedWeightOp* op : op_order_) absl::StrAppend(&out, op->Describe(), "\n");
  return out;
}

namespace {

std::string KindName(pb::PackedLayer::Kind kind) {
  switch (kind) {
    case pb::PackedLayer::FULL_PRECISION:
      return EntryKindName(EntryKind::kFullPrecision);
    case pb::PackedLayer::PACKED_CONV2D:
      return EntryKindName(EntryKind::kPackedConv2d);
    case pb::PackedLayer::PACKED_LINEAR:
      return EntryKindName(EntryKind::kPackedLinear);
    case pb::PackedLayer::ACTIVATION_QUANTIZER:
      return EntryKindName(EntryKind::kActivationQuantizer);
    default:
      return absl::StrCat("kind ", static_cast<int>(kind));
  }
}

pb::PackedLayer::Kind ProtoKind(EntryKind kind) {
  switch (kind) {
    case EntryKind::kFullPrecision:
      return pb::PackedLayer::FULL_PRECISION;
    case EntryKind::kPackedConv2d:
      return pb::PackedLayer::PACKED_CONV2D;
    case EntryKind::kPackedLinear:
      return pb::PackedLayer::PACKED_LINEAR;
    case EntryKind::kActivationQuantizer:
      return pb::PackedLayer::ACTIVATION_QUANTIZER;
  }
  return pb::PackedLayer::FULL_PRECISION;
}

bool SameShape(const pb::NamedTensor& t, const nn::Tensor& tensor) {
  if (t.shape_size() != tensor.rank()) return false;
  for (int i = 0; i < tensor.rank(); ++i) {
    if (t.shape(i) != tensor.dim(i)) return false;
  }
  return t.values_size() == tensor.size();
}

struct Target {
  std::string name;
  nn::Tensor* tensor;
};

// Checks layer.tensors against `targets` one to one (names, shapes), then copies.
absl::Status LoadTensors(const std::string& path, const pb::PackedLayer& layer,
                         const std::vector<Target>& targets) {
  if (layer.tensors_size() != static_cast<int>(targets.size())) {
    return absl::InvalidArgumentError(absl::StrCat("packed model ", path, ": layer '", layer.name(),
                                                   "' holds ", layer.tensors_size(),
                                                   " tensors, the model's has ", targets.size()));
  }
  for (size_t i = 0; i < targets.size(); ++i) {
    const pb::NamedTensor& t = layer.tensors(static_cast<int>(i));
    if (t.name() != targets[i].name || !SameShape(t, *targets[i].tensor)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "packed model ", path, ": layer '", layer.name(), "' tensor #", i, " is '", t.name(),
          "' with ", t.values_size(), " values; the model has '", targets[i].name, "' ",
          nn::ShapeToString(targets[i].tensor->shape())));
    }
  }
  for (size_t i = 0; i < targets.size(); ++i) {
    const pb::NamedTensor& t = layer.tensors(static_cast<int>(i));
    std::copy(t.values().begin(), t.values().end(), targets[i].tensor->data());
  }
  return absl::OkStatus();
}

bool SameCodebook(const pb::ActivationCodebook& stored, const ActCodebook& cb) {
  return stored.bits() == cb.bits && (cb.bits == 0 || stored.scale() == cb.scale);
}

// Builds the op of one packed layer; `layer` is the rebuilt QuantizedConv2d / QuantizedLinear.
absl::StatusOr<std::unique_ptr<PackedWeightOp>> MakeOp(const std::string& path,
                                                       const pb::PackedLayer& stored,
                                                       const NetworkEntry& entry) {
  auto corrupt = [&](auto&&... parts) {
    return absl::DataLossError(absl::StrCat("packed model ", path, ": layer '", stored.name(),
                                            "': ", parts...));
  };
  auto op = std::make_unique<PackedWeightOp>();
  op->name = entry.path;
  op->input = entry.codebook;
  nn::Tensor* master = nullptr;
  nn::Parameter* bias = nullptr;
  int qbits = 0;
  if (auto* c = dynamic_cast<QuantizedConv2d*>(entry.layer)) {
    op->conv = true;
    op->conv_options = c->options();
    master = &c->weight().value;
    if (c->options().bias) bias = &c->bias();
    qbits = c->quantizer().bits();
  } else if (auto* l = dynamic_cast<QuantizedLinear*>(entry.layer)) {
    master = &l->weight().value;
    if (l->options().bias) bias = &l->bias();
    qbits = l->quantizer().bits();
  } else {
    return corrupt("not a quantized weight layer");
  }
  const pb::PackedWeight& pw = stored.weight();
  op->wbits = pw.bits();
  op->rows = master->dim(0);
  op->cols = master->size() / op->rows;
  const nn::Shape shape(pw.shape().begin(), pw.shape().end());
  if (pw.bits() != qbits || pw.rows() != op->rows || pw.cols() != op->cols ||
      shape != master->shape()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "packed model ", path, ": layer '", stored.name(), "' holds a ", pw.bits(),
        "-bit weight of shape ", nn::ShapeToString(shape), "; the model has a ", qbits,
        "-bit weight of shape ", nn::ShapeToString(master->shape())));
  }
  const int levels = 1 << op->wbits;
  std::vector<uint8_t> codes(static_cast<size_t>(op->rows * op->cols));
  if (!UnpackCodesDense(pw.codes(), op->rows * op->cols, op->wbits, codes.data())) {
    return corrupt(pw.codes().size(), " bytes of codes; ", op->rows, "x", op->cols, " codes of ",
                   op->wbits, " bits need ", DenseCodeBytes(op->rows * op->cols, op->wbits));
  }
  if (pw.wscale_size() != op->rows || pw.wzero_size() != op->rows) {
    return corrupt(pw.wscale_size(), " wscale and ", pw.wzero_size(), " wzero values for ",
                   op->rows, " rows");
  }
  const int64_t table = pw.levels_size();
  if (table != 0 && table != levels && table != op->rows * levels) {
    return corrupt("a level table of ", table, " values (expected 0, ", levels, " or ",
                   op->rows * levels, ")");
  }
  // Integer codes (power-of-two weights): stored code c stands for the integer values[c].
  const std::vector<int> values(pw.code_values().begin(), pw.code_values().end());
  int64_t min_value = 0, max_value = 0;
  if (!values.empty()) {
    if (table != 0) return corrupt("both a level table and code values");
    if (static_cast<int64_t>(values.size()) > levels) {
      return corrupt(values.size(), " code values for ", op->wbits, "-bit codes");
    }
    min_value = *std::min_element(values.begin(), values.end());
    max_value = *std::max_element(values.begin(), values.end());
    if (max_value - min_value > 255) {
      return corrupt("code values spanning ", min_value, "..", max_value,
                     " (the integer GEMM takes at most 256 consecutive integers)");
    }
    for (uint8_t c : codes) {
      if (c >= values.size()) {
        return corrupt("code ", c, " beyond its ", values.size(), " code values");
      }
    }
  }
  if (stored.activation().bits() < 0 || stored.activation().bits() > 8) {
    return corrupt("input codebook of ", stored.activation().bits(), " bits");
  }
  if (!SameCodebook(stored.activation(), op->input)) {
    return corrupt("its input codebook (", stored.activation().bits(), " bits, scale ",
                   stored.activation().scale(), ") disagrees with the quantizer feeding it (",
                   op->input.bits, " bits, scale ", op->input.scale, ")");
  }
  op->wscale.assign(pw.wscale().begin(), pw.wscale().end());
  op->wzero.assign(pw.wzero().begin(), pw.wzero().end());
  std::vector<Target> bias_target;
  nn::Tensor bias_value;
  if (bias != nullptr) {
    bias_value = bias->value;
    bias_target.push_back({bias->name, &bias_value});
  }
  RETURN_IF_ERROR(LoadTensors(path, stored, bias_target));
  if (bias != nullptr) op->bias.assign(bias_value.data(), bias_value.data() + bias_value.size());

  // The GEMM's unsigned codes: the stored ones, or values[c] - min_value at the width they need.
  int gemm_bits = op->wbits;
  if (!values.empty()) {
    const auto span = static_cast<uint64_t>(max_value - min_value);
    gemm_bits = std::max(1, static_cast<int>(std::bit_width(span)));
  }
  op->code_values = static_cast<int>(values.size());
  op->lowbit = op->input.quantized() &&
               op->cols <= kernels::LowbitMaxDepth(gemm_bits, op->input.bits);
  if (op->lowbit) {
    if (!values.empty()) {
      for (uint8_t& c : codes) c = static_cast<uint8_t>(values[c] - min_value);
      // w = wscale * (g + min) + wzero for GEMM code g; exact for export's pow2 weights
      // (min = -2^b, wzero = 0).
      for (int64_t r = 0; r < op->rows; ++r) {
        op->wzero[r] = DequantizeAffine(op->wscale[r], op->wzero[r], static_cast<int>(min_value));
      }
      op->wbits = gemm_bits;
    }
    op->layout = op->wbits <= 2 && op->input.bits <= 2 ? kernels::CodeLayout::kBitPlanes
                                                        : kernels::CodeLayout::kBytes;
    RETURN_IF_ERROR(
        kernels::PackCodes(op->wbits, op->rows, op->cols, codes.data(), op->layout, &op->w));
    return op;
  }
  // Full-precision input: a plain layer holding the dequantized weight.
  std::mt19937_64 rng(0);
  nn::Parameter* weight = nullptr;
  nn::Parameter* fp_bias = nullptr;
  if (op->conv) {
    auto conv = std::make_unique<nn::Conv2d>(op->name, op->conv_options, rng);
    weight = &conv->weight();
    fp_bias = conv->options().bias ? &conv->bias() : nullptr;
    op->fp = std::move(conv);
  } else {
    auto* l = static_cast<QuantizedLinear*>(entry.layer);
    auto fc = std::make_unique<nn::Linear>(op->name, l->options(), rng);
    weight = &fc->weight();
    fp_bias = fc->options().bias ? &fc->bias() : nullptr;
    op->fp = std::move(fc);
  }
  for (int64_t r = 0; r < op->rows; ++r) {
    for (int64_t k = 0; k < op->cols; ++k) {
      const int code = codes[static_cast<size_t>(r * op->cols + k)];
      float v;
      if (!values.empty()) {
        v = DequantizeAffine(op->wscale[r], op->wzero[r], values[static_cast<size_t>(code)]);
      } else if (table == 0) {
        v = DequantizeAffine(op->wscale[r], op->wzero[r], code);
      } else if (table == levels) {
        v = pw.levels(code);
      } else {
        v = pw.levels(static_cast<int>(r * levels + code));
      }
      weight->value[r * op->cols + k] = v;
    }
  }
  if (fp_bias != nullptr) std::copy(op->bias.begin(), op->bias.end(), fp_bias->value.data());
  return op;
}

}  // namespace

absl::StatusOr<std::unique_ptr<PackedModel>> LoadPackedModel(const std::string& path) {
  ASSIGN_OR_RETURN(pb::PackedModel file, ReadPackedModelFile(path));
  auto invalid = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat("packed model ", path, ": ", parts...));
  };
  const nn::Shape input(file.input_shape().begin(), file.input_shape().end());
  // Bounds before building anything, so a hostile header cannot ask for a huge model.
  if (input.size() != 3 || input[0] < 1 || input[1] < 1 || input[2] < 1 || input[0] > 4096 ||
      input[1] > 4096 || input[2] > 4096 || nn::NumElements(input) > (int64_t{1} << 24)) {
    return invalid("input shape ", nn::ShapeToString(input), " is not a supported {C, H, W}");
  }
  if (file.num_classes() < 1 || file.num_classes() > (1 << 20)) {
    return invalid("class count ", file.num_classes(), " is out of range");
  }
  auto config = MakeQuantConfig("", file.weight_spec(), file.activation_spec(),
                                file.keep_first_last_fp(), file.full_precision_shortcut());
  if (!config.ok()) return invalid(config.status().message());
  if (config->ToString() != file.quant_config()) {
    return invalid("its quantization config '", file.quant_config(),
                   "' does not match its own specs (which give '", config->ToString(), "')");
  }
  auto factory = QuantLayerFactory::Create(*config);
  if (!factory.ok()) return invalid(factory.status().message());
  auto shortcut = ParseShortcutKind(file.resnet_shortcut());
  if (!shortcut.ok()) return invalid(shortcut.status().message());
  nn::ModelSpec spec;
  spec.name = file.model();
  spec.input = input;
  spec.num_classes = file.num_classes();
  spec.resnet_shortcut = *shortcut;
  spec.factory = factory->get();
  // The initial value is a placeholder: the stored scale replaces it.
  if (file.scalar_layer()) spec.scalar_layer = nn::ScalarLayer::kPaperInit;
  auto net = nn::BuildModel(spec);
  if (!net.ok()) return invalid(net.status().message());

  std::unique_ptr<PackedModel> model(new PackedModel());
  model->net_ = *std::move(net);
  model->input_ = input;
  const std::string what =
      absl::StrCat("the model '", file.model(), "' with quantization ", file.quant_config());

  ASSIGN_OR_RETURN(std::vector<NetworkEntry> entries, ListNetwork(*model->net_));
  if (static_cast<int>(entries.size()) != file.layers_size()) {
    return invalid("it holds ", file.layers_size(), " layers; ", what, " has ", entries.size());
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    const NetworkEntry& e = entries[i];
    const pb::PackedLayer& stored = file.layers(static_cast<int>(i));
    if (stored.name() != e.path || stored.kind() != ProtoKind(e.kind)) {
      return invalid("layer #", i, " is '", stored.name(), "' (", KindName(stored.kind()), "); ",
                     what, " has '", e.path, "' (", EntryKindName(e.kind), ")");
    }
    if (e.kind != EntryKind::kFullPrecision && e.kind != EntryKind::kActivationQuantizer) continue;
    std::vector<Target> targets;
    std::vector<nn::Parameter*> params;
    e.layer->CollectParameters(&params);
    for (nn::Parameter* p : params) targets.push_back({p->name, &p->value});
    if (e.kind == EntryKind::kFullPrecision) {
      std::vector<nn::Buffer*> buffers;
      e.layer->CollectBuffers(&buffers);
      for (nn::Buffer* b : buffers) targets.push_back({b->name, &b->value});
    }
    RETURN_IF_ERROR(LoadTensors(path, stored, targets));
  }
  // With the quantizers' parameters loaded, the codebooks are those of the exported model.
  ASSIGN_OR_RETURN(entries, ListNetwork(*model->net_));
  for (size_t i = 0; i < entries.size(); ++i) {
    const NetworkEntry& e = entries[i];
    const pb::PackedLayer& stored = file.layers(static_cast<int>(i));
    if (e.kind == EntryKind::kActivationQuantizer) {
      if (!SameCodebook(stored.activation(), e.codebook)) {
        return absl::DataLossError(absl::StrCat(
            "packed model ", path, ": activation quantizer '", e.path, "' stores the codebook (",
            stored.activation().bits(), " bits, scale ", stored.activation().scale(),
            ") but its parameters give (", e.codebook.bits, " bits, scale ", e.codebook.scale,
            ")"));
      }
    } else if (e.kind == EntryKind::kPackedConv2d || e.kind == EntryKind::kPackedLinear) {
      ASSIGN_OR_RETURN(std::unique_ptr<PackedWeightOp> op, MakeOp(path, stored, e));
      model->op_order_.push_back(op.get());
      model->ops_[e.layer] = std::move(op);
    }
  }
  model->header_ = std::move(file);
  model->header_.clear_layers();
  return model;
}

}  // namespace qtrain::quant
