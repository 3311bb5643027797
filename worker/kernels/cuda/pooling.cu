#include <string>

#include "common/status_macros.h"
#include "worker/kernels/cuda/kernel_util.cuh"
#include "worker/kernels/cuda/launch_util.h"
#include "worker/kernels/cuda/pooling.h"

namespace qtrain::kernels::cuda {
namespace {

// Pool2dShape's numbers in a form device code can use (its methods are host-only).
struct Geometry {
  int64_t in_h, in_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w;
  __device__ int64_t in_plane() const { return in_h * in_w; }
  __device__ int64_t out_plane() const { return out_h * out_w; }
};

Geometry MakeGeometry(const Pool2dShape& s) {
  return Geometry{s.in_height, s.in_width, s.kernel_h, s.kernel_w,     s.stride_h,
                  s.stride_w,  s.pad_h,    s.pad_w,    s.out_height(), s.out_width()};
}

// The in-bounds part [lo, hi) of the window starting at `start` (the CPU's Clip).
struct Range {
  int64_t lo;
  int64_t hi;
};
__device__ __forceinline__ Range Clip(int64_t start, int64_t kernel, int64_t size) {
  return Range{start > 0 ? start : 0, start + kernel < size ? start + kernel : size};
}

// Outputs [lo, hi] along one axis whose (unclipped) window [o * stride - pad, + kernel) holds
// input position i: o * stride <= i + pad and o * stride > i + pad - kernel.
__device__ __forceinline__ Range Covering(int64_t i, int64_t kernel, int64_t stride, int64_t pad,
                                          int64_t outputs) {
  const int64_t below = i + pad - kernel;  // o must exceed below / stride
  const int64_t lo = below < 0 ? 0 : below / stride + 1;
  const int64_t top = (i + pad) / stride;
  return Range{lo, top < outputs - 1 ? top : outputs - 1};  // inclusive hi
}

__device__ __forceinline__ float Divisor(const Geometry& g, AvgPoolDivisor divisor, Range rows,
                                         Range cols) {
  if (divisor == AvgPoolDivisor::kWindowSize) return static_cast<float>(g.kernel_h * g.kernel_w);
  return static_cast<float>((rows.hi - rows.lo) * (cols.hi - cols.lo));
}

struct MaxForwardFn {
  Geometry g;
  const float* x;
  float* y;
  int32_t* argmax;
  __device__ void operator()(int64_t o) const {
    const int64_t plane = o / g.out_plane();
    const int64_t r = o - plane * g.out_plane();
    const int64_t oh = r / g.out_w;
    const int64_t ow = r - oh * g.out_w;
    const float* xp = x + plane * g.in_plane();
    const Range rows = Clip(oh * g.stride_h - g.pad_h, g.kernel_h, g.in_h);
    const Range cols = Clip(ow * g.stride_w - g.pad_w, g.kernel_w, g.in_w);
    int64_t best_index = rows.lo * g.in_w + cols.lo;
    float best = xp[best_index];
    for (int64_t ih = rows.lo; ih < rows.hi; ++ih) {
      for (int64_t iw = cols.lo; iw < cols.hi; ++iw) {
        const float v = xp[ih * g.in_w + iw];
        // Strictly greater keeps the first maximum; a NaN wins once.
        if (v > best || (isnan(v) && !isnan(best))) {
          best = v;
          best_index = ih * g.in_w + iw;
        }
      }
    }
    y[o] = best;
    argmax[o] = static_cast<int32_t>(best_index);
  }
};

struct MaxBackwardFn {
  Geometry g;
  const float* dy;
  const int32_t* argmax;
  float* dx;
  __device__ void operator()(int64_t e) const {
    const int64_t plane = e / g.in_plane();
    const int64_t index = e - plane * g.in_plane();
    const int64_t ih = index / g.in_w;
    const int64_t iw = index - ih * g.in_w;
    const Range rows = Covering(ih, g.kernel_h, g.stride_h, g.pad_h, g.out_h);
    const Range cols = Covering(iw, g.kernel_w, g.stride_w, g.pad_w, g.out_w);
    const float* dyp = dy + plane * g.out_plane();
    const int32_t* ap = argmax + plane * g.out_plane();
    float sum = 0.0f;
    for (int64_t oh = rows.lo; oh <= rows.hi; ++oh) {
      for (int64_t ow = cols.lo; ow <= cols.hi; ++ow) {
        const int64_t o = oh * g.out_w + ow;
        if (ap[o] == index) sum += dyp[o];
      }
    }
    dx[e] = sum;
  }
};

struct AvgForwardFn {
  Geometry g;
  AvgPoolDivisor divisor;
  const float* x;
  float* y;
  __device__ void operator()(int64_t o) const {
    const int64_t plane = o / g.out_plane();
    const int64_t r = o - plane * g.out_plane();
    const int64_t oh = r / g.out_w;
    const int64_t ow = r - oh * g.out_w;
    const float* xp = x + plane * g.in_plane();
    const Range rows = Clip(oh * g.stride_h - g.pad_h, g.kernel_h, g.in_h);
    const Range cols = Clip(ow * g.stride_w - g.pad_w, g.kernel_w, g.in_w);
    float sum = 0.0f;
    for (int64_t ih = rows.lo; ih < rows.hi; ++ih) {
      for (int64_t iw = cols.lo; iw < cols.hi; ++iw) sum += xp[ih * g.in_w + iw];
    }
    y[o] = sum / Divisor(g, divisor, rows, cols);
  }
};

struct AvgBackwardFn {
  Geometry g;
  AvgPoolDivisor divisor;
  const float* dy;
  float* dx;
  __device__ void operator()(int64_t e) const {
    const int64_t plane = e / g.in_plane();
    const int64_t index = e - plane * g.in_plane();
    const int64_t ih = index / g.in_w;
    const int64_t iw = index - ih * g.in_w;
    const Range out_rows = Covering(ih, g.kernel_h, g.stride_h, g.pad_h, g.out_h);
    const Range out_cols = Covering(iw, g.kernel_w, g.stride_w, g.pad_w, g.out_w);
    const float* dyp = dy + plane * g.out_plane();
    float sum = 0.0f;
    for (int64_t oh = out_rows.lo; oh <= out_rows.hi; ++oh) {
      const Range rows = Clip(oh * g.stride_h - g.pad_h, g.kernel_h, g.in_h);
      for (int64_t ow = out_cols.lo; ow <= out_cols.hi; ++ow) {
        const Range cols = Clip(ow * g.stride_w - g.pad_w, g.kernel_w, g.in_w);
        sum += dyp[oh * g.out_w + ow] / Divisor(g, divisor, rows, cols);
      }
    }
    dx[e] = sum;
  }
};

// One warp per plane: lanes sum strided elements in double, then a fixed shuffle tree.
constexpr int kWarpsPerBlock = kThreads / 32;
__global__ void __launch_bounds__(kThreads)
    GlobalAvgForwardKernel(int64_t planes, int64_t spatial, const float* __restrict__ x,
                           float* __restrict__ y) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; p < planes;
       p += warps) {
    const float* xp = x + p * spatial;
    double sum = 0.0;
    for (int64_t j = lane; j < spatial; j += 32) sum += __ldg(xp + j);
    for (int offset = 16; offset > 0; offset >>= 1)
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) y[p] = static_cast<float>(sum / static_cast<double>(spatial));
  }
}

struct GlobalAvgBackwardFn {
  int64_t spatial;
  const float* dy;
  float* dx;
  __device__ void operator()(int64_t i) const {
    dx[i] = dy[i / spatial] / static_cast<float>(spatial);
  }
};

absl::Status CheckPool(const char* what, const Pool2dShape& shape, const void* in, const void* out,
                       const void* indices, bool needs_indices) {
  const absl::Status status = ValidatePool2dShape(shape);
  if (!status.ok()) {
    return absl::InvalidArgumentError(std::string(what) + ": " + std::string(status.message()));
  }
  if (needs_indices) {
    return CheckNotNull(what, {{"input", in}, {"output", out}, {"argmax", indices}});
  }
  return CheckNotNull(what, {{"input", in}, {"output", out}});
}

absl::Status CheckGlobal(const char* what, int64_t batch, int64_t channels, int64_t spatial,
                         const void* in, const void* out) {
  RETURN_IF_ERROR(CheckAtLeast(what, "batch", batch, 0));
  RETURN_IF_ERROR(CheckAtLeast(what, "channels", channels, 0));
  RETURN_IF_ERROR(CheckAtLeast(what, "spatial", spatial, 1));
  if (batch * channels > 0) RETURN_IF_ERROR(CheckNotNull(what, {{"input", in}, {"output", out}}));
  return absl::OkStatus();
}

}  // namespace

absl::Status MaxPool2dForward(const CudaContext& ctx, const Pool2dShape& shape, const float* x,
                              float* y, int32_t* argmax) {
  constexpr const char* kWhat = "cuda MaxPool2dForward";
  RETURN_IF_ERROR(CheckPool(kWhat, shape, x, y, argmax, true));
  const int64_t n = shape.batch * shape.channels * shape.out_plane();
  return detail::LaunchMap(ctx, kWhat, n, MaxForwardFn{MakeGeometry(shape), x, y, argmax});
}

absl::Status MaxPool2dBackward(const CudaContext& ctx, const Pool2dShape& shape, const float* dy,
                               const int32_t* argmax, float* dx) {
  constexpr const char* kWhat = "cuda MaxPool2dBackward";
  RETURN_IF_ERROR(CheckPool(kWhat, shape, dy, dx, argmax, true));
  const int64_t n = shape.batch * shape.channels * shape.in_plane();
  return detail::LaunchMap(ctx, kWhat, n, MaxBackwardFn{MakeGeometry(shape), dy, argmax, dx});
}

absl::Status AvgPool2dForward(const CudaContext& ctx, const Pool2dShape& shape,
                              AvgPoolDivisor divisor, const float* x, float* y) {
  constexpr const char* kWhat = "cuda AvgPool2dForward";
  RETURN_IF_ERROR(CheckPool(kWhat, shape, x, y, nullptr, false));
  const int64_t n = shape.batch * shape.channels * shape.out_plane();
  return detail::LaunchMap(ctx, kWhat, n, AvgForwardFn{MakeGeometry(shape), divisor, x, y});
}

absl::Status AvgPool2dBackward(const CudaContext& ctx, const Pool2dShape& shape,
                               AvgPoolDivisor divisor, const float* dy, float* dx) {
  constexpr const char* kWhat = "cuda AvgPool2dBackward";
  RETURN_IF_ERROR(CheckPool(kWhat, shape, dy, dx, nullptr, false));
  const int64_t n = shape.batch * shape.channels * shape.in_plane();
  return detail::LaunchMap(ctx, kWhat, n, AvgBackwardFn{MakeGeometry(shape), divisor, dy, dx});
}

absl::Status GlobalAvgPoolForward(const CudaContext& ctx, int64_t batch, int64_t channels,
                                  int64_t spatial, const float* x, float* y) {
  constexpr const char* kWhat = "cuda GlobalAvgPoolForward";
  RETURN_IF_ERROR(CheckGlobal(kWhat, batch, channels, spatial, x, y));
  const int64_t planes = batch * channels;
  if (planes == 0) return absl::OkStatus();
  int64_t blocks = (planes + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > kElementwiseMaxBlocks) blocks = kElementwiseMaxBlocks;
  GlobalAvgForwardKernel<<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream>>>(planes,
                                                                                     spatial, x, y);
  return LaunchStatus(kWhat);
}

absl::Status GlobalAvgPoolBackward(const CudaContext& ctx, int64_t batch, int64_t channels,
                                   int64_t spatial, const float* dy, float* dx) {
  constexpr const char* kWhat = "cuda GlobalAvgPoolBackward";
  RETURN_IF_ERROR(CheckGlobal(kWhat, batch, channels, spatial, dy, dx));
  return detail::LaunchMap(ctx, kWhat, batch * channels * spatial,
                           GlobalAvgBackwardFn{spatial, dy, dx});
}

}  // namespace qtrain::kernels::cuda
