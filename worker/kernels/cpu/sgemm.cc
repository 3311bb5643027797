#include "worker/kernels/cpu/sgemm.h"

#include <algorithm>
#include <cstring>

#include "common/logging.h"
#include "worker/kernels/cpu/aligned_buffer.h"
#include "worker/kernels/cpu/sgemm_microkernel.h"

namespace qtrain::kernels {
namespace {

using sgemm_internal::MicroKernel;

// Below this many flops per thread a parallel split costs more in wake-ups than it saves.
constexpr double kMinParallelFlopsPerThread = 2.0 * 96 * 96 * 96;

// In the single-A-block path, B is packed and consumed this many bytes at a time (fits in L2).
constexpr int64_t kFusedBGroupBytes = 96 * 1024;

// Largest tile over all kernels, for the edge-tile scratch.
constexpr int kMaxTile = 12 * 32;

constexpr int kScalarMr = 4;
constexpr int kScalarNr = 8;

// Portable micro-kernel; the compiler vectorises the j loop with SSE2.
void KernelScalar4x8(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, float alpha,
                     float beta) {
  float acc[kScalarMr][kScalarNr] = {};
  for (int64_t p = 0; p < kc; ++p) {
    for (int i = 0; i < kScalarMr; ++i) {
      const float ai = a[i];
      for (int j = 0; j < kScalarNr; ++j) acc[i][j] += ai * b[j];
    }
    a += kScalarMr;
    b += kScalarNr;
  }
  for (int i = 0; i < kScalarMr; ++i) {
    float* ci = c + i * ldc;
    if (beta == 0.0f) {
      for (int j = 0; j < kScalarNr; ++j) ci[j] = alpha * acc[i][j];
    } else {
      for (int j = 0; j < kScalarNr; ++j) ci[j] = alpha * acc[i][j] + beta * ci[j];
    }
  }
}

const MicroKernel& SelectKernel(SimdLevel level) {
  static const MicroKernel kScalar{
      SgemmBlocking{.mr = kScalarMr, .nr = kScalarNr, .mc = 128, .kc = 256, .nc = 2048},
      &KernelScalar4x8};
  static const MicroKernel kAvx2 = sgemm_internal::Avx2MicroKernel();
  static const MicroKernel kAvx512 = sgemm_internal::Avx512MicroKernel();
  switch (EffectiveSimdLevel(level)) {
    case SimdLevel::kAvx512:
      return kAvx512;
    case SimdLevel::kAvx2:
      return kAvx2;
    case SimdLevel::kScalar:
      break;
  }
  return kScalar;
}

// ---- Packing ----------------------------------------------------------------------------------

// Packs the mb x kb block of op(A) whose top-left element is at `a` into ceil(mb / kMr) strips,
// strip s holding dst[s*kMr*kb + p*kMr + i] = op(A)(s*kMr + i, p), rows past mb zero.
template <int kMr>
void PackA(Transpose trans, const float* a, int64_t lda, int64_t mb, int64_t kb, float* dst) {
  for (int64_t r0 = 0; r0 < mb; r0 += kMr) {
    const int rows = static_cast<int>(std::min<int64_t>(kMr, mb - r0));
    if (trans == Transpose::kNo) {
      // op(A)(i, p) = a[i * lda + p]: gather one element from each of the strip's rows.
      const float* src[kMr];
      for (int i = 0; i < kMr; ++i) src[i] = a + (r0 + std::min(i, rows - 1)) * lda;
      if (rows == kMr) {
        for (int64_t p = 0; p < kb; ++p) {
          for (int i = 0; i < kMr; ++i) dst[p * kMr + i] = src[i][p];
        }
      } else {
        for (int64_t p = 0; p < kb; ++p) {
          for (int i = 0; i < kMr; ++i) dst[p * kMr + i] = i < rows ? src[i][p] : 0.0f;
        }
      }
    } else {
      // op(A)(i, p) = a[p * lda + i]: each step of p is a contiguous run of the strip's rows.
      const float* src = a + r0;
      if (rows == kMr) {
        for (int64_t p = 0; p < kb; ++p) {
          std::memcpy(dst + p * kMr, src + p * lda, sizeof(float) * kMr);
        }
      } else {
        for (int64_t p = 0; p < kb; ++p) {
          for (int i = 0; i < kMr; ++i) dst[p * kMr + i] = i < rows ? src[p * lda + i] : 0.0f;
        }
      }
    }
    dst += kMr * kb;
  }
}

// Packs the kb x nb block of op(B) whose top-left element is at `b` into ceil(nb / kNr) strips,
// strip s holding dst[s*kNr*kb + p*kNr + j] = op(B)(p, s*kNr + j), columns past nb zero.
template <int kNr>
void PackB(Transpose trans, const float* b, int64_t ldb, int64_t kb, int64_t nb, float* dst) {
  const int64_t strips = (nb + kNr - 1) / kNr;
  if (trans == Transpose::kNo) {
    // op(B)(p, j) = b[p * ldb + j]: row by row across all strips, so each row is read
    // sequentially (strip by strip would touch one cache line per row, and with ldb a multiple
    // of 4 KiB those lines collide in the cache before the next strip uses them).
    for (int64_t p = 0; p < kb; ++p) {
      const float* src = b + p * ldb;
      for (int64_t s = 0; s < strips; ++s) {
        float* out = dst + s * kNr * kb + p * kNr;
        const int64_t cols = std::min<int64_t>(kNr, nb - s * kNr);
        if (cols == kNr) {
          std::memcpy(out, src + s * kNr, sizeof(float) * kNr);
        } else {
          for (int64_t j = 0; j < kNr; ++j) out[j] = j < cols ? src[s * kNr + j] : 0.0f;
        }
      }
    }
    return;
  }
  // op(B)(p, j) = b[j * ldb + p]: read each stored row sequentially; the strided writes land in
  // the strip (kNr * kb floats), which stays in L1.
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t cols = std::min<int64_t>(kNr, nb - s * kNr);
    float* out = dst + s * kNr * kb;
    for (int64_t j = 0; j < kNr; ++j) {
      if (j < cols) {
        const float* src = b + (s * kNr + j) * ldb;
        for (int64_t p = 0; p < kb; ++p) out[p * kNr + j] = src[p];
      } else {
        for (int64_t p = 0; p < kb; ++p) out[p * kNr + j] = 0.0f;
      }
    }
  }
}

void PackABlock(int mr, Transpose trans, const float* a, int64_t lda, int64_t mb, int64_t kb,
                float* dst) {
  switch (mr) {
    case 4:
      return PackA<4>(trans, a, lda, mb, kb, dst);
    case 6:
      return PackA<6>(trans, a, lda, mb, kb, dst);
    case 12:
      return PackA<12>(trans, a, lda, mb, kb, dst);
  }
  QTRAIN_CHECK(false) << "no A packer for mr=" << mr;
}

void PackBPanel(int nr, Transpose trans, const float* b, int64_t ldb, int64_t kb, int64_t nb,
                float* dst) {
  switch (nr) {
    case 8:
      return PackB<8>(trans, b, ldb, kb, nb, dst);
    case 16:
      return PackB<16>(trans, b, ldb, kb, nb, dst);
    case 32:
      return PackB<32>(trans, b, ldb, kb, nb, dst);
  }
  QTRAIN_CHECK(false) << "no B packer for nr=" << nr;
}

// ---- Blocked serial driver --------------------------------------------------------------------

// Packing buffers, one pair per thread: reused across calls so small GEMMs (one per image in a
// convolution) do not pay for allocation and page faults each time.
struct PackBuffers {
  AlignedBuffer a;
  AlignedBuffer b;
};
PackBuffers& ThreadPackBuffers() {
  thread_local PackBuffers buffers;
  return buffers;
}

int64_t RoundUp(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// C(mb x nb) = alpha * packed A * packed B + beta * C, tile by tile.
void MacroKernel(const MicroKernel& kernel, int64_t mb, int64_t nb, int64_t kb, float alpha,
                 const float* apack, const float* bpack, float beta, float* c, int64_t ldc) {
  const int mr = kernel.blocking.mr;
  const int nr = kernel.blocking.nr;
  alignas(64) float edge[kMaxTile];
  for (int64_t jr = 0; jr < nb; jr += nr) {
    const int64_t cols = std::min<int64_t>(nr, nb - jr);
    const float* bp = bpack + jr * kb;
    for (int64_t ir = 0; ir < mb; ir += mr) {
      const int64_t rows = std::min<int64_t>(mr, mb - ir);
      const float* ap = apack + ir * kb;
      float* cp = c + ir * ldc + jr;
      if (cols == nr) {
        if (rows == mr) {
          kernel.fn(kb, ap, bp, cp, ldc, alpha, beta);
          continue;
        }
        if (kernel.partial_rows[rows] != nullptr) {
          kernel.partial_rows[rows](kb, ap, bp, cp, ldc, alpha, beta);
          continue;
        }
      }
      // Ragged columns: compute the full tile into scratch, then merge the valid part with the
      // same alpha/beta arithmetic as the kernel's own store.
      kernel.fn(kb, ap, bp, edge, nr, 1.0f, 0.0f);
      for (int64_t i = 0; i < rows; ++i) {
        float* ci = cp + i * ldc;
        const float* ei = edge + i * nr;
        if (beta == 0.0f) {
          for (int64_t j = 0; j < cols; ++j) ci[j] = alpha * ei[j];
        } else {
          for (int64_t j = 0; j < cols; ++j) ci[j] = alpha * ei[j] + beta * ci[j];
        }
      }
    }
  }
}

// Single-threaded GEMM on the calling thread; m, n, k >= 1 and alpha != 0.
void GemmSerial(const MicroKernel& kernel, Transpose trans_a, Transpose trans_b, int64_t m,
                int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                int64_t ldb, float beta, float* c, int64_t ldc) {
  const SgemmBlocking& bl = kernel.blocking;
  // Equal-sized depth blocks: k = 300 runs as 2 x 150 rather than 256 + 44.
  const int64_t k_blocks = (k + bl.kc - 1) / bl.kc;
  const int64_t kc = (k + k_blocks - 1) / k_blocks;
  const int64_t nc = std::min<int64_t>(bl.nc, RoundUp(n, bl.nr));
  const int64_t mc = std::min<int64_t>(bl.mc, RoundUp(m, bl.mr));

  PackBuffers& buffers = ThreadPackBuffers();
  float* bpack = buffers.b.Reserve(kc * nc);
  float* apack = buffers.a.Reserve(mc * kc);

  auto pack_b = [&](const float* b_block, int64_t kb, int64_t nb, float* dst) {
    if (kernel.pack_b != nullptr) {
      kernel.pack_b(trans_b, b_block, ldb, kb, nb, dst);
    } else {
      PackBPanel(bl.nr, trans_b, b_block, ldb, kb, nb, dst);
    }
  };
  auto b_at = [&](int64_t p, int64_t j) {
    return trans_b == Transpose::kNo ? b + p * ldb + j : b + j * ldb + p;
  };
  auto a_at = [&](int64_t i, int64_t p) {
    return trans_a == Transpose::kNo ? a + i * lda + p : a + p * lda + i;
  };

  for (int64_t jc = 0; jc < n; jc += nc) {
    const int64_t nb = std::min(nc, n - jc);
    for (int64_t pc = 0; pc < k; pc += kc) {
      const int64_t kb = std::min(kc, k - pc);
      // Later depth blocks accumulate onto the first one's result.
      const float beta_block = pc == 0 ? beta : 1.0f;
      if (m <= mc) {
        // One block of A (small m, as in per-image convolutions): B is packed a group of strips
        // at a time and used at once, while the group is still in L2, instead of packing a whole
        // panel that may not fit in L2 and reading it back.
        PackABlock(bl.mr, trans_a, a_at(0, pc), lda, m, kb, apack);
        const int64_t group =
            bl.nr * std::max<int64_t>(1, kFusedBGroupBytes / (sizeof(float) * bl.nr * kb));
        for (int64_t jr = 0; jr < nb; jr += group) {
          const int64_t cols = std::min(group, nb - jr);
          pack_b(b_at(pc, jc + jr), kb, cols, bpack);
          MacroKernel(kernel, m, cols, kb, alpha, apack, bpack, beta_block, c + jc + jr, ldc);
        }
        continue;
      }
      pack_b(b_at(pc, jc), kb, nb, bpack);
      for (int64_t ic = 0; ic < m; ic += mc) {
        const int64_t mb = std::min(mc, m - ic);
        PackABlock(bl.mr, trans_a, a_at(ic, pc), lda, mb, kb, apack);
        MacroKernel(kernel, mb, nb, kb, alpha, apack, bpack, beta_block, c + ic * ldc + jc, ldc);
      }
    }
  }
}

// C = beta * C, with beta == 0 writing zeros without reading C.
void ScaleMatrix(int64_t m, int64_t n, float beta, float* c, int64_t ldc) {
  if (beta == 1.0f) return;
  for (int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    if (beta == 0.0f) {
      std::fill(ci, ci + n, 0.0f);
    } else {
      for (int64_t j = 0; j < n; ++j) ci[j] *= beta;
    }
  }
}

}  // namespace

SgemmBlocking SgemmBlockingFor(SimdLevel level) { return SelectKernel(level).blocking; }

void Sgemm(const CpuContext& ctx, Transpose trans_a, Transpose trans_b, int64_t m, int64_t n,
           int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
           float beta, float* c, int64_t ldc) {
  QTRAIN_CHECK(m >= 0 && n >= 0 && k >= 0) << "m=" << m << " n=" << n << " k=" << k;
  const int64_t a_cols = trans_a == Transpose::kNo ? k : m;
  const int64_t b_cols = trans_b == Transpose::kNo ? n : k;
  QTRAIN_CHECK(lda >= std::max<int64_t>(1, a_cols)) << "lda=" << lda << " < " << a_cols;
  QTRAIN_CHECK(ldb >= std::max<int64_t>(1, b_cols)) << "ldb=" << ldb << " < " << b_cols;
  QTRAIN_CHECK(ldc >= std::max<int64_t>(1, n)) << "ldc=" << ldc << " < " << n;
  if (m == 0 || n == 0) return;
  QTRAIN_CHECK(c != nullptr);
  if (k == 0 || alpha == 0.0f) {
    ScaleMatrix(m, n, beta, c, ldc);
    return;
  }
  QTRAIN_CHECK(a != nullptr && b != nullptr);

  const MicroKernel& kernel = SelectKernel(ctx.simd);
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * k;
  const int64_t max_parts = std::min<int64_t>(
      ctx.num_threads(), static_cast<int64_t>(flops / kMinParallelFlopsPerThread));
  if (max_parts <= 1) {
    GemmSerial(kernel, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }

  // Split C into slabs along its longer side, in whole micro-tiles; each thread packs its own
  // panels. Repacking the shared operand per thread costs O(mk) or O(kn) against O(mnk) work.
  const bool split_columns = n >= m;
  const int64_t unit = split_columns ? kernel.blocking.nr : kernel.blocking.mr;
  const int64_t extent = split_columns ? n : m;
  const int64_t units = (extent + unit - 1) / unit;
  const int64_t grain = (units + max_parts - 1) / max_parts;
  ParallelFor(ctx.pool, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t begin = u0 * unit;
    const int64_t end = std::min(extent, u1 * unit);
    if (split_columns) {
      const float* b_part = trans_b == Transpose::kNo ? b + begin : b + begin * ldb;
      GemmSerial(kernel, trans_a, trans_b, m, end - begin, k, alpha, a, lda, b_part, ldb, beta,
                 c + begin, ldc);
    } else {
      const float* a_part = trans_a == Transpose::kNo ? a + begin * lda : a + begin;
      GemmSerial(kernel, trans_a, trans_b, end - begin, n, k, alpha, a_part, lda, b, ldb, beta,
                 c + begin * ldc, ldc);
    }
  });
}

}  // namespace qtrain::kernels
