#include "worker/kernels/cpu/lowbit_gemm.h"

#include <algorithm>
#include <bit>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/lowbit_gemm_kernels.h"

namespace qtrain::kernels {
namespace {

using lowbit_internal::ByteRow;
using lowbit_internal::kByteGroup;
using lowbit_internal::kByteGroupStride;
using lowbit_internal::kByteRowBlock;
using lowbit_internal::kPlaneRowBlock;
using lowbit_internal::PlaneRow;
using lowbit_internal::TileArgs;
using lowbit_internal::TileKernel;

// Below this many multiply-adds per thread a parallel split costs more in wake-ups than it saves.
constexpr double kMinParallelMacsPerThread = 1 << 22;

// Rows of w kept hot while every tile of a streams past them.
constexpr int64_t kWBlockBytes = 256 * 1024;

constexpr int kScalarPopcountTileM = kPlaneRowBlock;
constexpr int kScalarIntegerTileM = kByteRowBlock;
constexpr int kScalarTileN = 4;

int64_t RoundUp(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// Portable popcount tile: D = sum over plane pairs of 2^(i+j) * popcount(wplane_i & aplane_j).
void ScalarPopcountTile(const TileArgs& t, int64_t m0, int m_count, int64_t n0, int n_count) {
  const PackedCodes& w = *t.w;
  const PackedCodes& a = *t.a;
  const int64_t words = w.plane_words();
  for (int64_t n = n0; n < n0 + n_count; ++n) {
    for (int64_t m = m0; m < m0 + m_count; ++m) {
      int64_t sum = 0;
      for (int i = 0; i < w.bits; ++i) {
        const uint64_t* wp = PlaneRow(w, m, i);
        for (int j = 0; j < a.bits; ++j) {
          const uint64_t* ap = PlaneRow(a, n, j);
          int64_t count = 0;
          for (int64_t g = 0; g < words; ++g) {
            count += std::popcount(wp[g * kPlaneRowBlock] & ap[g * kPlaneRowBlock]);
          }
          sum += count << (i + j);
        }
      }
      t.d[n * w.rows + m] = static_cast<int32_t>(sum);
    }
  }
}

// Portable integer tile over the kBytes layout.
void ScalarIntegerTile(const TileArgs& t, int64_t m0, int m_count, int64_t n0, int n_count) {
  const PackedCodes& w = *t.w;
  const PackedCodes& a = *t.a;
  const int64_t groups = w.padded_cols() / kByteGroup;
  for (int64_t n = n0; n < n0 + n_count; ++n) {
    const uint8_t* ap = ByteRow(a, n);
    for (int64_t m = m0; m < m0 + m_count; ++m) {
      const uint8_t* wp = ByteRow(w, m);
      int32_t sum = 0;
      for (int64_t g = 0; g < groups; ++g) {
        for (int q = 0; q < kByteGroup; ++q) {
          sum += int32_t{wp[g * kByteGroupStride + q]} * ap[g * kByteGroupStride + q];
        }
      }
      t.d[n * w.rows + m] = sum;
    }
  }
}

TileKernel SelectPopcountKernel(SimdLevel level) {
  if (level == SimdLevel::kAvx512 && DetectAvx512Extensions().vpopcntdq) {
    return lowbit_internal::Avx512PopcountKernel();
  }
  if (level >= SimdLevel::kAvx2) return lowbit_internal::Avx2PopcountKernel();
  return TileKernel{kScalarPopcountTileM, kScalarTileN, &ScalarPopcountTile};
}

TileKernel SelectIntegerKernel(SimdLevel level, int wbits) {
  if (level == SimdLevel::kAvx512 && DetectAvx512Extensions().vnni) {
    return lowbit_internal::Avx512VnniKernel(wbits);
  }
  if (level >= SimdLevel::kAvx2) return lowbit_internal::Avx2IntegerKernel();
  return TileKernel{kScalarIntegerTileM, kScalarTileN, &ScalarIntegerTile};
}

// Runs the tiles of D[n_begin..n_end) x [m_begin..m_end) on the calling thread; m_begin is a
// multiple of kernel.tile_m.
void RunTiles(const TileKernel& kernel, const TileArgs& args, int64_t w_row_bytes, int64_t m_begin,
              int64_t m_end, int64_t n_begin, int64_t n_end) {
  const int64_t mc =
      std::max<int64_t>(kernel.tile_m, kWBlockBytes / std::max<int64_t>(1, w_row_bytes) /
                                           kernel.tile_m * kernel.tile_m);
  for (int64_t mb = m_begin; mb < m_end; mb += mc) {
    const int64_t mb_end = std::min(m_end, mb + mc);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kernel.tile_n) {
      const int n_count = static_cast<int>(std::min<int64_t>(kernel.tile_n, n_end - n0));
      for (int64_t m0 = mb; m0 < mb_end; m0 += kernel.tile_m) {
        const int m_count = static_cast<int>(std::min<int64_t>(kernel.tile_m, mb_end - m0));
        kernel.fn(args, m0, m_count, n0, n_count);
      }
    }
  }
}

// Aborts unless p is a well-formed PackedCodes.
void CheckPacked(const PackedCodes& p, const char* name) {
  QTRAIN_CHECK(p.bits >= 1 && p.bits <= 8) << name << ".bits=" << p.bits;
  QTRAIN_CHECK(p.layout == CodeLayout::kBytes || p.bits <= 2)
      << name << ": kBitPlanes with bits=" << p.bits;
  QTRAIN_CHECK(p.rows >= 0 && p.rows <= kMaxPackedDim && p.cols >= 0 && p.cols <= kMaxPackedDim)
      << name << " is " << p.rows << "x" << p.cols;
  QTRAIN_CHECK(static_cast<int64_t>(p.storage.size()) ==
               PackedStorageWords(p.layout, p.bits, p.rows, p.cols))
      << name << ".storage has " << p.storage.size() << " words";
}

PackedCodes ToBytes(const PackedCodes& p) {
  std::vector<uint8_t> codes(p.rows * p.cols);
  UnpackCodes(p, codes.data());
  PackedCodes out;
  const absl::Status status =
      PackCodes(p.bits, p.rows, p.cols, codes.data(), CodeLayout::kBytes, &out);
  QTRAIN_CHECK(status.ok()) << status;
  return out;
}

}  // namespace

CodeLayout DefaultCodeLayout(int bits) {
  return bits <= 2 ? CodeLayout::kBitPlanes : CodeLayout::kBytes;
}

int64_t PackedStorageWords(CodeLayout layout, int bits, int64_t rows, int64_t cols) {
  if (layout == CodeLayout::kBitPlanes) {
    return RoundUp(rows, kPlaneRowBlock) * bits * ((cols + 63) / 64);
  }
  // A block of 16 rows holds 16 * roundup(cols, 4) bytes, a multiple of 8.
  return RoundUp(rows, kByteRowBlock) * RoundUp(cols, kByteGroup) / 8;
}

absl::Status PackCodes(int bits, int64_t rows, int64_t cols, const uint8_t* codes,
                       CodeLayout layout, PackedCodes* out) {
  if (bits < 1 || bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat("code bits must be in 1..8, got ", bits));
  }
  if (layout == CodeLayout::kBitPlanes && bits > 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("the bit-plane layout holds codes of 1 or 2 bits, got ", bits));
  }
  if (rows < 0 || cols < 0 || rows > kMaxPackedDim || cols > kMaxPackedDim) {
    return absl::InvalidArgumentError(absl::StrCat("code matrix must be at most ", kMaxPackedDim,
                                                   " a side, got ", rows, "x", cols));
  }
  if (rows * cols > kMaxPackedCodes) {
    return absl::InvalidArgumentError(absl::StrCat("code matrix ", rows, "x", cols,
                                                   " has more than ", kMaxPackedCodes, " codes"));
  }
  const int64_t count = rows * cols;
  if (count > 0 && codes == nullptr) return absl::InvalidArgumentError("codes is null");
  for (int64_t i = 0; i < count; ++i) {
    if (codes[i] >> bits != 0) {
      return absl::InvalidArgumentError(absl::StrCat("code ", int{codes[i]}, " at (", i / cols,
                                                     ", ", i % cols, ") does not fit in ", bits,
                                                     " bits"));
    }
  }

  PackedCodes packed;
  packed.bits = bits;
  packed.rows = rows;
  packed.cols = cols;
  packed.layout = layout;
  packed.storage.assign(PackedStorageWords(layout, bits, rows, cols), 0);
  if (layout == CodeLayout::kBitPlanes) {
    const int64_t words = packed.plane_words();
    for (int64_t r = 0; r < rows; ++r) {
      for (int i = 0; i < bits; ++i) {
        uint64_t* plane = packed.storage.data() +
                          ((r / kPlaneRowBlock) * bits + i) * words * kPlaneRowBlock +
                          r % kPlaneRowBlock;
        const uint8_t* row = codes + r * cols;
        for (int64_t k = 0; k < cols; ++k) {
          plane[(k / 64) * kPlaneRowBlock] |= uint64_t{(row[k] >> i) & 1u} << (k % 64);
        }
      }
    }
  } else {
    uint8_t* bytes = reinterpret_cast<uint8_t*>(packed.storage.data());
    const int64_t kp = packed.padded_cols();
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* dst =
          bytes + (r / kByteRowBlock) * kByteRowBlock * kp + (r % kByteRowBlock) * kByteGroup;
      const uint8_t* row = codes + r * cols;
      for (int64_t k = 0; k < cols; ++k) {
        dst[(k / kByteGroup) * kByteGroupStride + k % kByteGroup] = row[k];
      }
    }
  }
  *out = std::move(packed);
  return absl::OkStatus();
}

absl::Status PackCodes(int bits, int64_t rows, int64_t cols, const uint8_t* codes,
                       PackedCodes* out) {
  return PackCodes(bits, rows, cols, codes, DefaultCodeLayout(bits), out);
}

void UnpackCodes(const PackedCodes& packed, uint8_t* codes) {
  CheckPacked(packed, "packed");
  const int64_t cols = packed.cols;
  for (int64_t r = 0; r < packed.rows; ++r) {
    uint8_t* row = codes + r * cols;
    if (packed.layout == CodeLayout::kBitPlanes) {
      std::fill(row, row + cols, 0);
      for (int i = 0; i < packed.bits; ++i) {
        const uint64_t* plane = PlaneRow(packed, r, i);
        for (int64_t k = 0; k < cols; ++k) {
          row[k] |= ((plane[(k / 64) * kPlaneRowBlock] >> (k % 64)) & 1u) << i;
        }
      }
    } else {
      const uint8_t* src = ByteRow(packed, r);
      for (int64_t k = 0; k < cols; ++k) {
        row[k] = src[(k / kByteGroup) * kByteGroupStride + k % kByteGroup];
      }
    }
  }
}

int64_t LowbitMaxDepth(int wbits, int abits) {
  QTRAIN_CHECK(wbits >= 1 && wbits <= 8 && abits >= 1 && abits <= 8)
      << "wbits=" << wbits << " abits=" << abits;
  return std::numeric_limits<int32_t>::max() /
         (((int64_t{1} << wbits) - 1) * ((int64_t{1} << abits) - 1));
}

void LowbitRowSums(const PackedCodes& codes, int32_t* s) {
  CheckPacked(codes, "codes");
  QTRAIN_CHECK(codes.cols * ((int64_t{1} << codes.bits) - 1) <= std::numeric_limits<int32_t>::max())
      << "row sums of " << codes.cols << " " << codes.bits << "-bit codes may overflow int32";
  for (int64_t r = 0; r < codes.rows; ++r) {
    int64_t sum = 0;
    if (codes.layout == CodeLayout::kBitPlanes) {
      for (int i = 0; i < codes.bits; ++i) {
        const uint64_t* plane = PlaneRow(codes, r, i);
        int64_t count = 0;
        for (int64_t g = 0; g < codes.plane_words(); ++g) {
          count += std::popcount(plane[g * kPlaneRowBlock]);
        }
        sum += count << i;
      }
    } else {
      const uint8_t* row = ByteRow(codes, r);
      for (int64_t g = 0; g < codes.padded_cols() / kByteGroup; ++g) {
        for (int q = 0; q < kByteGroup; ++q) sum += row[g * kByteGroupStride + q];
      }
    }
    s[r] = static_cast<int32_t>(sum);
  }
}

void LowbitGemm(const CpuContext& cpu, const PackedCodes& w, const PackedCodes& a, int32_t* d) {
  CheckPacked(w, "w");
  CheckPacked(a, "a");
  QTRAIN_CHECK(w.cols == a.cols) << "w is " << w.rows << "x" << w.cols << ", a is " << a.rows << "x"
                                 << a.cols;
  QTRAIN_CHECK(w.cols <= LowbitMaxDepth(w.bits, a.bits))
      << "K=" << w.cols << " may overflow int32 for " << w.bits << "x" << a.bits << " bits";
  const int64_t m = w.rows;
  const int64_t n = a.rows;
  if (m == 0 || n == 0) return;
  QTRAIN_CHECK(d != nullptr);
  if (w.cols == 0) {
    std::fill(d, d + m * n, 0);
    return;
  }
  if (w.layout != a.layout) {
    if (w.layout == CodeLayout::kBitPlanes) return LowbitGemm(cpu, ToBytes(w), a, d);
    return LowbitGemm(cpu, w, ToBytes(a), d);
  }

  const bool popcount = w.layout == CodeLayout::kBitPlanes;
  const SimdLevel level = cpu.effective_simd();
  const TileKernel kernel =
      popcount ? SelectPopcountKernel(level) : SelectIntegerKernel(level, w.bits);
  std::vector<int32_t> a_sums;
  if (kernel.needs_a_sums) {
    a_sums.resize(n);
    LowbitRowSums(a, a_sums.data());
  }
  const TileArgs args{&w, &a, a_sums.data(), d};
  const int64_t w_row_bytes = popcount ? w.bits * w.plane_words() * 8 : w.padded_cols();

  // Popcount tiles do wbits*abits/64 word operations per multiply-add; weigh the work by it.
  const double macs = static_cast<double>(m) * n * w.cols * (popcount ? w.bits * a.bits / 64.0 : 1);
  const int64_t max_parts =
      std::min<int64_t>(cpu.num_threads(), static_cast<int64_t>(macs / kMinParallelMacsPerThread));
  if (max_parts <= 1) {
    RunTiles(kernel, args, w_row_bytes, 0, m, 0, n);
    return;
  }
  // Slabs of whole tiles along the longer side of D; each covers the full other side.
  const bool split_n = n >= m;
  const int64_t unit = split_n ? kernel.tile_n : kernel.tile_m;
  const int64_t extent = split_n ? n : m;
  const int64_t units = (extent + unit - 1) / unit;
  const int64_t grain = (units + max_parts - 1) / max_parts;
  ParallelFor(cpu.pool, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t begin = u0 * unit;
    const int64_t end = std::min(extent, u1 * unit);
    if (split_n) {
      RunTiles(kernel, args, w_row_bytes, 0, m, begin, end);
    } else {
      RunTiles(kernel, args, w_row_bytes, begin, end, 0, n);
    }
  });
}

void LowbitLinearForward(const CpuContext& cpu, const PackedCodes& w, const PackedCodes& a,
                         const LowbitLinearParams& params, float* y) {
  const int64_t m = w.rows;
  const int64_t n = a.rows;
  std::vector<int32_t> d(m * n);
  LowbitGemm(cpu, w, a, d.data());
  if (m == 0 || n == 0) return;
  QTRAIN_CHECK(params.wscale != nullptr && params.wzero != nullptr && y != nullptr);
  std::vector<int32_t> s(n);
  LowbitRowSums(a, s.data());
  const double ascale = params.ascale;
  ParallelFor(
      cpu.pool, n, std::max<int64_t>(1, (int64_t{1} << 16) / m), [&](int64_t n0, int64_t n1) {
        for (int64_t i = n0; i < n1; ++i) {
          const int32_t* di = d.data() + i * m;
          float* yi = y + i * m;
          for (int64_t j = 0; j < m; ++j) {
            double v = ascale * (double{params.wscale[j]} * di[j] + double{params.wzero[j]} * s[i]);
            if (params.bias != nullptr) v += params.bias[j];
            yi[j] = static_cast<float>(v);
          }
        }
      });
}

}  // namespace qtrain::kernels
