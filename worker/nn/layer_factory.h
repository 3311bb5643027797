// The hook through which models get their weight layers and the activations that feed them, so
// that the quantizers (worker/quant) can substitute quantized versions without nn/ knowing them.
//
// BuildModel and Residual ask a LayerFactory for every Conv2d and Linear, telling it the layer's
// role (the network's first or last weight layer), and for the nonlinearity in front of each
// weight layer. The default factory builds the plain layers; quant::QuantLayerFactory returns
// layers with weight quantizers and activation quantizers in place of (or after) the ReLU.
//
// Factories only construct: the returned layers do not refer back to the factory, which may be
// destroyed once the model is built. A factory must draw from rng exactly as the plain layer's
// constructor does, so that a quantized model starts from the same weights as its FP32 twin.
// Thread-safety: const methods, no state beyond construction.
#ifndef QTRAIN_WORKER_NN_LAYER_FACTORY_H_
#define QTRAIN_WORKER_NN_LAYER_FACTORY_H_

#include <memory>
#include <random>
#include <string>

#include "worker/nn/conv2d.h"
#include "worker/nn/layer.h"
#include "worker/nn/linear.h"

namespace qtrain::nn {

// Where a weight layer sits: the papers keep the first and the last layer at full precision.
struct WeightLayerRole {
  bool first = false;  // the network's first weight layer (reads the input images)
  bool last = false;   // the classifier
};

class LayerFactory {
 public:
  virtual ~LayerFactory() = default;

  virtual std::unique_ptr<Conv2d> MakeConv2d(std::string name, const Conv2dOptions& options,
                                             std::mt19937_64& rng, WeightLayerRole role) const;
  virtual std::unique_ptr<Linear> MakeLinear(std::string name, const LinearOptions& options,
                                             std::mt19937_64& rng, WeightLayerRole role) const;

  // The nonlinearity whose output feeds only the weight layer `consumer` (possibly through
  // pooling or flattening). nullptr means a plain ReLU (callers then use their own, possibly
  // fused or in-place, ReLU); otherwise a layer that includes the rectification (e.g. PACT's
  // clip(x, 0, alpha), or ReLU followed by a quantizer). It must not run in place.
  virtual std::unique_ptr<Layer> MakeActivation(std::string name, WeightLayerRole consumer) const {
    return nullptr;
  }

  // A quantizer for a non-negative activation (already rectified) that feeds `consumer`: placed
  // in front of a residual block's first convolution when shortcuts stay full precision, or
  // after a block's fused add + ReLU when they do not. nullptr: none.
  virtual std::unique_ptr<Layer> MakeInputQuantizer(std::string name,
                                                    WeightLayerRole consumer) const {
    return nullptr;
  }

  // Residual networks: whether the shortcut carries the full-precision activation (PACT's
  // "fpsc") while the block's first convolution reads its quantized copy. When false, the
  // activation between blocks is quantized once and both paths read it.
  virtual bool full_precision_shortcut() const { return true; }
};

// The factory of plain (full-precision) layers.
const LayerFactory& DefaultLayerFactory();

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_LAYER_FACTORY_H_
