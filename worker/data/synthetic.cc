#include "worker/data/synthetic.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/data/normalize.h"
#include "worker/data/rng.h"

namespace qtrain::data {
namespace {

constexpr uint64_t kPrototypeStream = 0;
constexpr uint64_t kTrainStream = 1;
constexpr uint64_t kTestStream = 2;

Dataset GenerateSplit(const SyntheticOptions& o, const std::vector<float>& prototypes,
                      uint64_t stream, int64_t count, std::string name) {
  Dataset d;
  d.name = std::move(name);
  d.channels = o.channels;
  d.height = o.height;
  d.width = o.width;
  d.num_classes = o.num_classes;
  const int64_t example_size = d.example_size();
  d.labels.resize(count);
  d.pixels.resize(count * example_size);
  const uint64_t split_seed = DeriveSeed(o.seed, stream);
  for (int64_t i = 0; i < count; ++i) {
    const int label = static_cast<int>(i % o.num_classes);
    d.labels[i] = label;
    std::mt19937_64 rng(DeriveSeed(split_seed, static_cast<uint64_t>(i)));
    const float* proto = prototypes.data() + label * example_size;
    uint8_t* out = d.pixels.data() + i * example_size;
    for (int64_t p = 0; p < example_size; ++p) {
      const double v = std::clamp(proto[p] + o.noise * StandardNormal(rng), 0.0, 1.0);
      out[p] = static_cast<uint8_t>(std::lround(v * 255.0));
    }
  }
  return d;
}

}  // namespace

absl::Status ValidateSyntheticOptions(const SyntheticOptions& o) {
  auto out_of_range = [](absl::string_view field, auto value, auto lo, auto hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("synthetic data: ", field, "=", value, " is outside [", lo, ", ", hi, "]"));
  };
  if (o.train_size < 1 || o.train_size > kMaxSyntheticExamples) {
    return out_of_range("n", o.train_size, 1, kMaxSyntheticExamples);
  }
  if (o.test_size < 0 || o.test_size > kMaxSyntheticExamples) {
    return out_of_range("test", o.test_size, 0, kMaxSyntheticExamples);
  }
  if (o.num_classes < 2 || o.num_classes > kMaxSyntheticClasses) {
    return out_of_range("classes", o.num_classes, 2, kMaxSyntheticClasses);
  }
  if (o.channels < 1 || o.channels > kMaxSyntheticChannels) {
    return out_of_range("shape channels", o.channels, 1, kMaxSyntheticChannels);
  }
  if (o.height < 1 || o.height > kMaxSyntheticSide) {
    return out_of_range("shape height", o.height, 1, kMaxSyntheticSide);
  }
  if (o.width < 1 || o.width > kMaxSyntheticSide) {
    return out_of_range("shape width", o.width, 1, kMaxSyntheticSide);
  }
  if (!(o.noise >= 0.0 && o.noise <= kMaxSyntheticNoise)) {
    return out_of_range("noise", o.noise, 0, kMaxSyntheticNoise);
  }
  // Each factor is bounded above, so this product cannot overflow int64.
  const int64_t example_size = int64_t{o.channels} * o.height * o.width;
  const int64_t total = (o.train_size + o.test_size + o.num_classes) * example_size;
  if (total > kMaxSyntheticBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("synthetic data: ", o.train_size, "+", o.test_size, " examples of ",
                     o.channels, "x", o.height, "x", o.width, " need ", total,
                     " bytes, more than the limit of ", kMaxSyntheticBytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<DataSplits> GenerateSynthetic(const SyntheticOptions& options,
                                             const LoadOptions& load_options) {
  RETURN_IF_ERROR(ValidateLoadOptions(load_options));
  RETURN_IF_ERROR(ValidateSyntheticOptions(options));
  const int64_t example_size = int64_t{options.channels} * options.height * options.width;
  std::vector<float> prototypes(options.num_classes * example_size);
  std::mt19937_64 rng(DeriveSeed(options.seed, kPrototypeStream));
  for (float& p : prototypes) p = static_cast<float>(UniformUnit(rng));

  auto capped = [](int64_t size, int64_t cap) { return cap > 0 ? std::min(size, cap) : size; };
  DataSplits splits;
  splits.train =
      GenerateSplit(options, prototypes, kTrainStream,
                    capped(options.train_size, load_options.max_train), "synthetic/train");
  splits.test = GenerateSplit(options, prototypes, kTestStream,
                              capped(options.test_size, load_options.max_test), "synthetic/test");
  const Normalization normalization = ComputeNormalization(splits.train.pixels, options.channels,
                                                           int64_t{options.height} * options.width);
  splits.train.normalization = normalization;
  splits.test.normalization = normalization;
  RETURN_IF_ERROR(ValidateDataset(splits.train));
  RETURN_IF_ERROR(ValidateDataset(splits.test));
  return splits;
}

}  // namespace qtrain::data
