#include "worker/data/batch.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "worker/data/normalize.h"

namespace qtrain::data {

absl::Status GatherBatch(const Dataset& dataset, std::span<const int64_t> indices,
                         const AugmentOptions& augment, std::mt19937_64& rng,
                         std::span<float> images, std::span<int32_t> labels) {
  const int64_t n = static_cast<int64_t>(indices.size());
  const int64_t example_size = dataset.example_size();
  if (static_cast<int64_t>(images.size()) < n * example_size ||
      static_cast<int64_t>(labels.size()) < n) {
    return absl::InvalidArgumentError(
        absl::StrCat("GatherBatch(", dataset.name, "): ", n, " examples of ", example_size,
                     " values need buffers of ", n * example_size, " floats and ", n,
                     " labels; got ", images.size(), " and ", labels.size()));
  }
  if (augment.crop_padding < 0 || augment.crop_padding > kMaxCropPadding) {
    return absl::InvalidArgumentError(absl::StrCat("GatherBatch: crop_padding must be in [0, ",
                                                   kMaxCropPadding, "], got ",
                                                   augment.crop_padding));
  }
  for (int64_t k = 0; k < n; ++k) {
    if (indices[k] < 0 || indices[k] >= dataset.size()) {
      return absl::InvalidArgumentError(absl::StrCat("GatherBatch(", dataset.name, "): index ",
                                                     indices[k], " at position ", k,
                                                     " is outside [0, ", dataset.size(), ")"));
    }
  }
  const std::vector<float> table = NormalizationTable(dataset.normalization);
  const int64_t plane = int64_t{dataset.height} * dataset.width;
  std::vector<uint8_t> scratch(augment.enabled() ? example_size : 0);
  for (int64_t k = 0; k < n; ++k) {
    std::span<const uint8_t> src = dataset.example(indices[k]);
    if (augment.enabled()) {
      const ImageTransform t = SampleTransform(augment, rng);
      ApplyTransform(t, dataset.channels, dataset.height, dataset.width, src, scratch);
      src = scratch;
    }
    NormalizeImage(src, table, dataset.channels, plane,
                   images.subspan(k * example_size, example_size));
    labels[k] = dataset.labels[indices[k]];
  }
  return absl::OkStatus();
}

absl::Status GatherBatch(const Dataset& dataset, std::span<const int64_t> indices,
                         std::span<float> images, std::span<int32_t> labels) {
  std::mt19937_64 unused_rng(0);
  return GatherBatch(dataset, indices, AugmentOptions{}, unused_rng, images, labels);
}

}  // namespace qtrain::data
