#include "worker/kernels/cpu/cpu_features.h"

namespace qtrain::kernels {
namespace {

SimdLevel DetectOnce() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // libgcc's cpuid probe also checks XCR0, so these are false when the OS does not save the
  // YMM/ZMM state.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f")) return SimdLevel::kAvx512;
  if (avx2) return SimdLevel::kAvx2;
#endif
  return SimdLevel::kScalar;
}

Avx512Extensions DetectExtensionsOnce() {
  Avx512Extensions ext;
#if defined(__x86_64__) || defined(__i386__)
  if (DetectSimdLevel() != SimdLevel::kAvx512) return ext;
  ext.vnni = __builtin_cpu_supports("avx512vnni");
  ext.vpopcntdq = __builtin_cpu_supports("avx512vpopcntdq");
#endif
  return ext;
}

}  // namespace

SimdLevel DetectSimdLevel() {
  static const SimdLevel kDetected = DetectOnce();  // thread-safe static initialisation
  return kDetected;
}

Avx512Extensions DetectAvx512Extensions() {
  static const Avx512Extensions kDetected = DetectExtensionsOnce();
  return kDetected;
}

SimdLevel EffectiveSimdLevel(SimdLevel requested) {
  const SimdLevel detected = DetectSimdLevel();
  return static_cast<int>(requested) < static_cast<int>(detected) ? requested : detected;
}

bool SimdLevelSupported(SimdLevel level) {
  return static_cast<int>(level) <= static_cast<int>(DetectSimdLevel());
}

const char* SimdLevelName(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar:
      return "scalar";
    case SimdLevel::kAvx2:
      return "avx2";
    case SimdLevel::kAvx512:
      return "avx512";
  }
  return "unknown";
}

}  // namespace qtrain::kernels
