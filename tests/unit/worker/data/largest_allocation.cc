#include "tests/unit/worker/data/largest_allocation.h"

#include <atomic>
#include <cstdlib>
#include <new>  // the declarations being replaced

namespace qtrain::data::test_util {
namespace {
std::atomic<size_t> g_largest{0};
}  // namespace

void ResetLargestAllocation() { g_largest.store(0); }
size_t LargestAllocation() { return g_largest.load(); }

}  // namespace qtrain::data::test_util

// Replacements of the global allocation functions; the array, nothrow and sized forms of the
// standard library forward to these.
void* operator new(std::size_t n) {
  std::size_t prev = qtrain::data::test_util::g_largest.load(std::memory_order_relaxed);
  while (n > prev && !qtrain::data::test_util::g_largest.compare_exchange_weak(prev, n)) {
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  std::abort();  // the project builds without exceptions in mind; a test OOM ends the run
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
