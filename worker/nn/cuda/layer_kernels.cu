#include "worker/nn/cuda/layer_kernels.h"

namespace qtrain::nn::cuda {
namespace {

using kernels::cuda::GridFor;
using kernels::cuda::LaunchStatus;

__global__ void AddRowBiasKernel(int64_t rows, int64_t cols, const float* __restrict__ bias,
                                 float* __restrict__ y) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] += bias[i % cols];
  }
}

__global__ void ColumnSumsKernel(int64_t rows, int64_t cols, const float* __restrict__ dy,
                                 float* __restrict__ out) {
  const int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (c >= cols) return;
  double sum = 0.0;
  for (int64_t r = 0; r < rows; ++r) sum += dy[r * cols + c];
  out[c] = static_cast<float>(sum);
}

__global__ void ShortcutAddReluKernel(ShortcutShape s, const float* __restrict__ x,
                                      const float* __restrict__ projected, const float* z,
                                      float* y) {
  const int64_t plane = s.out_height * s.out_width;
  const int64_t n = s.batch * s.out_channels * plane;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    float sc;
    if (projected != nullptr) {
      sc = projected[i];
    } else {
      const int64_t ow = i % s.out_width;
      const int64_t oh = (i / s.out_width) % s.out_height;
      const int64_t c = (i / plane) % s.out_channels;
      const int64_t b = i / (plane * s.out_channels);
      const int64_t ci = c - s.pad_before;
      sc = (ci >= 0 && ci < s.in_channels)
               ? x[((b * s.in_channels + ci) * s.in_height + oh * s.stride) * s.in_width +
                   ow * s.stride]
               : 0.0f;
    }
    const float v = z[i] + sc;
    y[i] = v > 0.0f ? v : 0.0f;
  }
}

__global__ void ReluBackwardFromOutputKernel(int64_t n, const float* __restrict__ y,
                                             const float* __restrict__ dy, float* dz) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dz[i] = y[i] > 0.0f ? dy[i] : 0.0f;
  }
}

__global__ void ShortcutBackwardKernel(ShortcutShape s, const float* __restrict__ dz,
                                       float* __restrict__ dx) {
  const int64_t plane = s.in_height * s.in_width;
  const int64_t n = s.batch * s.in_channels * plane;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t w = i % s.in_width;
    const int64_t h = (i / s.in_width) % s.in_height;
    if (h % s.stride != 0 || w % s.stride != 0) continue;
    const int64_t oh = h / s.stride, ow = w / s.stride;
    if (oh >= s.out_height || ow >= s.out_width) continue;
    const int64_t c = (i / plane) % s.in_channels;
    const int64_t b = i / (plane * s.in_channels);
    dx[i] += dz[((b * s.out_channels + c + s.pad_before) * s.out_height + oh) * s.out_width + ow];
  }
}

__global__ void AddInPlaceKernel(int64_t n, const float* __restrict__ b, float* __restrict__ a) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    a[i] += b[i];
  }
}

__global__ void ScaleByDeviceScalarKernel(int64_t n, const float* __restrict__ s,
                                          const float* __restrict__ x, float* __restrict__ y) {
  const float scale = *s;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = scale * x[i];
  }
}

}  // namespace

absl::Status AddRowBias(const CudaContext& ctx, int64_t rows, int64_t cols, const float* bias,
                        float* y) {
  if (rows * cols == 0) return absl::OkStatus();
  AddRowBiasKernel<<<GridFor(rows * cols), 256, 0, ctx.stream>>>(rows, cols, bias, y);
  return LaunchStatus("AddRowBias");
}

absl::Status ColumnSums(const CudaContext& ctx, int64_t rows, int64_t cols, const float* dy,
                        float* out) {
  if (cols == 0) return absl::OkStatus();
  ColumnSumsKernel<<<GridFor(cols, 128), 128, 0, ctx.stream>>>(rows, cols, dy, out);
  return LaunchStatus("ColumnSums");
}

absl::Status ShortcutAddRelu(const CudaContext& ctx, const ShortcutShape& s, const float* x,
                             const float* projected, const float* z, float* y) {
  const int64_t n = s.batch * s.out_channels * s.out_height * s.out_width;
  if (n == 0) return absl::OkStatus();
  ShortcutAddReluKernel<<<GridFor(n), 256, 0, ctx.stream>>>(s, x, projected, z, y);
  return LaunchStatus("ShortcutAddRelu");
}

absl::Status ReluBackwardFromOutput(const CudaContext& ctx, int64_t n, const float* y,
                                    const float* dy, float* dz) {
  if (n == 0) return absl::OkStatus();
  ReluBackwardFromOutputKernel<<<GridFor(n), 256, 0, ctx.stream>>>(n, y, dy, dz);
  return LaunchStatus("ReluBackwardFromOutput");
}

absl::Status ShortcutBackwardAccumulate(const CudaContext& ctx, const ShortcutShape& s,
                                        const float* dz, float* dx) {
  const int64_t n = s.batch * s.in_channels * s.in_height * s.in_width;
  if (n == 0) return absl::OkStatus();
  ShortcutBackwardKernel<<<GridFor(n), 256, 0, ctx.stream>>>(s, dz, dx);
  return LaunchStatus("ShortcutBackwardAccumulate");
}

absl::Status AddInPlace(const CudaContext& ctx, int64_t n, const float* b, float* a) {
  if (n == 0) return absl::OkStatus();
  AddInPlaceKernel<<<GridFor(n), 256, 0, ctx.stream>>>(n, b, a);
  return LaunchStatus("AddInPlace");
}

absl::Status ScaleByDeviceScalar(const CudaContext& ctx, int64_t n, const float* s, const float* x,
                                 float* y) {
  if (n == 0) return absl::OkStatus();
  ScaleByDeviceScalarKernel<<<GridFor(n), 256, 0, ctx.stream>>>(n, s, x, y);
  return LaunchStatus("ScaleByDeviceScalar");
}

}  // namespace qtrain::nn::cuda
