#include "worker/nn/batch_norm.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/layer_util.h"

namespace qtrain::nn {

BatchNorm2d::BatchNorm2d(std::string name, const BatchNormOptions& options)
    : Layer(std::move(name)), options_(options) {
  QTRAIN_CHECK(options.channels >= 1 && options.momentum >= 0.0f && options.momentum <= 1.0f &&
               options.epsilon > 0.0f)
      << "batchnorm '" << this->name() << "': channels " << options.channels << " momentum "
      << options.momentum << " epsilon " << options.epsilon;
  const int64_t c = options.channels;
  gamma_.name = "gamma";
  gamma_.kind = ParamKind::kNormScale;
  gamma_.value = Tensor({c});
  gamma_.value.Fill(1.0f);
  gamma_.grad = Tensor({c});
  beta_.name = "beta";
  beta_.kind = ParamKind::kNormShift;
  beta_.value = Tensor({c});
  beta_.grad = Tensor({c});
  running_mean_.name = "running_mean";
  running_mean_.value = Tensor({c});
  running_var_.name = "running_var";
  running_var_.value = Tensor({c});
  running_var_.value.Fill(1.0f);
  saved_mean_ = Tensor({c});
  saved_inv_std_ = Tensor({c});
}

std::string BatchNorm2d::Describe() const { return absl::StrCat("batchnorm ", options_.channels); }

absl::Status BatchNorm2d::ValidateInput(const Shape& input) const {
  if ((input.size() != 2 && input.size() != 4) || input[1] != options_.channels ||
      NumElements(input) < 1) {
    return internal::BadInput(
        name(), absl::StrCat("[N,", options_.channels, ",H,W] or [N,", options_.channels, "]"),
        input);
  }
  return absl::OkStatus();
}

kernels::BatchNormShape BatchNorm2d::KernelShape(const Shape& input) const {
  kernels::BatchNormShape s;
  s.batch = input[0];
  s.channels = input[1];
  s.spatial = input.size() == 4 ? input[2] * input[3] : 1;
  return s;
}

absl::StatusOr<Shape> BatchNorm2d::OutputShape(const Shape& input) const {
  if (absl::Status s = ValidateInput(input); !s.ok()) return s;
  return input;
}

void BatchNorm2d::Forward(RunContext& ctx, const Tensor& x, Tensor* y) {
  internal::CheckOk(ValidateInput(x.shape()));
  const kernels::BatchNormShape shape = KernelShape(x.shape());
  kernels::BatchNormOptions kopts;
  kopts.momentum = options_.momentum;
  kopts.epsilon = options_.epsilon;
  internal::EnsureShape(y, x.shape());
  if (ctx.mode == Mode::kTrain) {
    kernels::BatchNormTrainForward(ctx.cpu, shape, kopts, x.data(), gamma_.value.data(),
                                   beta_.value.data(), y->data(), saved_mean_.data(),
                                   saved_inv_std_.data(), running_mean_.value.data(),
                                   running_var_.value.data());
  } else {
    kernels::BatchNormEvalForward(ctx.cpu, shape, kopts, x.data(), gamma_.value.data(),
                                  beta_.value.data(), running_mean_.value.data(),
                                  running_var_.value.data(), y->data());
  }
  input_ = &x;
  forward_mode_ = ctx.mode;
}

void BatchNorm2d::Backward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  QTRAIN_CHECK(input_ != nullptr) << "batchnorm '" << name() << "': Backward before Forward";
  QTRAIN_CHECK(dy.shape() == input_->shape())
      << "batchnorm '" << name() << "': dy " << ShapeToString(dy.shape()) << " for input "
      << ShapeToString(input_->shape());
  if (forward_mode_ == Mode::kEval) {
    EvalBackward(ctx, dy, dx);
    return;
  }
  // The kernel always produces dx; without a caller's dx it goes to scratch.
  Tensor* target = dx != nullptr ? dx : &scratch_dx_;
  internal::EnsureShape(target, input_->shape());
  kernels::BatchNormBackward(ctx.cpu, KernelShape(input_->shape()), input_->data(), dy.data(),
                             gamma_.value.data(), saved_mean_.data(), saved_inv_std_.data(),
                             target->data(), gamma_.grad.data(), beta_.grad.data());
}

// With the running statistics as constants, y = x * scale_c + shift_c:
//   dx = dy * gamma_c * inv_std_c,  dgamma_c = sum dy * (x - mean_c) * inv_std_c,  dbeta_c = sum
//   dy.
void BatchNorm2d::EvalBackward(RunContext& ctx, const Tensor& dy, Tensor* dx) {
  const kernels::BatchNormShape s = KernelShape(input_->shape());
  if (dx != nullptr) internal::EnsureShape(dx, input_->shape());
  const float* x = input_->data();
  const float* g = dy.data();
  kernels::ParallelFor(ctx.cpu.pool, s.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const double mean = running_mean_.value[c];
      const double inv_std =
          1.0 / std::sqrt(static_cast<double>(running_var_.value[c]) + options_.epsilon);
      const float scale = static_cast<float>(gamma_.value[c] * inv_std);
      double dgamma = 0.0;
      double dbeta = 0.0;
      for (int64_t n = 0; n < s.batch; ++n) {
        const int64_t offset = (n * s.channels + c) * s.spatial;
        for (int64_t i = 0; i < s.spatial; ++i) {
          const double gi = g[offset + i];
          dbeta += gi;
          dgamma += gi * (x[offset + i] - mean);
          if (dx != nullptr) dx->data()[offset + i] = g[offset + i] * scale;
        }
      }
      gamma_.grad[c] = static_cast<float>(dgamma * inv_std);
      beta_.grad[c] = static_cast<float>(dbeta);
    }
  });
}

void BatchNorm2d::CollectParameters(std::vector<Parameter*>* out) {
  out->push_back(&gamma_);
  out->push_back(&beta_);
}

void BatchNorm2d::CollectBuffers(std::vector<Buffer*>* out) {
  out->push_back(&running_mean_);
  out->push_back(&running_var_);
}

}  // namespace qtrain::nn
