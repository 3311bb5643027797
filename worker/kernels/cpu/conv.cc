#include "worker/kernels/cpu/conv.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/aligned_buffer.h"
#include "worker/kernels/cpu/avx2_transpose.h"
#include "worker/kernels/cpu/elementwise.h"
#include "worker/kernels/cpu/sgemm.h"
#include "worker/kernels/cpu/sgemm_microkernel.h"

namespace qtrain::kernels {
namespace {

void CheckShape(const Conv2dShape& shape) {
  const absl::Status status = ValidateConv2dShape(shape);
  QTRAIN_CHECK(status.ok()) << status.ToString();
}

// A 1x1 kernel with unit stride and no padding: im2col would copy the image unchanged.
bool IsPointwise(const Conv2dShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 &&
         s.pad_w == 0;
}

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t CeilDiv(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// The output columns [lo, hi) whose input column ow*stride - pad + kw lies inside [0, width).
struct ColumnRange {
  int64_t lo;
  int64_t hi;
};
ColumnRange ValidColumns(const Conv2dShape& s, int64_t kw) {
  const int64_t ow_n = s.out_width();
  const int64_t lo = std::clamp<int64_t>(CeilDiv(s.pad_w - kw, s.stride_w), 0, ow_n);
  const int64_t hi =
      std::clamp<int64_t>(FloorDiv(s.in_width - 1 + s.pad_w - kw, s.stride_w) + 1, lo, ow_n);
  return ColumnRange{lo, hi};
}

// Runs fn(gemm_ctx, col_buffer, n) for every image n. With at least as many images as threads the
// images are split over the pool and each chunk gets its own column buffer and a single-threaded
// context; otherwise images run in turn and fn's GEMMs use the whole pool.
template <class Fn>
void ForEachImage(const CpuContext& ctx, int64_t batch, int64_t col_size, Fn&& fn) {
  if (batch >= ctx.num_threads()) {
    const CpuContext inner = ctx.SingleThreaded();
    ParallelFor(ctx.pool, batch, 1, [&](int64_t begin, int64_t end) {
      AlignedBuffer col(col_size);
      for (int64_t n = begin; n < end; ++n) fn(inner, col.data(), n);
    });
  } else {
    AlignedBuffer col(col_size);
    for (int64_t n = 0; n < batch; ++n) fn(ctx, col.data(), n);
  }
}


// ---- Implicit GEMM (AVX2 packing, AVX2 or AVX-512 micro-kernel) -------------------------------
//
// y (K x [N*OH*OW]) = w (K x R) * col (R x [N*OH*OW]), R = C*KH*KW, without an im2col buffer:
// the columns of all images form one flat index J = n*OH*OW + oh*OW + ow, cut into nr-wide
// strips; each strip of col is packed straight from a zero-padded copy of the input (R x nr,
// in L1) and multiplied by the weights, packed once per call into mr-row strips, with the SGEMM
// micro-kernel: AVX-512's 12 x 32 where the CPU has it (twice the multiply-adds per instruction;
// on CPUs with two 512-bit FMA units, twice the throughput), else AVX2's 6 x 16. Small spatial sizes (7x7) thus no longer waste most of a ragged last strip, and
// both threads get an even share of strips whatever the batch. Each output element sees the same
// depth blocking and arithmetic whichever thread computes it, so results do not depend on the
// thread count.

constexpr int kIgMaxNr = 32;  // the widest micro-kernel tile (AVX-512)
constexpr int64_t kIgMaxKc = 256;

#define QTRAIN_AVX2 __attribute__((target("avx2,fma")))

// The micro-kernel for an implicit GEMM whose tile columns cover `columns` outputs: AVX-512's
// when the context allows it and the 32-wide tile is not mostly padding (columns >= 32).
const sgemm_internal::MicroKernel& IgKernel(const CpuContext& ctx, int64_t columns) {
  static const sgemm_internal::MicroKernel avx2 = sgemm_internal::Avx2MicroKernel();
  if (ctx.effective_simd() == SimdLevel::kAvx512 && columns >= kIgMaxNr) {
    static const sgemm_internal::MicroKernel avx512 = sgemm_internal::Avx512MicroKernel();
    return avx512;
  }
  return avx2;
}

bool UseImplicitGemm(const CpuContext& ctx) {
  return static_cast<int>(ctx.effective_simd()) >= static_cast<int>(SimdLevel::kAvx2);
}

// A run of a strip's lanes that lie on one output row of one image.
struct IgSegment {
  int lane;
  int len;
  int64_t n;       // image
  int64_t sp;      // spatial index oh*OW + ow of the first lane
  int64_t offset;  // padded-input offset of (n, ih = oh*sh, iw = ow*sw), channel 0
};

struct IgScratch {
  AlignedBuffer xpad;   // zero-padded input batch (calling thread)
  AlignedBuffer apack;  // packed weights (calling thread)
  std::vector<int64_t> roff;
};
IgScratch& CallerScratch() {
  thread_local IgScratch scratch;
  return scratch;
}
struct IgStripScratch {
  AlignedBuffer strip;
  AlignedBuffer tile;
};
IgStripScratch& StripScratch() {
  thread_local IgStripScratch scratch;
  return scratch;
}

// Zero-padded copy of x: N*C planes of (H + 2ph) x (W + 2pw), plus kIgMaxNr zeros at the end so
// 8-wide loads may run past the last element.
void PadInput(const CpuContext& ctx, const Conv2dShape& s, const float* x, float* xpad) {
  const int64_t hp = s.in_height + 2 * s.pad_h;
  const int64_t wp = s.in_width + 2 * s.pad_w;
  const int64_t planes = s.batch * s.in_channels;
  ParallelFor(ctx.pool, planes, std::max<int64_t>(1, 8192 / (hp * wp)),
              [&](int64_t begin, int64_t end) {
                for (int64_t p = begin; p < end; ++p) {
                  const float* src = x + p * s.in_height * s.in_width;
                  float* dst = xpad + p * hp * wp;
                  std::fill(dst, dst + s.pad_h * wp, 0.0f);
                  for (int64_t h = 0; h < s.in_height; ++h) {
                    float* row = dst + (h + s.pad_h) * wp;
                    std::fill(row, row + s.pad_w, 0.0f);
                    std::memcpy(row + s.pad_w, src + h * s.in_width, sizeof(float) * s.in_width);
                    std::fill(row + s.pad_w + s.in_width, row + wp, 0.0f);
                  }
                  std::fill(dst + (s.pad_h + s.in_height) * wp, dst + hp * wp, 0.0f);
                }
              });
  std::fill(xpad + planes * hp * wp, xpad + planes * hp * wp + kIgMaxNr, 0.0f);
}

using avx2_internal::Transpose8x8;

// Computes the strips [strip_begin, strip_end) of y.
QTRAIN_AVX2 void IgStrips(const sgemm_internal::MicroKernel& kernel, const Conv2dShape& s,
                          const float* xpad, const float* apack, const int64_t* roff,
                          const float* bias, float* y, int64_t strip_begin, int64_t strip_end) {
  const int mr = kernel.blocking.mr;
  const int nr = kernel.blocking.nr;
  const int64_t k_out = s.out_channels;
  const int64_t rdim = s.col_rows();
  const int64_t ow_n = s.out_width();
  const int64_t spatial = s.col_cols();
  const int64_t total = s.batch * spatial;
  const int64_t hp = s.in_height + 2 * s.pad_h;
  const int64_t wp = s.in_width + 2 * s.pad_w;
  const int64_t image_pad = s.in_channels * hp * wp;
  const int64_t mp = (k_out + mr - 1) / mr * mr;
  const int64_t k_blocks = (rdim + kIgMaxKc - 1) / kIgMaxKc;
  const int64_t kc = (rdim + k_blocks - 1) / k_blocks;

  IgStripScratch& scratch = StripScratch();
  float* strip = scratch.strip.Reserve(rdim * nr + nr);
  float* tile = scratch.tile.Reserve(mp * nr);
  IgSegment seg[kIgMaxNr];

  for (int64_t st = strip_begin; st < strip_end; ++st) {
    const int64_t j0 = st * nr;
    int segments = 0;
    int lane = 0;
    for (int64_t j = j0; lane < nr && j < total;) {
      const int64_t n = j / spatial;
      const int64_t sp = j - n * spatial;
      const int64_t oh = sp / ow_n;
      const int64_t ow = sp - oh * ow_n;
      const int len = static_cast<int>(std::min<int64_t>({nr - lane, ow_n - ow, total - j}));
      seg[segments++] =
          IgSegment{lane, len, n, sp, n * image_pad + oh * s.stride_h * wp + ow * s.stride_w};
      lane += len;
      j += len;
    }
    const int valid = lane;

    // Pack: strip[r * nr + l] = col(r, j0 + l). Segments are written in lane order with 8-wide
    // stores that may spill past their end; the next segment (or row) overwrites the spill.
    if (s.stride_w == 1) {
      for (int64_t r = 0; r < rdim; ++r) {
        float* d = strip + r * nr;
        const float* base = xpad + roff[r];
        for (int g = 0; g < segments; ++g) {
          const float* src = base + seg[g].offset;
          float* out = d + seg[g].lane;
          for (int q = 0; q < seg[g].len; q += 8) {
            _mm256_storeu_ps(out + q, _mm256_loadu_ps(src + q));
          }
        }
        for (int l = valid; l < nr; ++l) d[l] = 0.0f;
      }
    } else {
      for (int64_t r = 0; r < rdim; ++r) {
        float* d = strip + r * nr;
        const float* base = xpad + roff[r];
        for (int g = 0; g < segments; ++g) {
          const float* src = base + seg[g].offset;
          float* out = d + seg[g].lane;
          for (int q = 0; q < seg[g].len; ++q) out[q] = src[q * s.stride_w];
        }
        for (int l = valid; l < nr; ++l) d[l] = 0.0f;
      }
    }

    // Straight into y when the nr columns are one contiguous run of one image.
    const bool direct = valid == nr && seg[0].sp + nr <= spatial;
    float* c_base = direct ? y + seg[0].n * k_out * spatial + seg[0].sp : tile;
    const int64_t ldc = direct ? spatial : nr;
    for (int64_t pc = 0; pc < rdim; pc += kc) {
      const int64_t kb = std::min(kc, rdim - pc);
      const float beta = pc == 0 ? 0.0f : 1.0f;
      const float* a_block = apack + pc * mp;
      for (int64_t i = 0; i < k_out; i += mr) {
        const int rows = static_cast<int>(std::min<int64_t>(mr, k_out - i));
        const sgemm_internal::MicroKernelFn fn =
            rows == mr ? kernel.fn : kernel.partial_rows[rows];
        fn(kb, a_block + i * kb, strip + pc * nr, c_base + i * ldc, ldc, 1.0f, beta);
      }
    }
    if (direct) {
      if (bias != nullptr) {
        for (int64_t k = 0; k < k_out; ++k) {
          float* row = c_base + k * spatial;
          const __m256 b = _mm256_set1_ps(bias[k]);
          for (int q = 0; q < nr; q += 8) {
            _mm256_storeu_ps(row + q, _mm256_add_ps(_mm256_loadu_ps(row + q), b));
          }
        }
      }
      continue;
    }
    for (int g = 0; g < segments; ++g) {
      float* out = y + seg[g].n * k_out * spatial + seg[g].sp;
      for (int64_t k = 0; k < k_out; ++k) {
        const float* src = tile + k * nr + seg[g].lane;
        float* dst = out + k * spatial;
        if (bias != nullptr) {
          for (int q = 0; q < seg[g].len; ++q) dst[q] = src[q] + bias[k];
        } else {
          for (int q = 0; q < seg[g].len; ++q) dst[q] = src[q];
        }
      }
    }
  }
}


// Forward convolution by implicit GEMM; w is K x R row-major. Requires AVX2.
void ImplicitGemmForward(const CpuContext& ctx, const Conv2dShape& s, const float* x,
                         const float* w, const float* bias, float* y) {
  const sgemm_internal::MicroKernel& kernel = IgKernel(ctx, kIgMaxNr);
  const int mr = kernel.blocking.mr;
  const int nr = kernel.blocking.nr;
  const int64_t k_out = s.out_channels;
  const int64_t rdim = s.col_rows();
  const int64_t hp = s.in_height + 2 * s.pad_h;
  const int64_t wp = s.in_width + 2 * s.pad_w;
  const int64_t mp = (k_out + mr - 1) / mr * mr;
  const int64_t k_blocks = (rdim + kIgMaxKc - 1) / kIgMaxKc;
  const int64_t kc = (rdim + k_blocks - 1) / k_blocks;

  IgScratch& scratch = CallerScratch();
  float* xpad = scratch.xpad.Reserve(s.batch * s.in_channels * hp * wp + kIgMaxNr);
  PadInput(ctx, s, x, xpad);

  // Weights: depth block pc holds ceil(K/mr) strips of kb x mr, rows past K zero.
  float* apack = scratch.apack.Reserve(mp * rdim);
  for (int64_t pc = 0; pc < rdim; pc += kc) {
    const int64_t kb = std::min(kc, rdim - pc);
    float* block = apack + pc * mp;
    for (int64_t i0 = 0; i0 < mp; i0 += mr) {
      float* dst = block + i0 * kb;
      for (int64_t p = 0; p < kb; ++p) {
        for (int i = 0; i < mr; ++i) {
          dst[p * mr + i] = i0 + i < k_out ? w[(i0 + i) * rdim + pc + p] : 0.0f;
        }
      }
    }
  }
  scratch.roff.resize(static_cast<size_t>(rdim));
  for (int64_t c = 0; c < s.in_channels; ++c) {
    for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
        scratch.roff[(c * s.kernel_h + kh) * s.kernel_w + kw] = c * hp * wp + kh * wp + kw;
      }
    }
  }
  const int64_t* roff = scratch.roff.data();
  const int64_t strips = (s.batch * s.col_cols() + nr - 1) / nr;
  ParallelFor(ctx.pool, strips, 4, [&](int64_t begin, int64_t end) {
    IgStrips(kernel, s, xpad, apack, roff, bias, y, begin, end);
  });
}

// Backward data of a unit-stride convolution is the forward convolution of dy with the weights
// flipped spatially and with in/out channels swapped, padded by KH-1-pad.
bool BackwardDataAsConvolution(const Conv2dShape& s) {
  return s.stride_h == 1 && s.stride_w == 1 && s.pad_h <= s.kernel_h - 1 &&
         s.pad_w <= s.kernel_w - 1;
}

void ImplicitGemmBackwardData(const CpuContext& ctx, const Conv2dShape& s, const float* dy,
                              const float* w, float* dx) {
  Conv2dShape t;
  t.batch = s.batch;
  t.in_channels = s.out_channels;
  t.in_height = s.out_height();
  t.in_width = s.out_width();
  t.out_channels = s.in_channels;
  t.kernel_h = s.kernel_h;
  t.kernel_w = s.kernel_w;
  t.pad_h = s.kernel_h - 1 - s.pad_h;
  t.pad_w = s.kernel_w - 1 - s.pad_w;
  thread_local AlignedBuffer flipped;
  const int64_t khw = s.kernel_h * s.kernel_w;
  float* wt = flipped.Reserve(s.out_channels * s.in_channels * khw);
  for (int64_t k = 0; k < s.out_channels; ++k) {
    for (int64_t c = 0; c < s.in_channels; ++c) {
      const float* src = w + (k * s.in_channels + c) * khw;
      float* dst = wt + (c * s.out_channels + k) * khw;
      for (int64_t q = 0; q < khw; ++q) dst[q] = src[khw - 1 - q];
    }
  }
  ImplicitGemmForward(ctx, t, dy, wt, nullptr, dx);
}

// Backward weights by implicit GEMM: dw^T (R x K) = col (R x T) * dy^T (T x K) over the flat
// column index T = N*OH*OW, in depth blocks of kIgDepth positions. col is packed straight from
// the padded input into mr-row strips, dy^T into nr-column strips. Threads split the R rows, each
// running the whole depth, so the result does not depend on the thread count. Requires AVX2.
constexpr int64_t kIgDepth = 256;

struct IgRun {
  int64_t p;       // first depth position within the block
  int64_t len;     // positions on one output row of one image
  int64_t n;       // image
  int64_t sp;      // spatial index of the first position
  int64_t offset;  // padded-input offset of its window origin, channel 0
};

// The runs covering positions [j0, j0 + kb).
void IgRuns(const Conv2dShape& s, int64_t j0, int64_t kb, std::vector<IgRun>* runs) {
  runs->clear();
  const int64_t ow_n = s.out_width();
  const int64_t spatial = s.col_cols();
  const int64_t hp = s.in_height + 2 * s.pad_h;
  const int64_t wp = s.in_width + 2 * s.pad_w;
  const int64_t image_pad = s.in_channels * hp * wp;
  for (int64_t p = 0; p < kb;) {
    const int64_t j = j0 + p;
    const int64_t n = j / spatial;
    const int64_t sp = j - n * spatial;
    const int64_t oh = sp / ow_n;
    const int64_t ow = sp - oh * ow_n;
    const int64_t len = std::min(kb - p, ow_n - ow);
    runs->push_back(
        IgRun{p, len, n, sp, n * image_pad + oh * s.stride_h * wp + ow * s.stride_w});
    p += len;
  }
}

// dw rows r in [r_begin, r_end) (multiples of mr except at R), written to dwt (R x kp, kp = K
// rounded up to nr).
QTRAIN_AVX2 void IgWeightRows(const sgemm_internal::MicroKernel& kernel, const Conv2dShape& s,
                              const float* xpad, const float* dy, const int64_t* roff,
                              int64_t r_begin, int64_t r_end, float* dwt, int64_t kp) {
  const int mr = kernel.blocking.mr;
  const int nr = kernel.blocking.nr;
  const int64_t k_out = s.out_channels;
  const int64_t spatial = s.col_cols();
  const int64_t total = s.batch * spatial;
  const int64_t sw = s.stride_w;
  thread_local AlignedBuffer bbuf;
  thread_local AlignedBuffer abuf;
  thread_local std::vector<IgRun> runs;
  float* bpack = bbuf.Reserve(kIgDepth * kp);
  float* apack = abuf.Reserve(kIgDepth * mr + 16);
  for (int64_t j0 = 0; j0 < total; j0 += kIgDepth) {
    const int64_t kb = std::min(kIgDepth, total - j0);
    IgRuns(s, j0, kb, &runs);
    // B: strip t holds bpack[t*nr*kb + p*nr + l] = dy(k = nr*t + l, position j0 + p). dy is
    // contiguous over an image's positions, so runs here are per image; 8x8 blocks go through
    // registers, the ragged tail of each run element by element.
    for (int64_t k0 = 0; k0 < kp; k0 += 8) {
      float* strip = bpack + (k0 / nr) * nr * kb + (k0 % nr);
      if (k0 + 8 > k_out) {
        for (int l = 0; l < 8; ++l) {
          const int64_t k = k0 + l;
          for (int64_t p = 0; p < kb; ++p) {
            const int64_t j = j0 + p;
            const int64_t n = j / spatial;
            strip[p * nr + l] = k < k_out ? dy[(n * k_out + k) * spatial + (j - n * spatial)]
                                             : 0.0f;
          }
        }
        continue;
      }
      for (int64_t p = 0; p < kb;) {
        const int64_t j = j0 + p;
        const int64_t n = j / spatial;
        const int64_t sp = j - n * spatial;
        const int64_t len = std::min(kb - p, spatial - sp);
        const float* src = dy + (n * k_out + k0) * spatial + sp;
        float* dst = strip + p * nr;
        int64_t q = 0;
        for (; q + 8 <= len; q += 8) {
          __m256 r[8];
#pragma GCC unroll 8
          for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(src + t * spatial + q);
          Transpose8x8(r);
#pragma GCC unroll 8
          for (int t = 0; t < 8; ++t) _mm256_storeu_ps(dst + (q + t) * nr, r[t]);
        }
        for (; q < len; ++q) {
          for (int t = 0; t < 8; ++t) dst[q * nr + t] = src[t * spatial + q];
        }
        p += len;
      }
    }
    const float beta = j0 == 0 ? 0.0f : 1.0f;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += mr) {
      const int rows = static_cast<int>(std::min<int64_t>(mr, r_end - r0));
      // A: apack[p*mr + i] = col(r0 + i, j0 + p). With unit stride, groups of 8 rows (the mr
      // wanted rounded up to 8, spare rows clamped to the strip) x 8 positions go through
      // registers and each position's groups are stored 8 wide, in order: the spare lanes of a
      // position's last group spill into the next position's slot, which is written next
      // (positions ascend; reads past a run stay inside the padded input).
      if (sw == 1) {
        const int groups = (mr + 7) / 8;
        const float* base[16];
        for (int i = 0; i < 8 * groups; ++i) base[i] = xpad + roff[r0 + std::min(i, rows - 1)];
        for (const IgRun& run : runs) {
          float* dst = apack + run.p * mr;
          for (int64_t q = 0; q < run.len; q += 8) {
            __m256 r[2][8];
            for (int g = 0; g < groups; ++g) {
#pragma GCC unroll 8
              for (int t = 0; t < 8; ++t) r[g][t] = _mm256_loadu_ps(base[8 * g + t] + run.offset + q);
              Transpose8x8(r[g]);
            }
            const int64_t count = std::min<int64_t>(8, run.len - q);
            for (int t = 0; t < count; ++t) {
              for (int g = 0; g < groups; ++g) {
                _mm256_storeu_ps(dst + (q + t) * mr + 8 * g, r[g][t]);
              }
            }
          }
        }
      } else {
        for (int i = 0; i < mr; ++i) {
          const float* base = xpad + roff[r0 + std::min(i, rows - 1)];
          for (const IgRun& run : runs) {
            const float* src = base + run.offset;
            float* dst = apack + run.p * mr + i;
            for (int64_t q = 0; q < run.len; ++q) dst[q * mr] = src[q * sw];
          }
        }
      }
      const sgemm_internal::MicroKernelFn fn =
          rows == mr ? kernel.fn : kernel.partial_rows[rows];
      for (int64_t k0 = 0; k0 < kp; k0 += nr) {
        fn(kb, apack, bpack + k0 * kb, dwt + r0 * kp + k0, kp, 1.0f, beta);
      }
    }
  }
}

void ImplicitGemmBackwardWeights(const CpuContext& ctx, const Conv2dShape& s, const float* x,
                                 const float* dy, float* dw) {
  const int64_t k_out = s.out_channels;
  const int64_t rdim = s.col_rows();
  const int64_t hp = s.in_height + 2 * s.pad_h;
  const int64_t wp = s.in_width + 2 * s.pad_w;
  const sgemm_internal::MicroKernel& kernel = IgKernel(ctx, k_out);
  const int mr = kernel.blocking.mr;
  const int nr = kernel.blocking.nr;
  const int64_t kp = (k_out + nr - 1) / nr * nr;
  IgScratch& scratch = CallerScratch();
  float* xpad = scratch.xpad.Reserve(s.batch * s.in_channels * hp * wp + kIgMaxNr);
  PadInput(ctx, s, x, xpad);
  scratch.roff.resize(static_cast<size_t>(rdim));
  for (int64_t c = 0; c < s.in_channels; ++c) {
    for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
        scratch.roff[(c * s.kernel_h + kh) * s.kernel_w + kw] = c * hp * wp + kh * wp + kw;
      }
    }
  }
  float* dwt = scratch.apack.Reserve(rdim * kp);
  const int64_t* roff = scratch.roff.data();
  const int64_t row_strips = (rdim + mr - 1) / mr;
  ParallelFor(ctx.pool, row_strips, 1, [&](int64_t begin, int64_t end) {
    IgWeightRows(kernel, s, xpad, dy, roff, begin * mr, std::min(rdim, end * mr), dwt, kp);
  });
  for (int64_t k = 0; k < k_out; ++k) {
    for (int64_t r = 0; r < rdim; ++r) dw[k * rdim + r] = dwt[r * kp + k];
  }
}

#undef QTRAIN_AVX2

}  // namespace

absl::Status ValidateConv2dShape(const Conv2dShape& s) {
  if (s.batch < 1 || s.in_channels < 1 || s.in_height < 1 || s.in_width < 1 || s.out_channels < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "conv2d: batch, channels and input size must be >= 1, got input ", s.batch, "x",
        s.in_channels, "x", s.in_height, "x", s.in_width, ", out_channels ", s.out_channels));
  }
  if (s.kernel_h < 1 || s.kernel_w < 1 || s.stride_h < 1 || s.stride_w < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("conv2d: kernel and stride must be >= 1, got kernel ", s.kernel_h, "x",
                     s.kernel_w, " stride ", s.stride_h, "x", s.stride_w));
  }
  if (s.pad_h < 0 || s.pad_w < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("conv2d: padding must be >= 0, got ", s.pad_h, "x", s.pad_w));
  }
  if (s.in_height + 2 * s.pad_h < s.kernel_h || s.in_width + 2 * s.pad_w < s.kernel_w) {
    return absl::InvalidArgumentError(absl::StrCat(
        "conv2d: kernel ", s.kernel_h, "x", s.kernel_w, " is larger than the padded input ",
        s.in_height + 2 * s.pad_h, "x", s.in_width + 2 * s.pad_w));
  }
  return absl::OkStatus();
}

void Im2Col(const Conv2dShape& s, const float* image, float* col) {
  const int64_t oh_n = s.out_height();
  const int64_t ow_n = s.out_width();
  for (int64_t c = 0; c < s.in_channels; ++c) {
    const float* plane = image + c * s.in_height * s.in_width;
    for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
        float* row = col + ((c * s.kernel_h + kh) * s.kernel_w + kw) * oh_n * ow_n;
        const ColumnRange cols = ValidColumns(s, kw);
        for (int64_t oh = 0; oh < oh_n; ++oh) {
          float* out = row + oh * ow_n;
          const int64_t ih = oh * s.stride_h - s.pad_h + kh;
          if (ih < 0 || ih >= s.in_height) {
            std::fill(out, out + ow_n, 0.0f);
            continue;
          }
          const float* in = plane + ih * s.in_width - s.pad_w + kw;  // in[ow * stride_w]
          std::fill(out, out + cols.lo, 0.0f);
          if (s.stride_w == 1) {
            std::memcpy(out + cols.lo, in + cols.lo, sizeof(float) * (cols.hi - cols.lo));
          } else {
            for (int64_t ow = cols.lo; ow < cols.hi; ++ow) out[ow] = in[ow * s.stride_w];
          }
          std::fill(out + cols.hi, out + ow_n, 0.0f);
        }
      }
    }
  }
}

void Col2Im(const Conv2dShape& s, const float* col, float* image) {
  const int64_t oh_n = s.out_height();
  const int64_t ow_n = s.out_width();
  std::fill(image, image + s.in_channels * s.in_height * s.in_width, 0.0f);
  for (int64_t c = 0; c < s.in_channels; ++c) {
    float* plane = image + c * s.in_height * s.in_width;
    for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
        const float* row = col + ((c * s.kernel_h + kh) * s.kernel_w + kw) * oh_n * ow_n;
        const ColumnRange cols = ValidColumns(s, kw);
        for (int64_t oh = 0; oh < oh_n; ++oh) {
          const int64_t ih = oh * s.stride_h - s.pad_h + kh;
          if (ih < 0 || ih >= s.in_height) continue;
          const float* out = row + oh * ow_n;
          float* in = plane + ih * s.in_width - s.pad_w + kw;
          for (int64_t ow = cols.lo; ow < cols.hi; ++ow) in[ow * s.stride_w] += out[ow];
        }
      }
    }
  }
}

void Conv2dForward(const CpuContext& ctx, const Conv2dShape& s, const float* x, const float* w,
                   const float* bias, float* y) {
  CheckShape(s);
  const int64_t kdim = s.col_rows();
  const int64_t spatial = s.col_cols();
  const int64_t in_size = s.in_channels * s.in_height * s.in_width;
  const int64_t out_size = s.out_channels * spatial;
  const bool pointwise = IsPointwise(s);
  if (!pointwise && UseImplicitGemm(ctx)) {
    ImplicitGemmForward(ctx, s, x, w, bias, y);
    return;
  }
  ForEachImage(ctx, s.batch, pointwise ? 0 : kdim * spatial,
               [&](const CpuContext& gemm_ctx, float* col, int64_t n) {
                 const float* xn = x + n * in_size;
                 float* yn = y + n * out_size;
                 const float* cols = xn;
                 if (!pointwise) {
                   Im2Col(s, xn, col);
                   cols = col;
                 }
                 // The bias is written first and the GEMM accumulates onto it (beta = 1).
                 float beta = 0.0f;
                 if (bias != nullptr) {
                   for (int64_t k = 0; k < s.out_channels; ++k) {
                     std::fill(yn + k * spatial, yn + (k + 1) * spatial, bias[k]);
                   }
                   beta = 1.0f;
                 }
                 Sgemm(gemm_ctx, Transpose::kNo, Transpose::kNo, s.out_channels, spatial, kdim,
                       1.0f, w, kdim, cols, spatial, beta, yn, spatial);
               });
}

void Conv2dBackwardData(const CpuContext& ctx, const Conv2dShape& s, const float* dy,
                        const float* w, float* dx) {
  CheckShape(s);
  const int64_t kdim = s.col_rows();
  const int64_t spatial = s.col_cols();
  const int64_t in_size = s.in_channels * s.in_height * s.in_width;
  const int64_t out_size = s.out_channels * spatial;
  const bool pointwise = IsPointwise(s);
  if (!pointwise && UseImplicitGemm(ctx) && BackwardDataAsConvolution(s)) {
    ImplicitGemmBackwardData(ctx, s, dy, w, dx);
    return;
  }
  ForEachImage(ctx, s.batch, pointwise ? 0 : kdim * spatial,
               [&](const CpuContext& gemm_ctx, float* dcol, int64_t n) {
                 const float* dyn = dy + n * out_size;
                 float* dxn = dx + n * in_size;
                 // dcol = w^T * dy_n; a pointwise convolution writes it straight into dx_n.
                 float* target = pointwise ? dxn : dcol;
                 Sgemm(gemm_ctx, Transpose::kYes, Transpose::kNo, kdim, spatial, s.out_channels,
                       1.0f, w, kdim, dyn, spatial, 0.0f, target, spatial);
                 if (!pointwise) Col2Im(s, dcol, dxn);
               });
}

void Conv2dBackwardWeights(const CpuContext& ctx, const Conv2dShape& s, const float* x,
                           const float* dy, float* dw, float* dbias) {
  CheckShape(s);
  const int64_t kdim = s.col_rows();
  const int64_t spatial = s.col_cols();
  const int64_t in_size = s.in_channels * s.in_height * s.in_width;
  const int64_t out_size = s.out_channels * spatial;
  const int64_t dw_size = s.out_channels * kdim;
  const bool pointwise = IsPointwise(s);
  if (!pointwise && UseImplicitGemm(ctx)) {
    ImplicitGemmBackwardWeights(ctx, s, x, dy, dw);
    if (dbias != nullptr) {
      // Per (image, channel) sums in image order: the same for every thread count.
      const CpuContext inner = ctx.SingleThreaded();
      for (int64_t k = 0; k < s.out_channels; ++k) {
        double total = 0.0;
        for (int64_t n = 0; n < s.batch; ++n) total += Sum(inner, spatial, dy + n * out_size + k * spatial);
        dbias[k] = static_cast<float>(total);
      }
    }
    return;
  }

  // Accumulates images [begin, end) into dw_part (overwritten) and dbias_part (added to).
  auto accumulate = [&](const CpuContext& gemm_ctx, int64_t begin, int64_t end, float* dw_part,
                        double* dbias_part) {
    AlignedBuffer col(pointwise ? 0 : kdim * spatial);
    const CpuContext inner = gemm_ctx.SingleThreaded();
    for (int64_t n = begin; n < end; ++n) {
      const float* dyn = dy + n * out_size;
      const float* cols = x + n * in_size;
      if (!pointwise) {
        Im2Col(s, cols, col.data());
        cols = col.data();
      }
      // dw += dy_n (K x OH*OW) * col^T (OH*OW x C*KH*KW).
      Sgemm(gemm_ctx, Transpose::kNo, Transpose::kYes, s.out_channels, kdim, spatial, 1.0f, dyn,
            spatial, cols, spatial, n == begin ? 0.0f : 1.0f, dw_part, kdim);
      if (dbias_part != nullptr) {
        for (int64_t k = 0; k < s.out_channels; ++k) {
          dbias_part[k] += Sum(inner, spatial, dyn + k * spatial);
        }
      }
    }
  };

  if (s.batch < ctx.num_threads()) {
    std::vector<double> dbias_sum(s.out_channels, 0.0);
    accumulate(ctx, 0, s.batch, dw, dbias != nullptr ? dbias_sum.data() : nullptr);
    if (dbias != nullptr) {
      for (int64_t k = 0; k < s.out_channels; ++k) dbias[k] = static_cast<float>(dbias_sum[k]);
    }
    return;
  }

  // One partial dw per chunk of images (chunk 0 writes dw itself), summed in chunk order.
  const int64_t chunks = NumChunks(ctx.pool, s.batch, 1);
  std::vector<AlignedBuffer> dw_partial(chunks > 1 ? chunks - 1 : 0);
  std::vector<double> dbias_partial(chunks * s.out_channels, 0.0);
  const CpuContext inner = ctx.SingleThreaded();
  ParallelForChunks(ctx.pool, s.batch, 1, [&](int64_t chunk, int64_t begin, int64_t end) {
    float* dw_part = chunk == 0 ? dw : dw_partial[chunk - 1].Reserve(dw_size);
    accumulate(inner, begin, end, dw_part,
               dbias != nullptr ? dbias_partial.data() + chunk * s.out_channels : nullptr);
  });
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    Add(ctx, dw_size, dw, dw_partial[chunk - 1].data(), dw);
  }
  if (dbias != nullptr) {
    for (int64_t k = 0; k < s.out_channels; ++k) {
      double total = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        total += dbias_partial[chunk * s.out_channels + k];
      }
      dbias[k] = static_cast<float>(total);
    }
  }
}

}  // namespace qtrain::kernels
