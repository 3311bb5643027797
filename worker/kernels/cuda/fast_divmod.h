// Division by a run-time constant with a multiply and a shift, for the index arithmetic of the
// CUDA convolution kernels (an integer division is ~20 instructions on the GPU; this is 4).
//
// For a divisor d >= 1 let l = ceil(log2 d) and mul = floor(2^32 * (2^l - d) / d) + 1
// (Granlund & Montgomery, "Division by invariant integers using multiplication", PLDI 1994,
// fig. 4.1). Then for every 0 <= n < 2^31:
//   n / d == (umulhi(n, mul) + n) >> l
// (umulhi(n, mul) <= n, so the sum fits in 32 bits). Larger or negative n give wrong quotients:
// callers keep every dividend in [0, 2^31), which the host code checks for each shape.
//
// Usable from host and device code (the host path is what the unit tests exercise; the device
// path differs only in computing the high word with __umulhi). A FastDivmod is a small value,
// passed to kernels by value.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_FAST_DIVMOD_H_
#define QTRAIN_WORKER_KERNELS_CUDA_FAST_DIVMOD_H_

#include <cstdint>

#if defined(__CUDACC__)
#define QTRAIN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QTRAIN_HOST_DEVICE inline
#endif

namespace qtrain::kernels::cuda {

struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 1;  // d = 1: l = 0, mul = 1, umulhi(n, 1) = 0, so n / 1 = n
  uint32_t shift = 0;

  // Host only. Precondition: 1 <= d < 2^31 (callers validate shapes first).
  static FastDivmod Make(int64_t d) {
    FastDivmod f;
    f.divisor = static_cast<uint32_t>(d);
    uint32_t l = 0;
    while ((uint64_t{1} << l) < static_cast<uint64_t>(d)) ++l;
    f.shift = l;
    f.multiplier = static_cast<uint32_t>(
        ((uint64_t{1} << 32) * ((uint64_t{1} << l) - static_cast<uint64_t>(d))) /
            static_cast<uint64_t>(d) +
        1);
    return f;
  }

  // n / divisor, for 0 <= n < 2^31.
  QTRAIN_HOST_DEVICE int Div(int n) const {
    const uint32_t un = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(un, multiplier);
#else
    const uint32_t hi =
        static_cast<uint32_t>((static_cast<uint64_t>(un) * multiplier) >> 32);
#endif
    return static_cast<int>((hi + un) >> shift);
  }

  // Returns n / divisor and stores n % divisor in *remainder, for 0 <= n < 2^31.
  QTRAIN_HOST_DEVICE int DivMod(int n, int* remainder) const {
    const int q = Div(n);
    *remainder = n - q * static_cast<int>(divisor);
    return q;
  }
};

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_FAST_DIVMOD_H_
