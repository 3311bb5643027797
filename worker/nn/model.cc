#include "worker/nn/model.h"

#include <cmath>
#include <cstdio>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/nn/batch_norm.h"
#include "worker/nn/conv2d.h"
#include "worker/nn/flatten.h"
#include "worker/nn/global_avg_pool.h"
#include "worker/nn/linear.h"
#include "worker/nn/max_pool.h"
#include "worker/nn/relu.h"
#include "worker/nn/scalar_layer.h"

namespace qtrain::nn {
namespace {

// Appends the nonlinearity that feeds `consumer`: the factory's (e.g. a quantizer) or a ReLU.
void AddActivation(Sequential* net, const LayerFactory& factory, const std::string& name,
                   WeightLayerRole consumer) {
  std::unique_ptr<Layer> act = factory.MakeActivation(name, consumer);
  if (act) {
    net->Add(std::move(act));
  } else {
    net->Emplace<Relu>(name);
  }
}

// conv3x3 (pad 1, no bias), batch norm; the activation after it is the caller's.
void AddConvBn(Sequential* net, const LayerFactory& factory, int index, int64_t in, int64_t out,
               std::mt19937_64& rng, WeightLayerRole role) {
  const std::string i = std::to_string(index);
  net->Add(factory.MakeConv2d("conv" + i,
                              Conv2dOptions{.in_channels = in,
                                            .out_channels = out,
                                            .kernel = 3,
                                            .stride = 1,
                                            .padding = 1,
                                            .bias = false},
                              rng, role));
  net->Emplace<BatchNorm2d>("bn" + i, BatchNormOptions{.channels = out});
}

constexpr WeightLayerRole kFirst{.first = true};
constexpr WeightLayerRole kMiddle{};
constexpr WeightLayerRole kLast{.last = true};

std::unique_ptr<Sequential> BuildMlp(const ModelSpec& spec, const LayerFactory& f,
                                     std::mt19937_64& rng) {
  auto net = std::make_unique<Sequential>(spec.name);
  net->Emplace<Flatten>("flatten");
  net->Add(f.MakeLinear(
      "fc1", LinearOptions{.in_features = NumElements(spec.input), .out_features = 512}, rng,
      kFirst));
  AddActivation(net.get(), f, "relu1", kMiddle);
  net->Add(f.MakeLinear("fc2", LinearOptions{.in_features = 512, .out_features = 256}, rng,
                        kMiddle));
  AddActivation(net.get(), f, "relu2", kLast);
  net->Add(f.MakeLinear(
      "fc3", LinearOptions{.in_features = 256, .out_features = spec.num_classes}, rng, kLast));
  return net;
}

// mlp-wide: three hidden layers of kWideHidden units.
constexpr int64_t kWideHidden = 4096;

std::unique_ptr<Sequential> BuildMlpWide(const ModelSpec& spec, const LayerFactory& f,
                                         std::mt19937_64& rng) {
  auto net = std::make_unique<Sequential>(spec.name);
  net->Emplace<Flatten>("flatten");
  net->Add(f.MakeLinear(
      "fc1", LinearOptions{.in_features = NumElements(spec.input), .out_features = kWideHidden},
      rng, kFirst));
  AddActivation(net.get(), f, "relu1", kMiddle);
  const LinearOptions hidden{.in_features = kWideHidden, .out_features = kWideHidden};
  net->Add(f.MakeLinear("fc2", hidden, rng, kMiddle));
  AddActivation(net.get(), f, "relu2", kMiddle);
  net->Add(f.MakeLinear("fc3", hidden, rng, kMiddle));
  AddActivation(net.get(), f, "relu3", kLast);
  net->Add(f.MakeLinear(
      "fc4", LinearOptions{.in_features = kWideHidden, .out_features = spec.num_classes}, rng,
      kLast));
  return net;
}

std::unique_ptr<Sequential> BuildCnn(const ModelSpec& spec, const LayerFactory& f,
                                     std::mt19937_64& rng) {
  auto net = std::make_unique<Sequential>(spec.name);
  AddConvBn(net.get(), f, 1, spec.input[0], 32, rng, kFirst);
  AddActivation(net.get(), f, "relu1", kMiddle);
  AddConvBn(net.get(), f, 2, 32, 32, rng, kMiddle);
  AddActivation(net.get(), f, "relu2", kMiddle);
  net->Emplace<MaxPool2d>("pool1", MaxPoolOptions{.kernel = 2, .stride = 2});
  AddConvBn(net.get(), f, 3, 32, 64, rng, kMiddle);
  AddActivation(net.get(), f, "relu3", kMiddle);
  AddConvBn(net.get(), f, 4, 64, 64, rng, kMiddle);
  AddActivation(net.get(), f, "relu4", kMiddle);
  net->Emplace<MaxPool2d>("pool2", MaxPoolOptions{.kernel = 2, .stride = 2});
  net->Emplace<Flatten>("flatten");
  const int64_t features = 64 * (spec.input[1] / 4) * (spec.input[2] / 4);
  net->Add(f.MakeLinear(
      "fc1", LinearOptions{.in_features = std::max<int64_t>(features, 1), .out_features = 256},
      rng, kMiddle));
  AddActivation(net.get(), f, "relu5", kLast);
  net->Add(f.MakeLinear(
      "fc2", LinearOptions{.in_features = 256, .out_features = spec.num_classes}, rng, kLast));
  return net;
}

// With full-precision shortcuts each block quantizes its own first convolution's input, so the
// activations between blocks stay plain ReLUs; otherwise they are quantized where produced.
std::unique_ptr<Sequential> BuildResnet20(const ModelSpec& spec, const LayerFactory& f,
                                          std::mt19937_64& rng) {
  auto net = std::make_unique<Sequential>(spec.name);
  const bool fpsc = f.full_precision_shortcut();
  AddConvBn(net.get(), f, 1, spec.input[0], 16, rng, kFirst);
  if (fpsc) {
    net->Emplace<Relu>("relu1");
  } else {
    AddActivation(net.get(), f, "relu1", kMiddle);
  }
  int64_t in = 16;
  constexpr int kStages = 3;
  constexpr int kBlocksPerStage = 3;
  for (int stage = 0; stage < kStages; ++stage) {
    const int64_t out = int64_t{16} << stage;
    for (int block = 0; block < kBlocksPerStage; ++block) {
      const int64_t stride = (stage > 0 && block == 0) ? 2 : 1;
      const std::string name = absl::StrCat("layer", stage + 1, ".", block);
      net->Emplace<Residual>(name,
                             ResidualOptions{.in_channels = in,
                                             .out_channels = out,
                                             .stride = stride,
                                             .shortcut = spec.resnet_shortcut,
                                             .factory = &f},
                             rng);
      const bool feeds_classifier = stage == kStages - 1 && block == kBlocksPerStage - 1;
      if (!fpsc && !feeds_classifier) {
        std::unique_ptr<Layer> q = f.MakeInputQuantizer(name + ".out_aq", kMiddle);
        if (q) net->Add(std::move(q));
      }
      in = out;
    }
  }
  net->Emplace<GlobalAvgPool>("avgpool");
  net->Add(f.MakeLinear("fc", LinearOptions{.in_features = in, .out_features = spec.num_classes},
                        rng, kLast));
  return net;
}

void CollectAll(const Layer& layer, std::vector<Parameter*>* params) {
  // CollectParameters only hands out pointers; nothing is modified here.
  const_cast<Layer&>(layer).CollectParameters(params);
}

void SummaryRows(const Layer& layer, const std::string& prefix, const Shape& input,
                 absl::StatusOr<Shape>* output, std::string* out) {
  const auto* seq = dynamic_cast<const Sequential*>(&layer);
  if (seq != nullptr && !prefix.empty()) {
    absl::StrAppend(out, prefix, "  ", layer.Describe(), "\n");
  }
  if (seq != nullptr) {
    absl::StatusOr<Shape> shape = input;
    const std::string child_prefix = prefix.empty() ? "" : prefix + ".";
    for (int i = 0; i < seq->num_children(); ++i) {
      const Layer& child = seq->child(i);
      if (!shape.ok()) break;
      SummaryRows(child, child_prefix + child.name(), *shape, &shape, out);
    }
    *output = shape;
    return;
  }
  *output = layer.OutputShape(input);
  std::string shape_text;
  if (output->ok()) {
    const Shape no_batch((*output)->begin() + 1, (*output)->end());
    shape_text = ShapeToString(no_batch);
  } else {
    shape_text = "error";
  }
  char line[256];
  const std::string& row_name = prefix.empty() ? layer.name() : prefix;
  std::snprintf(line, sizeof(line), "%-22s %-40s %-16s %10lld\n", row_name.c_str(),
                layer.Describe().c_str(), shape_text.c_str(),
                static_cast<long long>(CountParameters(layer)));
  absl::StrAppend(out, line);
  if (!output->ok()) absl::StrAppend(out, "  ", output->status().message(), "\n");
}

}  // namespace

std::vector<std::string> ModelNames() { return {"mlp", "cnn", "resnet20", "mlp-wide"}; }

absl::StatusOr<std::unique_ptr<Sequential>> BuildModel(const ModelSpec& spec) {
  if (spec.input.size() != 3 || spec.input[0] < 1 || spec.input[1] < 1 || spec.input[2] < 1) {
    return absl::InvalidArgumentError(absl::StrCat("model '", spec.name,
                                                   "': input must be {C, H, W} with every extent "
                                                   ">= 1, got ",
                                                   ShapeToString(spec.input)));
  }
  if (spec.num_classes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("model '", spec.name, "': num_classes must be >= 1, got ", spec.num_classes));
  }
  std::mt19937_64 rng(spec.seed);
  const LayerFactory& factory = spec.factory != nullptr ? *spec.factory : DefaultLayerFactory();
  std::unique_ptr<Sequential> net;
  if (spec.name == "mlp") {
    net = BuildMlp(spec, factory, rng);
  } else if (spec.name == "cnn") {
    net = BuildCnn(spec, factory, rng);
  } else if (spec.name == "resnet20") {
    net = BuildResnet20(spec, factory, rng);
  } else if (spec.name == "mlp-wide") {
    net = BuildMlpWide(spec, factory, rng);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown model '", spec.name, "'; valid models: ", absl::StrJoin(ModelNames(), ", ")));
  }
  if (!(spec.scalar_layer >= 0.0f) || !std::isfinite(spec.scalar_layer)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model '", spec.name, "': the scalar layer's initial value must be finite and > 0 (0 = "
        "none), got ", spec.scalar_layer));
  }
  if (spec.scalar_layer > 0.0f) net->Emplace<ScalarLayer>("scalar", spec.scalar_layer);
  Shape batch_input = {1};
  batch_input.insert(batch_input.end(), spec.input.begin(), spec.input.end());
  absl::StatusOr<Shape> output = net->OutputShape(batch_input);
  if (!output.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("model '", spec.name, "' cannot take input ",
                                                   ShapeToString(spec.input), ": ",
                                                   output.status().message()));
  }
  return net;
}

int64_t CountParameters(const Layer& layer) {
  std::vector<Parameter*> params;
  CollectAll(layer, &params);
  int64_t total = 0;
  for (const Parameter* p : params) total += p->value.size();
  return total;
}

std::string Summary(const Layer& layer, const Shape& input) {
  std::string out;
  char header[256];
  std::snprintf(header, sizeof(header), "%-22s %-40s %-16s %10s\n", "layer", "description",
                "output", "params");
  absl::StrAppend(&out, header);
  Shape batch_input = {1};
  batch_input.insert(batch_input.end(), input.begin(), input.end());
  absl::StatusOr<Shape> output = batch_input;
  SummaryRows(layer, "", batch_input, &output, &out);
  absl::StrAppend(&out, "total parameters: ", CountParameters(layer), "\n");
  return out;
}

}  // namespace qtrain::nn
