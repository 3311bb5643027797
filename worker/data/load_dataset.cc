#include "worker/data/load_dataset.h"

#include "absl/status/status.h"
#include "worker/data/cifar10.h"
#include "worker/data/idx_dataset.h"
#include "worker/data/synthetic.h"

namespace qtrain::data {

namespace {
constexpr int kCifarCropPadding = 4;
}  // namespace

absl::StatusOr<DataSplits> LoadDataset(const DataSpec& spec, const LoadOptions& options) {
  switch (spec.source) {
    case DataSource::kFashionMnist:
      return LoadFashionMnist(spec.dir, options);
    case DataSource::kIdx: {
      IdxDirectoryOptions idx_options;
      idx_options.name = "idx";
      return LoadIdxDirectory(spec.dir, idx_options, options);
    }
    case DataSource::kCifar10:
      return LoadCifar10(spec.dir, options);
    case DataSource::kSynthetic:
      return GenerateSynthetic(spec.synthetic, options);
  }
  return absl::InvalidArgumentError("LoadDataset: unknown DataSource");
}

AugmentOptions TrainAugmentation(const DataSpec& spec) {
  AugmentOptions options;
  if (spec.source == DataSource::kCifar10) {
    options.crop_padding = kCifarCropPadding;
    options.random_horizontal_flip = true;
  }
  return options;
}

}  // namespace qtrain::data
