// Large buffers stay in the process heap instead of being mapped and unmapped on every
// allocation. glibc serves blocks above its mmap threshold (at most 32 MiB with the dynamic
// threshold) with mmap and returns them with munmap, so a gradient payload or receive buffer of
// that size allocated each step pays a page fault per 4 KiB page each time: measured on this
// project's 2-core VM, an fp16 encode-with-feedback of 25.6M floats took 258 ms that way against
// 7 ms with the buffers recycled from the heap (codec_bench), and the fp16 step of the scaling
// benchmark was slower than fp32. The binaries that move large buffers every step (qtrain,
// qserver, the benchmarks) call KeepLargeAllocationsInHeap() first thing in main.
//
// Cost: the heap keeps its peak size (memory is not returned to the system while the process
// runs), which is what a training process wants. No effect outside glibc.
#ifndef QTRAIN_COMMON_MALLOC_TUNING_H_
#define QTRAIN_COMMON_MALLOC_TUNING_H_

namespace qtrain {

// Turns off glibc's use of mmap for large blocks and raises its trim threshold to 1 GiB
// (mallopt; the mmap threshold itself cannot go above 32 MiB). Returns false when the C library
// refused (or is not glibc).
bool KeepLargeAllocationsInHeap();

}  // namespace qtrain

#endif  // QTRAIN_COMMON_MALLOC_TUNING_H_
