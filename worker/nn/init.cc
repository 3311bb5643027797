#include "worker/nn/init.h"

#include <cmath>
#include <numbers>

#include "common/logging.h"

namespace qtrain::nn {
namespace {

// Uniform in (0, 1]: 53 random bits, never 0 so the logarithm below is finite.
double UniformOpenClosed(std::mt19937_64& rng) {
  return (static_cast<double>(rng() >> 11) + 1.0) * (1.0 / 9007199254740992.0);
}

}  // namespace

double StandardNormal(std::mt19937_64& rng) {
  // Box-Muller; the second sample of each pair is dropped to keep the draw count per sample fixed.
  const double u1 = UniformOpenClosed(rng);
  const double u2 = UniformOpenClosed(rng);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

void KaimingNormal(int64_t fan_in, std::mt19937_64& rng, Tensor* t) {
  QTRAIN_CHECK(fan_in >= 1) << "fan_in=" << fan_in;
  const double stddev = std::sqrt(2.0 / static_cast<double>(fan_in));
  for (int64_t i = 0; i < t->size(); ++i) {
    (*t)[i] = static_cast<float>(stddev * StandardNormal(rng));
  }
}

void UniformFanIn(int64_t fan_in, std::mt19937_64& rng, Tensor* t) {
  QTRAIN_CHECK(fan_in >= 1) << "fan_in=" << fan_in;
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  for (int64_t i = 0; i < t->size(); ++i) {
    // 53 random bits -> [0, 1), fixed by mt19937_64's standardized output.
    const double u = static_cast<double>(rng() >> 11) * 0x1p-53;
    (*t)[i] = static_cast<float>((2 * u - 1) * bound);
  }
}

}  // namespace qtrain::nn
