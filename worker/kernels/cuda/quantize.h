// Forward and backward kernels of every quantizer of worker/quant on device arrays: DoReFa
// (weights and activations), PACT, SAWB, QIL (weights and activations), binary and ternary.
//
// The CPU quantizers are objects holding their state (scales, saved tensors, trainable
// parameters); here each is a set of free functions on raw device pointers, and the state lives
// in device memory the caller owns: the quantizer's parameters (PACT alpha, QIL c / d / gamma,
// one float each) and their gradients, the per-call scalars (SAWB alpha, ternary threshold and
// scale, DoReFa max |tanh w| and arg-max, binary per-channel scales) and the saved tensors
// (DoReFa tanh w, QIL ln u and u^gamma). Scalars computed on the device stay there: each kernel
// reads what the previous one wrote, so a whole step can be captured in a CUDA graph.
//
// The math is the CPU classes' (each function names the class it mirrors and that class's
// header states the formulas), always with Discretize::kOn (the kOff mode exists for
// finite-difference tests of the CPU objects only).
//
// Exactness. Element-wise arithmetic is the CPU's, operation for operation (--fmad=false), so a
// quantized value equals the CPU's whenever the scalars it depends on are equal and the
// pre-rounding value does not depend on a transcendental function. The statistics (sums of |w|,
// w^2, gradient reductions) are accumulated in double by deterministic reductions whose order
// differs from the CPU's (which sums float blocks of 1024 for some of them), so derived scales
// match to ~1e-7 relative, and tanhf / logf / expf differ from glibc by a few ulp: an element
// whose pre-rounding value lies within a few ulp of a rounding boundary may round the other way.
// Every result is identical run to run on the same device.
//
// Common contract: n (elements) >= 1 for functions with statistics, >= 0 otherwise; bits in
// [1, 8] ([2, 8] for QIL weights); null pointers and bad workspaces are INVALID_ARGUMENT before
// anything is enqueued. Outputs may alias the gradient input where the CPU allows it (dw / dwq,
// dx / dy), never w or x. `workspace` is kReductionWorkspaceBytes (launch_util.h) of 16-byte
// aligned device memory unless stated otherwise, used by one stream at a time. Asynchronous on
// ctx.stream; no synchronization, no allocation. Cost: one memory-bound pass per kernel; a
// reduction adds a one-block final pass (~5 us).
#ifndef QTRAIN_WORKER_KERNELS_CUDA_QUANTIZE_H_
#define QTRAIN_WORKER_KERNELS_CUDA_QUANTIZE_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "worker/kernels/cuda/cuda_context.h"
#include "worker/kernels/cuda/launch_util.h"

namespace qtrain::kernels::cuda {

// ---- DoReFa (quant::DorefaWeightQuantizer, quant::DorefaActivationQuantizer) ------------------

// What DorefaWeightForward leaves for DorefaWeightBackward (device memory, 16 bytes).
struct DorefaWeightState {
  float max_tanh;  // m = max(tanh |w_argmax|, 1e-12)
  float reserved;
  int64_t argmax;  // first index of the largest |w|
};

// t = tanh(w) (saved in tanh_w, n floats), m = max |t| (via the first arg-max of |w|),
// wq = 2 round((t / (2m) + 1/2) n) / n - 1, n = 2^bits - 1. Two reduction kernels + one pass.
absl::Status DorefaWeightForward(const CudaContext& ctx, int bits, int64_t n, const float* w,
                                 float* wq, float* tanh_w, DorefaWeightState* state,
                                 void* workspace);
// dw = dwq (1 - t^2) / m, plus at the arg-max the path through m:
// sign(w_a)(1 - t_a^2) * (-sum_j dwq_j t_j / m^2). dw may alias dwq.
absl::Status DorefaWeightBackward(const CudaContext& ctx, int64_t n, const float* w,
                                  const float* tanh_w, const DorefaWeightState* state,
                                  const float* dwq, float* dw, void* workspace);

// y = round(clip(x, 0, 1) n) / n; dx = dy where 0 <= x <= 1, else 0 (dx may alias dy).
absl::Status DorefaActivationForward(const CudaContext& ctx, int bits, int64_t n, const float* x,
                                     float* y);
absl::Status DorefaActivationBackward(const CudaContext& ctx, int64_t n, const float* x,
                                      const float* dy, float* dx);

// ---- PACT (quant::PactActivationQuantizer) ----------------------------------------------------

// The clipping level floor PactActivationQuantizer::kMinAlpha.
inline constexpr float kPactMinAlpha = 1e-4f;

// alpha: the parameter value (one device float); a = max(alpha, kPactMinAlpha);
// y = round(clip(x, 0, a) n / a) a / n.
absl::Status PactForward(const CudaContext& ctx, int bits, int64_t n, const float* x,
                         const float* alpha, float* y);
// dx = dy where 0 <= x < a, else 0 (skipped when dx is null; may alias dy) and, fused in the same
// pass, alpha_grad (one device float, overwritten) = (alpha >= kPactMinAlpha ? sum_{x >= a} dy
// : 0) + l2 * alpha. The sum is in double (the CPU sums float blocks: ~1e-6 relative apart).
absl::Status PactBackward(const CudaContext& ctx, int64_t n, const float* x, const float* alpha,
                          float l2, const float* dy, float* dx, float* alpha_grad, void* workspace);

// ---- SAWB (quant::SawbWeightQuantizer) ---------------------------------------------------------

// alpha = SawbWeightQuantizer::Scale(bits, sqrt(E[w^2]), E|w|) (written to one device float), then
// wq = min(round((clip(w, -alpha, alpha) + alpha) n / (2 alpha)), n) 2 alpha / n - alpha.
// Kernels: the statistics reduction (two) and the quantize pass.
absl::Status SawbWeightForward(const CudaContext& ctx, int bits, int64_t n, const float* w,
                               float* wq, float* alpha, void* workspace);
// dw = dwq where |w| <= alpha, else 0 (dw may alias dwq).
absl::Status SawbWeightBackward(const CudaContext& ctx, int64_t n, const float* w,
                                const float* alpha, const float* dwq, float* dw);

// ---- QIL (quant::QilWeightQuantizer, quant::QilActivationQuantizer) ---------------------------

inline constexpr float kQilMinHalfWidth = 1e-8f;  // QilWeightQuantizer::kMinHalfWidth
inline constexpr float kQilMinGamma = 1e-3f;      // QilWeightQuantizer::kMinGamma

// The CPU objects initialise c and d from the first Forward's input when d == 0. Here that is a
// separate call: run it before the first forward (it may stay in every step: it writes c and d
// only when *d == 0, at the cost of one reduction pass). Weights: hi = min(max|w|, 3 rms(w));
// activations: hi = min(max x, mean + 3 std); hi = 1 if not positive; c = d = hi / 2.
absl::Status QilWeightInitialize(const CudaContext& ctx, int64_t n, const float* w, float* c,
                                 float* d, void* workspace);
absl::Status QilActivationInitialize(const CudaContext& ctx, int64_t n, const float* x, float* c,
                                     float* d, void* workspace);

// c, d, gamma: the parameter values (one device float each). u = clip((|w| - c) / (2d) + 1/2),
// wq = sign(w) round(u^gamma q) / q, q = 2^(bits-1) - 1; saves ln u and u^gamma (0 and u outside
// (0, 1)) in log_u and u_gamma (n floats each) for the backward.
absl::Status QilWeightForward(const CudaContext& ctx, int bits, int64_t n, const float* w,
                              const float* c, const float* d, const float* gamma, float* wq,
                              float* log_u, float* u_gamma);
// dw (may alias dwq) and, fused in the same pass, the parameter gradients (one device float each,
// overwritten) as QilWeightQuantizer::Backward.
absl::Status QilWeightBackward(const CudaContext& ctx, int64_t n, const float* w, const float* c,
                               const float* d, const float* gamma, const float* log_u,
                               const float* u_gamma, const float* dwq, float* dw, float* c_grad,
                               float* d_grad, float* gamma_grad, void* workspace);

// y = round(clip((x - c) / (2d) + 1/2, 0, 1) q) / q, q = 2^bits - 1.
absl::Status QilActivationForward(const CudaContext& ctx, int bits, int64_t n, const float* x,
                                  const float* c, const float* d, float* y);
// dx = dy inside the interval / (2d) (skipped when dx is null; may alias dy), c_grad and d_grad
// as QilActivationQuantizer::Backward, fused in one pass.
absl::Status QilActivationBackward(const CudaContext& ctx, int64_t n, const float* x,
                                   const float* c, const float* d, const float* dy, float* dx,
                                   float* c_grad, float* d_grad, void* workspace);

// ---- Binary (quant::BinaryWeightQuantizer) -----------------------------------------------------

// quant::BinaryScale, mirrored so this header needs nothing from worker/quant.
enum class BinaryScaling {
  kPerChannelMeanAbs,  // XNOR-Net: wq = alpha_c sign(w), alpha_c = mean |w| over channel c
  kNone,               // BinaryConnect: wq = sign(w)
};

// Device scratch bytes for BinaryWeightForward with kPerChannelMeanAbs (0 for kNone or a bad
// shape).
size_t BinaryWeightWorkspaceBytes(BinaryScaling scaling, int64_t channels, int64_t per_channel);

// w, wq: channels x per_channel (dim 0 = output channel). scales: `channels` device floats,
// written (alpha_c, or 1 for kNone). sign(0) = +1. workspace: BinaryWeightWorkspaceBytes (may be
// null for kNone).
absl::Status BinaryWeightForward(const CudaContext& ctx, BinaryScaling scaling, int64_t channels,
                                 int64_t per_channel, const float* w, float* wq, float* scales,
                                 void* workspace);
// dw = dwq (1/per_channel + alpha_c 1{|w| <= 1}) (kPerChannelMeanAbs), dwq 1{|w| <= 1} (kNone;
// scales unused and may be null). dw may alias dwq.
absl::Status BinaryWeightBackward(const CudaContext& ctx, BinaryScaling scaling, int64_t channels,
                                  int64_t per_channel, const float* w, const float* scales,
                                  const float* dwq, float* dw);

// ---- Ternary (quant::TernaryWeightQuantizer) ---------------------------------------------------

// What TernaryWeightForward writes (device memory, 8 bytes).
struct TernaryWeightState {
  float threshold;  // delta = 0.7 E|w|
  float scale;      // alpha = mean of |w| over |w| > delta (0 if none)
};

// wq = alpha sign(w) where |w| > delta, else 0. Kernels: two reductions (two kernels each) and the
// quantize pass.
absl::Status TernaryWeightForward(const CudaContext& ctx, int64_t n, const float* w, float* wq,
                                  TernaryWeightState* state, void* workspace);
// dw = dwq (straight-through): a copy, nothing when dw == dwq.
absl::Status TernaryWeightBackward(const CudaContext& ctx, int64_t n, const float* dwq, float* dw);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_QUANTIZE_H_
