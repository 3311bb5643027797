// What every CPU kernel is told about where it runs: the thread pool to spread work over and the
// SIMD level to use. Passing it explicitly (instead of reading globals) lets tests force the scalar
// path, AVX2, or a thread count, and lets one process run several differently-configured engines.
//
// A CpuContext is a small value; copy it freely. The pool is not owned and must outlive every call
// made with the context. Kernels clamp `simd` to what the machine supports, so asking for a level
// the CPU lacks runs the best supported one instead of crashing.
#ifndef QTRAIN_WORKER_KERNELS_CPU_CPU_CONTEXT_H_
#define QTRAIN_WORKER_KERNELS_CPU_CPU_CONTEXT_H_

#include "worker/kernels/cpu/cpu_features.h"
#include "worker/kernels/cpu/thread_pool.h"

namespace qtrain::kernels {

struct CpuContext {
  // Threads to use; nullptr means run on the calling thread only.
  ThreadPool* pool = nullptr;
  // Highest instruction set the kernels may use; defaults to the best the machine has.
  SimdLevel simd = DetectSimdLevel();

  int num_threads() const { return pool == nullptr ? 1 : pool->num_threads(); }
  SimdLevel effective_simd() const { return EffectiveSimdLevel(simd); }
  // The same SIMD level on the calling thread only: for kernels called from inside a chunk of a
  // parallel loop.
  CpuContext SingleThreaded() const { return CpuContext{nullptr, simd}; }
};

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_CPU_CONTEXT_H_
