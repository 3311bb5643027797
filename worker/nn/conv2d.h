// A 2-D convolution over NCHW tensors: x [N, C, H, W] -> y [N, K, OH, OW] with weight
// [K, C, KH, KW], an optional bias [K], stride and zero padding (square kernels, strides and
// padding; no dilation or groups). OH = (H + 2*padding - kernel) / stride + 1 (floor), likewise OW.
//
// Runs on the CPU kernels (kernels::Conv2dForward / BackwardData / BackwardWeights: im2col + SGEMM,
// images split over the pool). Parameters: "weight" (kWeight, Kaiming-normal with fan_in =
// C*KH*KW) and, when enabled, "bias" (kBias, zeros). Forward keeps a pointer to x for Backward: x
// must stay alive and unchanged until then. Backward skips the data gradient when dx is null (the
// first layer of a network). Cost: 2*N*K*C*KH*KW*OH*OW flops per pass.
//
// Quantization hook: as in Linear, every pass reads the weight through EffectiveWeight(), fetched
// once per Forward; EffectiveWeightBackward() maps the weight gradient back to the master weight.
#ifndef QTRAIN_WORKER_NN_CONV2D_H_
#define QTRAIN_WORKER_NN_CONV2D_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "worker/kernels/cpu/conv.h"
#include "worker/nn/layer.h"

namespace qtrain::nn {

struct Conv2dOptions {
  int64_t in_channels = 1;
  int64_t out_channels = 1;
  int64_t kernel = 3;
  int64_t stride = 1;
  int64_t padding = 0;
  bool bias = false;  // off by default: a convolution is usually followed by batch norm
};

class Conv2d : public Layer {
 public:
  // Preconditions (checked): channels, kernel, stride >= 1, padding >= 0. Draws the weight from
  // rng.
  Conv2d(std::string name, const Conv2dOptions& options, std::mt19937_64& rng);

  std::string Describe() const override;  // "conv2d 3->16 k3 s1 p1"
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;
  void CollectParameters(std::vector<Parameter*>* out) override;

  const Conv2dOptions& options() const { return options_; }
  Parameter& weight() { return weight_; }
  Parameter& bias() { return bias_; }  // empty when options().bias is false

 protected:
  // The weight the passes use, [K, C, KH, KW]; called once per Forward. Default: the master weight.
  virtual const Tensor& EffectiveWeight(RunContext& ctx) { return weight_.value; }
  // Turns weight_.grad from d/d(effective weight) into d/d(master weight). Default: identity
  // (the straight-through estimator).
  virtual void EffectiveWeightBackward(RunContext& ctx) {}

 private:
  kernels::Conv2dShape KernelShape(const Shape& input) const;
  absl::Status ValidateInput(const Shape& input) const;

  Conv2dOptions options_;
  Parameter weight_;
  Parameter bias_;
  const Tensor* input_ = nullptr;             // saved by Forward
  const Tensor* effective_weight_ = nullptr;  // saved by Forward
  kernels::Conv2dShape shape_;                // of the last Forward
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_CONV2D_H_
