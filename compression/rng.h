// Counter-based random numbers for stochastic codecs.
//
// Element i of stream k draws Uniform24(Mix32(i * kGolden + key_k)), where key_k comes from the
// seed and the stream number. Because each element's draw depends only on (seed, stream, i), the
// scalar reference and the SIMD paths of a codec produce the same payload, and the same seed
// gives the same payload. Each Encode call takes one new stream.
//
// Not thread-safe (NextStream mutates); use one Rng per thread. Cost: a few integer ops per draw.
//
// Mix32, Uniform24 and StreamUniform are also device functions when compiled by nvcc, so the CUDA
// codecs (compression/cuda/) draw exactly the numbers the CPU codecs draw; the stream key is
// still taken on the host with Rng::NextStream().
#ifndef QTRAIN_COMPRESSION_RNG_H_
#define QTRAIN_COMPRESSION_RNG_H_

#include <cstdint>

// `__host__ __device__` under nvcc, nothing for the host compiler.
#ifndef QTRAIN_HOST_DEVICE
#ifdef __CUDACC__
#define QTRAIN_HOST_DEVICE __host__ __device__
#else
#define QTRAIN_HOST_DEVICE
#endif
#endif

namespace qtrain::compression {

inline constexpr uint32_t kRngGolden = 0x9E3779B9u;

// "lowbias32" integer hash (C. Wellons): a bijection on 32-bit words with good avalanche.
QTRAIN_HOST_DEVICE inline uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Uniform in [0, 1) with 24 random bits; exact in float.
QTRAIN_HOST_DEVICE inline float Uniform24(uint32_t bits) {
  return static_cast<float>(bits >> 8) * 0x1p-24f;
}

// The draw for element i under a stream key.
QTRAIN_HOST_DEVICE inline float StreamUniform(uint32_t key, uint32_t i) {
  return Uniform24(Mix32(i * kRngGolden + key));
}

class Rng {
 public:
  explicit Rng(uint64_t seed) : seed_(seed) {}

  // A fresh 32-bit stream key (splitmix64 of seed and stream counter).
  uint32_t NextStream() {
    uint64_t z = seed_ + 0x9E3779B97F4A7C15ull * (++stream_);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<uint32_t>(z ^ (z >> 32));
  }
  uint64_t seed() const { return seed_; }
  uint64_t streams_used() const { return stream_; }

 private:
  uint64_t seed_;
  uint64_t stream_ = 0;
};

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_RNG_H_
