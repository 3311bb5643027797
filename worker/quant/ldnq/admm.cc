#include "worker/quant/ldnq/admm.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "worker/kernels/cpu/sgemm.h"

namespace qtrain::quant::ldnq {

using kernels::Sgemm;
using kernels::Transpose;

namespace {

double Dot(const double* a, const double* b, int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

std::vector<float> ToFloat(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

absl::Status ValidateProblem(const LayerProblem& p) {
  const MatrixLayout& l = p.layout;
  if (l.rows < 1 || l.cols < 1 || l.quantized_cols < 0 || l.quantized_cols > l.cols ||
      l.cols - l.quantized_cols > 1) {
    return absl::InvalidArgumentError(absl::StrCat("layer problem of ", l.rows, " x ", l.cols,
                                                   " with ", l.quantized_cols,
                                                   " quantized columns"));
  }
  if (static_cast<int64_t>(p.h.size()) != l.cols * l.cols ||
      static_cast<int64_t>(p.w.size()) != l.rows * l.cols) {
    return absl::InvalidArgumentError(absl::StrCat("layer problem: H has ", p.h.size(),
                                                   " entries, W ", p.w.size(), "; expected ",
                                                   l.cols * l.cols, " and ", l.rows * l.cols));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateAdmmOptions(const AdmmOptions& o) {
  bool scales_ok = !o.rho_scales.empty();
  for (double s : o.rho_scales) scales_ok = scales_ok && s > 0.0 && std::isfinite(s);
  if (!std::isfinite(o.rho) || !scales_ok || o.alpha_starts < 1 || o.max_iterations < 0 ||
      o.patience < 1 || o.projection_rounds < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ADMM options: rho ", o.rho, " (finite; <= 0 = each rho_scale * H[0][0]), rho_scales [",
        absl::StrJoin(o.rho_scales, ","), "] (at least one, each > 0), alpha_starts ",
        o.alpha_starts, " (>= 1), max_iterations ",
        o.max_iterations, " (>= 0), patience ", o.patience, " (>= 1), projection_rounds ",
        o.projection_rounds, " (>= 1)"));
  }
  return absl::OkStatus();
}

double QuadraticError(const kernels::CpuContext& ctx, const LayerProblem& problem,
                      std::span<const float> hf, std::span<const float> g) {
  const int64_t k = problem.layout.rows, d = problem.layout.cols;
  std::vector<float> diff(static_cast<size_t>(k * d)), dh(static_cast<size_t>(k * d));
  for (size_t i = 0; i < diff.size(); ++i) diff[i] = g[i] - problem.w[i];
  Sgemm(ctx, Transpose::kNo, Transpose::kNo, k, d, d, 1.0f, diff.data(), d, hf.data(), d, 0.0f,
        dh.data(), d);
  double s = 0.0;
  for (size_t i = 0; i < diff.size(); ++i) s += static_cast<double>(diff[i]) * dh[i];
  return 0.5 * s;
}

absl::Status CholeskyFactor(std::vector<double>* a_ptr, int64_t n) {
  std::vector<double>& a = *a_ptr;
  for (int64_t j = 0; j < n; ++j) {
    double* lj = a.data() + j * n;
    const double s = lj[j] - Dot(lj, lj, j);
    if (!(s > 0.0) || !std::isfinite(s)) {
      return absl::FailedPreconditionError(
          absl::StrCat("Cholesky: matrix not positive definite at pivot ", j, " (", s, ")"));
    }
    lj[j] = std::sqrt(s);
    const double inv = 1.0 / lj[j];
    for (int64_t i = j + 1; i < n; ++i) {
      double* li = a.data() + i * n;
      li[j] = (li[j] - Dot(li, lj, j)) * inv;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i + 1; j < n; ++j) a[i * n + j] = 0.0;
  }
  return absl::OkStatus();
}

std::vector<float> InverseFromCholesky(const kernels::CpuContext& ctx, const std::vector<double>& l,
                                       int64_t n) {
  // X = L^{-1} row by row: X[i] = (e_i - sum_{k<i} L[i][k] X[k]) / L[i][i] (X lower).
  std::vector<double> x(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double* xi = x.data() + i * n;
    xi[i] = 1.0;
    for (int64_t k = 0; k < i; ++k) {
      const double f = l[i * n + k];
      if (f == 0.0) continue;
      const double* xk = x.data() + k * n;
#pragma omp simd
      for (int64_t c = 0; c <= k; ++c) xi[c] -= f * xk[c];
    }
    const double inv = 1.0 / l[i * n + i];
#pragma omp simd
    for (int64_t c = 0; c <= i; ++c) xi[c] *= inv;
  }
  // (L L^T)^{-1} = X^T X.
  std::vector<float> xf = ToFloat(x), m(static_cast<size_t>(n * n));
  Sgemm(ctx, Transpose::kYes, Transpose::kNo, n, n, n, 1.0f, xf.data(), n, xf.data(), n, 0.0f,
        m.data(), n);
  return m;
}

absl::StatusOr<AdmmSolver> AdmmSolver::Create(const kernels::CpuContext& ctx,
                                              const LayerProblem& problem, const LevelSet& levels,
                                              const AdmmOptions& options) {
  if (absl::Status s = ValidateProblem(problem); !s.ok()) return s;
  if (absl::Status s = ValidateAdmmOptions(options); !s.ok()) return s;
  AdmmSolver solver;
  solver.ctx_ = ctx;
  solver.problem_ = &problem;
  solver.levels_ = &levels;
  solver.options_ = options;
  const int64_t d = problem.layout.cols, k = problem.layout.rows;
  double rho = options.rho;
  if (!(rho > 0.0)) {
    rho = problem.h[0];
    if (!(rho > 0.0)) {
      double trace = 0.0;
      for (int64_t i = 0; i < d; ++i) trace += problem.h[i * d + i];
      rho = trace > 0.0 ? trace / static_cast<double>(d) : 1.0;
    }
    rho *= options.rho_scales.front();
  }
  solver.rho_ = rho;
  std::vector<double> f = problem.h;
  for (int64_t i = 0; i < d; ++i) f[i * d + i] += rho;
  if (absl::Status s = CholeskyFactor(&f, d); !s.ok()) return s;
  solver.m_ = InverseFromCholesky(ctx, f, d);
  solver.hf_ = ToFloat(problem.h);
  // A = W H M.
  std::vector<float> wh(static_cast<size_t>(k * d));
  solver.a_.resize(static_cast<size_t>(k * d));
  Sgemm(ctx, Transpose::kNo, Transpose::kNo, k, d, d, 1.0f, problem.w.data(), d, solver.hf_.data(),
        d, 0.0f, wh.data(), d);
  Sgemm(ctx, Transpose::kNo, Transpose::kNo, k, d, d, 1.0f, wh.data(), d, solver.m_.data(), d, 0.0f,
        solver.a_.data(), d);
  solver.theta_hat_ = problem.w;
  solver.g_.resize(static_cast<size_t>(k * d));
  solver.lambda_.assign(static_cast<size_t>(k * d), 0.0f);
  solver.scratch_.resize(static_cast<size_t>(k * d));
  solver.Reset(0.0f);
  return solver;
}

void AdmmSolver::Reset(float alpha_init) {
  theta_hat_ = problem_->w;
  std::fill(lambda_.begin(), lambda_.end(), 0.0f);
  alpha_ = ProjectToLevels(problem_->w, problem_->layout, *levels_, alpha_init,
                           options_.projection_rounds, g_)
               .alpha;
}

void AdmmSolver::ProximalStep() {
  const int64_t d = problem_->layout.cols, k = problem_->layout.rows;
  for (size_t i = 0; i < scratch_.size(); ++i) scratch_[i] = g_[i] - lambda_[i];
  theta_hat_ = a_;
  Sgemm(ctx_, Transpose::kNo, Transpose::kNo, k, d, d, static_cast<float>(rho_), scratch_.data(), d,
        m_.data(), d, 1.0f, theta_hat_.data(), d);
}

void AdmmSolver::ProjectionStep() {
  for (size_t i = 0; i < scratch_.size(); ++i) scratch_[i] = theta_hat_[i] + lambda_[i];
  alpha_ =
      ProjectToLevels(scratch_, problem_->layout, *levels_, alpha_, options_.projection_rounds, g_)
          .alpha;
}

void AdmmSolver::DualStep() {
  for (size_t i = 0; i < lambda_.size(); ++i) lambda_[i] += theta_hat_[i] - g_[i];
}

float RefitScaleAndBias(const kernels::CpuContext& ctx, const LayerProblem& problem, float alpha,
                        bool refit_alpha, std::vector<float>* weights) {
  const int64_t k = problem.layout.rows, d = problem.layout.cols;
  const int64_t qc = problem.layout.quantized_cols;
  const bool has_bias = qc < d;
  std::vector<float>& w = *weights;
  const double hbb = has_bias ? problem.h[(d - 1) * d + (d - 1)] : 1.0;
  if (refit_alpha && alpha > 0.0f && qc > 0) {
    // S = Hxx - hxb hxb^T / hbb (the bias minimised out); alpha* = sum q S wx / sum q S q.
    std::vector<float> s(static_cast<size_t>(qc * qc));
    for (int64_t i = 0; i < qc; ++i) {
      for (int64_t j = 0; j < qc; ++j) {
        double v = problem.h[i * d + j];
        if (has_bias && hbb > 0.0) v -= problem.h[i * d + d - 1] * problem.h[j * d + d - 1] / hbb;
        s[static_cast<size_t>(i * qc + j)] = static_cast<float>(v);
      }
    }
    std::vector<float> q(static_cast<size_t>(k * qc)), qs(static_cast<size_t>(k * qc));
    for (int64_t r = 0; r < k; ++r) {
      for (int64_t c = 0; c < qc; ++c) q[r * qc + c] = w[r * d + c] / alpha;
    }
    Sgemm(ctx, Transpose::kNo, Transpose::kNo, k, qc, qc, 1.0f, q.data(), qc, s.data(), qc, 0.0f,
          qs.data(), qc);
    double num = 0.0, den = 0.0;
    for (int64_t r = 0; r < k; ++r) {
      for (int64_t c = 0; c < qc; ++c) {
        num += static_cast<double>(qs[r * qc + c]) * problem.w[r * d + c];
        den += static_cast<double>(qs[r * qc + c]) * q[r * qc + c];
      }
    }
    if (den > 0.0 && num > 0.0 && std::isfinite(num / den)) {
      alpha = static_cast<float>(num / den);
      for (int64_t r = 0; r < k; ++r) {
        for (int64_t c = 0; c < qc; ++c) w[r * d + c] = alpha * std::nearbyint(q[r * qc + c]);
      }
    }
  }
  if (has_bias && hbb > 0.0) {
    for (int64_t r = 0; r < k; ++r) {
      double s = 0.0;
      for (int64_t c = 0; c < qc; ++c) {
        s += problem.h[c * d + d - 1] * (static_cast<double>(w[r * d + c]) - problem.w[r * d + c]);
      }
      w[r * d + d - 1] = static_cast<float>(problem.w[r * d + d - 1] - s / hbb);
    }
  }
  return alpha;
}

AdmmResult DirectQuantize(const kernels::CpuContext& ctx, const LayerProblem& problem,
                          const LevelSet& levels, int projection_rounds) {
  AdmmResult r;
  r.weights.resize(problem.w.size());
  r.alpha =
      ProjectToLevels(problem.w, problem.layout, levels, 0.0f, projection_rounds, r.weights).alpha;
  const std::vector<float> hf = ToFloat(problem.h);
  std::vector<float> zero(problem.w.size(), 0.0f);
  r.reference = QuadraticError(ctx, problem, hf, zero);
  r.dq_error = r.error = QuadraticError(ctx, problem, hf, r.weights);
  return r;
}

absl::StatusOr<AdmmResult> SolveAdmm(const kernels::CpuContext& ctx, const LayerProblem& problem,
                                     const LevelSet& levels, const AdmmOptions& options) {
  if (absl::Status s = ValidateProblem(problem); !s.ok()) return s;
  if (absl::Status s = ValidateAdmmOptions(options); !s.ok()) return s;
  // One solver per rho: a solver made with only the scale `s` uses rho = s * H[0][0].
  std::vector<AdmmOptions> runs;
  if (options.rho > 0.0) {
    runs.push_back(options);
  } else {
    for (double scale : options.rho_scales) {
      runs.push_back(options);
      runs.back().rho_scales = {scale};
    }
  }
  AdmmResult r;
  const std::vector<float> hf = ToFloat(problem.h);
  {
    std::vector<float> zero(problem.w.size(), 0.0f);
    r.reference = QuadraticError(ctx, problem, hf, zero);
  }
  double best_total = 0.0;
  const float mean_abs = MeanAbsQuantized(problem.w, problem.layout);
  const int starts = std::max(1, options.alpha_starts);
  for (size_t run = 0; run < runs.size(); ++run) {
    absl::StatusOr<AdmmSolver> solver_or = AdmmSolver::Create(ctx, problem, levels, runs[run]);
    if (!solver_or.ok()) return solver_or.status();
    AdmmSolver& solver = *solver_or;
    if (run == 0) {
      r.rho = solver.rho();
      r.dq_error = solver.Objective();
      // The direct projection (with the refit) is the first candidate, so ADMM never does worse.
      r.weights = solver.g();
      r.alpha = RefitScaleAndBias(ctx, problem, solver.alpha(), options.refit_alpha, &r.weights);
      best_total = QuadraticError(ctx, problem, hf, r.weights);
    }
    for (int start = 0; start < starts; ++start) {
      // From mean|W| * 2^-(b+1) (the largest level near mean|W|) to mean|W| * 2.
      const double lo = -1.0 - levels.max_exponent();
      const double t = starts == 1 ? 0.0 : lo + (1.0 - lo) * start / (starts - 1);
      solver.Reset(start == 0 && starts == 1 ? 0.0f : static_cast<float>(mean_abs * std::exp2(t)));
      double best = solver.Objective();
      std::vector<float> weights = solver.g();
      float alpha = solver.alpha();
      int since_best = 0, iterations = 0;
      for (int it = 0; it < options.max_iterations && since_best < options.patience; ++it) {
        solver.ProximalStep();
        solver.ProjectionStep();
        solver.DualStep();
        iterations = it + 1;
        const double f = solver.Objective();
        if (f < best) {
          best = f;
          weights = solver.g();
          alpha = solver.alpha();
          since_best = 0;
        } else {
          ++since_best;
        }
      }
      alpha = RefitScaleAndBias(ctx, problem, alpha, options.refit_alpha, &weights);
      const double f = QuadraticError(ctx, problem, hf, weights);
      r.iterations += iterations;
      if (f < best_total) {
        best_total = f;
        r.weights = std::move(weights);
        r.alpha = alpha;
        r.rho = solver.rho();
      }
    }
  }
  r.error = best_total;
  return r;
}

}  // namespace qtrain::quant::ldnq
