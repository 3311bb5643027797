// The layer-wise Hessian of L-DNQ / L-OBS (Dong, Chen and Pan 2017): for a layer computing
// z = Theta^T y from an input vector y (a fully-connected layer's input row, or one im2col patch
// of a convolution), the second-order error of quantizing Theta is
//   1/2 (Theta_hat - Theta)^T H (Theta_hat - Theta),   H = mean over samples of y y^T,
// one block shared by all output channels. When the layer has a bias a constant 1 is appended to
// y, so H is (D + 1) x (D + 1) with H[D][D] = 1 and H[D][0..D) the mean input.
//
// The accumulator keeps the SUM of y y^T (double) and the sample count, so sums from several
// shards (ranks) can be added before Mean() divides: AllReduceHessian does that under mpirun. Each
// Add* call forms y y^T of its batch in float with SGEMM (float error ~ samples-per-batch * 2^-24
// relative) and adds it into the double sum.
//
// Thread-safety: one thread at a time (SGEMM uses ctx's pool). Memory: D^2 doubles + D^2 floats.
// Cost: 2 * samples * D^2 flops, plus an im2col pass per convolution image.
#ifndef QTRAIN_WORKER_QUANT_LDNQ_HESSIAN_H_
#define QTRAIN_WORKER_QUANT_LDNQ_HESSIAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "worker/comm/communicator.h"
#include "worker/kernels/cpu/conv.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/nn/tensor.h"

namespace qtrain::quant::ldnq {

enum class BiasColumn { kNone, kAppendOne };

class HessianAccumulator {
 public:
  // input_dim: D (in_features, or C*KH*KW for a convolution). Precondition: input_dim >= 1.
  HessianAccumulator(int64_t input_dim, BiasColumn bias);

  // x: [N, D] (one sample per row). Precondition (checked): x.dim(1) == D.
  void AddLinearInput(const kernels::CpuContext& ctx, const nn::Tensor& x);
  // x: [N, C, H, W], the convolution's input; every output position's patch is a sample.
  // Precondition (checked): shape.col_rows() == D and x matches shape.
  void AddConvInput(const kernels::CpuContext& ctx, const kernels::Conv2dShape& shape,
                    const nn::Tensor& x);

  // The side of H: D, or D + 1 with the bias column.
  int64_t dim() const { return dim_; }
  int64_t input_dim() const { return input_dim_; }
  int64_t samples() const { return samples_; }
  // The running sums (dim() x dim(), row-major, symmetric), e.g. for an allreduce of shards.
  std::vector<double>& sum() { return sum_; }
  void set_samples(int64_t samples) { samples_ = samples; }
  // sum / samples (zeros when no sample was added).
  std::vector<double> Mean() const;

 private:
  void AddGram(const kernels::CpuContext& ctx, const float* rows_major, int64_t n);
  int64_t input_dim_;
  int64_t dim_;
  int64_t samples_ = 0;
  std::vector<double> sum_;
  std::vector<float> gram_;  // scratch, D x D
  std::vector<float> col_;   // scratch, im2col of one image
};

// Replaces acc's sums and sample count by their totals over every rank of `comm` (each rank
// having accumulated its own samples), so that Mean() is the mean over the union of the ranks'
// samples, with the same bits on every rank. It equals one accumulator fed every sample up to
// the order of the double additions. Collective: every rank calls it with the same dim().
// Cost: one AllReduceSum of dim()^2 + 1 doubles.
absl::Status AllReduceHessian(comm::Communicator& comm, HessianAccumulator* acc);

}  // namespace qtrain::quant::ldnq

#endif  // QTRAIN_WORKER_QUANT_LDNQ_HESSIAN_H_
