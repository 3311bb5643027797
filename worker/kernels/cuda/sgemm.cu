#include "worker/kernels/cuda/sgemm.h"

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/kernels/cuda/gemm_tile.cuh"

namespace qtrain::kernels::cuda {
namespace {

namespace gi = gemm_internal;

// Sizes are 32-bit inside the kernels, with headroom for a tile's overrun past the edge.
constexpr int64_t kMaxDim = int64_t{1} << 30;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kBigTileMinBlocks = 256;

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

absl::Status Invalid(const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat("cuda::Sgemm: ", message));
}

absl::Status CheckArgs(Transpose ta, Transpose tb, int64_t m, int64_t n, int64_t k,
                       const float* a, int64_t lda, const float* b, int64_t ldb, const float* c,
                       int64_t ldc, bool reads_ab) {
  if (m < 0 || n < 0 || k < 0) {
    return Invalid(absl::StrCat("m, n, k must be >= 0, got ", m, ", ", n, ", ", k));
  }
  if (m >= kMaxDim || n >= kMaxDim || k >= kMaxDim) {
    return Invalid(absl::StrCat("m, n, k must be < 2^30, got ", m, ", ", n, ", ", k));
  }
  const int64_t a_cols = ta == Transpose::kNo ? k : m;
  const int64_t b_cols = tb == Transpose::kNo ? n : k;
  if (lda < (a_cols > 1 ? a_cols : 1)) {
    return Invalid(absl::StrCat("lda ", lda, " < ", a_cols, " columns of the stored A"));
  }
  if (ldb < (b_cols > 1 ? b_cols : 1)) {
    return Invalid(absl::StrCat("ldb ", ldb, " < ", b_cols, " columns of the stored B"));
  }
  if (ldc < (n > 1 ? n : 1)) return Invalid(absl::StrCat("ldc ", ldc, " < n = ", n));
  if (m == 0 || n == 0) return absl::OkStatus();
  if (c == nullptr) return Invalid("c is null");
  if (reads_ab && (a == nullptr || b == nullptr)) return Invalid("a or b is null");
  if ((m + 63) / 64 > kMaxGridY) {
    return Invalid(absl::StrCat("m = ", m, " exceeds ", kMaxGridY * 64, " rows"));
  }
  return absl::OkStatus();
}

template <class Cfg, bool kTransA, bool kTransB, bool kVec>
void Launch(const CudaContext& ctx, int m, int n, int k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc, bool vec_c) {
  const dim3 grid((n + Cfg::BN - 1) / Cfg::BN, (m + Cfg::BM - 1) / Cfg::BM);
  gi::SgemmKernel<Cfg, kTransA, kTransB, kVec><<<grid, gi::kThreads, 0, ctx.stream>>>(
      m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, vec_c);
}

template <class Cfg, bool kVec>
void LaunchTransposes(const CudaContext& ctx, Transpose ta, Transpose tb, int m, int n, int k,
                      float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float beta, float* c, int64_t ldc, bool vec_c) {
  const bool at = ta == Transpose::kYes;
  const bool bt = tb == Transpose::kYes;
  if (!at && !bt) {
    Launch<Cfg, false, false, kVec>(ctx, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, vec_c);
  } else if (!at && bt) {
    Launch<Cfg, false, true, kVec>(ctx, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, vec_c);
  } else if (at && !bt) {
    Launch<Cfg, true, false, kVec>(ctx, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, vec_c);
  } else {
    Launch<Cfg, true, true, kVec>(ctx, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, vec_c);
  }
}

template <class Cfg>
void LaunchTile(const CudaContext& ctx, Transpose ta, Transpose tb, int m, int n, int k,
                float alpha, const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                float* c, int64_t ldc) {
  const bool vec_ab = Aligned16(a) && Aligned16(b) && lda % 4 == 0 && ldb % 4 == 0;
  const bool vec_c = Aligned16(c) && ldc % 4 == 0;
  if (vec_ab) {
    LaunchTransposes<Cfg, true>(ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, vec_c);
  } else {
    LaunchTransposes<Cfg, false>(ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                                 vec_c);
  }
}

}  // namespace

SgemmTile SgemmTileFor(int64_t m, int64_t n) {
  // A 128-row (or -column) tile would be mostly padding on a skinny output.
  if (m <= 64 || n <= 64) return SgemmTile::k64x64;
  const int64_t big_tiles = ((m + 127) / 128) * ((n + 127) / 128);
  return big_tiles >= kBigTileMinBlocks ? SgemmTile::k128x128 : SgemmTile::k64x64;
}

absl::Status Sgemm(const CudaContext& ctx, Transpose trans_a, Transpose trans_b, int64_t m,
                   int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                   int64_t ldb, float beta, float* c, int64_t ldc) {
  const bool reads_ab = k > 0 && alpha != 0.0f;
  RETURN_IF_ERROR(CheckArgs(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, reads_ab));
  if (m == 0 || n == 0) return absl::OkStatus();
  const int mi = static_cast<int>(m);
  const int ni = static_cast<int>(n);
  const int ki = static_cast<int>(k);
  if (!reads_ab) {
    gi::ScaleMatrixKernel<<<GridFor(m * n, gi::kThreads, 4096), gi::kThreads, 0, ctx.stream>>>(
        mi, ni, beta, c, ldc);
    return LaunchStatus("ScaleMatrixKernel");
  }
  if (SgemmTileFor(m, n) == SgemmTile::k128x128) {
    LaunchTile<gi::Tile128x128>(ctx, trans_a, trans_b, mi, ni, ki, alpha, a, lda, b, ldb, beta,
                                c, ldc);
  } else {
    LaunchTile<gi::Tile64x64>(ctx, trans_a, trans_b, mi, ni, ki, alpha, a, lda, b, ldb, beta, c,
                              ldc);
  }
  return LaunchStatus("SgemmKernel");
}

}  // namespace qtrain::kernels::cuda
