// Max pooling over NCHW tensors with a square window: x [N, C, H, W] -> y [N, C, OH, OW],
// OH = (H - kernel) / stride + 1 (floor; no padding), likewise OW.
//
// Forward records the arg-max of every window (int32 per output element, kept in the layer), so
// Backward is a scatter and does not need x. The first maximum wins ties. No parameters.
// Cost: one pass over x per window element (kernels::MaxPool2d*).
#ifndef QTRAIN_WORKER_NN_MAX_POOL_H_
#define QTRAIN_WORKER_NN_MAX_POOL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "worker/kernels/cpu/pooling.h"
#include "worker/nn/layer.h"

namespace qtrain::nn {

struct MaxPoolOptions {
  int64_t kernel = 2;
  int64_t stride = 2;
};

class MaxPool2d : public Layer {
 public:
  // Precondition (checked): kernel, stride >= 1.
  MaxPool2d(std::string name, const MaxPoolOptions& options);

  std::string Describe() const override;  // "maxpool k2 s2"
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;

  const MaxPoolOptions& options() const { return options_; }

 private:
  kernels::Pool2dShape KernelShape(const Shape& input) const;
  absl::Status ValidateInput(const Shape& input) const;

  MaxPoolOptions options_;
  kernels::Pool2dShape shape_;  // of the last Forward
  Shape input_shape_;
  std::vector<int32_t> argmax_;
  bool has_forward_ = false;
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_MAX_POOL_H_
