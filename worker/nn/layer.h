// The Layer interface every building block of a network implements, and the parameters,
// buffers and run context they share.
//
// A layer owns its parameters (full-precision master values and their gradients) and whatever
// it saved in Forward for Backward. Backward OVERWRITES each parameter's grad with the gradient
// of the last Forward's output (no accumulation across calls) and writes dx when asked.
//
// Thread-safety: a layer is used by one thread at a time; its kernels may use the pool in the
// RunContext. Layers are not copyable.
#ifndef QTRAIN_WORKER_NN_LAYER_H_
#define QTRAIN_WORKER_NN_LAYER_H_

#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/nn/tensor.h"

namespace qtrain::nn {

enum class Mode { kTrain, kEval };

// What a parameter is, so the optimizer can treat kinds differently: weight decay applies to
// kWeight only; kQuantizer parameters (PACT alpha, QIL c/d/gamma) get their own learning rate.
enum class ParamKind { kWeight, kBias, kNormScale, kNormShift, kQuantizer };

struct Parameter {
  std::string name;  // unique within a model, e.g. "block1.conv2.weight"
  ParamKind kind = ParamKind::kWeight;
  Tensor value;      // the full-precision master copy
  Tensor grad;       // same shape as value
  // Multiplies the optimizer's learning rate for this parameter: the owner sets it when the
  // method prescribes its own rate (QIL's interval parameters train at 1/100 of the weights').
  float lr_scale = 1.0f;
};

// Non-trained state that checkpoints must keep (batch-norm running statistics).
struct Buffer {
  std::string name;
  Tensor value;
};

struct RunContext {
  kernels::CpuContext cpu;
  Mode mode = Mode::kTrain;
  // If set, called during Backward as soon as a layer's parameter gradients are final, in
  // reverse layer order, so communication can overlap the rest of backward.
  std::function<void(std::span<Parameter* const> ready)> on_grads_ready;
};

class Layer {
 public:
  explicit Layer(std::string name) : name_(std::move(name)) {}
  virtual ~Layer() = default;
  Layer(const Layer&) = delete;
  Layer& operator=(const Layer&) = delete;

  const std::string& name() const { return name_; }
  // One line for model summaries, e.g. "conv2d 1->32 k3 s1 p1".
  virtual std::string Describe() const = 0;

  // The output shape for an input shape; INVALID_ARGUMENT naming the layer if incompatible.
  virtual absl::StatusOr<Shape> OutputShape(const Shape& input) const = 0;

  // y = f(x). In Mode::kTrain keeps what Backward needs. Precondition: OutputShape(x.shape()) ok.
  virtual void Forward(RunContext& ctx, const Tensor& x, Tensor* y) = 0;

  // Given dy for the last Forward, overwrites parameter grads and writes dx if non-null.
  virtual void Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) = 0;

  // Appends this layer's (and its children's) parameters / buffers, in a fixed order.
  virtual void CollectParameters(std::vector<Parameter*>* out) {}
  virtual void CollectBuffers(std::vector<Buffer*>* out) {}

 private:
  std::string name_;
};

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_LAYER_H_
