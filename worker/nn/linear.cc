#include "worker/nn/linear.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/sgemm.h"
#include "worker/nn/init.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {

using kernels::Sgemm;
using kernels::Transpose;

Linear::Linear(std::string name, const LinearOptions& options, std::mt19937_64& rng)
    : Layer(std::move(name)), options_(options) {
  QTRAIN_CHECK(options.in_features >= 1 && options.out_features >= 1)
      << "linear '" << this->name() << "': " << options.in_features << "->" << options.out_features;
  weight_.name = "weight";
  weight_.kind = ParamKind::kWeight;
  weight_.value = Tensor({options.out_features, options.in_features});
  weight_.grad = Tensor({options.out_features, options.in_features});
  UniformFanIn(options.in_features, rng, &weight_.value);
  if (options.bias) {
    bias_.name = "bias";
    bias_.kind = ParamKind::kBias;
    bias_.value = Tensor({options.out_features});
    bias_.grad = Tensor({options.out_features});
    UniformFanIn(options.in_features, rng, &bias_.value);
  }
}

std::string Linear::Describe() const {
  return absl::StrCat("linear ", options_.in_features, "->", options_.out_features,
                      options_.bias ? "" : " no-bias");
}

absl::Status Linear::ValidateInput(const Shape& input) const {
  if (input.size() != 2 || input[0] < 1 || input[1] != options_.in_features) {
    return internal::BadInput(name(), absl::StrCat("[N>=1,", options_.in_features, "]"), input);
  }
  return absl::OkStatus();
}

absl::StatusOr<Shape> Linear::OutputShape(const Shape& input) const {
  if (absl::Status s = ValidateInput(input); !s.ok()) return s;
  return Shape{input[0], options_.out_features};
}

void Linear::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  internal::CheckOk(ValidateInput(x.shape()));
  const int64_t n = x.dim(0);
  const int64_t in = options_.in_features;
  const int64_t out = options_.out_features;
  const Tensor& w = EffectiveWeight(ctx);
  internal::EnsureShape(y, {n, out});
  float beta = 0.0f;
  if (options_.bias) {
    // The bias is written first and the GEMM accumulates onto it.
    for (int64_t i = 0; i < n; ++i) {
      std::copy_n(bias_.value.data(), out, y->data() + i * out);
    }
    beta = 1.0f;
  }
  // y[N, out] = x[N, in] * W^T.
  Sgemm(ctx.cpu, Transpose::kNo, Transpose::kYes, n, out, in, 1.0f, x.data(), in, w.data(), in,
        beta, y->data(), out);
  input_ = &x;
  effective_weight_ = &w;
}

void Linear::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(input_ != nullptr) << "linear '" << name() << "': Backward before Forward";
  const Tensor& x = *input_;
  const int64_t n = x.dim(0);
  const int64_t in = options_.in_features;
  const int64_t out = options_.out_features;
  QTRAIN_CHECK(dy.rank() == 2 && dy.dim(0) == n && dy.dim(1) == out)
      << "linear '" << name() << "': dy " << ShapeToString(dy.shape());
  // dW[out, in] = dy^T * x.
  Sgemm(ctx.cpu, Transpose::kYes, Transpose::kNo, out, in, n, 1.0f, dy.data(), out, x.data(), in,
        0.0f, weight_.grad.data(), in);
  EffectiveWeightBackward(ctx);
  if (options_.bias) {
    // db = column sums of dy, accumulated in double in row order (deterministic).
    float* db = bias_.grad.data();
    for (int64_t j = 0; j < out; ++j) {
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) sum += dy.data()[i * out + j];
      db[j] = static_cast<float>(sum);
    }
  }
  if (dx != nullptr) {
    // dx[N, in] = dy * W.
    internal::EnsureShape(dx, {n, in});
    Sgemm(ctx.cpu, Transpose::kNo, Transpose::kNo, n, in, out, 1.0f, dy.data(), out,
          effective_weight_->data(), in, 0.0f, dx->data(), in);
  }
}

void Linear::CollectParameters(std::vector<Parameter*>* out) {
  out->push_back(&weight_);
  if (options_.bias) out->push_back(&bias_);
}

}  // namespace qtrain::nn
