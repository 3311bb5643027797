// A fully-connected layer: y = x W^T + b for x [N, in], W [out, in], b [out], y [N, out].
//
// Parameters: "weight" (kWeight, Kaiming-normal) and, unless disabled, "bias" (kBias, zeros).
// Forward keeps a pointer to x for Backward: x must stay alive and unchanged until then.
// Costs 2*N*in*out flops forward and 4*N*in*out backward (2*N*in*out without dx), all in SGEMM.
//
// Quantization hook: every pass reads the weight through EffectiveWeight(), fetched once per
// Forward. Today that is the master weight; a weight quantizer (next issue) will return Q(w)
// there and map the gradient back in EffectiveWeightBackward() (straight-through by default).
#ifndef QTRAIN_WORKER_NN_LINEAR_H_
#define QTRAIN_WORKER_NN_LINEAR_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "worker/nn/layer.h"

namespace qtrain::nn {

struct LinearOptions {
  int64_t in_features = 1;
  int64_t out_features = 1;
  bool bias = true;  // add a learned bias
};

class Linear : public Layer {
 public:
  // Precondition (checked): in_features, out_features >= 1. Draws the weight from rng.
  Linear(std::string name, const LinearOptions& options, std::mt19937_64& rng);

  std::string Describe() const override;
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;
  void CollectParameters(std::vector<Parameter*>* out) override;

  const LinearOptions& options() const { return options_; }
  Parameter& weight() { return weight_; }
  Parameter& bias() { return bias_; }  // empty when options().bias is false

 protected:
  // The weight the passes use, [out, in]; called once per Forward. Default: the master weight.
  virtual const Tensor& EffectiveWeight(RunContext& ctx) { return weight_.value; }
  // Turns weight_.grad from d/d(effective weight) into d/d(master weight). Default: identity
  // (the straight-through estimator).
  virtual void EffectiveWeightBackward(RunContext& ctx) {}

 private:
  absl::Status ValidateInput(const Shape& input) const;

  LinearOptions options_;
  Parameter weight_;
  Parameter bias_;
  const Tensor* input_ = nullptr;             // saved by Forward
  const Tensor* effective_weight_ = nullptr;  // saved by Forward
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_LINEAR_H_
