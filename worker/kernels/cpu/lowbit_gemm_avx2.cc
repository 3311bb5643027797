// The AVX2 low-bit GEMM tiles (see lowbit_gemm.h for the layouts). Compiled with per-function
// target attributes, so this file builds for the baseline ISA and the kernels run only when
// DetectSimdLevel() >= kAvx2.
//
// Popcount: an 8 (w rows) x 4 (a rows) tile. One k-word of a block of 8 w rows is two ymm; each
// a row's word is broadcast against them, ANDed, and popcounted per byte with the nibble table
// (VPSHUFB). Byte counts (<= 8 per step) add up in 8-bit lanes for at most 31 steps, then VPSADBW
// folds each 8-byte word into its 64-bit lane: lane r holds the count of w row r.
//
// Integer: a 16 x 2 tile. One k-group of a 16-row block is 64 bytes = 4 rows x 4 codes per 16
// bytes; each 16 bytes are widened to 16-bit (VPMOVZXBW) and multiplied against the a row's 4
// codes, widened and repeated, with VPMADDWD: 32-bit lane 2r + h gets the sum over k-pair h of
// row r. Pair sums are at most 2 * 255 * 255, so nothing saturates; the two halves are added at
// the end.
#include <immintrin.h>

#include <cstring>

#include "worker/kernels/cpu/lowbit_gemm_kernels.h"

namespace qtrain::kernels::lowbit_internal {
namespace {

#define QTRAIN_AVX2 __attribute__((target("avx2")))

constexpr int kPopTileN = 4;
constexpr int kMaxByteSteps = 31;  // 31 * 8 = 248 fits a byte lane
constexpr int kIntTileN = 2;

// Stores the first `count` (<= 8) int32 lanes of v to dst.
QTRAIN_AVX2 inline void StoreFirst(int32_t* dst, __m256i v, int count) {
  if (count == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
    return;
  }
  const __m256i mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_maskstore_epi32(dst, mask, v);
}

// Per-byte popcount of x.
QTRAIN_AVX2 inline __m256i PopcountBytes(__m256i x, __m256i table, __m256i low_nibbles) {
  const __m256i lo = _mm256_and_si256(x, low_nibbles);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low_nibbles);
  return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
}

QTRAIN_AVX2 void PopcountTile(const TileArgs& t, int64_t m0, int m_count, int64_t n0, int n_count) {
  const PackedCodes& w = *t.w;
  const PackedCodes& a = *t.a;
  const int64_t words = w.plane_words();
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2,
                                         1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();

  __m256i total[kPopTileN][2];
  for (auto& row : total) row[0] = row[1] = zero;
  for (int i = 0; i < w.bits; ++i) {
    const uint64_t* wp = PlaneRow(w, m0, i);
    for (int j = 0; j < a.bits; ++j) {
      const uint64_t* ap[kPopTileN];
      for (int r = 0; r < kPopTileN; ++r) ap[r] = PlaneRow(a, ClampedRow(n0, r, n_count), j);
      __m256i acc[kPopTileN][2];
      for (auto& row : acc) row[0] = row[1] = zero;
      for (int64_t g0 = 0; g0 < words; g0 += kMaxByteSteps) {
        const int64_t g1 = std::min<int64_t>(words, g0 + kMaxByteSteps);
        __m256i acc8[kPopTileN][2];
        for (auto& row : acc8) row[0] = row[1] = zero;
        for (int64_t g = g0; g < g1; ++g) {
          const uint64_t* wg = wp + g * kPlaneRowBlock;
          const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg));
          const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 4));
#pragma GCC unroll 4
          for (int r = 0; r < kPopTileN; ++r) {
            const __m256i ar = _mm256_set1_epi64x(static_cast<int64_t>(ap[r][g * kPlaneRowBlock]));
            acc8[r][0] = _mm256_add_epi8(
                acc8[r][0], PopcountBytes(_mm256_and_si256(w0, ar), table, low_nibbles));
            acc8[r][1] = _mm256_add_epi8(
                acc8[r][1], PopcountBytes(_mm256_and_si256(w1, ar), table, low_nibbles));
          }
        }
        for (int r = 0; r < kPopTileN; ++r) {
          acc[r][0] = _mm256_add_epi64(acc[r][0], _mm256_sad_epu8(acc8[r][0], zero));
          acc[r][1] = _mm256_add_epi64(acc[r][1], _mm256_sad_epu8(acc8[r][1], zero));
        }
      }
      for (int r = 0; r < kPopTileN; ++r) {
        total[r][0] = _mm256_add_epi64(total[r][0], _mm256_slli_epi64(acc[r][0], i + j));
        total[r][1] = _mm256_add_epi64(total[r][1], _mm256_slli_epi64(acc[r][1], i + j));
      }
    }
  }
  // Totals fit int32 (LowbitMaxDepth): keep the low half of each 64-bit lane, rows 0..7 in order.
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  for (int r = 0; r < n_count; ++r) {
    const __m256i lo = _mm256_permutevar8x32_epi32(total[r][0], low_halves);
    const __m256i hi = _mm256_permutevar8x32_epi32(total[r][1], low_halves);
    StoreFirst(t.d + (n0 + r) * w.rows + m0, _mm256_permute2x128_si256(lo, hi, 0x20), m_count);
  }
}

QTRAIN_AVX2 void IntegerTile(const TileArgs& t, int64_t m0, int m_count, int64_t n0, int n_count) {
  const PackedCodes& w = *t.w;
  const PackedCodes& a = *t.a;
  const int64_t groups = w.padded_cols() / kByteGroup;
  const uint8_t* wp = ByteRow(w, m0);
  const uint8_t* ap[kIntTileN];
  for (int r = 0; r < kIntTileN; ++r) ap[r] = ByteRow(a, ClampedRow(n0, r, n_count));

  __m256i acc[kIntTileN][4];
  for (auto& row : acc) {
    for (__m256i& v : row) v = _mm256_setzero_si256();
  }
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* wg = wp + g * kByteGroupStride;
    __m256i wv[4];
    for (int q = 0; q < 4; ++q) {
      wv[q] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16 * q)));
    }
#pragma GCC unroll 2
    for (int r = 0; r < kIntTileN; ++r) {
      int32_t codes;
      std::memcpy(&codes, ap[r] + g * kByteGroupStride, sizeof(codes));
      const __m256i av = _mm256_cvtepu8_epi16(_mm_set1_epi32(codes));
      for (int q = 0; q < 4; ++q) {
        acc[r][q] = _mm256_add_epi32(acc[r][q], _mm256_madd_epi16(wv[q], av));
      }
    }
  }
  for (int r = 0; r < n_count; ++r) {
    int32_t* dst = t.d + (n0 + r) * w.rows + m0;
    // hadd of the lanes of rows 0..3 and 4..7 gives rows {0,1,4,5 | 2,3,6,7}; reorder the pairs.
    for (int half = 0; half < 2; ++half) {
      const int count = m_count - 8 * half;
      if (count <= 0) break;
      const __m256i sums = _mm256_hadd_epi32(acc[r][2 * half], acc[r][2 * half + 1]);
      StoreFirst(dst + 8 * half, _mm256_permute4x64_epi64(sums, _MM_SHUFFLE(3, 1, 2, 0)),
                 std::min(count, 8));
    }
  }
}

#undef QTRAIN_AVX2

}  // namespace

TileKernel Avx2PopcountKernel() { return TileKernel{kPlaneRowBlock, kPopTileN, &PopcountTile}; }

TileKernel Avx2IntegerKernel() { return TileKernel{kByteRowBlock, kIntTileN, &IntegerTile}; }

}  // namespace qtrain::kernels::lowbit_internal
