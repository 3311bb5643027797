// Host-side helpers shared by the CUDA kernels of this folder (private to it): launch shapes,
// workspace sizes and layouts of the deterministic reductions, and argument checks that turn a
// bad call into INVALID_ARGUMENT before anything is enqueued. Plain C++ (no CUDA headers), so the
// arithmetic here is unit-tested on machines without a GPU.
//
// The reductions (kernel_util.cuh) are deterministic because their shape depends only on the
// problem size, never on the device or on timing:
//   flat:      ReduceBlocks(n) blocks of kReduceThreads threads; thread t of block b visits
//              i = b * T + t + k * (blocks * T) in increasing k, accumulates in its own order,
//              the block combines its threads in a fixed tree and writes one partial; one final
//              block combines the partials in a fixed tree.
//   segmented: `segments` independent reductions of `length` elements each (a channel of a batch
//              norm, an output channel of a weight): SegmentSplit(segments, length) blocks per
//              segment, each a fixed tree; one thread per segment then combines its partials in
//              order.
//
// Thread-safety: pure functions and constants.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_LAUNCH_UTIL_H_
#define QTRAIN_WORKER_KERNELS_CUDA_LAUNCH_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "absl/status/status.h"

namespace qtrain::kernels::cuda {

// Threads per block of every kernel in this folder.
inline constexpr int kThreads = 256;
// Grid-stride element-wise kernels use at most this many blocks: one grid-stride round covers
// kThreads * kElementwiseMaxBlocks = 2^20 elements (about 4 waves of an H200's 132 SMs).
inline constexpr int64_t kElementwiseMaxBlocks = 4096;

// Flat reductions: at most kReduceMaxBlocks partials of at most kMaxReduceAccBytes each, then
// kReduceScalarBytes of scratch for the scalars one kernel hands to the next (e.g. DoReFa's
// correction term). One grid-stride round of a flat reduction is kThreads * kReduceMaxBlocks =
// 65536 elements.
inline constexpr int kReduceMaxBlocks = 256;
inline constexpr size_t kMaxReduceAccBytes = 64;
inline constexpr size_t kReducePartialBytes = kReduceMaxBlocks * kMaxReduceAccBytes;
inline constexpr size_t kReduceScalarBytes = 256;
// The device scratch every flat reduction needs (Sum, Dot, the quantizers' statistics). Must be
// 16-byte aligned (cudaMalloc gives 256). One workspace serves any number of reductions on the
// same stream, one after another; two streams need two.
inline constexpr size_t kReductionWorkspaceBytes = kReducePartialBytes + kReduceScalarBytes;

// Blocks of a flat reduction over n elements: ceil(n / kThreads) clamped to [1, kReduceMaxBlocks].
inline int ReduceBlocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kReduceMaxBlocks ? kReduceMaxBlocks : blocks));
}

// Segmented reductions: blocks per segment. One block per kSegmentElementsPerBlock elements of a
// segment (so long segments spread over many SMs), clamped to [1, kMaxSegmentSplit].
inline constexpr int64_t kSegmentElementsPerBlock = 16 * kThreads;
inline constexpr int kMaxSegmentSplit = 64;
inline int SegmentSplit(int64_t length) {
  const int64_t split = length / kSegmentElementsPerBlock;
  return static_cast<int>(split < 1 ? 1 : (split > kMaxSegmentSplit ? kMaxSegmentSplit : split));
}

inline constexpr size_t AlignUp(size_t bytes, size_t alignment = 16) {
  return (bytes + alignment - 1) / alignment * alignment;
}

// Bytes of partials a segmented reduction with accumulators of acc_bytes needs.
inline size_t SegmentPartialBytes(int64_t segments, int64_t length, size_t acc_bytes) {
  return AlignUp(static_cast<size_t>(segments) * static_cast<size_t>(SegmentSplit(length)) *
                 acc_bytes);
}

// INVALID_ARGUMENT "<what>: <name> must be >= <min>, got <value>" unless value >= min.
absl::Status CheckAtLeast(const char* what, const char* name, int64_t value, int64_t min);
// INVALID_ARGUMENT naming the first null pointer (each given as {name, pointer}).
struct NamedPointer {
  const char* name;
  const void* pointer;
};
absl::Status CheckNotNull(const char* what, std::initializer_list<NamedPointer> pointers);
// INVALID_ARGUMENT unless workspace is non-null and 16-byte aligned.
absl::Status CheckWorkspace(const char* what, const void* workspace);
// INVALID_ARGUMENT unless 1 <= bits <= max_bits (min_bits for QIL weights is 2).
absl::Status CheckBits(const char* what, int bits, int min_bits = 1, int max_bits = 8);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_LAUNCH_UTIL_H_
