// LaneSum: a vectorized, deterministic float reduction for the quantizer loops. Internal to
// worker/quant: include it from .cc files only, since the pragma needs -fopenmp-simd, which only
// the qtrain_quant target sets.
#ifndef QTRAIN_WORKER_QUANT_LANE_SUM_H_
#define QTRAIN_WORKER_QUANT_LANE_SUM_H_

#include <cstdint>

namespace qtrain::quant {

// Sum of fn(i) (a float) over [begin, end): blocks of kLaneBlock elements are summed in float
// with an OpenMP SIMD reduction (this library builds with -fopenmp-simd; no threads), each block
// total added into a double. A plain float or double accumulator is one serial dependency chain
// the compiler may not reorder. The order depends only on (begin, end) and the build, so the
// result is deterministic.
inline constexpr int64_t kLaneBlock = 1024;
template <class Fn>
double LaneSum(int64_t begin, int64_t end, Fn fn) {
  double total = 0.0;
  for (int64_t block = begin; block < end; block += kLaneBlock) {
    const int64_t block_end = end - block < kLaneBlock ? end : block + kLaneBlock;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = block; i < block_end; ++i) sum += fn(i);
    total += sum;
  }
  return total;
}

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_LANE_SUM_H_
