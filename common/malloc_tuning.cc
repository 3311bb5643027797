#include "common/malloc_tuning.h"

#include <cstdlib>  // defines __GLIBC__ under glibc

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace qtrain {

bool KeepLargeAllocationsInHeap() {
#if defined(__GLIBC__)
  constexpr int kOneGiB = 1 << 30;
  // mallopt caps M_MMAP_THRESHOLD at 32 MiB, so mmap is turned off instead (M_MMAP_MAX = 0: every
  // block comes from the heap) and the heap's top is trimmed only past 1 GiB of free space.
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, kOneGiB) == 1;
#else
  return false;
#endif
}

}  // namespace qtrain
