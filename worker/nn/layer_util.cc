#include "worker/nn/layer_util.h"

#include "absl/strings/str_cat.h"

namespace qtrain::nn::internal {

absl::Status BadInput(const std::string& layer_name, const std::string& expectation,
                      const Shape& got) {
  return absl::InvalidArgumentError(
      absl::StrCat("layer '", layer_name, "' expects ", expectation, ", got ", ShapeToString(got)));
}

}  // namespace qtrain::nn::internal
