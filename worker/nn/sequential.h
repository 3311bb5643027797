// A chain of layers run in order: y = child_k(... child_1(child_0(x))).
//
// Owns its children and the activations between them (allocated on the first Forward, reused
// afterwards: Tensor::Resize only grows). Parameter and buffer names of a child are prefixed with
// "<child name>." when it is added, so in a model built of nested containers names read
// "layer2.0.conv1.weight"; child names must therefore be unique within one Sequential (checked).
//
// Backward runs the children in reverse order. If ctx.on_grads_ready is set, it is called right
// after each direct child's Backward with that child's parameters (skipped for children without
// any), so each parameter is reported exactly once, in reverse layer order. Children do not see
// the callback (it is hidden while they run), so a nested container reports its whole subtree in
// one call once its Backward is done. The first child gets the caller's dx, so a null dx skips
// the first layer's data gradient.
//
// Children keep pointers into what they were given, so x and *y of the last Forward must stay
// alive and unchanged until the matching Backward (the trainer's input batch and logits do).
//
// Thread-safety: as any Layer. Cost: the children's, plus nothing per step once the activation
// and gradient buffers have grown to size.
#ifndef QTRAIN_WORKER_NN_SEQUENTIAL_H_
#define QTRAIN_WORKER_NN_SEQUENTIAL_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "worker/nn/layer.h"

namespace qtrain::nn {

class Sequential : public Layer {
 public:
  explicit Sequential(std::string name) : Layer(std::move(name)) {}

  // Appends a child and returns it. Precondition (checked): non-null, its name unused here.
  // The child must have all its parameters already (names are prefixed now).
  Layer* Add(std::unique_ptr<Layer> child);
  // Builds a T(args...) and appends it.
  template <class T, class... Args>
  T* Emplace(Args&&... args) {
    auto child = std::make_unique<T>(std::forward<Args>(args)...);
    T* raw = child.get();
    Add(std::move(child));
    return raw;
  }

  int num_children() const { return static_cast<int>(children_.size()); }
  Layer& child(int i) { return *children_[static_cast<size_t>(i)]; }
  const Layer& child(int i) const { return *children_[static_cast<size_t>(i)]; }

  std::string Describe() const override;  // "sequential (N layers)"
  // Threads the shape through every child; the first child's error if any. Precondition: at
  // least one child.
  absl::StatusOr<Shape> OutputShape(const Shape& input) const override;
  void Forward(RunContext& ctx, const Tensor& x, Tensor* y) override;
  void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) override;
  void CollectParameters(std::vector<Parameter*>* out) override;
  void CollectBuffers(std::vector<Buffer*>* out) override;

 private:
  std::vector<std::unique_ptr<Layer>> children_;
  std::vector<std::vector<Parameter*>> child_params_;  // per child, for on_grads_ready
  std::vector<Tensor> activations_;                    // output of child i, for i < last
  Tensor grads_[2];                                    // ping-pong gradients between children
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_SEQUENTIAL_H_
