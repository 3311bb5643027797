// KeepLargeAllocationsInHeap: afterwards a 64 MiB block comes from the heap, not from mmap
// (glibc's mallinfo2 counts mmapped blocks in hblkhd), and a freed one is reused.
#include "common/malloc_tuning.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

#include "gtest/gtest.h"

namespace qtrain {
namespace {

TEST(MallocTuningTest, LargeBlocksComeFromTheHeap) {
#if defined(__GLIBC__)
  constexpr size_t kBytes = size_t{64} << 20;
  // Before: glibc maps a block this large.
  const size_t mapped_before = mallinfo2().hblkhd;
  void* mapped = std::malloc(kBytes);
  ASSERT_NE(mapped, nullptr);
  EXPECT_GE(mallinfo2().hblkhd, mapped_before + kBytes);
  std::free(mapped);

  ASSERT_TRUE(KeepLargeAllocationsInHeap());
  const size_t mapped_after = mallinfo2().hblkhd;
  void* a = std::malloc(kBytes);
  ASSERT_NE(a, nullptr);
  std::memset(a, 1, kBytes);
  EXPECT_EQ(mallinfo2().hblkhd, mapped_after);  // not an mmap
  std::free(a);
  void* b = std::malloc(kBytes);
  EXPECT_EQ(a, b);  // the freed block, kept in the heap
  std::free(b);
#else
  GTEST_SKIP() << "not glibc";
#endif
}

}  // namespace
}  // namespace qtrain
