// Small helpers shared by the quantizers of worker/quant: rounding, chunked deterministic
// reductions over the CpuContext pool, and the Discretize option.
//
// Thread-safety: stateless functions. Cost: one pass over the data per call.
#ifndef QTRAIN_WORKER_QUANT_QUANT_UTIL_H_
#define QTRAIN_WORKER_QUANT_QUANT_UTIL_H_

#include <array>
#include <cstdint>
#include <vector>

#include "worker/kernels/cpu/cpu_context.h"
#include "worker/kernels/cpu/thread_pool.h"

namespace qtrain::quant {

// Whether a quantizer rounds onto its codebook (kOn, always in training) or outputs the
// continuous transform before the rounding step (kOff). kOff exists for finite-difference tests
// of the analytic gradients, which are taken through the rounding by the straight-through rule.
enum class Discretize { kOn, kOff };

// Below this many elements per thread a parallel split is not worth a wake-up.
inline constexpr int64_t kQuantGrain = 1 << 15;

// Nearest integer of v >= 0 (ties away from zero) as a float. Truncating conversion keeps the
// loops vectorizable without SSE4.1. Precondition: 0 <= v < 2^31.
inline float RoundNonNegative(float v) {
  return static_cast<float>(static_cast<int32_t>(v + 0.5f));
}

// Rounds v onto the grid {0, 1/n, ..., 1} (v clamped to [0, 1] by the caller) unless kOff.
inline float RoundUnit(float v, float n, Discretize discretize) {
  return discretize == Discretize::kOn ? RoundNonNegative(v * n) / n : v;
}

// Runs fn(begin, end) over [0, n) split over ctx.pool.
template <class Fn>
void ParallelRange(const kernels::CpuContext& ctx, int64_t n, Fn fn) {
  kernels::ParallelFor(ctx.pool, n, kQuantGrain,
                       [&](int64_t begin, int64_t end) { fn(begin, end); });
}

// K double sums over [0, n): fn(begin, end, std::array<double, K>& partial) adds its chunk's
// contribution to `partial`; partials are combined in chunk order, so the result depends only on
// the thread count, never on timing.
template <size_t K, class Fn>
std::array<double, K> ChunkedSums(const kernels::CpuContext& ctx, int64_t n, Fn fn) {
  const int64_t chunks = kernels::NumChunks(ctx.pool, n, kQuantGrain);
  std::vector<std::array<double, K>> partial(static_cast<size_t>(chunks > 0 ? chunks : 0));
  for (auto& p : partial) p.fill(0.0);
  kernels::ParallelForChunks(ctx.pool, n, kQuantGrain, [&](int64_t c, int64_t begin, int64_t end) {
    fn(begin, end, partial[static_cast<size_t>(c)]);
  });
  std::array<double, K> total;
  total.fill(0.0);
  for (const auto& p : partial) {
    for (size_t k = 0; k < K; ++k) total[k] += p[k];
  }
  return total;
}

// Largest |x_i| (0 for n == 0).
float MaxAbs(const kernels::CpuContext& ctx, int64_t n, const float* x);

// 2^bits - 1, the number of steps of a `bits`-bit uniform grid.
inline float NumSteps(int bits) { return static_cast<float>((1 << bits) - 1); }

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_QUANT_UTIL_H_
