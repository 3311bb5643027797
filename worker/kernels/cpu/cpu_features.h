// Run-time detection of the SIMD instruction sets the CPU kernels may use.
//
// The library is compiled for the baseline x86-64 ISA; AVX2 and AVX-512 code lives in functions
// marked __attribute__((target(...))) and runs only when DetectSimdLevel() says the CPU (and the
// OS, which must save the wider registers) supports it.
//
// Thread-safe. DetectSimdLevel() costs a few cpuid reads on first call and a load afterwards.
#ifndef QTRAIN_WORKER_KERNELS_CPU_CPU_FEATURES_H_
#define QTRAIN_WORKER_KERNELS_CPU_CPU_FEATURES_H_

namespace qtrain::kernels {

// Ordered: a higher level implies every lower one is available.
enum class SimdLevel {
  kScalar = 0,  // portable C++ (the compiler may still use SSE2)
  kAvx2 = 1,    // AVX2 + FMA
  kAvx512 = 2,  // AVX-512F (plus AVX2 + FMA)
};

// The best level this machine supports.
SimdLevel DetectSimdLevel();

// The level a kernel actually runs at: min(requested, DetectSimdLevel()). Lets callers (tests)
// ask for a lower level, and makes asking for an unsupported one safe rather than a SIGILL.
SimdLevel EffectiveSimdLevel(SimdLevel requested);

// AVX-512 extensions beyond the AVX-512F that kAvx512 guarantees, for kernels with a faster path
// when they are present (and a fallback when not). All false when DetectSimdLevel() < kAvx512.
struct Avx512Extensions {
  bool vnni = false;       // AVX512_VNNI: VPDPBUSD / VPDPWSSD
  bool vpopcntdq = false;  // AVX512_VPOPCNTDQ: VPOPCNTD / VPOPCNTQ
};
Avx512Extensions DetectAvx512Extensions();

// True when `level` can run on this machine.
bool SimdLevelSupported(SimdLevel level);

// "scalar", "avx2" or "avx512".
const char* SimdLevelName(SimdLevel level);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_CPU_FEATURES_H_
