// Training-time augmentation for image batches: random crop with zero padding and random
// horizontal flip (the standard CIFAR-10 recipe: pad 4, crop 32x32, flip with probability 1/2).
//
// A crop of an HxW image padded by P on every side, taken at offset (oy, ox) in [0, 2P], equals
// shifting the image by (sy, sx) = (oy - P, ox - P):  out(y, x) = in(y + sy, x + sx), with
// pixels outside the image set to `fill` (0, black, before normalization, as torchvision's
// RandomCrop(padding=P) does). The flip is applied after the crop: out(y, x) = cropped(y, W-1-x).
//
// Randomness comes only from the std::mt19937_64 the caller passes, through rng.h's portable
// helpers, so a seeded run is reproducible on every machine. A trainer seeds one engine per
// (seed, epoch, rank), e.g. DeriveSeed(DeriveSeed(seed, epoch), rank), and draws one transform
// per example in batch order.
//
// Thread-safety: free functions; concurrent calls need distinct engines and output buffers.
// Cost: SampleTransform makes at most three engine draws; ApplyTransform one pass over the image.
#ifndef QTRAIN_WORKER_DATA_AUGMENT_H_
#define QTRAIN_WORKER_DATA_AUGMENT_H_

#include <cstdint>
#include <random>
#include <span>

namespace qtrain::data {

// Larger paddings only add all-fill images; the cap keeps shift arithmetic far from overflow.
inline constexpr int kMaxCropPadding = 4096;

struct AugmentOptions {
  // Random crop: shift by up to this many pixels each way, filling with zeros. 0 disables it.
  // Must be in [0, kMaxCropPadding].
  int crop_padding = 0;
  // Mirror left-right with probability 1/2.
  bool random_horizontal_flip = false;

  bool enabled() const { return crop_padding > 0 || random_horizontal_flip; }
};

// The per-example transform; the default is the identity.
struct ImageTransform {
  int shift_y = 0;  // in [-crop_padding, crop_padding]
  int shift_x = 0;
  bool flip = false;

  bool operator==(const ImageTransform&) const = default;
};

// Draws one transform. Disabled parts draw nothing from the engine (so turning flips off does
// not change the crops drawn). Precondition: 0 <= options.crop_padding <= kMaxCropPadding.
ImageTransform SampleTransform(const AugmentOptions& options, std::mt19937_64& rng);

// dst = transform(src) for one C x H x W image. `src` and `dst` must not overlap.
// Precondition: src.size() == dst.size() == channels * height * width.
void ApplyTransform(const ImageTransform& transform, int channels, int height, int width,
                    std::span<const uint8_t> src, std::span<uint8_t> dst, uint8_t fill = 0);
void ApplyTransform(const ImageTransform& transform, int channels, int height, int width,
                    std::span<const float> src, std::span<float> dst, float fill = 0.0f);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_AUGMENT_H_
