// The AVX-512 low-bit GEMM tiles (see lowbit_gemm.h for the layouts). Compiled with per-function
// target attributes, so this file builds for the baseline ISA; each kernel runs only when
// DetectAvx512Extensions() reports its extension.
//
// Popcount (AVX512_VPOPCNTDQ): a 16 (w rows) x 8 (a rows) tile in 16 zmm accumulators. One k-word
// of a block of 8 w rows is one zmm; each a row's word is broadcast against the two blocks, ANDed
// and VPOPCNTQ'd, so 64-bit lane r counts w row r. Plane pairs (i, j) run one after another and
// are added shifted by i + j.
//
// Integer (AVX512_VNNI): a 32 x 12 tile in 24 zmm accumulators. One k-group of a 16-row block is
// one zmm (16 rows x 4 codes); each a row's 4 codes are broadcast and VPDPBUSD adds the 4 products
// u8(a) * s8(w) into 32-bit lane r. Weight codes of up to 7 bits are valid s8 as they are; 8-bit
// codes are shifted to code - 128 (XOR 0x80) and the kernel adds 128 * S[n] back. Partial sums
// stay within +-K*255*128 and the result within int32 (LowbitMaxDepth), so nothing overflows.
#include <immintrin.h>

#include <cstring>

#include "worker/kernels/cpu/lowbit_gemm_kernels.h"

namespace qtrain::kernels::lowbit_internal {
namespace {

#define QTRAIN_AVX512_POPCNT __attribute__((target("avx512f,avx512vpopcntdq")))
#define QTRAIN_AVX512_VNNI __attribute__((target("avx512f,avx512vnni")))

constexpr int kPopBlocks = 2;
constexpr int kPopTileN = 8;
constexpr int kVnniBlocks = 2;
constexpr int kVnniTileN = 12;

QTRAIN_AVX512_POPCNT void PopcountTile(const TileArgs& t, int64_t m0, int m_count, int64_t n0,
                                       int n_count) {
  const PackedCodes& w = *t.w;
  const PackedCodes& a = *t.a;
  const int64_t words = w.plane_words();
  __m512i total[kPopTileN][kPopBlocks];
  for (auto& row : total) {
    for (__m512i& v : row) v = _mm512_setzero_si512();
  }
  for (int i = 0; i < w.bits; ++i) {
    const uint64_t* wp[kPopBlocks];
    for (int b = 0; b < kPopBlocks; ++b) {
      const int64_t row = ClampedRow(m0, b * kPlaneRowBlock, m_count);
      wp[b] = PlaneRow(w, row - row % kPlaneRowBlock, i);
    }
    for (int j = 0; j < a.bits; ++j) {
      const uint64_t* ap[kPopTileN];
      for (int r = 0; r < kPopTileN; ++r) ap[r] = PlaneRow(a, ClampedRow(n0, r, n_count), j);
      __m512i acc[kPopTileN][kPopBlocks];
      for (auto& row : acc) {
        for (__m512i& v : row) v = _mm512_setzero_si512();
      }
      for (int64_t g = 0; g < words; ++g) {
        __m512i wv[kPopBlocks];
        for (int b = 0; b < kPopBlocks; ++b) wv[b] = _mm512_loadu_si512(wp[b] + g * kPlaneRowBlock);
#pragma GCC unroll 8
        for (int r = 0; r < kPopTileN; ++r) {
          const __m512i ar = _mm512_set1_epi64(static_cast<int64_t>(ap[r][g * kPlaneRowBlock]));
          for (int b = 0; b < kPopBlocks; ++b) {
            acc[r][b] =
                _mm512_add_epi64(acc[r][b], _mm512_popcnt_epi64(_mm512_and_si512(wv[b], ar)));
          }
        }
      }
      // The zero-masked form with an all-ones mask is a plain shift; GCC 12 falsely warns that the
      // unmasked _mm512_sll_epi64 reads an uninitialised register (GCC bug 105593).
      const __m128i shift = _mm_cvtsi32_si128(i + j);
      constexpr __mmask8 kAllLanes = 0xff;
      for (int r = 0; r < kPopTileN; ++r) {
        for (int b = 0; b < kPopBlocks; ++b) {
          total[r][b] =
              _mm512_add_epi64(total[r][b], _mm512_maskz_sll_epi64(kAllLanes, acc[r][b], shift));
        }
      }
    }
  }
  // Totals fit int32 (LowbitMaxDepth): VPMOVQD stores the low halves, masked to the tile.
  for (int r = 0; r < n_count; ++r) {
    int32_t* dst = t.d + (n0 + r) * w.rows + m0;
    for (int b = 0; b < kPopBlocks; ++b) {
      const int count = std::min(m_count - b * kPlaneRowBlock, kPlaneRowBlock);
      if (count <= 0) break;
      _mm512_mask_cvtepi64_storeu_epi32(dst + b * kPlaneRowBlock,
                                        static_cast<__mmask8>((1u << count) - 1), total[r][b]);
    }
  }
}

template <bool kOffsetW>
QTRAIN_AVX512_VNNI void VnniTile(const TileArgs& t, int64_t m0, int m_count, int64_t n0,
                                 int n_count) {
  const PackedCodes& w = *t.w;
  const PackedCodes& a = *t.a;
  const int64_t groups = w.padded_cols() / kByteGroup;
  const uint8_t* wp[kVnniBlocks];
  for (int b = 0; b < kVnniBlocks; ++b) {
    const int64_t row = ClampedRow(m0, b * kByteRowBlock, m_count);
    wp[b] = ByteRow(w, row - row % kByteRowBlock);
  }
  const uint8_t* ap[kVnniTileN];
  for (int r = 0; r < kVnniTileN; ++r) ap[r] = ByteRow(a, ClampedRow(n0, r, n_count));

  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[kVnniTileN][kVnniBlocks];
  for (auto& row : acc) {
    for (__m512i& v : row) v = _mm512_setzero_si512();
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512i wv[kVnniBlocks];
    for (int b = 0; b < kVnniBlocks; ++b) {
      wv[b] = _mm512_loadu_si512(wp[b] + g * kByteGroupStride);
      if constexpr (kOffsetW) wv[b] = _mm512_xor_si512(wv[b], offset);
    }
#pragma GCC unroll 12
    for (int r = 0; r < kVnniTileN; ++r) {
      int32_t codes;
      std::memcpy(&codes, ap[r] + g * kByteGroupStride, sizeof(codes));
      const __m512i av = _mm512_set1_epi32(codes);
      for (int b = 0; b < kVnniBlocks; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], av, wv[b]);
    }
  }
  for (int r = 0; r < n_count; ++r) {
    int32_t* dst = t.d + (n0 + r) * w.rows + m0;
    const __m512i correction =
        kOffsetW ? _mm512_set1_epi32(128 * t.a_sums[n0 + r]) : _mm512_setzero_si512();
    for (int b = 0; b < kVnniBlocks; ++b) {
      const int count = std::min(m_count - b * kByteRowBlock, kByteRowBlock);
      if (count <= 0) break;
      _mm512_mask_storeu_epi32(dst + b * kByteRowBlock, static_cast<__mmask16>((1u << count) - 1),
                               _mm512_add_epi32(acc[r][b], correction));
    }
  }
}

#undef QTRAIN_AVX512_POPCNT
#undef QTRAIN_AVX512_VNNI

}  // namespace

TileKernel Avx512PopcountKernel() {
  return TileKernel{kPopBlocks * kPlaneRowBlock, kPopTileN, &PopcountTile};
}

TileKernel Avx512VnniKernel(int wbits) {
  if (wbits == 8) return TileKernel{kVnniBlocks * kByteRowBlock, kVnniTileN, &VnniTile<true>, true};
  return TileKernel{kVnniBlocks * kByteRowBlock, kVnniTileN, &VnniTile<false>};
}

}  // namespace qtrain::kernels::lowbit_internal
