#include "worker/quant/ldnq/hessian.h"

#include <cmath>

#include "common/logging.h"
#include "common/status_macros.h"
#include "worker/kernels/cpu/sgemm.h"

namespace qtrain::quant::ldnq {

using kernels::Sgemm;
using kernels::Transpose;

HessianAccumulator::HessianAccumulator(int64_t input_dim, BiasColumn bias)
    : input_dim_(input_dim), dim_(input_dim + (bias == BiasColumn::kAppendOne ? 1 : 0)) {
  QTRAIN_CHECK(input_dim >= 1) << "Hessian of dimension " << input_dim;
  sum_.assign(static_cast<size_t>(dim_ * dim_), 0.0);
  gram_.assign(static_cast<size_t>(input_dim_ * input_dim_), 0.0f);
}

void HessianAccumulator::AddLinearInput(const kernels::CpuContext& ctx, const nn::Tensor& x) {
  QTRAIN_CHECK(x.rank() == 2 && x.dim(1) == input_dim_)
      << "Hessian of dimension " << input_dim_ << " fed " << nn::ShapeToString(x.shape());
  const int64_t n = x.dim(0), d = input_dim_;
  // gram = x^T x.
  Sgemm(ctx, Transpose::kYes, Transpose::kNo, d, d, n, 1.0f, x.data(), d, x.data(), d, 0.0f,
        gram_.data(), d);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < d; ++j) sum_[i * dim_ + j] += gram_[i * d + j];
  }
  if (dim_ > d) {
    for (int64_t j = 0; j < d; ++j) {
      double s = 0.0;
      for (int64_t i = 0; i < n; ++i) s += x.data()[i * d + j];
      sum_[d * dim_ + j] += s;
      sum_[j * dim_ + d] += s;
    }
    sum_[d * dim_ + d] += static_cast<double>(n);
  }
  samples_ += n;
}

void HessianAccumulator::AddConvInput(const kernels::CpuContext& ctx,
                                      const kernels::Conv2dShape& shape, const nn::Tensor& x) {
  QTRAIN_CHECK(shape.col_rows() == input_dim_ && x.rank() == 4 && x.dim(0) == shape.batch &&
               x.dim(1) == shape.in_channels && x.dim(2) == shape.in_height &&
               x.dim(3) == shape.in_width)
      << "Hessian of dimension " << input_dim_ << " fed " << nn::ShapeToString(x.shape());
  const int64_t d = input_dim_, p = shape.col_cols();
  col_.resize(static_cast<size_t>(d * p));
  const int64_t image = shape.in_channels * shape.in_height * shape.in_width;
  for (int64_t n = 0; n < shape.batch; ++n) {
    kernels::Im2Col(shape, x.data() + n * image, col_.data());
    // gram (+)= col col^T over this batch's images, then into the double sum once.
    Sgemm(ctx, Transpose::kNo, Transpose::kYes, d, d, p, 1.0f, col_.data(), p, col_.data(), p,
          n == 0 ? 0.0f : 1.0f, gram_.data(), d);
    if (dim_ > d) {
      for (int64_t i = 0; i < d; ++i) {
        double s = 0.0;
        for (int64_t j = 0; j < p; ++j) s += col_[i * p + j];
        sum_[d * dim_ + i] += s;
        sum_[i * dim_ + d] += s;
      }
      sum_[d * dim_ + d] += static_cast<double>(p);
    }
  }
  if (shape.batch > 0) {
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < d; ++j) sum_[i * dim_ + j] += gram_[i * d + j];
    }
  }
  samples_ += shape.batch * p;
}

std::vector<double> HessianAccumulator::Mean() const {
  std::vector<double> h(sum_.size(), 0.0);
  if (samples_ == 0) return h;
  const double inv = 1.0 / static_cast<double>(samples_);
  for (size_t i = 0; i < h.size(); ++i) h[i] = sum_[i] * inv;
  return h;
}

absl::Status AllReduceHessian(comm::Communicator& comm, HessianAccumulator* acc) {
  // The whole matrix, not a triangle: SGEMM's x^T x need not be bitwise symmetric, and the sum
  // must be what one process would have accumulated.
  std::vector<double>& sum = acc->sum();
  sum.push_back(static_cast<double>(acc->samples()));
  const absl::Status status = comm.AllReduceSum(sum);
  const double samples = sum.back();
  sum.pop_back();
  RETURN_IF_ERROR(status);
  acc->set_samples(std::llround(samples));
  return absl::OkStatus();
}

}  // namespace qtrain::quant::ldnq
