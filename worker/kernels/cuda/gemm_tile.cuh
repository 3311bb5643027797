// Private to worker/kernels/cuda/: the register-blocked SIMT GEMM shared by the CUDA SGEMM
// (sgemm.cu) and the implicit-GEMM convolutions (conv.cu), and the kernels built from it.
//
// The block tile. A block of 256 threads computes a BM x BN tile of C = op(A) * op(B), walking
// the depth in BK-deep slices. Each slice of op(A) (BM x BK) and op(B) (BK x BN) is staged in
// shared memory as a[p][i] and b[p][j] (A transposed, so that both are read along their row),
// rows padded by 4 floats; two buffers per operand: while the block multiplies one slice, each
// thread already holds the next slice's global loads in registers and writes them to the other
// buffer afterwards, so one __syncthreads() per slice suffices. The threads form a TY x TX grid;
// thread (ty, tx) owns TM = BM/TY rows and TN = BN/TX columns of the tile, in groups of 4:
//   rows    ty*4 + {0..3} + g*TY*4,   g < TM/4
//   columns tx*4 + {0..3} + h*TX*4,   h < TN/4
// so its fragments are read from shared memory as float4 (a warp reads at most 2 x 16
// consecutive float4: no bank conflicts), and it keeps TM x TN accumulators in registers.
//
// Where the operands come from is a loader: a struct with Load() (global memory -> registers,
// for the next slice; zero outside the operand, so ragged edges and padding taps contribute
// exact zeros) and Store(tile) (registers -> one shared buffer). The SGEMM uses
// MatrixTileLoader (one float4 per thread per slice); the convolutions gather im2col elements
// straight from the NCHW tensors (no column buffer), with the index arithmetic done by
// FastDivmod and incremental (c, kh, kw) stepping.
//
// Arithmetic: fmaf, in a fixed order per output element (slice by slice, p ascending), so
// results are deterministic and bitwise reproducible run to run. They differ from the CPU
// kernels in rounding only (FMA and summation order); both stay within the k * 2^-24 bound.
// No TF32, no atomics.
//
// Indices are 32-bit: the host code (sgemm.cu, conv.cu) checks every tensor and every dividend
// fits before launching anything.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_GEMM_TILE_CUH_
#define QTRAIN_WORKER_KERNELS_CUDA_GEMM_TILE_CUH_

#include <cstdint>

#include "worker/kernels/cpu/conv.h"
#include "worker/kernels/cuda/fast_divmod.h"

namespace qtrain::kernels::cuda::gemm_internal {

inline constexpr int kThreads = 256;  // threads per block, for every kernel in this file
inline constexpr int kSmemPad = 4;    // floats of padding per shared row (keeps float4 alignment)

template <int kBm, int kBn, int kBk, int kTy>
struct TileConfig {
  static constexpr int BM = kBm;  // tile rows
  static constexpr int BN = kBn;  // tile columns
  static constexpr int BK = kBk;  // depth per slice
  static constexpr int TY = kTy;  // thread rows
  static constexpr int TX = kThreads / kTy;
  static constexpr int TM = BM / TY;  // accumulator rows per thread
  static constexpr int TN = BN / TX;  // accumulator columns per thread
  static constexpr int SA = BM + kSmemPad;  // row stride of the shared A slice a[BK][SA]
  static constexpr int SB = BN + kSmemPad;  // row stride of the shared B slice b[BK][SB]
  static constexpr int kSmemFloats = 2 * BK * (SA + SB);
  static_assert(TY * TX == kThreads, "the thread grid must hold 256 threads");
  static_assert(TM % 4 == 0 && TN % 4 == 0 && TM * TY == BM && TN * TX == BN,
                "each thread owns whole groups of 4 rows and 4 columns");
};

// SGEMM tiles: each thread loads one float4 of A and one of B per slice.
using Tile128x128 = TileConfig<128, 128, 8, 16>;  // 8x8 accumulators per thread
using Tile64x64 = TileConfig<64, 64, 16, 16>;     // 4x4
// Convolution tiles (rows = output channels, few; columns = batch * pixels, many).
using Tile32x128 = TileConfig<32, 128, 16, 8>;   // 4x4
using Tile64x128 = TileConfig<64, 128, 16, 16>;  // 4x8

// Local row / column (within the tile) of accumulator acc[i][j] of thread (ty, tx).
template <class Cfg>
__device__ __forceinline__ int TileRow(int ty, int i) {
  return (i / 4) * Cfg::TY * 4 + ty * 4 + (i % 4);
}
template <class Cfg>
__device__ __forceinline__ int TileCol(int tx, int j) {
  return (j / 4) * Cfg::TX * 4 + tx * 4 + (j % 4);
}

// Reads N floats, as N/4 float4 groups at row + t*4 + g*T*4.
template <int N, int T>
__device__ __forceinline__ void LoadFragment(const float* row, int t, float (&f)[N]) {
#pragma unroll
  for (int g = 0; g < N / 4; ++g) {
    const float4 v = *reinterpret_cast<const float4*>(row + t * 4 + g * T * 4);
    f[4 * g + 0] = v.x;
    f[4 * g + 1] = v.y;
    f[4 * g + 2] = v.z;
    f[4 * g + 3] = v.w;
  }
}

// acc = sum over `slices` depth slices of the tiles the loaders deliver. smem holds
// Cfg::kSmemFloats floats (16-byte aligned). Every thread of the block must call it with the
// same `slices` (it synchronizes the block).
template <class Cfg, class LoaderA, class LoaderB>
__device__ __forceinline__ void GemmMainLoop(LoaderA& la, LoaderB& lb, int slices, float* smem,
                                             float (&acc)[Cfg::TM][Cfg::TN]) {
  constexpr int kSliceA = Cfg::BK * Cfg::SA;
  constexpr int kSliceB = Cfg::BK * Cfg::SB;
  float* as = smem;
  float* bs = smem + 2 * kSliceA;
  const int ty = threadIdx.x / Cfg::TX;
  const int tx = threadIdx.x % Cfg::TX;
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i) {
#pragma unroll
    for (int j = 0; j < Cfg::TN; ++j) acc[i][j] = 0.0f;
  }
  if (slices <= 0) return;

  la.Load();
  lb.Load();
  la.Store(as);
  lb.Store(bs);
  __syncthreads();
  for (int t = 0; t < slices; ++t) {
    const int cur = t & 1;
    const bool more = t + 1 < slices;
    if (more) {  // the next slice's global loads overlap this slice's arithmetic
      la.Load();
      lb.Load();
    }
    const float* a_tile = as + cur * kSliceA;
    const float* b_tile = bs + cur * kSliceB;
#pragma unroll
    for (int p = 0; p < Cfg::BK; ++p) {
      float a[Cfg::TM];
      float b[Cfg::TN];
      LoadFragment<Cfg::TM, Cfg::TY>(a_tile + p * Cfg::SA, ty, a);
      LoadFragment<Cfg::TN, Cfg::TX>(b_tile + p * Cfg::SB, tx, b);
#pragma unroll
      for (int i = 0; i < Cfg::TM; ++i) {
#pragma unroll
        for (int j = 0; j < Cfg::TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    if (more) {
      // The other buffer was last read in iteration t - 1, before the barrier that ended it.
      la.Store(as + (cur ^ 1) * kSliceA);
      lb.Store(bs + (cur ^ 1) * kSliceB);
    }
    __syncthreads();
  }
}

// ---- SGEMM -------------------------------------------------------------------------------------

// Loads BK x BX slices of one operand of C = op(A) op(B) into tile[p][x] (row stride S). The
// operand's element (p, x) (p along the depth, x along the rows of op(A) or the columns of
// op(B)) is base[x*ld + p] when kAlongK (memory contiguous along the depth), else base[p*ld + x].
// Each thread moves one group of 4 elements that are adjacent in memory, as one float4 when
// kVec (base 16-byte aligned, ld % 4 == 0: every group is then aligned) and the group lies
// inside the operand, else element by element with zeros outside.
template <int BK, int BX, int S, bool kAlongK, bool kVec>
struct MatrixTileLoader {
  static_assert(BK * BX == 4 * kThreads, "one float4 group per thread");
  static_assert(S % 4 == 0, "shared rows must keep float4 alignment");

  const float* ptr;  // this thread's group in the current slice
  int64_t step;      // pointer advance per slice
  int x;             // operand index of the group (first element when !kAlongK)
  int kk;            // depth index of the group (first element when kAlongK)
  int x_extent;
  int k_extent;
  int xl;  // tile-local x
  int pl;  // tile-local p
  float v[4];

  __device__ __forceinline__ MatrixTileLoader(const float* base, int64_t ld, int x0, int x_extent_,
                                              int k_extent_)
      : x_extent(x_extent_), k_extent(k_extent_) {
    const int g = threadIdx.x;
    if (kAlongK) {
      xl = g / (BK / 4);
      pl = (g % (BK / 4)) * 4;
    } else {
      pl = g / (BX / 4);
      xl = (g % (BX / 4)) * 4;
    }
    x = x0 + xl;
    kk = pl;
    ptr = base + (kAlongK ? static_cast<int64_t>(x) * ld + pl : static_cast<int64_t>(pl) * ld + x);
    step = kAlongK ? static_cast<int64_t>(BK) : static_cast<int64_t>(BK) * ld;
  }

  __device__ __forceinline__ void Load() {
    if (kAlongK) {
      const bool x_in = x < x_extent;
      if (kVec && x_in && kk + 3 < k_extent) {
        const float4 t = __ldg(reinterpret_cast<const float4*>(ptr));
        v[0] = t.x;
        v[1] = t.y;
        v[2] = t.z;
        v[3] = t.w;
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v[e] = 0.0f;
          if (x_in && kk + e < k_extent) v[e] = __ldg(ptr + e);
        }
      }
    } else {
      const bool k_in = kk < k_extent;
      if (kVec && k_in && x + 3 < x_extent) {
        const float4 t = __ldg(reinterpret_cast<const float4*>(ptr));
        v[0] = t.x;
        v[1] = t.y;
        v[2] = t.z;
        v[3] = t.w;
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          v[e] = 0.0f;
          if (k_in && x + e < x_extent) v[e] = __ldg(ptr + e);
        }
      }
    }
    ptr += step;
    kk += BK;
  }

  __device__ __forceinline__ void Store(float* tile) const {
    if (kAlongK) {
#pragma unroll
      for (int e = 0; e < 4; ++e) tile[(pl + e) * S + xl] = v[e];
    } else {
      *reinterpret_cast<float4*>(tile + pl * S + xl) = make_float4(v[0], v[1], v[2], v[3]);
    }
  }
};

// C (m x n, row stride ldc) = alpha * op(A) op(B) + beta * C; beta == 0 never reads C. Grid:
// (ceil(n / BN), ceil(m / BM)). vec_c: C is 16-byte aligned and ldc % 4 == 0.
template <class Cfg, bool kTransA, bool kTransB, bool kVec>
__global__ void __launch_bounds__(kThreads, (Cfg::TM * Cfg::TN >= 64 ? 2 : 1))
    SgemmKernel(int m, int n, int k, float alpha, const float* __restrict__ a, int64_t lda,
                const float* __restrict__ b, int64_t ldb, float beta, float* __restrict__ c,
                int64_t ldc, bool vec_c) {
  __shared__ __align__(16) float smem[Cfg::kSmemFloats];
  const int m0 = blockIdx.y * Cfg::BM;
  const int n0 = blockIdx.x * Cfg::BN;
  // op(A)(i, p) is a[i*lda + p] (contiguous along the depth) unless A is transposed.
  MatrixTileLoader<Cfg::BK, Cfg::BM, Cfg::SA, !kTransA, kVec> la(a, lda, m0, m, k);
  // op(B)(p, j) is b[p*ldb + j] unless B is transposed (then b[j*ldb + p]).
  MatrixTileLoader<Cfg::BK, Cfg::BN, Cfg::SB, kTransB, kVec> lb(b, ldb, n0, n, k);
  float acc[Cfg::TM][Cfg::TN];
  GemmMainLoop<Cfg>(la, lb, (k + Cfg::BK - 1) / Cfg::BK, smem, acc);

  const int ty = threadIdx.x / Cfg::TX;
  const int tx = threadIdx.x % Cfg::TX;
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i) {
    const int row = m0 + TileRow<Cfg>(ty, i);
    if (row >= m) continue;
    float* crow = c + static_cast<int64_t>(row) * ldc;
#pragma unroll
    for (int h = 0; h < Cfg::TN / 4; ++h) {
      const int col = n0 + TileCol<Cfg>(tx, 4 * h);
      const float* r = &acc[i][4 * h];
      if (vec_c && col + 3 < n) {
        float4 out;
        if (beta == 0.0f) {
          out = make_float4(alpha * r[0], alpha * r[1], alpha * r[2], alpha * r[3]);
        } else {
          const float4 old = *reinterpret_cast<const float4*>(crow + col);
          out = make_float4(fmaf(alpha, r[0], beta * old.x), fmaf(alpha, r[1], beta * old.y),
                            fmaf(alpha, r[2], beta * old.z), fmaf(alpha, r[3], beta * old.w));
        }
        *reinterpret_cast<float4*>(crow + col) = out;
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (col + e >= n) continue;
          crow[col + e] =
              beta == 0.0f ? alpha * r[e] : fmaf(alpha, r[e], beta * crow[col + e]);
        }
      }
    }
  }
}

// C = beta * C over m x n (beta == 0 writes zeros without reading C): the SGEMM with k == 0 or
// alpha == 0, which must not read A or B. Grid-stride over the m*n elements.
static __global__ void __launch_bounds__(kThreads)
    ScaleMatrixKernel(int m, int n, float beta, float* __restrict__ c, int64_t ldc) {
  const int64_t total = static_cast<int64_t>(m) * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float* p = c + (e / n) * ldc + e % n;
    *p = beta == 0.0f ? 0.0f : beta * *p;
  }
}

// ---- Implicit-GEMM convolution -----------------------------------------------------------------
//
// With R = C*KH*KW (r = (c*KH + kh)*KW + kw, the row index of im2col and the column index of
// the weights K x R), J = N*OH*OW (j = (n*OH + oh)*OW + ow) and Jx = N*H*W:
//   forward           y  (K x J)  = w (K x R) * col (R x J)          + bias
//   backward data     dx (C x Jx) = wt (C x K*KH*KW) * gat (K*KH*KW x Jx)
//   backward weights  dw (K x R)  = dy (K x J) * col^T (J x R), the depth J split in slices
// where col(r, j) = x[n, c, oh*SH - PH + kh, ow*SW - PW + kw] (zero outside the image),
// wt(c, (k, kh, kw)) = w[k, c, kh, kw], and gat((k, kh, kw), (n, ih, iw)) = dy[n, k, oh, ow]
// when oh = (ih + PH - kh) / SH and ow = (iw + PW - kw) / SW divide exactly and lie inside the
// output, else zero: each input pixel gathers every output it fed (no atomics). "Matrices" with
// an (n, pixel) column index are the NCHW tensors themselves.

struct ConvGeometry {
  int n, c, h, w, k, kh, kw, sh, sw, ph, pw, oh, ow;
  int hw;        // h * w
  int ohw;       // oh * ow
  int khw;       // kh * kw
  int rows;      // R = c * kh * kw
  int out_cols;  // J = n * oh * ow
  int in_cols;   // Jx = n * h * w
  FastDivmod div_hw, div_w, div_ohw, div_ow, div_khw, div_kw, div_sh, div_sw;
};

// Host only; the shape must be valid and within the 32-bit limits (conv.cu checks both).
inline ConvGeometry MakeConvGeometry(const Conv2dShape& s) {
  ConvGeometry g{};
  g.n = static_cast<int>(s.batch);
  g.c = static_cast<int>(s.in_channels);
  g.h = static_cast<int>(s.in_height);
  g.w = static_cast<int>(s.in_width);
  g.k = static_cast<int>(s.out_channels);
  g.kh = static_cast<int>(s.kernel_h);
  g.kw = static_cast<int>(s.kernel_w);
  g.sh = static_cast<int>(s.stride_h);
  g.sw = static_cast<int>(s.stride_w);
  g.ph = static_cast<int>(s.pad_h);
  g.pw = static_cast<int>(s.pad_w);
  g.oh = static_cast<int>(s.out_height());
  g.ow = static_cast<int>(s.out_width());
  g.hw = g.h * g.w;
  g.ohw = g.oh * g.ow;
  g.khw = g.kh * g.kw;
  g.rows = g.c * g.khw;
  g.out_cols = g.n * g.ohw;
  g.in_cols = g.n * g.hw;
  g.div_hw = FastDivmod::Make(g.hw);
  g.div_w = FastDivmod::Make(g.w);
  g.div_ohw = FastDivmod::Make(g.ohw);
  g.div_ow = FastDivmod::Make(g.ow);
  g.div_khw = FastDivmod::Make(g.khw);
  g.div_kw = FastDivmod::Make(g.kw);
  g.div_sh = FastDivmod::Make(g.sh);
  g.div_sw = FastDivmod::Make(g.sw);
  return g;
}

// Convolution tile for `rows` output rows (channels): narrow tiles waste less on 16-32 channels.
inline bool UseTile64x128(int64_t rows) { return rows > 32; }

// Backward weights splits the depth J into `slices` runs of `slice_len` (a multiple of 16, the
// conv tiles' BK), each block writing a partial dw; a second kernel adds the partials in slice
// order. A function of the shape alone, so the workspace size is too.
struct ConvWeightsSplit {
  int64_t slices = 1;
  int64_t slice_len = 0;
};
inline constexpr int64_t kConvTargetBlocks = 1024;  // ~8 per SM of an H100/H200 (132 SMs)
inline constexpr int64_t kConvMinSliceLen = 128;    // 8 slices of depth per block at least
inline constexpr int64_t kConvMaxSlices = 256;

inline ConvWeightsSplit PlanConvWeightsSplit(const Conv2dShape& s) {
  const int64_t bm = UseTile64x128(s.out_channels) ? 64 : 32;
  const int64_t bk = 16;
  const int64_t tiles = ((s.out_channels + bm - 1) / bm) * ((s.col_rows() + 127) / 128);
  const int64_t depth = s.batch * s.out_height() * s.out_width();
  int64_t slices = (kConvTargetBlocks + tiles - 1) / tiles;
  slices = slices < kConvMaxSlices ? slices : kConvMaxSlices;
  const int64_t by_len = (depth + kConvMinSliceLen - 1) / kConvMinSliceLen;
  slices = slices < by_len ? slices : by_len;
  if (slices < 1) slices = 1;
  ConvWeightsSplit split;
  split.slice_len = ((depth + slices - 1) / slices + bk - 1) / bk * bk;
  split.slices = (depth + split.slice_len - 1) / split.slice_len;
  return split;
}

// A: weights, element (i = k, p = r) = w[i*R + r]. Thread: one depth p, rows il + q*(256/BK).
template <class Cfg>
struct ConvWeightLoader {
  static constexpr int kRowStep = kThreads / Cfg::BK;
  static constexpr int kPer = Cfg::BM / kRowStep;
  static_assert(kPer * kRowStep == Cfg::BM, "");
  const float* w;
  int rows, depth, m0, pl, il, kk;
  float v[kPer];

  __device__ __forceinline__ ConvWeightLoader(const float* w_, int rows_, int depth_, int m0_)
      : w(w_), rows(rows_), depth(depth_), m0(m0_), kk(0) {
    pl = threadIdx.x % Cfg::BK;
    il = threadIdx.x / Cfg::BK;
  }
  __device__ __forceinline__ void Load() {
    const int p = kk + pl;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int i = m0 + il + q * kRowStep;
      v[q] = 0.0f;
      if (p < depth && i < rows) v[q] = __ldg(w + i * depth + p);
    }
    kk += Cfg::BK;
  }
  __device__ __forceinline__ void Store(float* tile) const {
#pragma unroll
    for (int q = 0; q < kPer; ++q) tile[pl * Cfg::SA + il + q * kRowStep] = v[q];
  }
};

// B of the forward pass: element (p = r = (c, kh, kw), x = j = (n, oh, ow)) = col(r, j).
// Thread: one column j (fixed for the whole depth, decoded once) and kPer consecutive depths
// per slice (decoded once per slice, then stepped).
template <class Cfg>
struct ConvColumnLoader {
  static constexpr int kGroups = kThreads / Cfg::BN;
  static constexpr int kPer = Cfg::BK / kGroups;
  static_assert(kPer * kGroups == Cfg::BK, "");
  const float* x;
  ConvGeometry g;
  int xl, pb, kk;
  bool col_ok;
  int base, ih0, iw0;  // image offset n*C*H*W and the window's top-left corner
  float v[kPer];

  __device__ __forceinline__ ConvColumnLoader(const float* x_, const ConvGeometry& g_, int j0)
      : x(x_), g(g_), kk(0), base(0), ih0(0), iw0(0) {
    xl = threadIdx.x % Cfg::BN;
    pb = (threadIdx.x / Cfg::BN) * kPer;
    const int j = j0 + xl;
    col_ok = j < g.out_cols;
    if (col_ok) {
      int sp, ow;
      const int n = g.div_ohw.DivMod(j, &sp);
      const int oh = g.div_ow.DivMod(sp, &ow);
      base = n * g.c * g.hw;
      ih0 = oh * g.sh - g.ph;
      iw0 = ow * g.sw - g.pw;
    }
  }
  __device__ __forceinline__ void Load() {
    const int r = kk + pb;
    int rem, kw;
    int c = g.div_khw.DivMod(r, &rem);
    int kh = g.div_kw.DivMod(rem, &kw);
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int ih = ih0 + kh;
      const int iw = iw0 + kw;
      v[q] = 0.0f;
      if (col_ok && r + q < g.rows && static_cast<unsigned>(ih) < static_cast<unsigned>(g.h) &&
          static_cast<unsigned>(iw) < static_cast<unsigned>(g.w)) {
        v[q] = __ldg(x + base + c * g.hw + ih * g.w + iw);
      }
      if (++kw == g.kw) {
        kw = 0;
        if (++kh == g.kh) {
          kh = 0;
          ++c;
        }
      }
    }
    kk += Cfg::BK;
  }
  __device__ __forceinline__ void Store(float* tile) const {
#pragma unroll
    for (int q = 0; q < kPer; ++q) tile[(pb + q) * Cfg::SB + xl] = v[q];
  }
};

// Writes the tile's accumulators to an NCHW tensor out[n][row][sp] with column j = n*spatial +
// sp, adding bias[row] when bias is not null.
template <class Cfg>
__device__ __forceinline__ void StoreNchw(const float (&acc)[Cfg::TM][Cfg::TN],
                                          float* __restrict__ out, const float* __restrict__ bias,
                                          int rows, int cols, int spatial,
                                          const FastDivmod& div_spatial, int m0, int j0) {
  const int ty = threadIdx.x / Cfg::TX;
  const int tx = threadIdx.x % Cfg::TX;
#pragma unroll
  for (int jn = 0; jn < Cfg::TN; ++jn) {
    const int j = j0 + TileCol<Cfg>(tx, jn);
    if (j >= cols) continue;
    int sp;
    const int n = div_spatial.DivMod(j, &sp);
    float* o = out + n * rows * spatial + sp;
#pragma unroll
    for (int i = 0; i < Cfg::TM; ++i) {
      const int row = m0 + TileRow<Cfg>(ty, i);
      if (row >= rows) continue;
      o[row * spatial] = bias != nullptr ? acc[i][jn] + __ldg(bias + row) : acc[i][jn];
    }
  }
}

// y = conv(x, w) + bias. Grid: (ceil(J / BN), ceil(K / BM)).
template <class Cfg>
__global__ void __launch_bounds__(kThreads)
    ConvForwardKernel(ConvGeometry g, const float* __restrict__ x, const float* __restrict__ w,
                      const float* __restrict__ bias, float* __restrict__ y) {
  __shared__ __align__(16) float smem[Cfg::kSmemFloats];
  const int m0 = blockIdx.y * Cfg::BM;
  const int j0 = blockIdx.x * Cfg::BN;
  ConvWeightLoader<Cfg> la(w, g.k, g.rows, m0);
  ConvColumnLoader<Cfg> lb(x, g, j0);
  float acc[Cfg::TM][Cfg::TN];
  GemmMainLoop<Cfg>(la, lb, (g.rows + Cfg::BK - 1) / Cfg::BK, smem, acc);
  StoreNchw<Cfg>(acc, y, bias, g.k, g.out_cols, g.ohw, g.div_ohw, m0, j0);
}

// A of backward data: element (i = c, p = (k, kh, kw)) = w[(k*C + c)*KH*KW + kh*KW + kw].
template <class Cfg>
struct ConvWeightTLoader {
  static constexpr int kRowStep = kThreads / Cfg::BK;
  static constexpr int kPer = Cfg::BM / kRowStep;
  static_assert(kPer * kRowStep == Cfg::BM, "");
  const float* w;
  ConvGeometry g;
  int depth, m0, pl, il, kk;
  float v[kPer];

  __device__ __forceinline__ ConvWeightTLoader(const float* w_, const ConvGeometry& g_, int m0_)
      : w(w_), g(g_), depth(g_.k * g_.khw), m0(m0_), kk(0) {
    pl = threadIdx.x % Cfg::BK;
    il = threadIdx.x / Cfg::BK;
  }
  __device__ __forceinline__ void Load() {
    const int p = kk + pl;
    int khw;
    const int k = g.div_khw.DivMod(p, &khw);
    const int base = k * g.c * g.khw + khw;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int i = m0 + il + q * kRowStep;
      v[q] = 0.0f;
      if (p < depth && i < g.c) v[q] = __ldg(w + base + i * g.khw);
    }
    kk += Cfg::BK;
  }
  __device__ __forceinline__ void Store(float* tile) const {
#pragma unroll
    for (int q = 0; q < kPer; ++q) tile[pl * Cfg::SA + il + q * kRowStep] = v[q];
  }
};

// B of backward data: element (p = (k, kh, kw), x = (n, ih, iw)) = gat(p, x) (see above).
// Thread: one input pixel (decoded once), kPer consecutive depths per slice.
template <class Cfg, bool kUnitStride>
struct ConvGatherLoader {
  static constexpr int kGroups = kThreads / Cfg::BN;
  static constexpr int kPer = Cfg::BK / kGroups;
  static_assert(kPer * kGroups == Cfg::BK, "");
  const float* dy;
  ConvGeometry g;
  int depth, xl, pb, kk;
  bool col_ok;
  int base, ihp, iwp;  // n*K*OH*OW, ih + PH, iw + PW
  float v[kPer];

  __device__ __forceinline__ ConvGatherLoader(const float* dy_, const ConvGeometry& g_, int j0)
      : dy(dy_), g(g_), depth(g_.k * g_.khw), kk(0), base(0), ihp(0), iwp(0) {
    xl = threadIdx.x % Cfg::BN;
    pb = (threadIdx.x / Cfg::BN) * kPer;
    const int j = j0 + xl;
    col_ok = j < g.in_cols;
    if (col_ok) {
      int pix, iw;
      const int n = g.div_hw.DivMod(j, &pix);
      const int ih = g.div_w.DivMod(pix, &iw);
      base = n * g.k * g.ohw;
      ihp = ih + g.ph;
      iwp = iw + g.pw;
    }
  }
  __device__ __forceinline__ void Load() {
    const int r = kk + pb;
    int rem, kw;
    int k = g.div_khw.DivMod(r, &rem);
    int kh = g.div_kw.DivMod(rem, &kw);
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int th = ihp - kh;  // oh * SH when this tap hits an output
      const int tw = iwp - kw;
      bool ok = col_ok && r + q < depth && th >= 0 && tw >= 0;
      int oh = th;
      int ow = tw;
      if (!kUnitStride) {
        int rh, rw;
        oh = g.div_sh.DivMod(th >= 0 ? th : 0, &rh);
        ow = g.div_sw.DivMod(tw >= 0 ? tw : 0, &rw);
        ok = ok && rh == 0 && rw == 0;
      }
      ok = ok && oh < g.oh && ow < g.ow;
      v[q] = 0.0f;
      if (ok) v[q] = __ldg(dy + base + k * g.ohw + oh * g.ow + ow);
      if (++kw == g.kw) {
        kw = 0;
        if (++kh == g.kh) {
          kh = 0;
          ++k;
        }
      }
    }
    kk += Cfg::BK;
  }
  __device__ __forceinline__ void Store(float* tile) const {
#pragma unroll
    for (int q = 0; q < kPer; ++q) tile[(pb + q) * Cfg::SB + xl] = v[q];
  }
};

// dx = the gradient of sum(y * dy) with respect to x. Grid: (ceil(Jx / BN), ceil(C / BM)).
template <class Cfg, bool kUnitStride>
__global__ void __launch_bounds__(kThreads)
    ConvBackwardDataKernel(ConvGeometry g, const float* __restrict__ dy,
                           const float* __restrict__ w, float* __restrict__ dx) {
  __shared__ __align__(16) float smem[Cfg::kSmemFloats];
  const int m0 = blockIdx.y * Cfg::BM;
  const int j0 = blockIdx.x * Cfg::BN;
  ConvWeightTLoader<Cfg> la(w, g, m0);
  ConvGatherLoader<Cfg, kUnitStride> lb(dy, g, j0);
  float acc[Cfg::TM][Cfg::TN];
  GemmMainLoop<Cfg>(la, lb, (g.k * g.khw + Cfg::BK - 1) / Cfg::BK, smem, acc);
  StoreNchw<Cfg>(acc, dx, nullptr, g.c, g.in_cols, g.hw, g.div_hw, m0, j0);
}

// A of backward weights: element (i = k, p = j = (n, sp)) = dy[(n*K + k)*OH*OW + sp], depth
// limited to this block's slice [j_begin, j_end). Thread: one depth per slice, rows il + q*16.
template <class Cfg>
struct ConvGradRowLoader {
  static constexpr int kRowStep = kThreads / Cfg::BK;
  static constexpr int kPer = Cfg::BM / kRowStep;
  static_assert(kPer * kRowStep == Cfg::BM, "");
  const float* dy;
  ConvGeometry g;
  int m0, pl, il, kk, j_end;
  float v[kPer];

  __device__ __forceinline__ ConvGradRowLoader(const float* dy_, const ConvGeometry& g_, int m0_,
                                               int j_begin, int j_end_)
      : dy(dy_), g(g_), m0(m0_), kk(j_begin), j_end(j_end_) {
    pl = threadIdx.x % Cfg::BK;
    il = threadIdx.x / Cfg::BK;
  }
  __device__ __forceinline__ void Load() {
    const int j = kk + pl;
    int sp;
    const int n = g.div_ohw.DivMod(j, &sp);
    const int base = n * g.k * g.ohw + sp;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int i = m0 + il + q * kRowStep;
      v[q] = 0.0f;
      if (j < j_end && i < g.k) v[q] = __ldg(dy + base + i * g.ohw);
    }
    kk += Cfg::BK;
  }
  __device__ __forceinline__ void Store(float* tile) const {
#pragma unroll
    for (int q = 0; q < kPer; ++q) tile[pl * Cfg::SA + il + q * kRowStep] = v[q];
  }
};

// B of backward weights: element (p = j = (n, oh, ow), x = r = (c, kh, kw)) = col(r, j).
// Thread: one depth per slice (decoded per slice), and kPer fixed columns r (decoded once).
template <class Cfg>
struct ConvColumnTLoader {
  static constexpr int kColStep = kThreads / Cfg::BK;
  static constexpr int kPer = Cfg::BN / kColStep;
  static_assert(kPer * kColStep == Cfg::BN && kPer <= 32, "");
  const float* x;
  ConvGeometry g;
  int pl, xl, kk, j_end;
  unsigned valid_r;  // bit q: column xl + q*kColStep lies inside R
  int roff[kPer];    // c*H*W + kh*W + kw
  int rkh[kPer];
  int rkw[kPer];
  float v[kPer];

  __device__ __forceinline__ ConvColumnTLoader(const float* x_, const ConvGeometry& g_, int n0,
                                               int j_begin, int j_end_)
      : x(x_), g(g_), kk(j_begin), j_end(j_end_), valid_r(0) {
    pl = threadIdx.x % Cfg::BK;
    xl = threadIdx.x / Cfg::BK;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int r = n0 + xl + q * kColStep;
      roff[q] = 0;
      rkh[q] = 0;
      rkw[q] = 0;
      if (r < g.rows) {
        int rem, kw;
        const int c = g.div_khw.DivMod(r, &rem);
        const int kh = g.div_kw.DivMod(rem, &kw);
        roff[q] = c * g.hw + kh * g.w + kw;
        rkh[q] = kh;
        rkw[q] = kw;
        valid_r |= 1u << q;
      }
    }
  }
  __device__ __forceinline__ void Load() {
    const int j = kk + pl;
    const bool j_ok = j < j_end;
    int sp, ow;
    const int n = g.div_ohw.DivMod(j, &sp);
    const int oh = g.div_ow.DivMod(sp, &ow);
    const int ih0 = oh * g.sh - g.ph;
    const int iw0 = ow * g.sw - g.pw;
    const int base = n * g.c * g.hw + ih0 * g.w + iw0;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int ih = ih0 + rkh[q];
      const int iw = iw0 + rkw[q];
      v[q] = 0.0f;
      if (j_ok && ((valid_r >> q) & 1u) != 0 &&
          static_cast<unsigned>(ih) < static_cast<unsigned>(g.h) &&
          static_cast<unsigned>(iw) < static_cast<unsigned>(g.w)) {
        v[q] = __ldg(x + base + roff[q]);
      }
    }
    kk += Cfg::BK;
  }
  __device__ __forceinline__ void Store(float* tile) const {
#pragma unroll
    for (int q = 0; q < kPer; ++q) tile[pl * Cfg::SB + xl + q * kColStep] = v[q];
  }
};

// out + blockIdx.z*K*R (K x R) = the slice blockIdx.z of dw: depths [z*slice_len, (z+1)*slice_len)
// of J. Grid: (ceil(R / BN), ceil(K / BM), slices).
template <class Cfg>
__global__ void __launch_bounds__(kThreads)
    ConvBackwardWeightsKernel(ConvGeometry g, const float* __restrict__ x,
                              const float* __restrict__ dy, float* __restrict__ out,
                              int slice_len) {
  __shared__ __align__(16) float smem[Cfg::kSmemFloats];
  const int m0 = blockIdx.y * Cfg::BM;
  const int n0 = blockIdx.x * Cfg::BN;
  const int j_begin = blockIdx.z * slice_len;
  const int j_end = g.out_cols - j_begin < slice_len ? g.out_cols : j_begin + slice_len;
  ConvGradRowLoader<Cfg> la(dy, g, m0, j_begin, j_end);
  ConvColumnTLoader<Cfg> lb(x, g, n0, j_begin, j_end);
  float acc[Cfg::TM][Cfg::TN];
  GemmMainLoop<Cfg>(la, lb, (j_end - j_begin + Cfg::BK - 1) / Cfg::BK, smem, acc);

  float* o = out + static_cast<int64_t>(blockIdx.z) * g.k * g.rows;
  const int ty = threadIdx.x / Cfg::TX;
  const int tx = threadIdx.x % Cfg::TX;
#pragma unroll
  for (int i = 0; i < Cfg::TM; ++i) {
    const int row = m0 + TileRow<Cfg>(ty, i);
    if (row >= g.k) continue;
#pragma unroll
    for (int jn = 0; jn < Cfg::TN; ++jn) {
      const int col = n0 + TileCol<Cfg>(tx, jn);
      if (col < g.rows) o[row * g.rows + col] = acc[i][jn];
    }
  }
}

// out[e] = sum over s < slices of partial[s*count + e], added in slice order.
static __global__ void __launch_bounds__(kThreads)
    SumSlicesKernel(const float* __restrict__ partial, int slices, int count,
                    float* __restrict__ out) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < count; e += gridDim.x * blockDim.x) {
    float s = partial[e];
    for (int z = 1; z < slices; ++z) s += partial[static_cast<int64_t>(z) * count + e];
    out[e] = s;
  }
}

// dbias[k] = sum over n, oh, ow of dy[n, k, oh, ow], accumulated in double (a fixed tree, so
// deterministic) and rounded once. One block per channel (grid-stride over channels).
static __global__ void __launch_bounds__(kThreads)
    ConvBiasGradKernel(ConvGeometry g, const float* __restrict__ dy, float* __restrict__ dbias) {
  __shared__ double partial[kThreads];
  const int t = threadIdx.x;
  for (int k = blockIdx.x; k < g.k; k += gridDim.x) {
    double s = 0.0;
    for (int n = 0; n < g.n; ++n) {
      const float* p = dy + (n * g.k + k) * g.ohw;
      for (int sp = t; sp < g.ohw; sp += kThreads) s += static_cast<double>(__ldg(p + sp));
    }
    partial[t] = s;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride /= 2) {
      if (t < stride) partial[t] += partial[t + stride];
      __syncthreads();
    }
    if (t == 0) dbias[k] = static_cast<float>(partial[0]);
    __syncthreads();  // partial is rewritten for the next channel
  }
}

}  // namespace qtrain::kernels::cuda::gemm_internal

#endif  // QTRAIN_WORKER_KERNELS_CUDA_GEMM_TILE_CUH_
