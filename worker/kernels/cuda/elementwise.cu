#include <initializer_list>
#include <string>

#include "common/status_macros.h"
#include "worker/kernels/cuda/elementwise.h"
#include "worker/kernels/cuda/kernel_util.cuh"

namespace qtrain::kernels::cuda {
namespace {

// No __restrict__: outputs may alias inputs.
struct FillFn {
  float value;
  float* out;
  __device__ void operator()(int64_t i) const { out[i] = value; }
};
struct CopyFn {
  const float* x;
  float* out;
  __device__ void operator()(int64_t i) const { out[i] = x[i]; }
};
struct AddFn {
  const float* a;
  const float* b;
  float* out;
  __device__ void operator()(int64_t i) const { out[i] = a[i] + b[i]; }
};
struct SubFn {
  const float* a;
  const float* b;
  float* out;
  __device__ void operator()(int64_t i) const { out[i] = a[i] - b[i]; }
};
struct MulFn {
  const float* a;
  const float* b;
  float* out;
  __device__ void operator()(int64_t i) const { out[i] = a[i] * b[i]; }
};
struct ScaleFn {
  float alpha;
  const float* x;
  float* out;
  __device__ void operator()(int64_t i) const { out[i] = alpha * x[i]; }
};
struct AddScalarFn {
  float alpha;
  const float* x;
  float* out;
  __device__ void operator()(int64_t i) const { out[i] = x[i] + alpha; }
};
struct AxpyFn {
  float alpha;
  const float* x;
  float* y;
  __device__ void operator()(int64_t i) const { y[i] = alpha * x[i] + y[i]; }
};
struct AxpbyFn {
  float alpha;
  float beta;
  const float* x;
  float* y;
  __device__ void operator()(int64_t i) const { y[i] = alpha * x[i] + beta * y[i]; }
};

// Sum of term(i) in double, written to the DeviceScalarOut.
template <class Term>
struct SumOp {
  using Acc = detail::Sum1;
  Term term;
  double* f64;
  float* f32;
  __device__ Acc Identity() const { return {0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const { acc.s += term(i); }
  __device__ Acc Combine(const Acc& a, const Acc& b) const { return {a.s + b.s}; }
  __device__ void Finish(const Acc& total) const {
    if (f64 != nullptr) *f64 = total.s;
    if (f32 != nullptr) *f32 = static_cast<float>(total.s);
  }
};
struct ValueTerm {
  const float* __restrict__ x;
  __device__ double operator()(int64_t i) const { return __ldg(x + i); }
};
struct ProductTerm {
  const float* __restrict__ a;
  const float* __restrict__ b;
  __device__ double operator()(int64_t i) const {
    return static_cast<double>(__ldg(a + i)) * static_cast<double>(__ldg(b + i));
  }
};
struct SquareTerm {
  const float* __restrict__ x;
  __device__ double operator()(int64_t i) const {
    const double v = __ldg(x + i);
    return v * v;
  }
};

// e = a - b into pos / neg (scaled) while summing e^2; Finish adds the total to *sum_sq.
struct DiffScaledSumSquaresOp {
  using Acc = detail::Sum1;
  const float* __restrict__ a;
  const float* __restrict__ b;
  float scale;
  float* pos;
  float* neg;
  double* sum_sq;
  __device__ Acc Identity() const { return {0.0}; }
  __device__ void Accumulate(Acc& acc, int64_t i) const {
    const float e = a[i] - b[i];
    acc.s += static_cast<double>(e) * e;
    if (pos != nullptr) pos[i] = scale * e;
    if (neg != nullptr) neg[i] = -scale * e;
  }
  __device__ Acc Combine(const Acc& x, const Acc& y) const { return {x.s + y.s}; }
  __device__ void Finish(const Acc& total) const { *sum_sq += total.s; }
};

absl::Status CheckElementwise(const char* what, int64_t n,
                              std::initializer_list<NamedPointer> pointers) {
  RETURN_IF_ERROR(CheckAtLeast(what, "n", n, 0));
  if (n > 0) RETURN_IF_ERROR(CheckNotNull(what, pointers));
  return absl::OkStatus();
}

template <class Term>
absl::Status LaunchSum(const CudaContext& ctx, const char* what, int64_t n, Term term,
                       DeviceScalarOut out, void* workspace,
                       std::initializer_list<NamedPointer> inputs) {
  RETURN_IF_ERROR(CheckElementwise(what, n, inputs));
  RETURN_IF_ERROR(CheckWorkspace(what, workspace));
  if (out.f64 == nullptr && out.f32 == nullptr) {
    RETURN_IF_ERROR(absl::InvalidArgumentError(std::string(what) + ": both outputs are null"));
  }
  return detail::LaunchReduce(ctx, what, n, SumOp<Term>{term, out.f64, out.f32}, workspace);
}

}  // namespace

absl::Status Fill(const CudaContext& ctx, int64_t n, float value, float* out) {
  RETURN_IF_ERROR(CheckElementwise("cuda Fill", n, {{"out", out}}));
  return detail::LaunchMap(ctx, "cuda Fill", n, FillFn{value, out});
}

absl::Status Copy(const CudaContext& ctx, int64_t n, const float* x, float* out) {
  RETURN_IF_ERROR(CheckElementwise("cuda Copy", n, {{"x", x}, {"out", out}}));
  return detail::LaunchMap(ctx, "cuda Copy", n, CopyFn{x, out});
}

absl::Status Add(const CudaContext& ctx, int64_t n, const float* a, const float* b, float* out) {
  RETURN_IF_ERROR(CheckElementwise("cuda Add", n, {{"a", a}, {"b", b}, {"out", out}}));
  return detail::LaunchMap(ctx, "cuda Add", n, AddFn{a, b, out});
}

absl::Status Sub(const CudaContext& ctx, int64_t n, const float* a, const float* b, float* out) {
  RETURN_IF_ERROR(CheckElementwise("cuda Sub", n, {{"a", a}, {"b", b}, {"out", out}}));
  return detail::LaunchMap(ctx, "cuda Sub", n, SubFn{a, b, out});
}

absl::Status Mul(const CudaContext& ctx, int64_t n, const float* a, const float* b, float* out) {
  RETURN_IF_ERROR(CheckElementwise("cuda Mul", n, {{"a", a}, {"b", b}, {"out", out}}));
  return detail::LaunchMap(ctx, "cuda Mul", n, MulFn{a, b, out});
}

absl::Status Scale(const CudaContext& ctx, int64_t n, float alpha, const float* x, float* out) {
  RETURN_IF_ERROR(CheckElementwise("cuda Scale", n, {{"x", x}, {"out", out}}));
  return detail::LaunchMap(ctx, "cuda Scale", n, ScaleFn{alpha, x, out});
}

absl::Status AddScalar(const CudaContext& ctx, int64_t n, float alpha, const float* x, float* out) {
  RETURN_IF_ERROR(CheckElementwise("cuda AddScalar", n, {{"x", x}, {"out", out}}));
  return detail::LaunchMap(ctx, "cuda AddScalar", n, AddScalarFn{alpha, x, out});
}

absl::Status Axpy(const CudaContext& ctx, int64_t n, float alpha, const float* x, float* y) {
  RETURN_IF_ERROR(CheckElementwise("cuda Axpy", n, {{"x", x}, {"y", y}}));
  return detail::LaunchMap(ctx, "cuda Axpy", n, AxpyFn{alpha, x, y});
}

absl::Status Axpby(const CudaContext& ctx, int64_t n, float alpha, const float* x, float beta,
                   float* y) {
  RETURN_IF_ERROR(CheckElementwise("cuda Axpby", n, {{"x", x}, {"y", y}}));
  return detail::LaunchMap(ctx, "cuda Axpby", n, AxpbyFn{alpha, beta, x, y});
}

absl::Status Sum(const CudaContext& ctx, int64_t n, const float* x, DeviceScalarOut out,
                 void* workspace) {
  return LaunchSum(ctx, "cuda Sum", n, ValueTerm{x}, out, workspace, {{"x", x}});
}

absl::Status Dot(const CudaContext& ctx, int64_t n, const float* a, const float* b,
                 DeviceScalarOut out, void* workspace) {
  return LaunchSum(ctx, "cuda Dot", n, ProductTerm{a, b}, out, workspace, {{"a", a}, {"b", b}});
}

absl::Status SumSquares(const CudaContext& ctx, int64_t n, const float* x, DeviceScalarOut out,
                        void* workspace) {
  return LaunchSum(ctx, "cuda SumSquares", n, SquareTerm{x}, out, workspace, {{"x", x}});
}

absl::Status DiffScaledSumSquares(const CudaContext& ctx, int64_t n, const float* a,
                                  const float* b, float scale, float* pos, float* neg,
                                  double* sum_sq, void* workspace) {
  const char* what = "cuda DiffScaledSumSquares";
  RETURN_IF_ERROR(CheckElementwise(what, n, {{"a", a}, {"b", b}}));
  RETURN_IF_ERROR(CheckNotNull(what, {{"sum_sq", sum_sq}}));
  RETURN_IF_ERROR(CheckWorkspace(what, workspace));
  return detail::LaunchReduce(ctx, what, n,
                              DiffScaledSumSquaresOp{a, b, scale, pos, neg, sum_sq}, workspace);
}

}  // namespace qtrain::kernels::cuda
