// Host side of the CUDA SGD kernels: option validation and the multi-tensor work plan.
#include "worker/kernels/cuda/optimizer.h"

#include <cstdint>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"

namespace qtrain::kernels::cuda {

absl::Status ValidateSgdStepOptions(const SgdStepOptions& o) {
  if (!(o.momentum >= 0 && o.momentum < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("momentum must be in [0, 1), got ", o.momentum));
  }
  if (o.nesterov && o.momentum == 0) {
    return absl::InvalidArgumentError("nesterov needs momentum > 0");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SgdChunk>> PlanSgdChunks(std::span<const SgdTensor> tensors,
                                                    int64_t chunk_elements) {
  if (chunk_elements < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("PlanSgdChunks: chunk_elements must be >= 1, got ", chunk_elements));
  }
  if (tensors.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat("PlanSgdChunks: at most 2^31 - 1 tensors, got ", tensors.size()));
  }
  std::vector<SgdChunk> chunks;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const SgdTensor& t = tensors[k];
    if (t.size < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("PlanSgdChunks: tensor ", k, " has negative size ", t.size));
    }
    if (t.size > 0 && (t.param == nullptr || t.grad == nullptr || t.momentum == nullptr)) {
      return absl::InvalidArgumentError(
          absl::StrCat("PlanSgdChunks: tensor ", k, " has a null param, grad or momentum"));
    }
    for (int64_t begin = 0; begin < t.size; begin += chunk_elements) {
      SgdChunk c;
      c.tensor = static_cast<int32_t>(k);
      c.begin = begin;
      c.end = t.size - begin > chunk_elements ? begin + chunk_elements : t.size;
      chunks.push_back(c);
    }
  }
  return chunks;
}

}  // namespace qtrain::kernels::cuda
