#include "worker/kernels/cuda/conv.h"

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "worker/kernels/cuda/gemm_tile.cuh"

namespace qtrain::kernels::cuda {
namespace {

namespace gi = gemm_internal;

// Every tensor and every index the kernels form stays below 2^30 (32-bit arithmetic with room
// for a tile's overrun past the edge and for one-past-the-end image offsets).
constexpr int64_t kMaxElements = int64_t{1} << 30;
constexpr int64_t kMaxGridY = 65535;

// a_1 * a_2 * ... <= limit, without overflowing (every factor is >= 0).
bool ProductAtMost(std::initializer_list<int64_t> factors, int64_t limit) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (f != 0 && p > limit / f) return false;
    p *= f;
  }
  return p <= limit;
}

absl::Status CheckShape(const char* what, const Conv2dShape& s) {
  if (const absl::Status status = ValidateConv2dShape(s); !status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", status.message()));
  }
  for (int64_t v : {s.kernel_h, s.kernel_w, s.stride_h, s.stride_w}) {
    if (v >= kMaxElements) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": kernel or stride too large"));
    }
  }
  const bool fits =
      s.in_height + 2 * s.pad_h < kMaxElements && s.in_width + 2 * s.pad_w < kMaxElements &&
      ProductAtMost({s.batch, s.in_channels, s.in_height + 2 * s.pad_h, s.in_width + 2 * s.pad_w},
                    kMaxElements) &&
      ProductAtMost({s.batch, s.out_channels, s.out_height(), s.out_width()}, kMaxElements) &&
      ProductAtMost({s.out_channels, s.in_channels, s.kernel_h, s.kernel_w}, kMaxElements);
  if (!fits) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": tensors must have fewer than 2^30 elements (32-bit indexing), got input ",
        s.batch, "x", s.in_channels, "x", s.in_height, "x", s.in_width, ", output channels ",
        s.out_channels));
  }
  if ((s.out_channels + 63) / 64 > kMaxGridY || (s.in_channels + 63) / 64 > kMaxGridY) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": too many channels"));
  }
  return absl::OkStatus();
}

absl::Status CheckPointers(const char* what, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (p == nullptr) return absl::InvalidArgumentError(absl::StrCat(what, ": null tensor"));
  }
  return absl::OkStatus();
}

absl::Status CheckWorkspace(const char* what, uint64_t needed, const void* workspace,
                            uint64_t workspace_bytes) {
  if (needed == 0) return absl::OkStatus();
  if (workspace_bytes < needed) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": workspace of ", workspace_bytes,
                                                   " bytes, needs ", needed,
                                                   " (Conv2dWorkspaceBytes)"));
  }
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 4 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": workspace must be a non-null, 4-byte aligned device pointer"));
  }
  return absl::OkStatus();
}

uint64_t WeightsPartialBytes(const Conv2dShape& s, const gi::ConvWeightsSplit& split) {
  if (split.slices <= 1) return 0;
  return static_cast<uint64_t>(split.slices) * static_cast<uint64_t>(s.out_channels) *
         static_cast<uint64_t>(s.col_rows()) * sizeof(float);
}

template <class Cfg>
dim3 Grid(int64_t cols, int64_t rows, int64_t slices = 1) {
  return dim3(static_cast<unsigned>((cols + Cfg::BN - 1) / Cfg::BN),
              static_cast<unsigned>((rows + Cfg::BM - 1) / Cfg::BM),
              static_cast<unsigned>(slices));
}

template <class Cfg>
void LaunchForward(const CudaContext& ctx, const gi::ConvGeometry& g, const float* x,
                   const float* w, const float* bias, float* y) {
  gi::ConvForwardKernel<Cfg>
      <<<Grid<Cfg>(g.out_cols, g.k), gi::kThreads, 0, ctx.stream>>>(g, x, w, bias, y);
}

template <class Cfg, bool kUnitStride>
void LaunchBackwardData(const CudaContext& ctx, const gi::ConvGeometry& g, const float* dy,
                        const float* w, float* dx) {
  gi::ConvBackwardDataKernel<Cfg, kUnitStride>
      <<<Grid<Cfg>(g.in_cols, g.c), gi::kThreads, 0, ctx.stream>>>(g, dy, w, dx);
}

template <class Cfg>
void LaunchBackwardWeights(const CudaContext& ctx, const gi::ConvGeometry& g, const float* x,
                           const float* dy, float* out, const gi::ConvWeightsSplit& split) {
  gi::ConvBackwardWeightsKernel<Cfg>
      <<<Grid<Cfg>(g.rows, g.k, split.slices), gi::kThreads, 0, ctx.stream>>>(
          g, x, dy, out, static_cast<int>(split.slice_len));
}

}  // namespace

Conv2dWeightsSplit Conv2dBackwardWeightsSplit(const Conv2dShape& shape) {
  const gi::ConvWeightsSplit split = gi::PlanConvWeightsSplit(shape);
  return Conv2dWeightsSplit{split.slices, split.slice_len};
}

uint64_t Conv2dWorkspaceBytes(const Conv2dShape& shape) {
  if (!CheckShape("Conv2dWorkspaceBytes", shape).ok()) return 0;
  return WeightsPartialBytes(shape, gi::PlanConvWeightsSplit(shape));
}

absl::Status Conv2dForward(const CudaContext& ctx, const Conv2dShape& shape, const float* x,
                           const float* w, const float* bias, float* y, void* workspace,
                           uint64_t workspace_bytes) {
  constexpr const char* kWhat = "cuda::Conv2dForward";
  RETURN_IF_ERROR(CheckShape(kWhat, shape));
  RETURN_IF_ERROR(CheckPointers(kWhat, {x, w, y}));
  const gi::ConvGeometry g = gi::MakeConvGeometry(shape);
  if (gi::UseTile64x128(g.k)) {
    LaunchForward<gi::Tile64x128>(ctx, g, x, w, bias, y);
  } else {
    LaunchForward<gi::Tile32x128>(ctx, g, x, w, bias, y);
  }
  return LaunchStatus("ConvForwardKernel");
}

absl::Status Conv2dBackwardData(const CudaContext& ctx, const Conv2dShape& shape, const float* dy,
                                const float* w, float* dx, void* workspace,
                                uint64_t workspace_bytes) {
  constexpr const char* kWhat = "cuda::Conv2dBackwardData";
  RETURN_IF_ERROR(CheckShape(kWhat, shape));
  RETURN_IF_ERROR(CheckPointers(kWhat, {dy, w, dx}));
  const gi::ConvGeometry g = gi::MakeConvGeometry(shape);
  const bool unit = g.sh == 1 && g.sw == 1;
  if (gi::UseTile64x128(g.c)) {
    if (unit) {
      LaunchBackwardData<gi::Tile64x128, true>(ctx, g, dy, w, dx);
    } else {
      LaunchBackwardData<gi::Tile64x128, false>(ctx, g, dy, w, dx);
    }
  } else {
    if (unit) {
      LaunchBackwardData<gi::Tile32x128, true>(ctx, g, dy, w, dx);
    } else {
      LaunchBackwardData<gi::Tile32x128, false>(ctx, g, dy, w, dx);
    }
  }
  return LaunchStatus("ConvBackwardDataKernel");
}

absl::Status Conv2dBackwardWeights(const CudaContext& ctx, const Conv2dShape& shape,
                                   const float* x, const float* dy, float* dw, float* dbias,
                                   void* workspace, uint64_t workspace_bytes) {
  constexpr const char* kWhat = "cuda::Conv2dBackwardWeights";
  RETURN_IF_ERROR(CheckShape(kWhat, shape));
  RETURN_IF_ERROR(CheckPointers(kWhat, {x, dy, dw}));
  const gi::ConvWeightsSplit split = gi::PlanConvWeightsSplit(shape);
  RETURN_IF_ERROR(
      CheckWorkspace(kWhat, WeightsPartialBytes(shape, split), workspace, workspace_bytes));
  const gi::ConvGeometry g = gi::MakeConvGeometry(shape);
  float* out = split.slices > 1 ? static_cast<float*>(workspace) : dw;
  if (gi::UseTile64x128(g.k)) {
    LaunchBackwardWeights<gi::Tile64x128>(ctx, g, x, dy, out, split);
  } else {
    LaunchBackwardWeights<gi::Tile32x128>(ctx, g, x, dy, out, split);
  }
  RETURN_IF_ERROR(LaunchStatus("ConvBackwardWeightsKernel"));
  if (split.slices > 1) {
    const int64_t count = static_cast<int64_t>(g.k) * g.rows;
    gi::SumSlicesKernel<<<GridFor(count, gi::kThreads, 4096), gi::kThreads, 0, ctx.stream>>>(
        out, static_cast<int>(split.slices), static_cast<int>(count), dw);
    RETURN_IF_ERROR(LaunchStatus("SumSlicesKernel"));
  }
  if (dbias != nullptr) {
    const unsigned blocks = static_cast<unsigned>(g.k < 65535 ? g.k : 65535);
    gi::ConvBiasGradKernel<<<blocks, gi::kThreads, 0, ctx.stream>>>(g, dy, dbias);
    RETURN_IF_ERROR(LaunchStatus("ConvBiasGradKernel"));
  }
  return absl::OkStatus();
}

}  // namespace qtrain::kernels::cuda
