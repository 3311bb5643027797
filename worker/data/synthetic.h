// A deterministic, learnable synthetic data set for tests and smoke runs (--data=synthetic).
//
// Each class k has a prototype image whose pixels are uniform in [0, 1], drawn from
// DeriveSeed(seed, 0). Example i of a split has label i % num_classes (so classes are exactly
// balanced) and pixels clamp(prototype + noise * N(0, 1), 0, 1), rounded to bytes, drawn from
// its own stream DeriveSeed(DeriveSeed(seed, split), i). So:
//   - the same options give the same bytes on every machine (rng.h);
//   - a smaller train_size gives a prefix of a larger one (capping is consistent);
//   - the classes are separable by a linear model: nearest-prototype classification is nearly
//     exact at the default noise, so a tiny model can learn it in a few steps.
// Normalization: per-channel statistics computed over the generated training split.
//
// Thread-safety: free functions without shared state.
// Cost: (train_size + test_size) * C * H * W normal draws; the defaults take a few ms.
#ifndef QTRAIN_WORKER_DATA_SYNTHETIC_H_
#define QTRAIN_WORKER_DATA_SYNTHETIC_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/data/dataset.h"

namespace qtrain::data {

// Every field is also a key of the data spec "synthetic:key=value,..." (data_spec.h).
struct SyntheticOptions {
  int64_t train_size = 1024;  // key n
  int64_t test_size = 256;    // key test
  int num_classes = 10;       // key classes
  int channels = 1;           // key shape=CxHxW; the default 1x28x28 matches Fashion-MNIST
  int height = 28;
  int width = 28;
  uint64_t seed = 1;   // key seed
  double noise = 0.3;  // key noise: stddev of the pixel noise on the [0, 1] scale
};

// Limits that keep a typo from asking for terabytes.
inline constexpr int64_t kMaxSyntheticExamples = 10'000'000;
inline constexpr int kMaxSyntheticClasses = 1000;
inline constexpr int kMaxSyntheticSide = 4096;
inline constexpr int kMaxSyntheticChannels = 64;
inline constexpr int64_t kMaxSyntheticBytes = int64_t{1} << 30;
inline constexpr double kMaxSyntheticNoise = 10.0;

// INVALID_ARGUMENT, naming the field, if any field is outside its limits.
absl::Status ValidateSyntheticOptions(const SyntheticOptions& options);

// Generates both splits. LoadOptions' max_train / max_test cap the sizes (a prefix, see above).
absl::StatusOr<DataSplits> GenerateSynthetic(const SyntheticOptions& options,
                                             const LoadOptions& load_options);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_SYNTHETIC_H_
