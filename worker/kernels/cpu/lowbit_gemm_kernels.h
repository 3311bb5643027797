// Internal to lowbit_gemm.cc: the tile-kernel interface, the layout geometry the kernels share,
// and the per-ISA kernels (defined in lowbit_gemm_avx2.cc / lowbit_gemm_avx512.cc, compiled with
// target attributes; callable only when the CPU has the ISA).
//
// A tile kernel computes D[n, m] for n in [n0, n0 + n_count) and m in [m0, m0 + m_count), where
// m0 is a multiple of tile_m (itself a multiple of the layout's row block), 1 <= m_count <= tile_m
// and 1 <= n_count <= tile_n, over the full depth K >= 1. Rows of a tile past m_count / n_count
// are computed from clamped (repeated) row pointers and not stored, so kernels never read past
// the packed storage and never write outside the tile.
#ifndef QTRAIN_WORKER_KERNELS_CPU_LOWBIT_GEMM_KERNELS_H_
#define QTRAIN_WORKER_KERNELS_CPU_LOWBIT_GEMM_KERNELS_H_

#include <algorithm>
#include <cstdint>

#include "worker/kernels/cpu/lowbit_gemm.h"

namespace qtrain::kernels::lowbit_internal {

// Rows per block of the two layouts, and k per 4-byte group of kBytes (lowbit_gemm.h).
inline constexpr int kPlaneRowBlock = 8;
inline constexpr int kByteRowBlock = 16;
inline constexpr int kByteGroup = 4;
inline constexpr int kByteGroupStride = kByteRowBlock * kByteGroup;  // bytes per k-group of a block

// kBitPlanes: word 0 of plane `plane` of row r; word g is at [g * kPlaneRowBlock].
inline const uint64_t* PlaneRow(const PackedCodes& p, int64_t r, int plane) {
  return p.storage.data() +
         ((r / kPlaneRowBlock) * p.bits + plane) * p.plane_words() * kPlaneRowBlock +
         r % kPlaneRowBlock;
}

// kBytes: codes k..k+3 of row r (k % 4 == 0) are the 4 bytes at [(k / 4) * kByteGroupStride].
inline const uint8_t* ByteRow(const PackedCodes& p, int64_t r) {
  return p.bytes() + (r / kByteRowBlock) * kByteRowBlock * p.padded_cols() +
         (r % kByteRowBlock) * kByteGroup;
}

// Row `first + i` of a tile, repeated from the last valid row when i >= count. Kernels that load
// whole blocks round it down to its block's first row.
inline int64_t ClampedRow(int64_t first, int i, int count) {
  return first + std::min(i, count - 1);
}

struct TileArgs {
  const PackedCodes* w;   // [M, K]
  const PackedCodes* a;   // [N, K], same layout as w
  const int32_t* a_sums;  // S[n]; read only by kernels with needs_a_sums
  int32_t* d;             // [N, M] row-major
};

using TileFn = void (*)(const TileArgs& args, int64_t m0, int m_count, int64_t n0, int n_count);

struct TileKernel {
  int tile_m;
  int tile_n;
  TileFn fn;
  bool needs_a_sums = false;
};

TileKernel Avx2PopcountKernel();
TileKernel Avx2IntegerKernel();
// Need DetectAvx512Extensions().vpopcntdq / .vnni respectively.
TileKernel Avx512PopcountKernel();
TileKernel Avx512VnniKernel(int wbits);

}  // namespace qtrain::kernels::lowbit_internal

#endif  // QTRAIN_WORKER_KERNELS_CPU_LOWBIT_GEMM_KERNELS_H_
