// 2-D convolution over NCHW float tensors on the GPU, forward and both backward passes: the
// CUDA counterparts of worker/kernels/cpu/conv.h, with the same Conv2dShape, layouts and
// overwrite semantics.
//
//   x  N x C x H x W        w  K x C x KH x KW        bias, dbias  K
//   y  N x K x OH x OW      OH = (H + 2*PH - KH) / SH + 1 (floor), likewise OW
//   forward:          y[n,k,oh,ow] = bias[k] + sum_{c,kh,kw} w[k,c,kh,kw] *
//                                    x[n, c, oh*SH - PH + kh, ow*SW - PW + kw]   (zero outside)
//   backward data:    dx = the gradient of sum(y * dy) with respect to x          (overwritten)
//   backward weights: dw = the gradient with respect to w, dbias = sum_{n,oh,ow} dy (overwritten)
//
// Implementation (gemm_tile.cuh): implicit GEMMs on the SGEMM's register-blocked tile, with no
// im2col buffer; the loaders gather the im2col elements straight from x (forward, backward
// weights) or dy (backward data: each input pixel gathers the outputs it fed, so there are no
// atomics; strided convolutions skip the taps that do not divide exactly). Tiles are 32 x 128
// for up to 32 output rows (channels), else 64 x 128. Backward weights reduces over the
// N*OH*OW output positions, which it splits into slices (PlanConvWeightsSplit, a function of the
// shape only) computed by separate blocks into partial sums in the workspace and then added in
// slice order; dbias is a per-channel sum accumulated in double.
//
// Numerics: float FMA in a fixed order, so results are deterministic and bitwise reproducible
// (no atomics), and differ from the CPU kernels only in rounding, within the bound of a float
// sum of that many products (forward C*KH*KW + 1 terms, backward data K*KH*KW, backward weights
// N*OH*OW plus the number of slices). dbias is exact to within one rounding of the double sum.
//
// Workspace: every call takes a device workspace of workspace_bytes; Conv2dWorkspaceBytes(shape)
// bytes (4-byte aligned; cudaMalloc's 256 is fine) suffice for all three passes of that shape,
// and a call given fewer than it needs returns INVALID_ARGUMENT. Only backward weights uses it
// today (forward and backward data need 0 bytes and accept a null workspace). One workspace may
// serve any number of calls enqueued one after another on the same stream.
//
// Asynchronous: enqueued on ctx.stream; no host synchronization, no allocation, so the calls can
// be captured in a CUDA graph. The Status reports argument errors (INVALID_ARGUMENT, before
// anything is enqueued: an invalid shape, a null tensor, a short workspace, or tensors of 2^30
// elements or more, since the kernels index with 32 bits) and launch errors. Pointers are device
// pointers; outputs must not overlap inputs. Thread-safe as the stream is.
// Cost: 2*N*K*C*KH*KW*OH*OW flops per pass (backward data of a stride-s convolution computes
// s_h*s_w times that, most of it on skipped zero taps); backward weights also writes and reads
// the workspace's partials once.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_CONV_H_
#define QTRAIN_WORKER_KERNELS_CUDA_CONV_H_

#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cpu/conv.h"
#include "worker/kernels/cuda/cuda_context.h"

namespace qtrain::kernels::cuda {

using ::qtrain::kernels::Conv2dShape;

// Device workspace bytes that the three passes below need for `shape` (0 for an invalid shape,
// which the passes reject anyway).
uint64_t Conv2dWorkspaceBytes(const Conv2dShape& shape);

// y = conv(x, w) + bias (bias may be null: no bias).
absl::Status Conv2dForward(const CudaContext& ctx, const Conv2dShape& shape, const float* x,
                           const float* w, const float* bias, float* y, void* workspace,
                           uint64_t workspace_bytes);

// dx (N x C x H x W) = gradient of sum(y * dy) with respect to x; overwritten.
absl::Status Conv2dBackwardData(const CudaContext& ctx, const Conv2dShape& shape, const float* dy,
                                const float* w, float* dx, void* workspace,
                                uint64_t workspace_bytes);

// dw (K x C x KH x KW) and dbias (K, or null to skip) = gradients of sum(y * dy); overwritten.
absl::Status Conv2dBackwardWeights(const CudaContext& ctx, const Conv2dShape& shape,
                                   const float* x, const float* dy, float* dw, float* dbias,
                                   void* workspace, uint64_t workspace_bytes);

// How backward weights splits its N*OH*OW-long reduction (for tests and benchmarks): `slices`
// blocks along it, each covering `slice_len` positions (the last one fewer). slices == 1 writes
// dw directly and needs no workspace.
struct Conv2dWeightsSplit {
  int64_t slices = 1;
  int64_t slice_len = 0;
};
Conv2dWeightsSplit Conv2dBackwardWeightsSplit(const Conv2dShape& shape);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_CONV_H_
