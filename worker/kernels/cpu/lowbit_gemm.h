// Exact integer GEMM on low-bit codes, for inference with exported quantized models.
//
// An exported layer stores each weight as an unsigned code of `wbits` bits (1..8) with a
// per-output-row affine map w = wscale[m] * code + wzero[m], and each activation entering it as an
// unsigned code of `abits` bits (1..8) with one scale, a = ascale * code (activations are >= 0).
// With D[n,m] = sum_k wcode[m,k] * acode[n,k] and S[n] = sum_k acode[n,k] (both exact integers):
//
//   y[n,m] = ascale * (wscale[m] * D[n,m] + wzero[m] * S[n]) + bias[m]
//
// (binary +-alpha is code {0,1} with wscale = 2 alpha, wzero = -alpha; ternary {-a,0,a} is code
// {0,1,2} with wscale = a, wzero = -a.)
//
// Codes are packed once (PackCodes) into one of two layouts; both group rows in blocks so that one
// SIMD vector holds the same k-slice of consecutive rows, and the GEMM broadcasts the other
// operand's k-slice against it (no horizontal sums, output rows stored contiguously).
//
//   kBitPlanes (bits <= 2): code bit i of all codes of a row forms plane i, a bitset over cols in
//     W = ceil(cols / 64) little-endian uint64 words (bit k % 64 of word k / 64; padding bits 0).
//     Rows are grouped in blocks of 8; word g of plane i of row r is storage word
//       ((r / 8) * bits + i) * W * 8 + g * 8 + r % 8.
//     D = sum_{i < wbits, j < abits} 2^(i+j) sum_g popcount(wplane_i[g] & aplane_j[g]).
//   kBytes (any bits): one byte per code; rows grouped in blocks of 16 and cols padded to
//     Kp = roundup(cols, 4) (zeros); code (r, k) is storage byte
//       (r / 16) * 16 * Kp + (k / 4) * 64 + (r % 16) * 4 + k % 4,
//     so a 64-byte vector holds 4 consecutive k of 16 rows (the VPDPBUSD operand shape).
//   Rows past `rows` in the last block are zero. Storage is little-endian host memory (no file
//   format: a model file stores the plain codes and packs them at load time).
//
// LowbitGemm uses a popcount kernel when both operands are kBitPlanes and an integer kernel when
// both are kBytes; a mixed pair is run on the integer kernel after converting the kBitPlanes
// operand to kBytes (rows*cols extra work and memory per call: pack such an operand with kBytes up
// front when it is reused). Kernels, chosen at run time from cpu.simd:
//   popcount: scalar std::popcount; AVX2 nibble-table VPSHUFB + VPSADBW, 8 rows x 4 rows per tile;
//             AVX-512 VPOPCNTQ (needs AVX512_VPOPCNTDQ, else the AVX2 kernel), 16 x 8 per tile.
//   integer:  scalar; AVX2 VPMADDWD on codes widened to 16 bits (pair sums <= 2*255*255 cannot
//             saturate), 16 x 2 per tile; AVX-512 VPDPBUSD (needs AVX512_VNNI, else the AVX2
//             kernel), 32 x 12 per tile. VPDPBUSD multiplies u8 by s8: 8-bit weight codes do not
//             fit s8, so they enter as code - 128 and 128 * S[n] is added back.
// With a pool, D is split into slabs of rows of n (or of m when M > N), one per thread.
//
// Results are exact, hence identical for every SIMD level and thread count. Thread-safe: calls
// may run concurrently when their outputs do not overlap. Cost: M*N*K multiply-adds (popcount
// path: wbits*abits*M*N*ceil(K/64) word AND+popcounts), plus M*K or N*K for mixed layouts.
#ifndef QTRAIN_WORKER_KERNELS_CPU_LOWBIT_GEMM_H_
#define QTRAIN_WORKER_KERNELS_CPU_LOWBIT_GEMM_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "worker/kernels/cpu/cpu_context.h"

namespace qtrain::kernels {

enum class CodeLayout {
  kBitPlanes,  // bits <= 2: one bitset per code bit, for the popcount GEMM
  kBytes,      // any bits: one byte per code, for the integer GEMM
};

// kBitPlanes for bits <= 2, kBytes otherwise.
CodeLayout DefaultCodeLayout(int bits);

// Largest rows and cols PackCodes accepts, and the largest code count (bounds memory to 64 GiB).
inline constexpr int64_t kMaxPackedDim = int64_t{1} << 31;
inline constexpr int64_t kMaxPackedCodes = int64_t{1} << 36;

// A [rows, cols] matrix of `bits`-bit codes in one of the layouts above. Built by PackCodes;
// fields are public for reading, and a hand-built value must keep storage.size() ==
// PackedStorageWords(layout, bits, rows, cols) (the GEMM checks it).
struct PackedCodes {
  int bits = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  CodeLayout layout = CodeLayout::kBytes;
  std::vector<uint64_t> storage;

  // kBitPlanes: words per plane of a row, ceil(cols / 64).
  int64_t plane_words() const { return (cols + 63) / 64; }
  // kBytes: bytes per row, cols rounded up to 4.
  int64_t padded_cols() const { return (cols + 3) / 4 * 4; }
  const uint8_t* bytes() const { return reinterpret_cast<const uint8_t*>(storage.data()); }
};

// The uint64 words a layout needs for a [rows, cols] matrix of `bits`-bit codes.
int64_t PackedStorageWords(CodeLayout layout, int bits, int64_t rows, int64_t cols);

// Packs row-major codes[rows * cols] (each < 2^bits) into *out, replacing its contents.
// INVALID_ARGUMENT (and *out untouched) when bits is outside 1..8, kBitPlanes is asked for with
// bits > 2, rows or cols is negative or above kMaxPackedDim, rows * cols > kMaxPackedCodes, or a
// code is >= 2^bits. codes may be null when rows * cols == 0. Cost: one pass over the codes.
absl::Status PackCodes(int bits, int64_t rows, int64_t cols, const uint8_t* codes,
                       CodeLayout layout, PackedCodes* out);
// The same with DefaultCodeLayout(bits).
absl::Status PackCodes(int bits, int64_t rows, int64_t cols, const uint8_t* codes,
                       PackedCodes* out);

// Writes the codes back row-major into codes[rows * cols].
void UnpackCodes(const PackedCodes& packed, uint8_t* codes);

// The largest K for which every D of a (wbits, abits) GEMM fits in int32:
// floor((2^31 - 1) / ((2^wbits - 1) * (2^abits - 1))), e.g. 33025 for 8 x 8 bits.
int64_t LowbitMaxDepth(int wbits, int abits);

// D[n * M + m] = sum_k wcode[m,k] * acode[n,k] for w = [M, K] and a = [N, K], d = [N, M].
// Preconditions (checked; programmer errors abort): w.cols == a.cols <= LowbitMaxDepth(w.bits,
// a.bits); both operands consistent (see PackedCodes); d non-null when M * N > 0.
void LowbitGemm(const CpuContext& cpu, const PackedCodes& w, const PackedCodes& a, int32_t* d);

// s[r] = sum_k code[r,k] for r < rows. Precondition: cols * (2^bits - 1) < 2^31.
void LowbitRowSums(const PackedCodes& codes, int32_t* s);

// The affine map of one exported layer; see the top of this file.
struct LowbitLinearParams {
  const float* wscale = nullptr;  // [M]
  const float* wzero = nullptr;   // [M]
  const float* bias = nullptr;    // [M], or nullptr for none
  float ascale = 1.0f;
};

// y[n * M + m] = ascale * (wscale[m] * D[n,m] + wzero[m] * S[n]) + bias[m], evaluated in double
// from the exact D and S and rounded once to float. Same preconditions as LowbitGemm; wscale and
// wzero non-null when M > 0. Cost: LowbitGemm plus N*K + N*M, and an N*M int32 scratch.
void LowbitLinearForward(const CpuContext& cpu, const PackedCodes& w, const PackedCodes& a,
                         const LowbitLinearParams& params, float* y);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_LOWBIT_GEMM_H_
