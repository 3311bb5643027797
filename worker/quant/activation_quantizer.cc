#include "worker/quant/activation_quantizer.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace qtrain::quant {

absl::StatusOr<nn::Shape> ActivationQuantizer::OutputShape(const nn::Shape& input) const {
  if (input.empty() || input[0] < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "input of layer '", name(), "' expects [N>=1,...], got ", nn::ShapeToString(input)));
  }
  return input;
}

bool ActivationQuantizer::PrepareBackward(const nn::Tensor* input, const nn::Tensor& dy,
                                          nn::Tensor* dx) const {
  QTRAIN_CHECK(input != nullptr) << "'" << name() << "': Backward before Forward";
  QTRAIN_CHECK(dy.shape() == input->shape())
      << "'" << name() << "': dy " << nn::ShapeToString(dy.shape()) << " for input "
      << nn::ShapeToString(input->shape());
  if (dx == nullptr) return false;
  if (dx->shape() != dy.shape()) dx->Resize(dy.shape());
  return true;
}

}  // namespace qtrain::quant
