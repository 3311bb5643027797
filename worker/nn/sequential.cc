#include "worker/nn/sequential.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace qtrain::nn {

Layer* Sequential::Add(std::unique_ptr<Layer> child) {
  QTRAIN_CHECK(child != nullptr) << "sequential '" << name() << "': null child";
  for (const auto& existing : children_) {
    QTRAIN_CHECK(existing->name() != child->name())
        << "sequential '" << name() << "': duplicate child name '" << child->name() << "'";
  }
  const std::string prefix = child->name() + ".";
  std::vector<Parameter*> params;
  child->CollectParameters(&params);
  for (Parameter* p : params) p->name = prefix + p->name;
  std::vector<Buffer*> buffers;
  child->CollectBuffers(&buffers);
  for (Buffer* b : buffers) b->name = prefix + b->name;
  child_params_.push_back(std::move(params));
  children_.push_back(std::move(child));
  activations_.resize(children_.size() - 1);
  return children_.back().get();
}

std::string Sequential::Describe() const {
  return absl::StrCat("sequential (", children_.size(), " layers)");
}

absl::StatusOr<Shape> Sequential::OutputShape(const Shape& input) const {
  if (children_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("sequential '", name(), "' is empty"));
  }
  Shape shape = input;
  for (const auto& child : children_) {
    absl::StatusOr<Shape> next = child->OutputShape(shape);
    if (!next.ok()) return next.status();
    shape = *std::move(next);
  }
  return shape;
}

void Sequential::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  QTRAIN_CHECK(!children_.empty()) << "sequential '" << name() << "' is empty";
  const size_t last = children_.size() - 1;
  const Tensor* in = &x;
  for (size_t i = 0; i < children_.size(); ++i) {
    Tensor* out = i == last ? y : &activations_[i];
    children_[i]->Forward(ctx, *in, out);
    in = out;
  }
}

void Sequential::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(!children_.empty()) << "sequential '" << name() << "' is empty";
  // Hidden from the children (moved, not copied: no allocation) and restored before returning.
  auto on_ready = std::move(ctx.on_grads_ready);
  ctx.on_grads_ready = nullptr;
  const Tensor* grad_out = &dy;
  for (size_t i = children_.size(); i-- > 0;) {
    // Child i reads the gradient child i+1 wrote into grads_[(i+1) % 2] and writes grads_[i % 2].
    Tensor* grad_in = i == 0 ? dx : &grads_[i % 2];
    children_[i]->Backward(ctx, *grad_out, grad_in);
    if (on_ready && !child_params_[i].empty()) on_ready(child_params_[i]);
    grad_out = grad_in;
  }
  ctx.on_grads_ready = std::move(on_ready);
}

void Sequential::CollectParameters(std::vector<Parameter*>* out) {
  for (const auto& params : child_params_) out->insert(out->end(), params.begin(), params.end());
}

void Sequential::CollectBuffers(std::vector<Buffer*>* out) {
  for (const auto& child : children_) child->CollectBuffers(out);
}

}  // namespace qtrain::nn
