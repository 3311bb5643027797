// Per-channel normalization of byte images: x = (byte / 255 - mean[c]) / stddev[c].
//
// Data sets are stored as bytes (4x less memory than floats: CIFAR-10 train is 150 MB as bytes)
// and normalized when a batch is gathered, through a 256-entry lookup table per channel.
//
// Which statistics are used is decided by the loader (see load_dataset.h): Fashion-MNIST uses
// the published training-set constants below; other data sets use ComputeNormalization over
// the training examples that were loaded.
//
// Thread-safety: free functions and plain structs; concurrent reads are safe.
#ifndef QTRAIN_WORKER_DATA_NORMALIZE_H_
#define QTRAIN_WORKER_DATA_NORMALIZE_H_

#include <cstdint>
#include <span>
#include <vector>

namespace qtrain::data {

// Fashion-MNIST training set (60000 images), pixels scaled to [0, 1].
inline constexpr float kFashionMnistMean = 0.2860f;
inline constexpr float kFashionMnistStd = 0.3530f;

// A channel whose standard deviation is below this is treated as constant: its stddev is set
// to 1 so normalization only centres it (no division by ~0).
inline constexpr float kMinStddev = 1e-3f;

// Per-channel statistics on the [0, 1] pixel scale. mean.size() == stddev.size() == channels.
struct Normalization {
  std::vector<float> mean;
  std::vector<float> stddev;
};

// Mean and (population) standard deviation per channel of `num_examples` images stored
// C x plane_size each (CHW). Cost: one pass over the bytes, exact integer sums.
// Precondition: pixels.size() == num_examples * channels * plane_size, channels >= 1.
Normalization ComputeNormalization(std::span<const uint8_t> pixels, int channels,
                                   int64_t plane_size);

// The lookup table: entry [c * 256 + b] is the normalized value of byte b in channel c.
std::vector<float> NormalizationTable(const Normalization& normalization);

// Normalizes one CHW image of bytes into floats through `table`.
// Precondition: src.size() == dst.size() == channels * plane_size; table from NormalizationTable.
void NormalizeImage(std::span<const uint8_t> src, std::span<const float> table, int channels,
                    int64_t plane_size, std::span<float> dst);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_NORMALIZE_H_
