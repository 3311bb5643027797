// Fused SGD update kernels: the CUDA counterpart of train::Sgd::Step (worker/train/optimizer.h),
// element for element the same arithmetic in the same order:
//
//   step = (lr * lr_scale) * group_lr_scale
//   g'   = g + weight_decay * w
//   v    = momentum * v + g'
//   w   -= step * (nesterov ? g' + momentum * v : v)
//
// so the results are identical bit for bit to the CPU optimizer's (no FMA contraction: this folder
// builds with --fmad=false). Mapping from an nn::Parameter p under train::SgdOptions o:
//   lr_scale       = p.lr_scale
//   group_lr_scale = p.kind == kQuantizer ? o.quantizer_lr_scale : 1   (x * 1 is exact, so this is
//                    the CPU's lr * p.lr_scale for the other kinds)
//   weight_decay   = p.kind == kWeight ? o.weight_decay : 0
//
// The learning rate is read from device memory (one float) so that a captured CUDA graph can be
// replayed with a new rate: update it with cudaMemcpyAsync (or a memcpy node) before each step.
//
// Two forms: SgdStep updates one tensor per launch; SgdStepMultiTensor updates a whole list in one
// launch, driven by two device arrays prepared once: the SgdTensor descriptors and the work chunks
// PlanSgdChunks cuts from them (each chunk is one block's work; tensors of any size share the
// grid). The plan depends only on the sizes, so it stays valid while the buffers stay put.
//
// Asynchronous on ctx.stream, no synchronization, no allocation. Cost: one pass over w, g, v.
#ifndef QTRAIN_WORKER_KERNELS_CUDA_OPTIMIZER_H_
#define QTRAIN_WORKER_KERNELS_CUDA_OPTIMIZER_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/kernels/cuda/cuda_context.h"

namespace qtrain::kernels::cuda {

// The hyper-parameters shared by every tensor (train::SgdOptions minus the per-kind fields).
struct SgdStepOptions {
  float momentum = 0.9f;  // in [0, 1); 0 disables momentum
  bool nesterov = false;  // needs momentum > 0
};

// OK, or INVALID_ARGUMENT as train::ValidateSgdOptions words it.
absl::Status ValidateSgdStepOptions(const SgdStepOptions& options);

// One parameter tensor: device pointers (param and momentum updated in place) and its scalars.
// 48 bytes; an array of these lives in device memory for the multi-tensor form.
struct SgdTensor {
  float* param = nullptr;
  const float* grad = nullptr;
  float* momentum = nullptr;
  int64_t size = 0;
  float lr_scale = 1.0f;
  float group_lr_scale = 1.0f;
  float weight_decay = 0.0f;
  float reserved = 0.0f;
};
static_assert(sizeof(SgdTensor) == 48);

// One block's work in the multi-tensor form: elements [begin, end) of tensors[tensor].
struct SgdChunk {
  int32_t tensor = 0;
  int32_t reserved = 0;
  int64_t begin = 0;
  int64_t end = 0;
};
static_assert(sizeof(SgdChunk) == 24);

// Elements per chunk: 64 per thread of a 256-thread block.
inline constexpr int64_t kSgdChunkElements = 1 << 14;

// Cuts every tensor into chunks of at most chunk_elements, in tensor order (empty tensors give
// none). INVALID_ARGUMENT for a negative size, a null pointer in a non-empty tensor, more than
// 2^31 - 1 tensors, or chunk_elements < 1. Pure host code.
absl::StatusOr<std::vector<SgdChunk>> PlanSgdChunks(std::span<const SgdTensor> tensors,
                                                    int64_t chunk_elements = kSgdChunkElements);

// Updates one tensor (its pointers are used, not copied to the device). lr: one device float.
absl::Status SgdStep(const CudaContext& ctx, const SgdStepOptions& options, const float* lr,
                     const SgdTensor& tensor);

// Updates every tensor: tensors and chunks are DEVICE arrays (copies of the host descriptors and
// of PlanSgdChunks(those descriptors)); num_chunks is the plan's length (0 launches nothing).
// The kernel trusts the plan: build it with PlanSgdChunks from the same descriptors.
absl::Status SgdStepMultiTensor(const CudaContext& ctx, const SgdStepOptions& options,
                                const float* lr, const SgdTensor* tensors, const SgdChunk* chunks,
                                int64_t num_chunks);

}  // namespace qtrain::kernels::cuda

#endif  // QTRAIN_WORKER_KERNELS_CUDA_OPTIMIZER_H_
