#include <cmath>
#include <cstdint>

#include "common/status_macros.h"
#include "worker/kernels/cuda/kernel_util.cuh"
#include "worker/kernels/cuda/launch_util.h"
#include "worker/kernels/cuda/softmax_xent.h"

namespace qtrain::kernels::cuda {
namespace {

constexpr int kRowsPerBlock = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Row states in the workspace.
constexpr int32_t kRowWrong = 0;
constexpr int32_t kRowCorrect = 1;
constexpr int32_t kRowBadLabel = -1;

// Candidate arg-max (value, index); index -1 means "no candidate yet".
__device__ __forceinline__ void TakeBetter(float& best, int64_t& best_j, float other,
                                           int64_t other_j) {
  if (other_j < 0) return;
  if (best_j < 0 || other > best || (other == best && other_j < best_j)) {
    best = other;
    best_j = other_j;
  }
}

__global__ void __launch_bounds__(kThreads)
    SoftmaxRowsKernel(int64_t batch, int64_t classes, const float* __restrict__ logits,
                      const int32_t* __restrict__ labels, float grad_scale,
                      float* __restrict__ dlogits, double* __restrict__ row_loss,
                      int32_t* __restrict__ row_state) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
       row < batch; row += warps) {
    const float* z = logits + row * classes;
    const int32_t label = labels[row];
    const bool bad = label < 0 || label >= classes;

    // First arg-max among the non-NaN values; the CPU's strictly-greater scan from z[0] gives
    // exactly that, unless z[0] is NaN (then nothing beats it: index 0).
    float best = 0.0f;
    int64_t best_j = -1;
    for (int64_t j = lane; j < classes; j += 32) {
      const float v = z[j];
      if (!isnan(v)) TakeBetter(best, best_j, v, j);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_down_sync(kFullMask, best, offset);
      const int64_t other_j = __shfl_down_sync(kFullMask, best_j, offset);
      TakeBetter(best, best_j, other, other_j);
    }
    best = __shfl_sync(kFullMask, best, 0);
    best_j = __shfl_sync(kFullMask, best_j, 0);
    const float z0 = z[0];
    if (isnan(z0) || best_j < 0) {
      best = z0;
      best_j = 0;
    }
    const float max = best;

    double sum = 0.0;
    for (int64_t j = lane; j < classes; j += 32) sum += exp(static_cast<double>(z[j]) - max);
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(kFullMask, sum, offset);
    sum = __shfl_sync(kFullMask, sum, 0);

    if (dlogits != nullptr) {
      float* dz = dlogits + row * classes;
      const double inv_sum = 1.0 / sum;
      for (int64_t j = lane; j < classes; j += 32) {
        if (bad) {
          dz[j] = 0.0f;
        } else {
          const double p = exp(static_cast<double>(z[j]) - max) * inv_sum;
          dz[j] =
              static_cast<float>((p - (j == label ? 1.0 : 0.0)) * static_cast<double>(grad_scale));
        }
      }
    }
    if (lane == 0) {
      if (bad) {
        row_loss[row] = 0.0;
        row_state[row] = kRowBadLabel;
      } else {
        row_loss[row] = log(sum) + static_cast<double>(max) - static_cast<double>(z[label]);
        row_state[row] = best_j == label ? kRowCorrect : kRowWrong;
      }
    }
  }
}

struct Totals {
  double loss;
  long long correct;
  long long bad_row;  // INT64_MAX: none
};

struct TotalsOp {
  using Acc = Totals;
  __device__ Acc Combine(const Acc& a, const Acc& b) const {
    return {a.loss + b.loss, a.correct + b.correct, a.bad_row < b.bad_row ? a.bad_row : b.bad_row};
  }
};

__global__ void __launch_bounds__(kThreads)
    SoftmaxTotalsKernel(int64_t batch, const double* __restrict__ row_loss,
                        const int32_t* __restrict__ row_state, const int32_t* __restrict__ labels,
                        SoftmaxXentDeviceResult* __restrict__ result) {
  Totals acc{0.0, 0, INT64_MAX};
  for (int64_t r = threadIdx.x; r < batch; r += kThreads) {
    acc.loss += row_loss[r];
    const int32_t state = row_state[r];
    if (state == kRowCorrect) ++acc.correct;
    if (state == kRowBadLabel && r < acc.bad_row) acc.bad_row = r;
  }
  acc = detail::BlockReduce(TotalsOp{}, acc);
  if (threadIdx.x == 0) {
    const bool bad = acc.bad_row != INT64_MAX;
    result->mean_loss =
        bad ? __longlong_as_double(0x7ff8000000000000LL) : acc.loss / static_cast<double>(batch);
    result->correct = bad ? 0 : acc.correct;
    result->bad_row = bad ? acc.bad_row : -1;
    result->bad_label = bad ? labels[acc.bad_row] : 0;
    result->reserved = 0;
  }
}

size_t RowLossBytes(int64_t batch) { return AlignUp(static_cast<size_t>(batch) * sizeof(double)); }

}  // namespace

size_t SoftmaxXentWorkspaceBytes(int64_t batch) {
  if (batch < 1) return 0;
  return RowLossBytes(batch) + AlignUp(static_cast<size_t>(batch) * sizeof(int32_t));
}

absl::Status SoftmaxCrossEntropy(const CudaContext& ctx, int64_t batch, int64_t classes,
                                 const float* logits, const int32_t* labels, float* dlogits,
                                 SoftmaxXentDeviceResult* result, void* workspace) {
  constexpr const char* kWhat = "cuda SoftmaxCrossEntropy";
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "batch", batch, 1));
  RETURN_IF_ERROR(CheckAtLeast(kWhat, "classes", classes, 1));
  RETURN_IF_ERROR(
      CheckNotNull(kWhat, {{"logits", logits}, {"labels", labels}, {"result", result}}));
  RETURN_IF_ERROR(CheckWorkspace(kWhat, workspace));
  double* row_loss = static_cast<double*>(workspace);
  int32_t* row_state =
      reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + RowLossBytes(batch));
  const float grad_scale = static_cast<float>(1.0 / static_cast<double>(batch));
  int64_t blocks = (batch + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > kElementwiseMaxBlocks) blocks = kElementwiseMaxBlocks;
  SoftmaxRowsKernel<<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream>>>(
      batch, classes, logits, labels, grad_scale, dlogits, row_loss, row_state);
  RETURN_IF_ERROR(LaunchStatus(kWhat));
  SoftmaxTotalsKernel<<<1, kThreads, 0, ctx.stream>>>(batch, row_loss, row_state, labels, result);
  return LaunchStatus(kWhat);
}

}  // namespace qtrain::kernels::cuda
