#include "worker/quant/quant_util.h"

#include <algorithm>
#include <cmath>

namespace qtrain::quant {

float MaxAbs(const kernels::CpuContext& ctx, int64_t n, const float* x) {
  const int64_t chunks = kernels::NumChunks(ctx.pool, n, kQuantGrain);
  std::vector<float> partial(static_cast<size_t>(chunks > 0 ? chunks : 0), 0.0f);
  kernels::ParallelForChunks(ctx.pool, n, kQuantGrain, [&](int64_t c, int64_t begin, int64_t end) {
    float m = 0.0f;
    for (int64_t i = begin; i < end; ++i) m = std::max(m, std::fabs(x[i]));
    partial[static_cast<size_t>(c)] = m;
  });
  float m = 0.0f;
  for (float p : partial) m = std::max(m, p);
  return m;
}

}  // namespace qtrain::quant
