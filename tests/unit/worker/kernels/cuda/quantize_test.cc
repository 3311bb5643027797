// Tests of worker/kernels/cuda/quantize.h: every quantizer kernel against the CPU quantizer object
// of worker/quant that it mirrors, at several bit-widths and sizes (one element, odd sizes, above
// one reduction and one element-wise grid-stride round, a few million elements).
//
// The comparisons follow quantize.h's exactness contract:
//  - element-wise results computed from equal inputs and scalars are compared bit for bit (the
//    activation quantizers given the same parameters, every backward given the same saved state);
//  - a quantized output that depends on tanhf / logf / expf or on a derived scale may be one level
//    off, and only where the CPU's pre-rounding value lies within the propagated error of a
//    rounding boundary (and at most at 1 + n/1000 elements);
//  - scalars both sides accumulate in double are equal or float neighbours; sums the CPU forms in
//    float blocks are exact on dyadic inputs (multiples of 2^-k whose block sums fit in 24 bits),
//    otherwise within FloatSumTolerance;
//  - transcendental values within kTranscendentalUlps.
// The argument tests at the end fail before anything is enqueued, so they run without a GPU.
#include "worker/kernels/cuda/quantize.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "tests/unit/worker/kernels/cuda/gpu_test_util.h"
#include "worker/kernels/cuda/launch_util.h"
#include "worker/nn/layer.h"
#include "worker/nn/tensor.h"
#include "worker/quant/binary.h"
#include "worker/quant/dorefa.h"
#include "worker/quant/pact.h"
#include "worker/quant/qil.h"
#include "worker/quant/quant_util.h"
#include "worker/quant/sawb.h"
#include "worker/quant/sawb_table.h"
#include "worker/quant/ternary.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::cuda::DeviceArray;
using ::qtrain::kernels::testing::RandomVector;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::Download;
using testing::ExpectBitsEqual;
using testing::FloatUlp;
using testing::GpuTest;
using ::testing::HasSubstr;
using testing::NearRoundingBoundary;
using testing::Poisoned;
using testing::SameBits;
using testing::UlpDistance;
using testing::Upload;
using testing::UploadInto;

// The layouts and constants quantize.h documents.
static_assert(sizeof(DorefaWeightState) == 16);
static_assert(offsetof(DorefaWeightState, argmax) == 8);
static_assert(sizeof(TernaryWeightState) == 8);
static_assert(kPactMinAlpha == quant::PactActivationQuantizer::kMinAlpha);
static_assert(kQilMinHalfWidth == quant::QilWeightQuantizer::kMinHalfWidth);
static_assert(kQilMinHalfWidth == quant::QilActivationQuantizer::kMinHalfWidth);
static_assert(kQilMinGamma == quant::QilWeightQuantizer::kMinGamma);

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// CUDA's tanhf / logf / expf are within 2 / 1 / 2 ulp of the exact value (CUDA math API), glibc
// 2.36's within 2 / 1 / 1 (libm-test-ulps): two implementations differ by at most 4 ulp.
constexpr int64_t kTranscendentalUlps = 4;

// One element, odd sizes around one block, above one reduction grid-stride round (65536), above
// one element-wise round (2^20), and a few million (several rounds of every reduction).
std::vector<int64_t> Sizes() {
  return {1, 7, 255, 257, 4097, 65536 + 17, kThreads * kElementwiseMaxBlocks + 12345, 3'000'017};
}

// The CPU reference runs on the calling thread (ChunkedSums then has one chunk).
nn::RunContext CpuRun() { return nn::RunContext{}; }

nn::Tensor ToTensor(const std::vector<float>& v, nn::Shape shape) {
  nn::Tensor t(std::move(shape));
  QTRAIN_CHECK(t.size() == static_cast<int64_t>(v.size()));
  std::copy(v.begin(), v.end(), t.data());
  return t;
}
nn::Tensor ToTensor(const std::vector<float>& v) {
  return ToTensor(v, {static_cast<int64_t>(v.size())});
}
std::vector<float> ToVector(const nn::Tensor& t) {
  return std::vector<float>(t.data(), t.data() + t.size());
}

// Uniform multiples of 2^-frac_bits, k 2^-frac_bits with k in [lo, hi]. While 1024 max|k| < 2^24,
// every partial sum of a 1024-element block is a float, so the CPU's float block sums and the
// GPU's double sums are both exact.
std::vector<float> DyadicVector(int64_t n, uint32_t seed, int lo, int hi, int frac_bits) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = std::ldexp(static_cast<float>(dist(rng)), -frac_bits);
  return v;
}

std::vector<float> GaussianVector(int64_t n, uint32_t seed, float mean, float sigma) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(mean, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return v;
}

// Overwrites the first elements of v with `specials` (as many as fit).
void Plant(std::vector<float>& v, std::initializer_list<float> specials) {
  size_t i = 0;
  for (float s : specials) {
    if (i >= v.size()) break;
    v[i++] = s;
  }
}

std::string Trace(const std::string& what, int bits, int64_t n) {
  return what + " bits " + std::to_string(bits) + " n " + std::to_string(n);
}

// ---- Comparisons ----------------------------------------------------------------------------

using Tolerance = std::function<double(size_t)>;

// |actual_i - expected_i| <= tol(i) for every i; reports the count and the first failures.
void ExpectAllWithin(const std::vector<float>& expected, const std::vector<float>& actual,
                     const Tolerance& tol, const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    if (!(diff <= tol(i))) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << "[" << i << "]: expected " << expected[i] << " got " << actual[i]
                      << " (tolerance " << tol(i) << ")";
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << expected.size()
                    << " elements out of tolerance";
}

void ExpectUlpsWithin(const std::vector<float>& expected, const std::vector<float>& actual,
                      int64_t max_ulps, const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (!std::isfinite(actual[i]) || UlpDistance(expected[i], actual[i]) > max_ulps) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << "[" << i << "]: expected " << expected[i] << " got " << actual[i];
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << expected.size() << " elements more than "
                    << max_ulps << " ulp apart";
}

// Quantized outputs: every element within value_tol of the CPU's, except that an element for
// which may_flip(i) holds (its pre-rounding value is within the propagated error of a rounding
// boundary) may instead be one level (`step`) away. At most 1 + n/1000 elements may be.
void ExpectQuantizedMatch(const std::vector<float>& expected, const std::vector<float>& actual,
                          double step, double value_tol,
                          const std::function<bool(size_t)>& may_flip, const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << what;
  int64_t flips = 0;
  int64_t bad = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    if (diff <= value_tol) continue;
    // Adjacent levels are `step` apart up to the float rounding of the level values.
    if (std::fabs(diff - step) <= value_tol + 1e-3 * step && may_flip(i)) {
      ++flips;
      continue;
    }
    if (++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "]: expected " << expected[i] << " got " << actual[i]
                    << " (level step " << step << ")";
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << expected.size() << " elements differ";
  EXPECT_LE(flips, 1 + static_cast<int64_t>(expected.size()) / 1000)
      << what << ": " << flips << " elements one level off";
}

// The float roundings of two doubles at most `bound` apart are equal or neighbours.
void ExpectRoundedNear(float expected, float actual, double bound, const std::string& what) {
  const double diff = std::fabs(static_cast<double>(actual) - expected);
  EXPECT_LE(diff, bound + 1.01 * FloatUlp(std::fabs(static_cast<double>(expected)) + bound))
      << what << ": expected " << expected << " got " << actual;
}

// Two double sums of the same `terms` values in different orders differ by at most
// 2 gamma(terms) sum |term| (u = 2^-53); doubled.
double DoubleSumBound(int64_t terms, double abs_sum) {
  const double t = static_cast<double>(terms + 1) * std::ldexp(1.0, -53);
  return 4.0 * t / (1.0 - t) * abs_sum;
}

// A gradient the CPU sums in float blocks (LaneSum: 1024 terms, SIMD lanes of at most 256 serial
// additions, each block total added in double) and the GPU in double. Without cancellation the
// float error is at most gamma(256) ~ 1.5e-5 of the value: 1e-4 |value| covers it. With
// cancellation the lanes' rounding errors (each addition's at most 2^-24 of a partial sum, itself
// at most the lane's sum |term|) have random signs: ~2^-24 sqrt(256) ~ 1e-6 of the lane's sum
// |term| for one lane, less once lanes and blocks average out. 1e-6 sum |term| bounds that.
double FloatSumTolerance(double value, double abs_sum) {
  return 1e-4 * std::fabs(value) + 1e-6 * abs_sum;
}

// ---- Host mirrors of what the CPU objects keep private --------------------------------------

// DorefaWeightQuantizer::Forward's tanh(w), arg-max and m, computed as it does.
struct DorefaReference {
  std::vector<float> tanh_w;
  int64_t argmax = 0;
  float max_tanh = 0.0f;
};

DorefaReference DorefaHost(const std::vector<float>& w) {
  DorefaReference r;
  r.tanh_w.resize(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    r.tanh_w[i] = std::tanh(w[i]);
    if (std::fabs(w[i]) > std::fabs(w[static_cast<size_t>(r.argmax)])) {
      r.argmax = static_cast<int64_t>(i);
    }
  }
  r.max_tanh = std::max(std::tanh(std::fabs(w[static_cast<size_t>(r.argmax)])), 1e-12f);
  return r;
}

// The correction term's sum_j g_j t_j (exact in double), its sum |g_j t_j|, and
// |correction| = |sum| (1 - t_a^2) / m^2 with the factor (1 - t_a^2) / m^2 alone.
struct DorefaCorrection {
  double sum = 0.0;
  double abs_sum = 0.0;
  double factor = 0.0;
  double magnitude() const { return std::fabs(sum) * factor; }
};

DorefaCorrection DorefaCorrectionHost(const DorefaReference& r, const std::vector<float>& g) {
  DorefaCorrection c;
  for (size_t i = 0; i < g.size(); ++i) {
    const double p = static_cast<double>(g[i]) * r.tanh_w[i];
    c.sum += p;
    c.abs_sum += std::fabs(p);
  }
  const double ta = r.tanh_w[static_cast<size_t>(r.argmax)];
  const double m = r.max_tanh;
  c.factor = (1.0 - ta * ta) / (m * m);
  return c;
}

// QilWeightQuantizer::Forward's saved ln u and u^gamma, computed as it does.
struct QilWeightReference {
  std::vector<float> log_u;
  std::vector<float> u_gamma;
  float gamma = 1.0f;  // max(gamma, kQilMinGamma)
};

QilWeightReference QilWeightHost(const std::vector<float>& w, float c, float d, float gamma) {
  QilWeightReference r;
  const float half = std::max(std::fabs(d), kQilMinHalfWidth);
  r.gamma = std::max(gamma, kQilMinGamma);
  const float inv_2d = 0.5f / half;
  r.log_u.resize(w.size());
  r.u_gamma.resize(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    float u = std::clamp((std::fabs(w[i]) - c) * inv_2d + 0.5f, 0.0f, 1.0f);
    float lu = 0.0f;
    if (u > 0.0f && u < 1.0f) {
      lu = std::log(u);
      if (r.gamma != 1.0f) u = std::exp(r.gamma * lu);
    }
    r.log_u[i] = lu;
    r.u_gamma[i] = u;
  }
  return r;
}

// The relative error bound of u^gamma = expf(gamma logf(u)) between two implementations: expf's
// own 3 ulp plus logf's 2 ulp amplified by |gamma ln u|, 5e-7 (1 + |gamma ln u|); doubled.
double QilUGammaRelError(float gamma, float log_u) {
  return 1e-6 * (1.0 + std::fabs(static_cast<double>(gamma) * log_u));
}

// Per-term magnitudes of QilWeightQuantizer::Backward's three sums (from the CPU's saved tensors),
// and those weighted by each term's relative error bound when the GPU used its own u^gamma.
struct QilWeightTerms {
  double c_abs = 0.0, d_abs = 0.0, gamma_abs = 0.0;
  double c_err = 0.0, d_err = 0.0, gamma_err = 0.0;
  std::vector<char> pow_branch;  // u exactly 0 or 1 with gamma != 1: the slope comes from pow
};

QilWeightTerms QilWeightTermsHost(const std::vector<float>& w, const std::vector<float>& g, float c,
                                  float d, const QilWeightReference& r) {
  QilWeightTerms t;
  t.pow_branch.assign(w.size(), 0);
  const float half = std::max(std::fabs(d), kQilMinHalfWidth);
  const double inv_2d = 0.5 / static_cast<double>(half);
  const double gamma = r.gamma;
  for (size_t i = 0; i < w.size(); ++i) {
    const double a = std::fabs(static_cast<double>(w[i]));
    const double u = (a - static_cast<double>(c)) * inv_2d + 0.5;
    if (u < 0.0 || u > 1.0) continue;
    const bool inside = u > 0.0 && u < 1.0;
    double slope = 1.0;
    if (r.gamma != 1.0f) {
      const double uc = std::max(u, 1e-6);
      slope = inside ? gamma * r.u_gamma[i] / uc : gamma * std::pow(uc, gamma - 1.0);
      t.pow_branch[i] = inside ? 0 : 1;
    }
    const double rel = QilUGammaRelError(r.gamma, r.log_u[i]);
    const double tc = std::fabs(static_cast<double>(g[i]) * slope * inv_2d);
    const double td = tc * std::fabs(a - static_cast<double>(c)) / static_cast<double>(half);
    const double tg =
        inside ? std::fabs(static_cast<double>(g[i]) * r.u_gamma[i] * r.log_u[i]) : 0.0;
    t.c_abs += tc;
    t.d_abs += td;
    t.gamma_abs += tg;
    t.c_err += tc * rel;
    t.d_err += td * rel;
    t.gamma_err += tg * rel;
  }
  return t;
}

constexpr DorefaWeightState kPoisonedDorefaState = {kNaN, kNaN, -1};
constexpr TernaryWeightState kPoisonedTernaryState = {kNaN, kNaN};

class QuantizeGpuTest : public GpuTest {
 protected:
  // DoReFa weights end to end: GPU forward + backward against the CPU object's.
  void CheckDorefaWeight(int bits, const std::vector<float>& w, const std::vector<float>& g) {
    const int64_t n = static_cast<int64_t>(w.size());
    nn::RunContext run = CpuRun();
    quant::DorefaWeightQuantizer cpu(bits);
    const nn::Tensor w_t = ToTensor(w);
    nn::Tensor wq_t, dw_t;
    cpu.Forward(run, w_t, &wq_t);
    cpu.Backward(run, w_t, ToTensor(g), &dw_t);
    const std::vector<float> wq_cpu = ToVector(wq_t);
    const std::vector<float> dw_cpu = ToVector(dw_t);
    const DorefaReference ref = DorefaHost(w);

    auto w_d = Upload(w);
    auto g_d = Upload(g);
    auto wq_d = Poisoned(w.size());
    auto t_d = Poisoned(w.size());
    auto dw_d = Poisoned(w.size());
    auto state_d = Upload(std::vector<DorefaWeightState>{kPoisonedDorefaState});
    ASSERT_THAT(DorefaWeightForward(ctx_, bits, n, w_d.data(), wq_d.data(), t_d.data(),
                                    state_d.data(), workspace_.data()),
                IsOk());
    ASSERT_THAT(DorefaWeightBackward(ctx_, n, w_d.data(), t_d.data(), state_d.data(), g_d.data(),
                                     dw_d.data(), workspace_.data()),
                IsOk());
    Sync();
    const DorefaWeightState state = Download(state_d)[0];
    const std::vector<float> t_gpu = Download(t_d);
    EXPECT_EQ(state.argmax, ref.argmax);
    EXPECT_LE(UlpDistance(state.max_tanh, ref.max_tanh), kTranscendentalUlps)
        << "max_tanh: cpu " << ref.max_tanh << " gpu " << state.max_tanh;
    ExpectUlpsWithin(ref.tanh_w, t_gpu, kTranscendentalUlps, "tanh_w");

    // v = (t / (2m) + 1/2) N moves by at most N/2 (|dt|/|t| + |dm|/m) + float rounding
    // ~ N (2 * 4.8e-7 / 2 + 3.6e-7) < 1e-6 N when t and m are 4 ulp off; 2e-6 N leaves 2x.
    const float steps = quant::NumSteps(bits);
    const float inv_2m = 0.5f / ref.max_tanh;
    const bool same_m = SameBits(state.max_tanh, ref.max_tanh);
    ExpectQuantizedMatch(
        wq_cpu, Download(wq_d), 2.0 / steps, 0.0,
        [&](size_t i) {
          if (same_m && SameBits(t_gpu[i], ref.tanh_w[i])) return false;  // then exact
          const float u = std::clamp(ref.tanh_w[i] * inv_2m + 0.5f, 0.0f, 1.0f);
          return NearRoundingBoundary(static_cast<double>(u) * steps, 2e-6 * steps);
        },
        "wq");

    // dw_i = g (1 - t^2) / m: t 4 ulp off moves 1 - t^2 by <= 1e-6 (absolute) and m by
    // 4.8e-7 (relative), so |d dw| <= 2e-6 |g| / m plus rounding; 1e-5 |g| / m + 1e-4 |dw| is
    // 5x that. The arg-max adds the correction: its sum is FloatSumTolerance apart (the CPU sums
    // float blocks), and its (1 - t_a^2) factor carries t_a's error (3.5e-5 relative at
    // |w_a| = 2.5, inside the 1e-4 of FloatSumTolerance).
    const DorefaCorrection corr = DorefaCorrectionHost(ref, g);
    const size_t a = static_cast<size_t>(ref.argmax);
    const double m = ref.max_tanh;
    ExpectAllWithin(
        dw_cpu, Download(dw_d),
        [&](size_t i) {
          double tol = 1e-4 * std::fabs(dw_cpu[i]) + 1e-5 * std::fabs(g[i]) / m;
          if (i == a) tol += FloatSumTolerance(corr.magnitude(), corr.abs_sum * corr.factor);
          return tol;
        },
        "dw");
  }

  // QIL weights end to end with parameters (c, d, gamma): GPU forward + backward against the CPU
  // object's.
  void CheckQilWeight(int bits, float c, float d, float gamma, const std::vector<float>& w,
                      const std::vector<float>& g) {
    const int64_t n = static_cast<int64_t>(w.size());
    nn::RunContext run = CpuRun();
    quant::QilOptions options;
    options.bits = bits;
    quant::QilWeightQuantizer cpu(options);
    cpu.c().value[0] = c;
    cpu.d().value[0] = d;  // non-zero: no initialisation
    cpu.gamma().value[0] = gamma;
    const nn::Tensor w_t = ToTensor(w);
    nn::Tensor wq_t, dw_t;
    cpu.Forward(run, w_t, &wq_t);
    cpu.Backward(run, w_t, ToTensor(g), &dw_t);
    const std::vector<float> wq_cpu = ToVector(wq_t);
    const std::vector<float> dw_cpu = ToVector(dw_t);
    const float c_grad = cpu.c().grad[0];
    const float d_grad = cpu.d().grad[0];
    const float gamma_grad = cpu.gamma().grad[0];
    const QilWeightReference ref = QilWeightHost(w, c, d, gamma);
    const QilWeightTerms terms = QilWeightTermsHost(w, g, c, d, ref);

    auto w_d = Upload(w);
    auto g_d = Upload(g);
    auto params = Upload(std::vector<float>{c, d, gamma});
    auto wq_d = Poisoned(w.size());
    auto log_u_d = Poisoned(w.size());
    auto u_gamma_d = Poisoned(w.size());
    auto dw_d = Poisoned(w.size());
    auto grads = Poisoned(3);
    const float* pc = params.data();
    ASSERT_THAT(QilWeightForward(ctx_, bits, n, w_d.data(), pc, pc + 1, pc + 2, wq_d.data(),
                                 log_u_d.data(), u_gamma_d.data()),
                IsOk());
    ASSERT_THAT(QilWeightBackward(ctx_, n, w_d.data(), pc, pc + 1, pc + 2, log_u_d.data(),
                                  u_gamma_d.data(), g_d.data(), dw_d.data(), grads.data(),
                                  grads.data() + 1, grads.data() + 2, workspace_.data()),
                IsOk());
    Sync();
    const std::vector<float> log_u = Download(log_u_d);
    const std::vector<float> u_gamma = Download(u_gamma_d);
    ExpectUlpsWithin(ref.log_u, log_u, kTranscendentalUlps, "log_u");
    const float q = static_cast<float>((1 << (bits - 1)) - 1);
    if (ref.gamma == 1.0f) {
      // No transcendental function reaches wq or dw.
      ExpectBitsEqual(ref.u_gamma, u_gamma, "u_gamma");
      ExpectBitsEqual(wq_cpu, Download(wq_d), "wq");
      ExpectBitsEqual(dw_cpu, Download(dw_d), "dw");
    } else {
      ExpectAllWithin(
          ref.u_gamma, u_gamma,
          [&](size_t i) {
            return QilUGammaRelError(ref.gamma, ref.log_u[i]) * std::fabs(ref.u_gamma[i]);
          },
          "u_gamma");
      // v = u^gamma q moves by at most that relative error of v <= q; doubled.
      ExpectQuantizedMatch(
          wq_cpu, Download(wq_d), 1.0 / q, 0.0,
          [&](size_t i) {
            if (SameBits(u_gamma[i], ref.u_gamma[i])) return false;
            return NearRoundingBoundary(static_cast<double>(ref.u_gamma[i]) * q,
                                        2.0 * q * QilUGammaRelError(ref.gamma, ref.log_u[i]));
          },
          "wq");
      // dw = g gamma u^gamma / u / (2d): u^gamma's relative error, then one float rounding.
      ExpectAllWithin(
          dw_cpu, Download(dw_d),
          [&](size_t i) {
            return std::fabs(dw_cpu[i]) * QilUGammaRelError(ref.gamma, ref.log_u[i]) +
                   FloatUlp(dw_cpu[i]);
          },
          "dw");
    }
    // Double sums both sides: each term's error from u^gamma / ln u, plus the summation order.
    const std::vector<float> got = Download(grads);
    ExpectRoundedNear(c_grad, got[0], terms.c_err + DoubleSumBound(n, terms.c_abs), "c_grad");
    ExpectRoundedNear(d_grad, got[1], terms.d_err + DoubleSumBound(n, terms.d_abs), "d_grad");
    ExpectRoundedNear(gamma_grad, got[2], terms.gamma_err + DoubleSumBound(n, terms.gamma_abs),
                      "gamma_grad");
  }
};

// ---- DoReFa weights ---------------------------------------------------------------------------

TEST_F(QuantizeGpuTest, DorefaWeightForwardBackwardMatchCpu) {
  for (int bits : {1, 2, 4, 8}) {
    for (int64_t n : Sizes()) {
      SCOPED_TRACE(Trace("dorefa weight", bits, n));
      // |w| <= 2 keeps 1 - tanh^2 >= 0.07, so tanh's ulps stay small in it.
      const std::vector<float> w = RandomVector(n, 100 + bits, -2.0f, 2.0f);
      std::vector<float> g = RandomVector(n, 200 + bits, -1.0f, 1.0f);
      if (bits >= 4) {
        // Gradients aligned with w: every g_j t_j >= 0, the correction's sum has no cancellation
        // (the tight regime of FloatSumTolerance); bits 1 and 2 keep random signs.
        for (size_t i = 0; i < g.size(); ++i)
          g[i] = w[i] >= 0.0f ? std::fabs(g[i]) : -std::fabs(g[i]);
      }
      CheckDorefaWeight(bits, w, g);
    }
  }
}

TEST_F(QuantizeGpuTest, DorefaWeightArgmaxIsTheFirstLargestMagnitude) {
  {
    // Ties across grid-stride rounds and blocks of the reduction, of opposite signs.
    const int64_t n = 3'000'017;
    std::vector<float> w = RandomVector(n, 301, -1.0f, 1.0f);
    w[5] = -2.4f;
    w[70001] = 2.5f;
    w[1234567] = -2.5f;
    w[n - 1] = 2.5f;
    ASSERT_EQ(DorefaHost(w).argmax, 70001);
    SCOPED_TRACE("ties across rounds");
    CheckDorefaWeight(2, w, RandomVector(n, 302, -1.0f, 1.0f));
  }
  {
    // Within one thread (indices one reduction round apart) and within one block.
    const int64_t n = 200000;
    std::vector<float> w = RandomVector(n, 303, -1.0f, 1.0f);
    w[3 + 65536] = 1.5f;
    w[3] = -1.5f;
    w[20] = 1.25f;
    w[10] = -1.25f;
    ASSERT_EQ(DorefaHost(w).argmax, 3);
    SCOPED_TRACE("ties within a thread");
    CheckDorefaWeight(4, w, RandomVector(n, 304, -1.0f, 1.0f));
  }
  {
    // All zero: m = 1e-12, the arg-max is element 0, every t is 0.
    const std::vector<float> w(1000, 0.0f);
    SCOPED_TRACE("all zero");
    for (int bits : {1, 3}) CheckDorefaWeight(bits, w, RandomVector(1000, 305, -1.0f, 1.0f));
  }
}

TEST_F(QuantizeGpuTest, DorefaWeightBackwardIsExactGivenTheCpuState) {
  for (int64_t n : {int64_t{1}, int64_t{257}, int64_t{65536 + 17}, int64_t{3'000'017}}) {
    SCOPED_TRACE("n " + std::to_string(n));
    const std::vector<float> w = RandomVector(n, 311, -2.0f, 2.0f);
    const std::vector<float> g = RandomVector(n, 312, -1.0f, 1.0f);
    nn::RunContext run = CpuRun();
    quant::DorefaWeightQuantizer cpu(3);
    const nn::Tensor w_t = ToTensor(w);
    nn::Tensor wq_t, dw_t;
    cpu.Forward(run, w_t, &wq_t);
    cpu.Backward(run, w_t, ToTensor(g), &dw_t);
    const std::vector<float> dw_cpu = ToVector(dw_t);
    const DorefaReference ref = DorefaHost(w);

    // The CPU's saved tanh(w) and state, so only the correction's sum order differs.
    auto w_d = Upload(w);
    auto t_d = Upload(ref.tanh_w);
    auto state_d = Upload(std::vector<DorefaWeightState>{{ref.max_tanh, 0.0f, ref.argmax}});
    auto g_d = Upload(g);
    auto dw_d = Poisoned(w.size());
    ASSERT_THAT(DorefaWeightBackward(ctx_, n, w_d.data(), t_d.data(), state_d.data(), g_d.data(),
                                     dw_d.data(), workspace_.data()),
                IsOk());
    // In place: dw aliases dwq.
    auto inplace = Upload(g);
    ASSERT_THAT(DorefaWeightBackward(ctx_, n, w_d.data(), t_d.data(), state_d.data(),
                                     inplace.data(), inplace.data(), workspace_.data()),
                IsOk());
    Sync();
    std::vector<float> dw_gpu = Download(dw_d);
    ExpectBitsEqual(dw_gpu, Download(inplace), "dw in place");
    const size_t a = static_cast<size_t>(ref.argmax);
    const DorefaCorrection corr = DorefaCorrectionHost(ref, g);
    EXPECT_LE(
        std::fabs(static_cast<double>(dw_gpu[a]) - dw_cpu[a]),
        FloatSumTolerance(corr.magnitude(), corr.abs_sum * corr.factor) + 2.0 * FloatUlp(dw_cpu[a]))
        << "dw at the arg-max: cpu " << dw_cpu[a] << " gpu " << dw_gpu[a];
    dw_gpu[a] = dw_cpu[a];  // every other element is the CPU's, operation for operation
    ExpectBitsEqual(dw_cpu, dw_gpu, "dw");
  }
}

// ---- DoReFa activations -----------------------------------------------------------------------

TEST_F(QuantizeGpuTest, DorefaActivationMatchesCpuExactly) {
  for (int bits : {1, 2, 4, 8}) {
    for (int64_t n : Sizes()) {
      SCOPED_TRACE(Trace("dorefa activation", bits, n));
      std::vector<float> x = RandomVector(n, 400 + bits, -0.5f, 1.5f);
      Plant(x, {0.0f, 1.0f, -0.0f, std::nextafter(1.0f, 2.0f), std::nextafter(0.0f, -1.0f)});
      const std::vector<float> dy = RandomVector(n, 500 + bits, -1.0f, 1.0f);
      nn::RunContext run = CpuRun();
      quant::DorefaActivationQuantizer cpu("aq", bits);
      const nn::Tensor x_t = ToTensor(x);
      nn::Tensor y_t, dx_t;
      cpu.Forward(run, x_t, &y_t);
      cpu.Backward(run, ToTensor(dy), &dx_t);

      auto x_d = Upload(x);
      auto dy_d = Upload(dy);
      auto y_d = Poisoned(x.size());
      auto dx_d = Poisoned(x.size());
      auto inplace = Upload(dy);
      ASSERT_THAT(DorefaActivationForward(ctx_, bits, n, x_d.data(), y_d.data()), IsOk());
      ASSERT_THAT(DorefaActivationBackward(ctx_, n, x_d.data(), dy_d.data(), dx_d.data()), IsOk());
      ASSERT_THAT(DorefaActivationBackward(ctx_, n, x_d.data(), inplace.data(), inplace.data()),
                  IsOk());
      Sync();
      ExpectBitsEqual(ToVector(y_t), Download(y_d), "y");
      ExpectBitsEqual(ToVector(dx_t), Download(dx_d), "dx");
      ExpectBitsEqual(ToVector(dx_t), Download(inplace), "dx in place");
    }
  }
}

// ---- PACT -------------------------------------------------------------------------------------

TEST_F(QuantizeGpuTest, PactMatchesCpuExactly) {
  struct Case {
    float alpha;
    float l2;
  };
  // A typical level, the paper's initial one, one below kPactMinAlpha (clamped; no data gradient)
  // and a negative one (likewise).
  const Case cases[] = {{0.75f, 0.0f}, {6.0f, 1e-2f}, {5e-5f, 1e-2f}, {-0.25f, 1e-3f}};
  for (int bits : {1, 2, 4, 8}) {
    for (int64_t n : Sizes()) {
      for (const Case& k : cases) {
        SCOPED_TRACE(Trace("pact alpha " + std::to_string(k.alpha), bits, n));
        const float a = std::max(k.alpha, kPactMinAlpha);
        std::vector<float> x = RandomVector(n, 600 + bits, -0.25f * a, 1.5f * a);
        Plant(x, {a, 0.0f, std::nextafter(a, 0.0f), -0.0f, std::nextafter(0.0f, -1.0f)});
        // dy in multiples of 2^-8 in [-1, 1]: the alpha gradient's float block sums are exact.
        const std::vector<float> dy = DyadicVector(n, 700 + bits, -256, 256, 8);
        nn::RunContext run = CpuRun();
        quant::PactOptions options;
        options.bits = bits;
        options.alpha_init = 1.0f;
        options.l2 = k.l2;
        quant::PactActivationQuantizer cpu("aq", options);
        cpu.alpha().value[0] = k.alpha;
        const nn::Tensor x_t = ToTensor(x);
        nn::Tensor y_t, dx_t;
        cpu.Forward(run, x_t, &y_t);
        cpu.Backward(run, ToTensor(dy), &dx_t);
        const float alpha_grad = cpu.alpha().grad[0];

        auto x_d = Upload(x);
        auto dy_d = Upload(dy);
        auto alpha_d = Upload(std::vector<float>{k.alpha});
        auto y_d = Poisoned(x.size());
        auto dx_d = Poisoned(x.size());
        auto inplace = Upload(dy);
        auto grads = Poisoned(3);
        ASSERT_THAT(PactForward(ctx_, bits, n, x_d.data(), alpha_d.data(), y_d.data()), IsOk());
        ASSERT_THAT(PactBackward(ctx_, n, x_d.data(), alpha_d.data(), k.l2, dy_d.data(),
                                 dx_d.data(), grads.data(), workspace_.data()),
                    IsOk());
        ASSERT_THAT(PactBackward(ctx_, n, x_d.data(), alpha_d.data(), k.l2, dy_d.data(), nullptr,
                                 grads.data() + 1, workspace_.data()),
                    IsOk());
        ASSERT_THAT(PactBackward(ctx_, n, x_d.data(), alpha_d.data(), k.l2, inplace.data(),
                                 inplace.data(), grads.data() + 2, workspace_.data()),
                    IsOk());
        Sync();
        ExpectBitsEqual(ToVector(y_t), Download(y_d), "y");
        ExpectBitsEqual(ToVector(dx_t), Download(dx_d), "dx");
        ExpectBitsEqual(ToVector(dx_t), Download(inplace), "dx in place");
        ExpectBitsEqual(std::vector<float>(3, alpha_grad), Download(grads),
                        "alpha_grad (with dx, without, in place)");
      }
    }
  }
}

TEST_F(QuantizeGpuTest, PactAlphaGradientWithArbitraryGradients) {
  constexpr float kAlpha = 2.0f;
  constexpr float kL2 = 5e-3f;
  for (int64_t n : Sizes()) {
    SCOPED_TRACE(Trace("pact", 4, n));
    const std::vector<float> x = RandomVector(n, 801, -0.5f, 3.0f);
    const std::vector<float> dy = RandomVector(n, 802, -1.0f, 1.0f);
    nn::RunContext run = CpuRun();
    quant::PactOptions options;
    options.bits = 4;
    options.alpha_init = kAlpha;
    options.l2 = kL2;
    quant::PactActivationQuantizer cpu("aq", options);
    const nn::Tensor x_t = ToTensor(x);
    nn::Tensor y_t, dx_t;
    cpu.Forward(run, x_t, &y_t);
    cpu.Backward(run, ToTensor(dy), &dx_t);
    double abs_sum = std::fabs(static_cast<double>(kL2) * kAlpha);
    for (size_t i = 0; i < x.size(); ++i) {
      if (x[i] >= kAlpha) abs_sum += std::fabs(dy[i]);
    }

    auto x_d = Upload(x);
    auto dy_d = Upload(dy);
    auto alpha_d = Upload(std::vector<float>{kAlpha});
    auto y_d = Poisoned(x.size());
    auto dx_d = Poisoned(x.size());
    auto grad = Poisoned(1);
    ASSERT_THAT(PactForward(ctx_, 4, n, x_d.data(), alpha_d.data(), y_d.data()), IsOk());
    ASSERT_THAT(PactBackward(ctx_, n, x_d.data(), alpha_d.data(), kL2, dy_d.data(), dx_d.data(),
                             grad.data(), workspace_.data()),
                IsOk());
    Sync();
    ExpectBitsEqual(ToVector(y_t), Download(y_d), "y");
    ExpectBitsEqual(ToVector(dx_t), Download(dx_d), "dx");
    const float want = cpu.alpha().grad[0];
    const float got = Download(grad)[0];
    EXPECT_LE(std::fabs(static_cast<double>(got) - want), FloatSumTolerance(want, abs_sum))
        << "alpha_grad: cpu " << want << " gpu " << got;
  }
}

// ---- SAWB -------------------------------------------------------------------------------------

TEST_F(QuantizeGpuTest, SawbMatchesCpu) {
  for (int bits = 1; bits <= 8; ++bits) {  // every row of the coefficient table
    std::vector<std::vector<float>> inputs;
    for (int64_t n : Sizes()) inputs.push_back(GaussianVector(n, 900 + bits, 0.0f, 0.05f));
    inputs.push_back(std::vector<float>(100, 0.0f));  // degenerate: alpha = 1e-12
    for (const std::vector<float>& w : inputs) {
      const int64_t n = static_cast<int64_t>(w.size());
      SCOPED_TRACE(Trace("sawb", bits, n));
      const std::vector<float> g = RandomVector(n, 1000 + bits, -1.0f, 1.0f);
      nn::RunContext run = CpuRun();
      quant::SawbWeightQuantizer cpu(bits);
      const nn::Tensor w_t = ToTensor(w);
      nn::Tensor wq_t, dw_t;
      cpu.Forward(run, w_t, &wq_t);
      cpu.Backward(run, w_t, ToTensor(g), &dw_t);
      const float alpha_cpu = cpu.alpha();
      const std::vector<float> wq_cpu = ToVector(wq_t);

      auto w_d = Upload(w);
      auto g_d = Upload(g);
      auto alpha_d = Poisoned(1);
      auto alpha_cpu_d = Upload(std::vector<float>{alpha_cpu});
      auto wq_d = Poisoned(w.size());
      auto dw_d = Poisoned(w.size());
      auto inplace = Upload(g);
      ASSERT_THAT(SawbWeightForward(ctx_, bits, n, w_d.data(), wq_d.data(), alpha_d.data(),
                                    workspace_.data()),
                  IsOk());
      // The backward given the CPU's alpha is the CPU's, bit for bit.
      ASSERT_THAT(
          SawbWeightBackward(ctx_, n, w_d.data(), alpha_cpu_d.data(), g_d.data(), dw_d.data()),
          IsOk());
      ASSERT_THAT(SawbWeightBackward(ctx_, n, w_d.data(), alpha_cpu_d.data(), inplace.data(),
                                     inplace.data()),
                  IsOk());
      Sync();
      // alpha = c1 rms - c2 E|w| from double sums whose difference (DoubleSumBound, no
      // cancellation) stays far below a float ulp even after the subtraction.
      double sq = 0.0, abs_sum = 0.0;
      for (float v : w) {
        sq += static_cast<double>(v) * v;
        abs_sum += std::fabs(static_cast<double>(v));
      }
      const quant::SawbCoefficients& k = quant::kSawbCoefficients[bits - 1];
      const double scale = std::fabs(k.c1) * std::sqrt(sq / n) + std::fabs(k.c2) * abs_sum / n;
      const float alpha_gpu = Download(alpha_d)[0];
      ExpectRoundedNear(alpha_cpu, alpha_gpu, DoubleSumBound(n, scale), "alpha");
      const std::vector<float> wq_gpu = Download(wq_d);
      if (SameBits(alpha_gpu, alpha_cpu)) {
        ExpectBitsEqual(wq_cpu, wq_gpu, "wq");
      } else {
        // Levels j 2a/N - a move by a few ulp of a; v = (w + a) N / (2a) by ~1e-7 N.
        const float steps = quant::NumSteps(bits);
        ExpectQuantizedMatch(
            wq_cpu, wq_gpu, 2.0 * alpha_cpu / steps, 8.0 * FloatUlp(alpha_cpu),
            [&](size_t i) {
              const double a = alpha_cpu;
              const double v = (std::clamp(static_cast<double>(w[i]), -a, a) + a) * steps / (2 * a);
              return NearRoundingBoundary(v, 1e-6 * steps);
            },
            "wq");
      }
      ExpectBitsEqual(ToVector(dw_t), Download(dw_d), "dw");
      ExpectBitsEqual(ToVector(dw_t), Download(inplace), "dw in place");
    }
  }
}

// ---- QIL weights ------------------------------------------------------------------------------

TEST_F(QuantizeGpuTest, QilWeightInitializeMatchesCpu) {
  std::vector<std::vector<float>> inputs;
  for (int64_t n : Sizes()) {
    inputs.push_back(RandomVector(n, 1100, -1.0f, 1.0f));  // hi = max|w| (< 3 rms)
    std::vector<float> heavy = GaussianVector(n, 1101, 0.0f, 0.05f);
    Plant(heavy, {5.0f});  // hi = 3 rms (< max|w|) once n is large
    inputs.push_back(heavy);
  }
  inputs.push_back(std::vector<float>(10, 0.0f));  // hi = 0 -> 1: c = d = 0.5
  for (const std::vector<float>& w : inputs) {
    const int64_t n = static_cast<int64_t>(w.size());
    SCOPED_TRACE("qil weight init n " + std::to_string(n));
    nn::RunContext run = CpuRun();
    quant::QilWeightQuantizer cpu(quant::QilOptions{});
    cpu.InitializeFrom(run.cpu, ToTensor(w));
    const float c = cpu.c().value[0];
    const float d = cpu.d().value[0];

    auto w_d = Upload(w);
    auto fresh = Upload(std::vector<float>{kNaN, 0.0f});
    auto negative_zero = Upload(std::vector<float>{kNaN, -0.0f});  // == 0: not initialised
    auto kept = Upload(std::vector<float>{0.125f, 0.25f});
    for (DeviceArray<float>* cd : {&fresh, &negative_zero, &kept}) {
      ASSERT_THAT(
          QilWeightInitialize(ctx_, n, w_d.data(), cd->data(), cd->data() + 1, workspace_.data()),
          IsOk());
    }
    Sync();
    // hi = min(max|w|, 3 rms): rms from a double sum without cancellation, far below a float ulp.
    double sq = 0.0;
    for (float v : w) sq += static_cast<double>(v) * v;
    const double bound = DoubleSumBound(n, 1.5 * std::sqrt(sq / n));
    for (DeviceArray<float>* cd : {&fresh, &negative_zero}) {
      const std::vector<float> got = Download(*cd);
      ExpectRoundedNear(c, got[0], bound, "c");
      ExpectRoundedNear(d, got[1], bound, "d");
    }
    ExpectBitsEqual({0.125f, 0.25f}, Download(kept), "initialised c, d are kept");
  }
}

TEST_F(QuantizeGpuTest, QilWeightForwardBackwardMatchCpu) {
  struct Case {
    float c, d, gamma;
  };
  // gamma = 1 (no transcendental in wq), below and above 1, a negative d (|d| used, d_grad
  // negated), gamma below kQilMinGamma (clamped, zero gradient), d below kQilMinHalfWidth.
  const Case cases[] = {{0.5f, 0.3f, 1.0f},  {0.5f, 0.3f, 0.6f},  {0.45f, 0.4f, 1.7f},
                        {0.5f, -0.3f, 0.8f}, {0.5f, 0.3f, 1e-4f}, {0.5f, 1e-9f, 1.0f}};
  for (int bits : {2, 3, 4, 8}) {
    for (int64_t n : Sizes()) {
      for (const Case& k : cases) {
        SCOPED_TRACE(Trace("qil weight c " + std::to_string(k.c) + " d " + std::to_string(k.d) +
                               " gamma " + std::to_string(k.gamma),
                           bits, n));
        std::vector<float> w = RandomVector(n, 1200 + bits, -1.0f, 1.0f);
        const float half = std::fabs(k.d);
        // The interval's ends (u = 0 and 1, where the slope comes from pow) and zero.
        Plant(w, {k.c - half, k.c + half, -(k.c + half), 0.0f, -(k.c - half)});
        CheckQilWeight(bits, k.c, k.d, k.gamma, w, RandomVector(n, 1300 + bits, -1.0f, 1.0f));
      }
    }
  }
}

TEST_F(QuantizeGpuTest, QilWeightBackwardIsExactGivenTheCpuSavedTensors) {
  constexpr float kC = 0.5f;
  constexpr float kD = 0.3f;
  for (float gamma : {1.0f, 0.6f, 1.7f}) {
    for (int64_t n : {int64_t{1}, int64_t{257}, int64_t{65536 + 17}, int64_t{3'000'017}}) {
      SCOPED_TRACE("gamma " + std::to_string(gamma) + " n " + std::to_string(n));
      std::vector<float> w = RandomVector(n, 1400, -1.0f, 1.0f);
      Plant(w, {kC - kD, kC + kD, 0.0f});
      const std::vector<float> g = RandomVector(n, 1401, -1.0f, 1.0f);
      nn::RunContext run = CpuRun();
      quant::QilWeightQuantizer cpu(quant::QilOptions{});
      cpu.c().value[0] = kC;
      cpu.d().value[0] = kD;
      cpu.gamma().value[0] = gamma;
      const nn::Tensor w_t = ToTensor(w);
      nn::Tensor wq_t, dw_t;
      cpu.Forward(run, w_t, &wq_t);
      cpu.Backward(run, w_t, ToTensor(g), &dw_t);
      const std::vector<float> dw_cpu = ToVector(dw_t);
      const QilWeightReference ref = QilWeightHost(w, kC, kD, gamma);
      const QilWeightTerms terms = QilWeightTermsHost(w, g, kC, kD, ref);

      auto w_d = Upload(w);
      auto g_d = Upload(g);
      auto params = Upload(std::vector<float>{kC, kD, gamma});
      auto log_u_d = Upload(ref.log_u);
      auto u_gamma_d = Upload(ref.u_gamma);
      auto dw_d = Poisoned(w.size());
      auto inplace = Upload(g);
      auto grads = Poisoned(6);
      const float* pc = params.data();
      ASSERT_THAT(QilWeightBackward(ctx_, n, w_d.data(), pc, pc + 1, pc + 2, log_u_d.data(),
                                    u_gamma_d.data(), g_d.data(), dw_d.data(), grads.data(),
                                    grads.data() + 1, grads.data() + 2, workspace_.data()),
                  IsOk());
      ASSERT_THAT(
          QilWeightBackward(ctx_, n, w_d.data(), pc, pc + 1, pc + 2, log_u_d.data(),
                            u_gamma_d.data(), inplace.data(), inplace.data(), grads.data() + 3,
                            grads.data() + 4, grads.data() + 5, workspace_.data()),
          IsOk());
      Sync();
      std::vector<float> dw_gpu = Download(dw_d);
      ExpectBitsEqual(dw_gpu, Download(inplace), "dw in place");
      // Inside (0, 1) the loop body is the CPU's in double; at u = 0 or 1 the slope is pow()'s,
      // a few double ulp apart, so the float dw is equal or a neighbour.
      for (size_t i = 0; i < w.size(); ++i) {
        if (terms.pow_branch[i] == 0) continue;
        EXPECT_LE(UlpDistance(dw_cpu[i], dw_gpu[i]), 1) << "dw[" << i << "] (pow branch)";
        dw_gpu[i] = dw_cpu[i];
      }
      ExpectBitsEqual(dw_cpu, dw_gpu, "dw");
      const std::vector<float> got = Download(grads);
      for (int run_index = 0; run_index < 2; ++run_index) {
        const size_t o = static_cast<size_t>(3 * run_index);
        ExpectRoundedNear(cpu.c().grad[0], got[o], DoubleSumBound(n, terms.c_abs), "c_grad");
        ExpectRoundedNear(cpu.d().grad[0], got[o + 1], DoubleSumBound(n, terms.d_abs), "d_grad");
        ExpectRoundedNear(cpu.gamma().grad[0], got[o + 2], DoubleSumBound(n, terms.gamma_abs),
                          "gamma_grad");
      }
    }
  }
}

// ---- QIL activations --------------------------------------------------------------------------

TEST_F(QuantizeGpuTest, QilActivationInitializeMatchesCpu) {
  std::vector<std::vector<float>> inputs;
  for (int64_t n : Sizes()) {
    inputs.push_back(RandomVector(n, 1500, -1.0f, 3.0f));   // hi = max x
    inputs.push_back(GaussianVector(n, 1501, 0.5f, 1.0f));  // hi = mean + 3 std
  }
  inputs.push_back(RandomVector(17, 1502, -2.0f, -0.5f));  // hi <= 0 -> 1: c = d = 0.5
  for (const std::vector<float>& x : inputs) {
    const int64_t n = static_cast<int64_t>(x.size());
    SCOPED_TRACE("qil activation init n " + std::to_string(n));
    nn::RunContext run = CpuRun();
    quant::QilActivationQuantizer cpu("aq", quant::QilOptions{});
    cpu.InitializeFrom(run.cpu, ToTensor(x));

    auto x_d = Upload(x);
    auto fresh = Upload(std::vector<float>{kNaN, 0.0f});
    auto kept = Upload(std::vector<float>{0.125f, -0.25f});
    for (DeviceArray<float>* cd : {&fresh, &kept}) {
      ASSERT_THAT(QilActivationInitialize(ctx_, n, x_d.data(), cd->data(), cd->data() + 1,
                                          workspace_.data()),
                  IsOk());
    }
    Sync();
    // mean + 3 sqrt(E[x^2] - mean^2) from double sums: for these inputs (var >= E[x^2] / 3) the
    // summation-order difference stays below 1e-8 relative, far below a float ulp.
    const std::vector<float> got = Download(fresh);
    ExpectRoundedNear(cpu.c().value[0], got[0], 1e-8 * std::fabs(cpu.c().value[0]), "c");
    ExpectRoundedNear(cpu.d().value[0], got[1], 1e-8 * std::fabs(cpu.d().value[0]), "d");
    ExpectBitsEqual({0.125f, -0.25f}, Download(kept), "initialised c, d are kept");
  }
}

TEST_F(QuantizeGpuTest, QilActivationMatchesCpuExactly) {
  struct Case {
    float c, d;
  };
  // Dyadic c and d (u exact), a negative d, and d below kQilMinHalfWidth.
  const Case cases[] = {{1.5f, 1.0f}, {0.75f, 0.25f}, {1.5f, -1.0f}, {1.5f, 1e-9f}};
  for (int bits : {1, 2, 4, 8}) {
    for (int64_t n : Sizes()) {
      for (const Case& k : cases) {
        SCOPED_TRACE(Trace("qil activation c " + std::to_string(k.c) + " d " + std::to_string(k.d),
                           bits, n));
        // x in multiples of 2^-8 in [-1, 4], dy in multiples of 2^-4 in [-1, 1]: inside the
        // interval |x - c| <= 1, so dy (x - c) is a multiple of 2^-12 below 2^12 of them, and
        // 1024 of those sum exactly in float: both gradients are the CPU's bit for bit.
        const std::vector<float> x = DyadicVector(n, 1600 + bits, -256, 1024, 8);
        const std::vector<float> dy = DyadicVector(n, 1700 + bits, -16, 16, 4);
        nn::RunContext run = CpuRun();
        quant::QilOptions options;
        options.bits = bits;
        quant::QilActivationQuantizer cpu("aq", options);
        cpu.c().value[0] = k.c;
        cpu.d().value[0] = k.d;
        const nn::Tensor x_t = ToTensor(x);
        nn::Tensor y_t, dx_t;
        cpu.Forward(run, x_t, &y_t);
        cpu.Backward(run, ToTensor(dy), &dx_t);
        const std::vector<float> want_grads = {cpu.c().grad[0], cpu.d().grad[0]};

        auto x_d = Upload(x);
        auto dy_d = Upload(dy);
        auto params = Upload(std::vector<float>{k.c, k.d});
        auto y_d = Poisoned(x.size());
        auto dx_d = Poisoned(x.size());
        auto inplace = Upload(dy);
        auto grads = Poisoned(6);
        const float* pc = params.data();
        float* pg = grads.data();
        ASSERT_THAT(QilActivationForward(ctx_, bits, n, x_d.data(), pc, pc + 1, y_d.data()),
                    IsOk());
        ASSERT_THAT(QilActivationBackward(ctx_, n, x_d.data(), pc, pc + 1, dy_d.data(), dx_d.data(),
                                          pg, pg + 1, workspace_.data()),
                    IsOk());
        ASSERT_THAT(QilActivationBackward(ctx_, n, x_d.data(), pc, pc + 1, dy_d.data(), nullptr,
                                          pg + 2, pg + 3, workspace_.data()),
                    IsOk());
        ASSERT_THAT(QilActivationBackward(ctx_, n, x_d.data(), pc, pc + 1, inplace.data(),
                                          inplace.data(), pg + 4, pg + 5, workspace_.data()),
                    IsOk());
        Sync();
        ExpectBitsEqual(ToVector(y_t), Download(y_d), "y");
        ExpectBitsEqual(ToVector(dx_t), Download(dx_d), "dx");
        ExpectBitsEqual(ToVector(dx_t), Download(inplace), "dx in place");
        const std::vector<float> got = Download(grads);
        for (size_t r = 0; r < 3; ++r) {
          ExpectBitsEqual(want_grads, {got[2 * r], got[2 * r + 1]},
                          "c_grad, d_grad (with dx, without, in place)");
        }
      }
    }
  }
}

TEST_F(QuantizeGpuTest, QilActivationGradientsWithArbitraryInputs) {
  for (int64_t n : Sizes()) {
    SCOPED_TRACE(Trace("qil activation", 3, n));
    const std::vector<float> x = RandomVector(n, 1800, -1.0f, 3.0f);
    const std::vector<float> dy = RandomVector(n, 1801, -1.0f, 1.0f);
    nn::RunContext run = CpuRun();
    quant::QilOptions options;
    options.bits = 3;
    quant::QilActivationQuantizer cpu("aq", options);
    const nn::Tensor x_t = ToTensor(x);
    nn::Tensor y_t, dx_t;
    cpu.Forward(run, x_t, &y_t);  // initialises c and d from x
    cpu.Backward(run, ToTensor(dy), &dx_t);
    const float c = cpu.c().value[0];
    const float d = cpu.d().value[0];
    // The terms of both sums, masked as the CPU masks them.
    const float inv_2d_f = static_cast<float>(0.5 / std::max(std::fabs(d), kQilMinHalfWidth));
    double c_abs = 0.0, d_abs = 0.0;
    for (size_t i = 0; i < x.size(); ++i) {
      const float u = (x[i] - c) * inv_2d_f + 0.5f;
      if (u < 0.0f || u > 1.0f) continue;
      c_abs += std::fabs(dy[i]) * static_cast<double>(inv_2d_f);
      d_abs += std::fabs(dy[i] * (x[i] - c)) * static_cast<double>(inv_2d_f) / std::fabs(d);
    }

    auto x_d = Upload(x);
    auto dy_d = Upload(dy);
    auto params = Upload(std::vector<float>{c, d});
    auto y_d = Poisoned(x.size());
    auto dx_d = Poisoned(x.size());
    auto grads = Poisoned(2);
    ASSERT_THAT(
        QilActivationForward(ctx_, 3, n, x_d.data(), params.data(), params.data() + 1, y_d.data()),
        IsOk());
    ASSERT_THAT(
        QilActivationBackward(ctx_, n, x_d.data(), params.data(), params.data() + 1, dy_d.data(),
                              dx_d.data(), grads.data(), grads.data() + 1, workspace_.data()),
        IsOk());
    Sync();
    ExpectBitsEqual(ToVector(y_t), Download(y_d), "y");
    ExpectBitsEqual(ToVector(dx_t), Download(dx_d), "dx");
    const std::vector<float> got = Download(grads);
    const float want_c = cpu.c().grad[0];
    const float want_d = cpu.d().grad[0];
    EXPECT_LE(std::fabs(static_cast<double>(got[0]) - want_c), FloatSumTolerance(want_c, c_abs))
        << "c_grad: cpu " << want_c << " gpu " << got[0];
    EXPECT_LE(std::fabs(static_cast<double>(got[1]) - want_d), FloatSumTolerance(want_d, d_abs))
        << "d_grad: cpu " << want_d << " gpu " << got[1];
  }
}

// ---- Binary -----------------------------------------------------------------------------------

TEST_F(QuantizeGpuTest, BinaryMatchesCpu) {
  struct Shape {
    int64_t channels, per_channel;
  };
  // One element; odd; a conv layer; more channels than one final block; segments split over 4
  // blocks; and over the maximum split.
  const Shape shapes[] = {{1, 1}, {3, 7}, {16, 576}, {1000, 37}, {5, 20000}, {3, 300001}};
  for (BinaryScaling scaling : {BinaryScaling::kPerChannelMeanAbs, BinaryScaling::kNone}) {
    const bool scaled = scaling == BinaryScaling::kPerChannelMeanAbs;
    for (const Shape& s : shapes) {
      const int64_t total = s.channels * s.per_channel;
      SCOPED_TRACE(std::string(scaled ? "xnor " : "binaryconnect ") + std::to_string(s.channels) +
                   "x" + std::to_string(s.per_channel));
      std::vector<float> w = RandomVector(total, 1900, -1.5f, 1.5f);
      Plant(w, {0.0f, -0.0f, 1.0f, -1.0f, std::nextafter(1.0f, 2.0f)});
      const std::vector<float> g = RandomVector(total, 1901, -1.0f, 1.0f);
      nn::RunContext run = CpuRun();
      quant::BinaryWeightQuantizer cpu(scaled ? quant::BinaryScale::kPerChannelMeanAbs
                                              : quant::BinaryScale::kNone);
      const nn::Tensor w_t = ToTensor(w, {s.channels, s.per_channel});
      nn::Tensor wq_t, dw_t;
      cpu.Forward(run, w_t, &wq_t);
      cpu.Backward(run, w_t, ToTensor(g, {s.channels, s.per_channel}), &dw_t);
      const std::vector<float> scales_cpu = cpu.channel_scales();

      const size_t ws_bytes = BinaryWeightWorkspaceBytes(scaling, s.channels, s.per_channel);
      EXPECT_EQ(ws_bytes == 0, !scaled);
      auto ws = Workspace(ws_bytes);
      auto w_d = Upload(w);
      auto g_d = Upload(g);
      auto scales_d = Poisoned(static_cast<size_t>(s.channels));
      auto scales_cpu_d = Upload(scales_cpu);
      auto wq_d = Poisoned(w.size());
      auto dw_d = Poisoned(w.size());
      auto inplace = Upload(g);
      ASSERT_THAT(BinaryWeightForward(ctx_, scaling, s.channels, s.per_channel, w_d.data(),
                                      wq_d.data(), scales_d.data(), scaled ? ws.data() : nullptr),
                  IsOk());
      // Given the CPU's scales (none for BinaryConnect) the backward is the CPU's bit for bit.
      const float* scales_in = scaled ? scales_cpu_d.data() : nullptr;
      ASSERT_THAT(BinaryWeightBackward(ctx_, scaling, s.channels, s.per_channel, w_d.data(),
                                       scales_in, g_d.data(), dw_d.data()),
                  IsOk());
      ASSERT_THAT(BinaryWeightBackward(ctx_, scaling, s.channels, s.per_channel, w_d.data(),
                                       scales_in, inplace.data(), inplace.data()),
                  IsOk());
      Sync();
      const std::vector<float> scales_gpu = Download(scales_d);
      if (scaled) {
        // Means of |w| from double sums (no cancellation): equal or float neighbours.
        for (size_t c = 0; c < scales_cpu.size(); ++c) {
          ExpectRoundedNear(scales_cpu[c], scales_gpu[c],
                            DoubleSumBound(s.per_channel, scales_cpu[c]),
                            "scale of channel " + std::to_string(c));
        }
      } else {
        ExpectBitsEqual(std::vector<float>(scales_cpu.size(), 1.0f), scales_gpu, "scales");
      }
      // wq = +-alpha_c exactly (sign(0) = +1), which is the CPU's up to alpha_c's rounding.
      std::vector<float> want(w.size());
      for (size_t i = 0; i < w.size(); ++i) {
        const float alpha = scales_gpu[i / static_cast<size_t>(s.per_channel)];
        want[i] = w[i] >= 0.0f ? alpha : -alpha;
      }
      const std::vector<float> wq_gpu = Download(wq_d);
      ExpectBitsEqual(want, wq_gpu, "wq = sign(w) alpha_c");
      const std::vector<float> wq_cpu = ToVector(wq_t);
      ExpectAllWithin(
          wq_cpu, wq_gpu, [&](size_t i) { return 1.01 * FloatUlp(wq_cpu[i]); }, "wq");
      ExpectBitsEqual(ToVector(dw_t), Download(dw_d), "dw");
      ExpectBitsEqual(ToVector(dw_t), Download(inplace), "dw in place");
    }
  }
}

// ---- Ternary ----------------------------------------------------------------------------------

TEST_F(QuantizeGpuTest, TernaryMatchesCpu) {
  for (int64_t n : Sizes()) {
    SCOPED_TRACE("ternary n " + std::to_string(n));
    std::vector<float> w = GaussianVector(n, 2000, 0.0f, 0.1f);
    Plant(w, {0.0f, -0.0f});
    const std::vector<float> g = RandomVector(n, 2001, -1.0f, 1.0f);
    nn::RunContext run = CpuRun();
    quant::TernaryWeightQuantizer cpu;
    const nn::Tensor w_t = ToTensor(w);
    nn::Tensor wq_t, dw_t;
    cpu.Forward(run, w_t, &wq_t);
    cpu.Backward(run, w_t, ToTensor(g), &dw_t);

    auto w_d = Upload(w);
    auto g_d = Upload(g);
    auto wq_d = Poisoned(w.size());
    auto dw_d = Poisoned(w.size());
    auto inplace = Upload(g);
    auto state_d = Upload(std::vector<TernaryWeightState>{kPoisonedTernaryState});
    ASSERT_THAT(
        TernaryWeightForward(ctx_, n, w_d.data(), wq_d.data(), state_d.data(), workspace_.data()),
        IsOk());
    ASSERT_THAT(TernaryWeightBackward(ctx_, n, g_d.data(), dw_d.data()), IsOk());
    ASSERT_THAT(TernaryWeightBackward(ctx_, n, inplace.data(), inplace.data()), IsOk());
    Sync();
    // Sums of |w| (no cancellation) the CPU forms in float blocks: FloatSumTolerance's tight
    // regime, 1e-5 relative with the random-rounding estimate ~1e-6.
    const TernaryWeightState state = Download(state_d)[0];
    EXPECT_LE(std::fabs(static_cast<double>(state.threshold) - cpu.threshold()),
              1e-5 * cpu.threshold())
        << "threshold: cpu " << cpu.threshold() << " gpu " << state.threshold;
    EXPECT_LE(std::fabs(static_cast<double>(state.scale) - cpu.scale()), 1e-5 * cpu.scale())
        << "scale: cpu " << cpu.scale() << " gpu " << state.scale;
    // Only weights between the two thresholds may take another code (0 against +-alpha); the
    // others carry the GPU's alpha, within the scale difference of the CPU's.
    const double lo = std::min(state.threshold, cpu.threshold());
    const double hi = std::max(state.threshold, cpu.threshold());
    ExpectQuantizedMatch(
        ToVector(wq_t), Download(wq_d), cpu.scale(),
        std::fabs(static_cast<double>(state.scale) - cpu.scale()),
        [&](size_t i) { return std::fabs(w[i]) >= lo && std::fabs(w[i]) <= hi; }, "wq");
    ExpectBitsEqual(ToVector(dw_t), Download(dw_d), "dw");
    ExpectBitsEqual(g, Download(inplace), "dw in place (untouched)");
  }
}

TEST_F(QuantizeGpuTest, TernaryIsExactOnDyadicWeights) {
  for (int64_t n : Sizes()) {
    SCOPED_TRACE("ternary n " + std::to_string(n));
    // Multiples of 2^-12 in [-1, 1]: the CPU's float block sums are exact, like the GPU's.
    const std::vector<float> w = DyadicVector(n, 2100, -4096, 4096, 12);
    nn::RunContext run = CpuRun();
    quant::TernaryWeightQuantizer cpu;
    nn::Tensor wq_t;
    cpu.Forward(run, ToTensor(w), &wq_t);
    auto w_d = Upload(w);
    auto wq_d = Poisoned(w.size());
    auto state_d = Upload(std::vector<TernaryWeightState>{kPoisonedTernaryState});
    ASSERT_THAT(
        TernaryWeightForward(ctx_, n, w_d.data(), wq_d.data(), state_d.data(), workspace_.data()),
        IsOk());
    Sync();
    const TernaryWeightState state = Download(state_d)[0];
    ExpectBitsEqual({cpu.threshold(), cpu.scale()}, {state.threshold, state.scale},
                    "threshold, scale");
    ExpectBitsEqual(ToVector(wq_t), Download(wq_d), "wq");
  }
}

// ---- Determinism and graph capture ------------------------------------------------------------

TEST_F(QuantizeGpuTest, RepeatedRunsAndGraphReplayAreBitwiseIdentical) {
  const int64_t n = 3'000'017;
  const int64_t channels = 64;
  const std::vector<float> w = RandomVector(n, 2200, -1.0f, 1.0f);
  const std::vector<float> g = RandomVector(n, 2201, -1.0f, 1.0f);
  const std::vector<float> x = RandomVector(n, 2202, -0.5f, 2.0f);
  auto w_d = Upload(w);
  auto g_d = Upload(g);
  auto x_d = Upload(x);
  // Every output of one training step of each quantizer.
  std::vector<DeviceArray<float>> out;
  for (int k = 0; k < 12; ++k) out.push_back(Poisoned(static_cast<size_t>(n)));
  auto scalars = Poisoned(16);
  auto dorefa_state = Upload(std::vector<DorefaWeightState>{kPoisonedDorefaState});
  auto ternary_state = Upload(std::vector<TernaryWeightState>{kPoisonedTernaryState});
  auto binary_ws = Workspace(
      BinaryWeightWorkspaceBytes(BinaryScaling::kPerChannelMeanAbs, channels, n / channels));
  // PACT alpha; QIL weight c, d, gamma (d = 0: the initialiser sets c and d); QIL activation c, d.
  auto params = Upload(std::vector<float>{1.5f, 0.0f, 0.0f, 0.8f, 0.0f, 0.0f});
  float* p = params.data();
  float* s = scalars.data();
  void* ws = workspace_.data();
  auto step = [&]() -> absl::Status {
    const float* wp = w_d.data();
    const float* gp = g_d.data();
    const float* xp = x_d.data();
    RETURN_IF_ERROR(
        DorefaWeightForward(ctx_, 3, n, wp, out[0].data(), out[1].data(), dorefa_state.data(), ws));
    RETURN_IF_ERROR(DorefaWeightBackward(ctx_, n, wp, out[1].data(), dorefa_state.data(), gp,
                                         out[2].data(), ws));
    RETURN_IF_ERROR(SawbWeightForward(ctx_, 2, n, wp, out[3].data(), s, ws));
    RETURN_IF_ERROR(PactBackward(ctx_, n, xp, p, 1e-3f, gp, out[4].data(), s + 1, ws));
    RETURN_IF_ERROR(QilWeightInitialize(ctx_, n, wp, p + 1, p + 2, ws));
    RETURN_IF_ERROR(QilWeightForward(ctx_, 4, n, wp, p + 1, p + 2, p + 3, out[5].data(),
                                     out[6].data(), out[7].data()));
    RETURN_IF_ERROR(QilWeightBackward(ctx_, n, wp, p + 1, p + 2, p + 3, out[6].data(),
                                      out[7].data(), gp, out[8].data(), s + 2, s + 3, s + 4, ws));
    RETURN_IF_ERROR(QilActivationInitialize(ctx_, n, xp, p + 4, p + 5, ws));
    RETURN_IF_ERROR(
        QilActivationBackward(ctx_, n, xp, p + 4, p + 5, gp, out[9].data(), s + 5, s + 6, ws));
    RETURN_IF_ERROR(TernaryWeightForward(ctx_, n, wp, out[10].data(), ternary_state.data(), ws));
    return BinaryWeightForward(ctx_, BinaryScaling::kPerChannelMeanAbs, channels, n / channels, wp,
                               out[11].data(), s + 7, binary_ws.data());
  };
  auto snapshot = [&]() {
    std::vector<std::vector<float>> all;
    for (const DeviceArray<float>& a : out) all.push_back(Download(a));
    all.push_back(Download(scalars));
    all.push_back(Download(params));
    const DorefaWeightState d = Download(dorefa_state)[0];
    const TernaryWeightState t = Download(ternary_state)[0];
    std::vector<float> states(6);
    std::memcpy(states.data(), &d, sizeof(d));
    std::memcpy(states.data() + 4, &t, sizeof(t));
    all.push_back(states);
    return all;
  };
  auto expect_same = [](const std::vector<std::vector<float>>& a,
                        const std::vector<std::vector<float>>& b, const std::string& what) {
    ASSERT_EQ(a.size(), b.size());
    for (size_t k = 0; k < a.size(); ++k)
      ExpectBitsEqual(a[k], b[k], what + " #" + std::to_string(k));
  };

  ASSERT_THAT(step(), IsOk());
  Sync();
  const std::vector<std::vector<float>> first = snapshot();
  ASSERT_THAT(step(), IsOk());
  Sync();
  expect_same(first, snapshot(), "second run");

  // The whole step captured in a graph: no synchronization and no allocation inside.
  for (DeviceArray<float>& a : out) UploadInto(a, std::vector<float>(a.size(), kNaN));
  UploadInto(scalars, std::vector<float>(scalars.size(), kNaN));
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(ctx_.stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  const absl::Status captured = step();
  ASSERT_EQ(cudaStreamEndCapture(ctx_.stream, &graph), cudaSuccess);
  ASSERT_THAT(captured, IsOk());
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, ctx_.stream), cudaSuccess);
  Sync();
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  expect_same(first, snapshot(), "graph replay");
}

// ---- Host-side checks (run without a GPU: they fail, or do nothing, before any launch) -------

TEST(QuantizeArgumentsTest, BadBitsAreInvalidArgument) {
  const CudaContext ctx;
  float w[4] = {}, out[4] = {}, aux[4] = {}, aux2[4] = {};
  float c = 0.5f, d = 0.5f, gamma = 1.0f, alpha = 1.0f;
  DorefaWeightState state{};
  alignas(16) unsigned char ws[32];
  const auto bad_bits = [](const std::string& range, int got) {
    return StatusIs(absl::StatusCode::kInvalidArgument,
                    HasSubstr("bits must be in " + range + ", got " + std::to_string(got)));
  };
  EXPECT_THAT(DorefaWeightForward(ctx, 0, 4, w, out, aux, &state, ws), bad_bits("[1, 8]", 0));
  EXPECT_THAT(DorefaWeightForward(ctx, 9, 4, w, out, aux, &state, ws), bad_bits("[1, 8]", 9));
  EXPECT_THAT(DorefaActivationForward(ctx, 9, 4, w, out), bad_bits("[1, 8]", 9));
  EXPECT_THAT(DorefaActivationForward(ctx, 0, 0, nullptr, nullptr), bad_bits("[1, 8]", 0));
  EXPECT_THAT(PactForward(ctx, 0, 4, w, &alpha, out), bad_bits("[1, 8]", 0));
  EXPECT_THAT(PactForward(ctx, -3, 4, w, &alpha, out), bad_bits("[1, 8]", -3));
  EXPECT_THAT(SawbWeightForward(ctx, 9, 4, w, out, &alpha, ws), bad_bits("[1, 8]", 9));
  EXPECT_THAT(SawbWeightForward(ctx, 0, 4, w, out, &alpha, ws), bad_bits("[1, 8]", 0));
  // QIL weights need a sign and at least one magnitude level.
  EXPECT_THAT(QilWeightForward(ctx, 1, 4, w, &c, &d, &gamma, out, aux, aux2),
              bad_bits("[2, 8]", 1));
  EXPECT_THAT(QilWeightForward(ctx, 9, 4, w, &c, &d, &gamma, out, aux, aux2),
              bad_bits("[2, 8]", 9));
  EXPECT_THAT(QilActivationForward(ctx, 0, 4, w, &c, &d, out), bad_bits("[1, 8]", 0));
  EXPECT_THAT(QilActivationForward(ctx, 9, 4, w, &c, &d, out), bad_bits("[1, 8]", 9));
}

TEST(QuantizeArgumentsTest, NullPointersAreInvalidArgument) {
  const CudaContext ctx;
  float w[4] = {}, out[4] = {}, aux[4] = {}, aux2[4] = {};
  float c = 0.5f, d = 0.5f, gamma = 1.0f, alpha = 1.0f, g1 = 0.0f, g2 = 0.0f, g3 = 0.0f;
  DorefaWeightState dorefa{};
  alignas(16) unsigned char ws[32];
  const auto null = [](const std::string& name) {
    return StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(name + " is null"));
  };
  EXPECT_THAT(DorefaWeightForward(ctx, 2, 4, nullptr, out, aux, &dorefa, ws), null("w"));
  EXPECT_THAT(DorefaWeightForward(ctx, 2, 4, w, out, nullptr, &dorefa, ws), null("tanh_w"));
  EXPECT_THAT(DorefaWeightForward(ctx, 2, 4, w, out, aux, nullptr, ws), null("state"));
  EXPECT_THAT(DorefaWeightBackward(ctx, 4, w, aux, &dorefa, nullptr, out, ws), null("dwq"));
  EXPECT_THAT(DorefaWeightBackward(ctx, 4, w, aux, nullptr, aux2, out, ws), null("state"));
  EXPECT_THAT(DorefaActivationForward(ctx, 2, 4, w, nullptr), null("y"));
  EXPECT_THAT(DorefaActivationBackward(ctx, 4, w, nullptr, out), null("dy"));
  EXPECT_THAT(PactForward(ctx, 2, 4, w, nullptr, out), null("alpha"));
  // The parameter and its gradient are checked even with nothing to reduce.
  EXPECT_THAT(PactBackward(ctx, 0, nullptr, &alpha, 0.0f, nullptr, nullptr, nullptr, ws),
              null("alpha_grad"));
  EXPECT_THAT(PactBackward(ctx, 4, w, &alpha, 0.0f, nullptr, out, &g1, ws), null("dy"));
  EXPECT_THAT(SawbWeightForward(ctx, 2, 4, w, out, nullptr, ws), null("alpha"));
  EXPECT_THAT(SawbWeightBackward(ctx, 4, w, nullptr, aux, out), null("alpha"));
  EXPECT_THAT(QilWeightInitialize(ctx, 4, w, &c, nullptr, ws), null("d"));
  EXPECT_THAT(QilActivationInitialize(ctx, 4, nullptr, &c, &d, ws), null("x"));
  EXPECT_THAT(QilWeightForward(ctx, 3, 4, w, &c, &d, &gamma, out, aux, nullptr), null("u_gamma"));
  EXPECT_THAT(QilWeightForward(ctx, 3, 4, w, &c, &d, nullptr, out, aux, aux2), null("gamma"));
  EXPECT_THAT(QilWeightBackward(ctx, 0, nullptr, &c, &d, &gamma, nullptr, nullptr, nullptr, nullptr,
                                &g1, &g2, nullptr, ws),
              null("gamma_grad"));
  EXPECT_THAT(
      QilWeightBackward(ctx, 4, w, &c, &d, &gamma, nullptr, aux, aux2, out, &g1, &g2, &g3, ws),
      null("log_u"));
  EXPECT_THAT(QilActivationForward(ctx, 2, 4, w, nullptr, &d, out), null("c"));
  EXPECT_THAT(QilActivationBackward(ctx, 4, w, &c, &d, aux, out, &g1, nullptr, ws), null("d_grad"));
  EXPECT_THAT(QilActivationBackward(ctx, 4, w, &c, &d, nullptr, out, &g1, &g2, ws), null("dy"));
  EXPECT_THAT(
      BinaryWeightForward(ctx, BinaryScaling::kPerChannelMeanAbs, 2, 2, w, out, nullptr, ws),
      null("scales"));
  EXPECT_THAT(BinaryWeightForward(ctx, BinaryScaling::kNone, 2, 2, w, nullptr, aux, nullptr),
              null("wq"));
  EXPECT_THAT(
      BinaryWeightBackward(ctx, BinaryScaling::kPerChannelMeanAbs, 2, 2, w, nullptr, aux, out),
      null("scales"));
  EXPECT_THAT(BinaryWeightBackward(ctx, BinaryScaling::kNone, 2, 2, w, nullptr, nullptr, out),
              null("dwq"));
  TernaryWeightState ternary{};
  EXPECT_THAT(TernaryWeightForward(ctx, 4, w, out, nullptr, ws), null("state"));
  EXPECT_THAT(TernaryWeightForward(ctx, 4, w, nullptr, &ternary, ws), null("wq"));
  EXPECT_THAT(TernaryWeightBackward(ctx, 4, nullptr, out), null("dwq"));
}

TEST(QuantizeArgumentsTest, BadWorkspacesAreInvalidArgument) {
  const CudaContext ctx;
  float w[4] = {}, out[4] = {}, aux[4] = {};
  float c = 0.5f, d = 0.5f, gamma = 1.0f, alpha = 1.0f, g1 = 0.0f, g2 = 0.0f, g3 = 0.0f;
  DorefaWeightState dorefa{};
  TernaryWeightState ternary{};
  alignas(16) unsigned char bytes[64];
  void* misaligned = bytes + 4;
  const auto null_ws = StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("workspace is null"));
  const auto unaligned = StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("aligned"));
  EXPECT_THAT(DorefaWeightForward(ctx, 2, 4, w, out, aux, &dorefa, nullptr), null_ws);
  EXPECT_THAT(DorefaWeightBackward(ctx, 4, w, aux, &dorefa, aux, out, misaligned), unaligned);
  EXPECT_THAT(PactBackward(ctx, 4, w, &alpha, 0.0f, aux, out, &g1, nullptr), null_ws);
  EXPECT_THAT(SawbWeightForward(ctx, 2, 4, w, out, &alpha, misaligned), unaligned);
  EXPECT_THAT(QilWeightInitialize(ctx, 4, w, &c, &d, nullptr), null_ws);
  EXPECT_THAT(QilActivationInitialize(ctx, 4, w, &c, &d, misaligned), unaligned);
  EXPECT_THAT(
      QilWeightBackward(ctx, 4, w, &c, &d, &gamma, aux, aux, aux, out, &g1, &g2, &g3, nullptr),
      null_ws);
  EXPECT_THAT(QilActivationBackward(ctx, 4, w, &c, &d, aux, out, &g1, &g2, misaligned), unaligned);
  EXPECT_THAT(TernaryWeightForward(ctx, 4, w, out, &ternary, nullptr), null_ws);
  EXPECT_THAT(
      BinaryWeightForward(ctx, BinaryScaling::kPerChannelMeanAbs, 2, 2, w, out, aux, nullptr),
      null_ws);
  EXPECT_THAT(
      BinaryWeightForward(ctx, BinaryScaling::kPerChannelMeanAbs, 2, 2, w, out, aux, misaligned),
      unaligned);
}

TEST(QuantizeArgumentsTest, SizesBelowTheMinimumAreInvalidArgument) {
  const CudaContext ctx;
  float w[4] = {}, out[4] = {}, aux[4] = {}, aux2[4] = {};
  float c = 0.5f, d = 0.5f, gamma = 1.0f, alpha = 1.0f, g1 = 0.0f, g2 = 0.0f, g3 = 0.0f;
  DorefaWeightState dorefa{};
  TernaryWeightState ternary{};
  alignas(16) unsigned char ws[32];
  const auto at_least = [](const std::string& name, int min, int64_t got) {
    return StatusIs(
        absl::StatusCode::kInvalidArgument,
        HasSubstr(name + " must be >= " + std::to_string(min) + ", got " + std::to_string(got)));
  };
  // Functions with statistics need an element.
  EXPECT_THAT(DorefaWeightForward(ctx, 2, 0, w, out, aux, &dorefa, ws), at_least("n", 1, 0));
  EXPECT_THAT(DorefaWeightBackward(ctx, 0, w, aux, &dorefa, aux2, out, ws), at_least("n", 1, 0));
  EXPECT_THAT(SawbWeightForward(ctx, 2, 0, w, out, &alpha, ws), at_least("n", 1, 0));
  EXPECT_THAT(QilWeightInitialize(ctx, 0, w, &c, &d, ws), at_least("n", 1, 0));
  EXPECT_THAT(QilActivationInitialize(ctx, -2, w, &c, &d, ws), at_least("n", 1, -2));
  EXPECT_THAT(TernaryWeightForward(ctx, 0, w, out, &ternary, ws), at_least("n", 1, 0));
  // The others need n >= 0.
  EXPECT_THAT(DorefaActivationForward(ctx, 2, -1, w, out), at_least("n", 0, -1));
  EXPECT_THAT(DorefaActivationBackward(ctx, -1, w, aux, out), at_least("n", 0, -1));
  EXPECT_THAT(PactForward(ctx, 2, -1, w, &alpha, out), at_least("n", 0, -1));
  EXPECT_THAT(PactBackward(ctx, -1, w, &alpha, 0.0f, aux, out, &g1, ws), at_least("n", 0, -1));
  EXPECT_THAT(SawbWeightBackward(ctx, -1, w, &alpha, aux, out), at_least("n", 0, -1));
  EXPECT_THAT(QilWeightForward(ctx, 3, -1, w, &c, &d, &gamma, out, aux, aux2),
              at_least("n", 0, -1));
  EXPECT_THAT(QilWeightBackward(ctx, -1, w, &c, &d, &gamma, aux, aux, aux2, out, &g1, &g2, &g3, ws),
              at_least("n", 0, -1));
  EXPECT_THAT(QilActivationForward(ctx, 3, -1, w, &c, &d, out), at_least("n", 0, -1));
  EXPECT_THAT(QilActivationBackward(ctx, -1, w, &c, &d, aux, out, &g1, &g2, ws),
              at_least("n", 0, -1));
  EXPECT_THAT(TernaryWeightBackward(ctx, -1, aux, out), at_least("n", 0, -1));
  // Binary weights: a channel of at least one element.
  EXPECT_THAT(BinaryWeightForward(ctx, BinaryScaling::kNone, 0, 4, w, out, aux, nullptr),
              at_least("channels", 1, 0));
  EXPECT_THAT(BinaryWeightForward(ctx, BinaryScaling::kPerChannelMeanAbs, 2, 0, w, out, aux, ws),
              at_least("per_channel", 1, 0));
  EXPECT_THAT(BinaryWeightBackward(ctx, BinaryScaling::kNone, -1, 4, w, nullptr, aux, out),
              at_least("channels", 1, -1));
  EXPECT_THAT(BinaryWeightBackward(ctx, BinaryScaling::kNone, 1, 0, w, nullptr, aux, out),
              at_least("per_channel", 1, 0));
}

TEST(QuantizeArgumentsTest, EmptyElementwiseCallsAndInPlaceTernaryBackwardAreNoOps) {
  // Nothing to do, so nothing is launched and no pointer is needed: these run without a GPU.
  const CudaContext ctx;
  EXPECT_THAT(DorefaActivationForward(ctx, 2, 0, nullptr, nullptr), IsOk());
  EXPECT_THAT(DorefaActivationBackward(ctx, 0, nullptr, nullptr, nullptr), IsOk());
  EXPECT_THAT(PactForward(ctx, 4, 0, nullptr, nullptr, nullptr), IsOk());
  EXPECT_THAT(SawbWeightBackward(ctx, 0, nullptr, nullptr, nullptr, nullptr), IsOk());
  EXPECT_THAT(
      QilWeightForward(ctx, 3, 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr),
      IsOk());
  EXPECT_THAT(QilActivationForward(ctx, 1, 0, nullptr, nullptr, nullptr, nullptr), IsOk());
  EXPECT_THAT(TernaryWeightBackward(ctx, 0, nullptr, nullptr), IsOk());
  // dw == dwq: the straight-through gradient is already in place.
  float g[4] = {1.0f, -2.0f, 3.0f, -4.0f};
  EXPECT_THAT(TernaryWeightBackward(ctx, 4, g, g), IsOk());
  EXPECT_EQ(g[1], -2.0f);
}

TEST(QuantizeArgumentsTest, BinaryWorkspaceBytes) {
  EXPECT_EQ(BinaryWeightWorkspaceBytes(BinaryScaling::kNone, 4, 100), 0u);
  EXPECT_EQ(BinaryWeightWorkspaceBytes(BinaryScaling::kPerChannelMeanAbs, 0, 100), 0u);
  EXPECT_EQ(BinaryWeightWorkspaceBytes(BinaryScaling::kPerChannelMeanAbs, 4, 0), 0u);
  // One double partial per block of each channel's segmented reduction, 16-byte aligned.
  struct Shape {
    int64_t channels, per_channel;
  };
  for (const Shape& s :
       {Shape{1, 1}, Shape{3, 7}, Shape{5, 20000}, Shape{3, int64_t{1} << 30}, Shape{1000, 37}}) {
    const size_t bytes =
        BinaryWeightWorkspaceBytes(BinaryScaling::kPerChannelMeanAbs, s.channels, s.per_channel);
    EXPECT_GE(bytes, static_cast<size_t>(s.channels * SegmentSplit(s.per_channel)) * sizeof(double))
        << s.channels << "x" << s.per_channel;
    EXPECT_EQ(bytes % 16, 0u) << s.channels << "x" << s.per_channel;
  }
}

}  // namespace
}  // namespace qtrain::kernels::cuda
