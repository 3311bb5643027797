// The models qtrain trains, built from a small spec, plus model summaries and parameter counts.
//
//   "mlp":      flatten, linear C*H*W->512, relu, linear 512->256, relu, linear 256->classes.
//   "cnn":      [conv3x3 32, bn, relu] x2, maxpool 2, [conv3x3 64, bn, relu] x2, maxpool 2,
//               flatten, linear 64*(H/4)*(W/4)->256, relu, linear 256->classes. Convolutions pad 1
//               and have no bias (batch norm follows). 28x28 inputs pool to 7x7, 32x32 to 8x8.
//   "resnet20": He et al.'s CIFAR ResNet-20: conv3x3 16 (no bias), bn, relu, three stages of three
//               basic blocks (Residual) with 16/32/64 channels and strides 1/2/2, global average
//               pooling, linear 64->classes. Any channel count and size the convolutions accept
//               (e.g. 1x28x28 or 3x32x32). Shortcuts per ModelSpec::resnet_shortcut.
//   "mlp-wide": the communication-heavy model of the scaling benchmark (deploy/scaling-bench.sh):
//               flatten, linear C*H*W->4096, relu, linear 4096->4096, relu, linear 4096->4096,
//               relu, linear 4096->classes. 36,818,954 parameters at 1x28x28 / 10 classes
//               (3,215,360 + 2 x 16,781,312 + 40,970), 46,190,602 at 3x32x32: ~147 MB of fp32
//               gradient per step against ~7 GFLOP of compute per 32 images.
//
// Quantized variants come from ModelSpec::factory (see layer_factory.h): it supplies every conv
// and linear layer (told whether it is the first or last) and the activation in front of each.
//
// Weights are drawn (Kaiming-normal) from one std::mt19937_64 seeded with spec.seed, layer by
// layer in network order, so the same spec gives the same model bit for bit.
//
// Parameter names: "conv1.weight", "bn1.gamma", "layer2.0.conv1.weight", "fc.bias", ...
#ifndef QTRAIN_WORKER_NN_MODEL_H_
#define QTRAIN_WORKER_NN_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/nn/layer.h"
#include "worker/nn/layer_factory.h"
#include "worker/nn/residual.h"
#include "worker/nn/sequential.h"

namespace qtrain::nn {

struct ModelSpec {
  std::string name;  // one of ModelNames(): "mlp", "cnn", "resnet20", "mlp-wide"
  Shape input;       // one example: {C, H, W}
  int num_classes = 10;
  uint64_t seed = 0;  // for the weight initialisation
  // resnet20 only: the shortcut of the blocks that change shape. kZeroPad is the paper's CIFAR
  // choice (option A, 269,722 parameters at 3x32x32 / 10 classes); kProjection is option B
  // (272,474).
  ShortcutKind resnet_shortcut = ShortcutKind::kZeroPad;
  // Where the weight layers and the activations in front of them come from; nullptr means
  // DefaultLayerFactory() (full precision). Used only during BuildModel.
  const LayerFactory* factory = nullptr;
  // > 0: a ScalarLayer named "scalar" with this initial value follows the classifier (Zhuang et
  // al. 2018's scalar layer; ScalarLayer::kPaperInit = 0.01). 0: none. Full precision always.
  float scalar_layer = 0.0f;
};

// The model names BuildModel knows, in the order listed in its errors.
std::vector<std::string> ModelNames();

// Builds the model and checks that it accepts spec.input. INVALID_ARGUMENT for an unknown name
// (the message lists the valid ones), an input that is not {C, H, W} with positive extents,
// num_classes < 1, or an input the layers cannot take (e.g. too small to pool).
absl::StatusOr<std::unique_ptr<Sequential>> BuildModel(const ModelSpec& spec);

// Total number of parameter elements (the layer's and its children's).
int64_t CountParameters(const Layer& layer);

// A table: one row per layer (recursing into Sequential containers) with its Describe() line,
// output shape (without the batch dimension) and parameter count, then the total. `input` is one
// example's shape, {C, H, W}. Rows after a layer that rejects its input say why.
std::string Summary(const Layer& layer, const Shape& input);

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_MODEL_H_
