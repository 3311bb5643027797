#include "worker/quant/weight_quantizer.h"

namespace qtrain::quant {

WeightQuantizer::~WeightQuantizer() = default;

}  // namespace qtrain::quant
