// GPU twins of worker/quant's layers, built by CompileLayer (gpu_layers.h) through
// CompileQuantLayer: QuantizedConv2d / QuantizedLinear (weights DoReFa, SAWB, QIL, binary,
// ternary) and the activation quantizers (DoReFa, PACT, QIL), on the quantizer kernels of
// worker/kernels/cuda/quantize.h.
//
// Quantized conv / linear: every Forward computes wq = weight_scale() * Q(w) from the device master
// weight into the twin's own buffer and runs the plain conv / linear twin of gpu_layers.cc on it;
// Backward lets that twin write dL/dwq into the weight's gradient slot (and the bias gradient and
// dx, the latter through wq), then maps the slot in place to dL/dw exactly as
// quant::WeightQuantization::Backward does (scale by weight_scale(), then the quantizer's
// backward) and overwrites the quantizer's parameter gradients (QIL c, d, gamma).
// Activation quantizers: y = Q(x) in the twin's own buffer; Backward writes dx and overwrites the
// parameter gradients (PACT alpha with its L2 term, QIL c and d). QIL's c and d are initialised on
// the device from the first Forward's input (weights: w) while d == 0, in either mode, as the CPU
// objects do. Forward is the same in Mode::kEval as in training (as on the CPU).
//
// Agreement with the CPU objects: quantize.h's exactness contract (element-wise arithmetic
// identical; scales from reductions within ~1e-7 relative; tanhf / logf / expf within a few ulp,
// so a rare element may round to the neighbouring level). Quantizers built with
// Discretize::kOff (finite-difference tests only) are run as kOn: the kernels always round.
//
// Memory: Plan allocates wq and the quantizer's saved tensors (DoReFa tanh w, QIL ln u and u^gamma:
// one weight-sized array each) and scalars in the twin, and raises Planner::workspace_bytes to what
// the quantizer kernels need (they share GpuPass::workspace, one kernel after another on the
// stream); Forward and Backward allocate nothing, so a step can be captured in a CUDA graph.
// Thread-safety: one thread, like every GpuLayer.
#ifndef QTRAIN_WORKER_NN_CUDA_GPU_QUANT_LAYERS_H_
#define QTRAIN_WORKER_NN_CUDA_GPU_QUANT_LAYERS_H_

#include <memory>

#include "absl/status/statusor.h"
#include "worker/nn/conv2d.h"
#include "worker/nn/cuda/gpu_layers.h"
#include "worker/nn/layer.h"
#include "worker/nn/linear.h"

namespace qtrain::nn::cuda {

// The GPU twin of a quantized layer of worker/quant; a null pointer (OK) when `layer` is not one
// (CompileLayer then tries the plain layers); UNIMPLEMENTED naming the layer for a quantizer kind
// without kernels. Parameters are read from and gradients written to `state`, which must hold the
// layer's parameters (the quantizer's included) and outlive the twin. Allocates no device memory
// (Plan does).
absl::StatusOr<std::unique_ptr<GpuLayer>> CompileQuantLayer(Layer* layer, DeviceState* state);

// The device array wq = weight_scale() * Q(w) (the weight's shape) of the last Forward of a twin
// that CompileQuantLayer built for a QuantizedConv2d / QuantizedLinear; nullptr for any other
// GpuLayer or before Plan. For tests.
const float* QuantizedWeight(const GpuLayer& twin);

// Defined in gpu_layers.cc: the plain conv / linear twins reading their weight from `weight`, a
// device array of the weight's shape that outlives the twin, instead of the master weight
// (nullptr: the master weight, as CompileLayer builds them). Gradients still go to the weight's
// (and bias's) slots in `state`.
std::unique_ptr<GpuLayer> MakeGpuConv2d(Conv2d* conv, DeviceState* state, const float* weight);
std::unique_ptr<GpuLayer> MakeGpuLinear(Linear* linear, DeviceState* state, const float* weight);

}  // namespace qtrain::nn::cuda

#endif  // QTRAIN_WORKER_NN_CUDA_GPU_QUANT_LAYERS_H_
