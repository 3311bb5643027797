// ReLU forward and backward over flat float arrays (any layout: it is element-wise).
//
//   forward:  y = x > 0 ? x : 0        (NaN and -0 map to +0)
//   backward: dx = x > 0 ? dy : 0      (x is the forward input; the forward output works too)
//
// AVX2 and scalar paths give identical bits. Large n is split over ctx.pool. `y` may alias `x`,
// `dx` may alias `dy`. Thread-safe for non-overlapping outputs. Cost: one memory-bound pass.
#ifndef QTRAIN_WORKER_KERNELS_CPU_ACTIVATION_H_
#define QTRAIN_WORKER_KERNELS_CPU_ACTIVATION_H_

#include <cstdint>

#include "worker/kernels/cpu/cpu_context.h"

namespace qtrain::kernels {

void ReluForward(const CpuContext& ctx, int64_t n, const float* x, float* y);
void ReluBackward(const CpuContext& ctx, int64_t n, const float* x, const float* dy, float* dx);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_ACTIVATION_H_
