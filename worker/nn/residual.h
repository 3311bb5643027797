// The basic residual block of He et al. 2016 ("Deep Residual Learning for Image Recognition"),
// as used in their CIFAR ResNets:
//
//   y = relu( bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x) )
//
// conv1 is 3x3 with the block's stride, conv2 3x3 stride 1, both padding 1 and without bias.
// The shortcut is the identity when the stride is 1 and the channel count is unchanged. Otherwise:
//   - ShortcutKind::kZeroPad (default; the paper's "option A", which its CIFAR experiments use and
//     which adds no parameters): x subsampled by the stride (x[:, :, ::s, ::s]) with zero channels
//     added. The input channels land in the middle, (out - in) / 2 zero channels before them and
//     the rest after, as in the widely used PyTorch port (akamaster/pytorch_resnet_cifar10), so
//     its ResNet-20 has 269,722 parameters with a 10-class head. Which channels hold zeros makes
//     no difference to training (the block's output channels are interchangeable).
//   - ShortcutKind::kProjection ("option B"): a 1x1 convolution with the stride, then batch norm
//     (ResNet-20 then has 272,474 parameters).
//
// Children (parameter prefixes): conv1, bn1, conv2, bn2 and, for a projection, shortcut_conv,
// shortcut_bn; with a quantizing factory (ResidualOptions::factory) also relu1 (the activation
// quantizer between the convolutions) and aq_in (conv1's input quantizer). The final add and ReLU are fused into one pass over the output; the inner ReLU runs
// in place. Forward keeps pointers to x and *y for Backward (both must stay alive and unchanged
// until then). If ctx.on_grads_ready is set, Backward reports each child's parameters right after
// that child's backward (bn2, conv2, bn1, conv1, then the projection's). Cost: the two
// convolutions dominate (2 * 2*N*out*in_or_out*9*OH*OW flops per pass).
#ifndef QTRAIN_WORKER_NN_RESIDUAL_H_
#define QTRAIN_WORKER_NN_RESIDUAL_H_

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "worker/nn/batch_norm.h"
#include "worker/nn/conv2d.h"
#include "worker/nn/layer.h"
#include "worker/nn/layer_factory.h"

namespace qtrain::nn {

enum class ShortcutKind {
  kZeroPad,     // option A: subsample + zero channels, no parameters
  kProjection,  // option B: 1x1 conv (stride s) + batch norm
};

struct ResidualOptions {
  int64_t in_channels = 16;
  int64_t out_channels = 16;
  int64_t stride = 1;
  // Used only when the shape changes (stride != 1 or in_channels != out_channels).
  ShortcutKind shortcut = ShortcutKind::kZeroPad;
  // Supplies conv1, conv2 (role: middle), the activation between them (MakeActivation; a plain
  // in-place ReLU when it returns nullptr) and, when factory->full_precision_shortcut(), a
  // quantizer of x in front of conv1 only (MakeInputQuantizer; the shortcut reads x). A
  // projection shortcut's conv comes from the factory unless shortcuts are full precision.
  // nullptr: DefaultLayerFactory(). Used only by the constructor.
  const LayerFactory* factory = nullptr;
};

class Residual : public Layer {
 public:
  // Preconditions (checked): channels, stride >= 1; kZeroPad needs out_channels >= in_channels.
  // Draws conv1's, conv2's (and the projection's) weights from rng in that order.
  Residual(std::string name, const ResidualOptions& options, std::mt19937_64& rng);

  std::string Describe() const override;  // "residual 16->32 s2 shortcut=zero-pad"
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;
  void CollectParameters(std::vector<Parameter*>* out) override;
  void CollectBuffers(std::vector<Buffer*>* out) override;

  const ResidualOptions& options() const { return options_; }
  bool has_identity_shortcut() const;
  // y = relu(y + shortcut(x)) in one pass over y, where the shortcut is `projected` (the
  // projection branch's output, same shape as y) when given, else the identity or the zero-pad
  // subsample of x. Shared with packed inference (worker/quant/packed_model.cc).
  void AddShortcutAndRelu(RunContext& ctx, const Tensor& x, const Tensor* projected,
                          Tensor* y) const;

  // The children, for tools that walk a model (export, packed inference). Forward runs them as:
  // conv1 on in_quant(x) (or x), bn1, act1 (or an in-place ReLU when null), conv2, bn2, and on
  // x shortcut_conv, shortcut_bn (projection only); then y = relu(bn2 out + shortcut).
  Conv2d* conv1() const { return conv1_.get(); }
  BatchNorm2d* bn1() const { return bn1_.get(); }
  Conv2d* conv2() const { return conv2_.get(); }
  BatchNorm2d* bn2() const { return bn2_.get(); }
  Conv2d* shortcut_conv() const { return shortcut_conv_.get(); }  // null unless projection
  BatchNorm2d* shortcut_bn() const { return shortcut_bn_.get(); }  // null unless projection
  Layer* act1() const { return act1_.get(); }                      // null: in-place ReLU
  Layer* in_quant() const { return in_quant_.get(); }              // null: conv1 reads x

 private:
  void AddShortcutBackward(RunContext& ctx, const Tensor& dz, Tensor* dx);
  void Report(RunContext& ctx, const std::vector<Parameter*>& params);

  ResidualOptions options_;
  std::unique_ptr<Conv2d> conv1_;
  std::unique_ptr<BatchNorm2d> bn1_;
  std::unique_ptr<Conv2d> conv2_;
  std::unique_ptr<BatchNorm2d> bn2_;
  std::unique_ptr<Conv2d> shortcut_conv_;     // projection only
  std::unique_ptr<BatchNorm2d> shortcut_bn_;  // projection only
  std::unique_ptr<Layer> act1_;      // null: in-place ReLU
  std::unique_ptr<Layer> in_quant_;  // null: conv1 reads x
  // Per child, in CollectParameters order: conv1, bn1, conv2, bn2, act1, in_quant,
  // shortcut_conv, shortcut_bn (empty lists for absent children).
  std::vector<std::vector<Parameter*>> child_params_;

  const Tensor* input_ = nullptr;             // saved by Forward
  const Tensor* output_ = nullptr;            // saved by Forward
  Tensor conv1_out_, relu1_out_, conv2_out_;  // forward activations (relu1 in place on bn1's)
  Tensor bn1_out_, grad_act_, x_quant_;      // with act1_ / in_quant_ only
  Tensor shortcut_conv_out_, shortcut_out_;   // projection only
  Tensor dz_;                                 // gradient at the final ReLU's input
  Tensor grad_a_, grad_b_;                    // gradients inside the main branch
  Tensor grad_shortcut_a_, grad_shortcut_x_;  // projection only
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_RESIDUAL_H_
