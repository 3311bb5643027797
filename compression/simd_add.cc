#include "compression/simd_add.h"

#include <immintrin.h>

#include <cstring>

namespace qtrain::compression {
namespace {

__attribute__((target("avx2"))) void AddAvx2(const uint8_t* src, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 a = _mm256_loadu_ps(reinterpret_cast<const float*>(src + 4 * i));
    _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), a));
  }
  for (; i < n; ++i) {
    float v;
    std::memcpy(&v, src + 4 * i, 4);
    out[i] += v;
  }
}

}  // namespace

void AddLittleEndianFloats(const uint8_t* src, std::span<float> out, bool fast) {
  if (fast) {
    AddAvx2(src, out.data(), out.size());
    return;
  }
  for (size_t i = 0; i < out.size(); ++i) {
    float v;
    std::memcpy(&v, src + 4 * i, 4);  // x86-64 is little-endian, as the format is
    out[i] += v;
  }
}

}  // namespace qtrain::compression
