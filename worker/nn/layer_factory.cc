#include "worker/nn/layer_factory.h"

namespace qtrain::nn {

std::unique_ptr<Conv2d> LayerFactory::MakeConv2d(std::string name, const Conv2dOptions& options,
                                                 std::mt19937_64& rng,
                                                 WeightLayerRole /*role*/) const {
  return std::make_unique<Conv2d>(std::move(name), options, rng);
}

std::unique_ptr<Linear> LayerFactory::MakeLinear(std::string name, const LinearOptions& options,
                                                 std::mt19937_64& rng,
                                                 WeightLayerRole /*role*/) const {
  return std::make_unique<Linear>(std::move(name), options, rng);
}

const LayerFactory& DefaultLayerFactory() {
  static const LayerFactory* const kFactory = new LayerFactory();
  return *kFactory;
}

}  // namespace qtrain::nn
