// The scalar layer of Zhuang et al. 2018 (Sec. 4.1): y = s * x with one trainable scalar s, placed
// after the network's last fully connected layer. A low-bit last layer produces logits far larger
// than a full-precision one; the scalar (initialised small, 0.01 in the paper) brings them back
// to the softmax's working range and is learned with the rest. Its kind is kNormScale, so weight
// decay does not pull it to zero.
//
// Backward: dx = s * dy, ds = sum(x * dy) (accumulated in double). Keeps a pointer to the last
// Forward's input, which must stay alive and unchanged until Backward. Cost: two memory-bound
// passes.
#ifndef QTRAIN_WORKER_NN_SCALAR_LAYER_H_
#define QTRAIN_WORKER_NN_SCALAR_LAYER_H_

#include <string>

#include "worker/nn/layer.h"

namespace qtrain::nn {

class ScalarLayer : public Layer {
 public:
  static constexpr float kPaperInit = 0.01f;
  ScalarLayer(std::string name, float init);

  std::string Describe() const override;
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;
  void CollectParameters(std::vector<Parameter*>* out) override { out->push_back(&scale_); }

  Parameter& scale() { return scale_; }

 private:
  Parameter scale_;
  const Tensor* input_ = nullptr;  // saved by Forward
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_SCALAR_LAYER_H_
