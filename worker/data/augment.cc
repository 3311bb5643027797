#include "worker/data/augment.h"

#include <algorithm>

#include "common/logging.h"
#include "worker/data/rng.h"

namespace qtrain::data {
namespace {

template <typename T>
void ApplyTransformImpl(const ImageTransform& t, int channels, int height, int width,
                        std::span<const T> src, std::span<T> dst, T fill) {
  const int64_t plane = int64_t{height} * width;
  QTRAIN_CHECK(channels > 0 && height > 0 && width > 0 &&
               static_cast<int64_t>(src.size()) == channels * plane && dst.size() == src.size())
      << channels << "x" << height << "x" << width << " src=" << src.size()
      << " dst=" << dst.size();
  // Output columns [x_lo, x_hi) read source columns inside the image; the rest are fill.
  for (int c = 0; c < channels; ++c) {
    const T* in = src.data() + c * plane;
    T* out = dst.data() + c * plane;
    for (int y = 0; y < height; ++y) {
      T* out_row = out + int64_t{y} * width;
      const int64_t sy = int64_t{y} + t.shift_y;
      if (sy < 0 || sy >= height) {
        std::fill(out_row, out_row + width, fill);
        continue;
      }
      const T* in_row = in + sy * width;
      for (int x = 0; x < width; ++x) {
        const int cx = t.flip ? width - 1 - x : x;  // column of the cropped image
        const int64_t sx = int64_t{cx} + t.shift_x;
        out_row[x] = (sx < 0 || sx >= width) ? fill : in_row[sx];
      }
    }
  }
}

}  // namespace

ImageTransform SampleTransform(const AugmentOptions& options, std::mt19937_64& rng) {
  QTRAIN_CHECK(options.crop_padding >= 0 && options.crop_padding <= kMaxCropPadding)
      << "crop_padding=" << options.crop_padding;
  ImageTransform t;
  if (options.crop_padding > 0) {
    const uint64_t span = 2 * static_cast<uint64_t>(options.crop_padding) + 1;
    t.shift_y = static_cast<int>(UniformBelow(rng, span)) - options.crop_padding;
    t.shift_x = static_cast<int>(UniformBelow(rng, span)) - options.crop_padding;
  }
  if (options.random_horizontal_flip) t.flip = (rng() >> 63) != 0;
  return t;
}

void ApplyTransform(const ImageTransform& transform, int channels, int height, int width,
                    std::span<const uint8_t> src, std::span<uint8_t> dst, uint8_t fill) {
  ApplyTransformImpl<uint8_t>(transform, channels, height, width, src, dst, fill);
}

void ApplyTransform(const ImageTransform& transform, int channels, int height, int width,
                    std::span<const float> src, std::span<float> dst, float fill) {
  ApplyTransformImpl<float>(transform, channels, height, width, src, dst, fill);
}

}  // namespace qtrain::data
