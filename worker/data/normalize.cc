#include "worker/data/normalize.h"

#include <cmath>

#include "common/logging.h"

namespace qtrain::data {

Normalization ComputeNormalization(std::span<const uint8_t> pixels, int channels,
                                   int64_t plane_size) {
  QTRAIN_CHECK(channels >= 1 && plane_size >= 1) << channels << " " << plane_size;
  const int64_t example_size = channels * plane_size;
  QTRAIN_CHECK(static_cast<int64_t>(pixels.size()) % example_size == 0)
      << "pixels=" << pixels.size() << " example_size=" << example_size;
  const int64_t num_examples = static_cast<int64_t>(pixels.size()) / example_size;
  // Byte histograms give exact sums in one pass without overflow concerns.
  std::vector<std::vector<uint64_t>> histograms(channels, std::vector<uint64_t>(256, 0));
  for (int64_t n = 0; n < num_examples; ++n) {
    for (int c = 0; c < channels; ++c) {
      const uint8_t* plane = pixels.data() + n * example_size + c * plane_size;
      std::vector<uint64_t>& h = histograms[c];
      for (int64_t i = 0; i < plane_size; ++i) ++h[plane[i]];
    }
  }
  Normalization result;
  result.mean.resize(channels);
  result.stddev.resize(channels);
  const double count = static_cast<double>(num_examples) * static_cast<double>(plane_size);
  for (int c = 0; c < channels; ++c) {
    double sum = 0;
    double sum_sq = 0;
    for (int b = 0; b < 256; ++b) {
      const double v = b / 255.0;
      sum += histograms[c][b] * v;
      sum_sq += histograms[c][b] * v * v;
    }
    const double mean = count > 0 ? sum / count : 0.0;
    const double var = count > 0 ? std::max(0.0, sum_sq / count - mean * mean) : 0.0;
    const double stddev = std::sqrt(var);
    result.mean[c] = static_cast<float>(mean);
    result.stddev[c] = stddev < kMinStddev ? 1.0f : static_cast<float>(stddev);
  }
  return result;
}

std::vector<float> NormalizationTable(const Normalization& normalization) {
  QTRAIN_CHECK(normalization.mean.size() == normalization.stddev.size() &&
               !normalization.mean.empty());
  const size_t channels = normalization.mean.size();
  std::vector<float> table(channels * 256);
  for (size_t c = 0; c < channels; ++c) {
    const float mean = normalization.mean[c];
    const float inv_std = 1.0f / normalization.stddev[c];
    for (int b = 0; b < 256; ++b) {
      table[c * 256 + b] = (static_cast<float>(b) / 255.0f - mean) * inv_std;
    }
  }
  return table;
}

void NormalizeImage(std::span<const uint8_t> src, std::span<const float> table, int channels,
                    int64_t plane_size, std::span<float> dst) {
  QTRAIN_CHECK(static_cast<int64_t>(src.size()) == channels * plane_size &&
               dst.size() == src.size() && table.size() == static_cast<size_t>(channels) * 256);
  for (int c = 0; c < channels; ++c) {
    const float* t = table.data() + c * 256;
    const uint8_t* s = src.data() + c * plane_size;
    float* d = dst.data() + c * plane_size;
    for (int64_t i = 0; i < plane_size; ++i) d[i] = t[s[i]];
  }
}

}  // namespace qtrain::data
