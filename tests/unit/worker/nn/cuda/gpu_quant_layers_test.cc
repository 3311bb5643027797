// The GPU twins of the quantized layers (gpu_quant_layers.h) against the CPU layers of
// worker/quant: the same layer (same parameters), input and output gradient must give the same
// output, input gradient, weight gradient and quantizer-parameter gradients up to the error bounds
// below.
//
// The bounds come from the kernels' contracts, not from a run that passed:
//  * sums of products (conv, GEMM): |computed - exact| <= k u sum_j |a_j b_j| (u = 2^-24, k the
//    reduction length) for each side, so the two sides differ by at most 2 k u S, where S is the
//    same layer run on |x|, |wq|, |dy| (a plain CPU layer: an exact-enough S, since it has no
//    cancellation);
//  * quantize.h: element-wise arithmetic is the CPU's, scalars from reductions agree to ~1e-7
//    relative and tanhf / logf / expf to a few ulp, so a value on the codebook either equals the
//    CPU's up to the scale's rounding or, rarely, lands one level apart (a "flip"). Flips are
//    counted on wq itself (at most 1 + n/1000, each exactly one level) and their effect on y and
//    dx is bounded by (flips) x (level gap) x max|x| (resp. max|dy|), since every output element
//    uses each weight at most once;
//  * the weight layers' x and dy are multiples of 1/4 (|x| <= 2, |dy| <= 1), so every partial sum
//    of dL/dwq = sum dy x (and of dL/dbias) is exact in float on both sides, whatever the order:
//    the weight gradient and the quantizer parameters' gradients then test the quantizer's
//    backward alone, whose element-wise terms are the CPU's up to a few ulp (tanhf, logf, expf,
//    scalars) and whose sums differ by the CPU's float-lane rounding (n u sum |term|);
//  * the activation quantizers see the same x and dy on both sides: their outputs and dx are
//    identical, their parameter gradients differ by that float-lane rounding.
// A real bug (a missing weight_scale, a wrong mask, a swapped parameter slot, an L2 term dropped,
// QIL not initialised) moves results by percent, orders of magnitude above these bounds.
#include "worker/nn/cuda/gpu_quant_layers.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/cuda/cuda_util.h"
#include "common/status_macros.h"
#include "common/testing/cuda_testing.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"
#include "worker/nn/conv2d.h"
#include "worker/nn/linear.h"
#include "worker/nn/relu.h"
#include "worker/nn/sequential.h"
#include "worker/quant/dorefa.h"
#include "worker/quant/pact.h"
#include "worker/quant/qil.h"
#include "worker/quant/quant_spec.h"
#include "worker/quant/quantized_layers.h"

namespace qtrain::nn::cuda {
namespace {

using ::qtrain::cuda::DeviceArray;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

constexpr double kU = 1.0 / (1 << 24);  // float's unit roundoff

// ---- A compiled twin on its own DeviceState, stream and workspace ------------------------------

using Compiler = absl::StatusOr<std::unique_ptr<GpuLayer>> (*)(Layer*, DeviceState*);

class GpuRig {
 public:
  // Copies `layer`'s parameters and buffers to the device as they are now, compiles the twin with
  // `compile` and plans it for `input`.
  static absl::StatusOr<std::unique_ptr<GpuRig>> Create(Layer* layer, const Shape& input,
                                                        Compiler compile) {
    auto rig = std::unique_ptr<GpuRig>(new GpuRig());
    layer->CollectParameters(&rig->params_);
    std::vector<Buffer*> buffers;
    layer->CollectBuffers(&buffers);
    ASSIGN_OR_RETURN(rig->stream_, qtrain::cuda::Stream::Create());
    ASSIGN_OR_RETURN(rig->state_, DeviceState::Create(rig->params_, buffers, {}, {}));
    RETURN_IF_ERROR(rig->state_->Push(nullptr, rig->stream_.get()));
    ASSIGN_OR_RETURN(rig->twin_, compile(layer, rig->state_.get()));
    if (rig->twin_ == nullptr) return absl::InternalError("not compiled");
    Planner planner;
    ASSIGN_OR_RETURN(Shape out, rig->twin_->Plan(input, &planner));
    ASSIGN_OR_RETURN(rig->workspace_, DeviceArray<uint8_t>::Create(planner.workspace_bytes));
    ASSIGN_OR_RETURN(rig->x_, DeviceArray<float>::Create(NumElements(input)));
    ASSIGN_OR_RETURN(rig->dy_, DeviceArray<float>::Create(NumElements(out)));
    return rig;
  }

  GpuLayer& twin() { return *twin_; }
  DeviceState& state() { return *state_; }

  absl::Status Forward(Mode mode, const Tensor& x, Tensor* y) {
    RETURN_IF_ERROR(Upload(x.data(), x.size(), x_.data()));
    DeviceTensor out;
    RETURN_IF_ERROR(twin_->Forward(Pass(mode), DeviceTensor{x_.data(), x.shape()}, &out));
    y->Resize(out.shape);
    return Download(out.data, out.size(), y->data());
  }

  // dx null: no input gradient is asked for.
  absl::Status Backward(const Tensor& dy, Tensor* dx) {
    RETURN_IF_ERROR(Upload(dy.data(), dy.size(), dy_.data()));
    DeviceTensor g;
    RETURN_IF_ERROR(twin_->Backward(Pass(Mode::kTrain), DeviceTensor{dy_.data(), dy.shape()},
                                    dx != nullptr ? &g : nullptr));
    if (dx == nullptr) return stream_.Synchronize();
    dx->Resize(g.shape);
    return Download(g.data, g.size(), dx->data());
  }

  absl::Status ZeroGrad(const Parameter& p) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
        state_->grad(&p), 0, 4 * static_cast<size_t>(p.value.size()), stream_.get()));
    return stream_.Synchronize();
  }
  absl::StatusOr<Tensor> Value(const Parameter& p) { return Read(state_->value(&p), p.value); }
  absl::StatusOr<Tensor> Grad(const Parameter& p) { return Read(state_->grad(&p), p.value); }
  // n floats at a device pointer, in `like`'s shape.
  absl::StatusOr<Tensor> Read(const float* device, const Tensor& like) {
    if (device == nullptr) return absl::InternalError("null device pointer");
    Tensor t(like.shape());
    RETURN_IF_ERROR(Download(device, t.size(), t.data()));
    return t;
  }

 private:
  GpuRig() = default;
  GpuPass Pass(Mode mode) {
    return GpuPass{CudaContext{stream_.get()}, mode, workspace_.data(), workspace_.size()};
  }
  absl::Status Upload(const float* host, int64_t n, float* device) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device, host, 4 * static_cast<size_t>(n),
                                                cudaMemcpyHostToDevice, stream_.get()));
    return stream_.Synchronize();
  }
  absl::Status Download(const float* device, int64_t n, float* host) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host, device, 4 * static_cast<size_t>(n),
                                                cudaMemcpyDeviceToHost, stream_.get()));
    return stream_.Synchronize();
  }

  std::vector<Parameter*> params_;
  qtrain::cuda::Stream stream_;
  std::unique_ptr<DeviceState> state_;
  std::unique_ptr<GpuLayer> twin_;
  DeviceArray<uint8_t> workspace_;
  DeviceArray<float> x_, dy_;
};

// ---- Comparison helpers -------------------------------------------------------------------------

double MaxAbs(const Tensor& t) {
  double m = 0.0;
  for (int64_t i = 0; i < t.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(t[i])));
  return m;
}

Tensor Abs(const Tensor& t) {
  Tensor a = t;
  for (int64_t i = 0; i < a.size(); ++i) a[i] = std::fabs(a[i]);
  return a;
}

// Every |got_i - want_i| <= tol_i; reports the first few offenders.
void ExpectWithin(const std::string& what, const Tensor& want, const Tensor& got,
                  const std::vector<double>& tol) {
  ASSERT_EQ(want.shape(), got.shape()) << what;
  ASSERT_EQ(static_cast<int64_t>(tol.size()), want.size()) << what;
  int64_t bad = 0;
  for (int64_t i = 0; i < want.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(diff <= tol[i]) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", cpu " << want[i] << ", |diff| "
                    << diff << " > bound " << tol[i];
    }
  }
  EXPECT_EQ(bad, 0) << what << ": elements outside their bound, of " << want.size();
}

void ExpectScalarWithin(const std::string& what, double want, double got, double tol) {
  EXPECT_LE(std::fabs(got - want), tol) << what << ": gpu " << got << ", cpu " << want;
}

// Elements of quantized tensors that differ by more than `noise`: at most `allowed`, each at most
// one level gap apart. Returns how many.
int64_t CountFlips(const std::string& what, const Tensor& want, const Tensor& got, double noise,
                   double gap, int64_t allowed) {
  EXPECT_EQ(want.shape(), got.shape()) << what;
  int64_t flips = 0;
  for (int64_t i = 0; i < want.size() && i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (diff <= noise) continue;
    ++flips;
    EXPECT_LE(diff, gap * (1 + 1e-5) + noise)
        << what << "[" << i << "]: gpu " << got[i] << ", cpu " << want[i] << " are not neighbours";
  }
  EXPECT_LE(flips, allowed) << what << ": elements on another level than the CPU's, of "
                            << want.size();
  return flips;
}

// Flips allowed in n quantized values (quantize.h: "a rare element").
int64_t AllowedFlips(int64_t n) { return 1 + n / 1000; }

double LargestGap(std::vector<float> levels) {
  std::sort(levels.begin(), levels.end());
  double gap = 0.0;
  for (size_t i = 1; i < levels.size(); ++i) gap = std::max(gap, double(levels[i] - levels[i - 1]));
  return gap;
}

// ---- Quantized conv / linear --------------------------------------------------------------------

struct WeightCase {
  std::string spec;  // --wq syntax (quant_spec.h)
  bool conv;         // QuantizedConv2d, else QuantizedLinear
};

std::string CaseName(const ::testing::TestParamInfo<WeightCase>& info) {
  std::string name = std::string(info.param.conv ? "Conv_" : "Linear_") + info.param.spec;
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

const Conv2dOptions kConv{
    .in_channels = 8, .out_channels = 16, .kernel = 3, .stride = 1, .padding = 1, .bias = true};
const Shape kConvInput = {4, 8, 8, 8};
const LinearOptions kLinear{.in_features = 96, .out_features = 24, .bias = true};
const Shape kLinearInput = {8, 96};

// The plain layer of the same geometry with weight `w` and bias `b`: for the reference dL/dwq and
// for the bound sums S (run on absolute values).
struct PlainRun {
  Tensor y, dx, dw, db;
};
PlainRun RunPlain(bool conv, const Tensor& w, const Tensor& b, const Tensor& x, const Tensor& dy) {
  std::mt19937_64 rng(1);
  std::unique_ptr<Layer> layer;
  Parameter* weight;
  Parameter* bias;
  if (conv) {
    auto c = std::make_unique<Conv2d>("plain", kConv, rng);
    weight = &c->weight();
    bias = &c->bias();
    layer = std::move(c);
  } else {
    auto l = std::make_unique<Linear>("plain", kLinear, rng);
    weight = &l->weight();
    bias = &l->bias();
    layer = std::move(l);
  }
  weight->value = w;
  bias->value = b;
  RunContext ctx;
  PlainRun r;
  layer->Forward(ctx, x, &r.y);
  layer->Backward(ctx, dy, &r.dx);
  r.dw = weight->grad;
  r.db = bias->grad;
  return r;
}

class GpuQuantizedWeightTest : public ::testing::TestWithParam<WeightCase> {};

TEST_P(GpuQuantizedWeightTest, MatchesTheCpuLayer) {
  QTRAIN_REQUIRE_GPU();
  const WeightCase& c = GetParam();
  std::mt19937_64 rng(11);
  ASSERT_OK_AND_ASSIGN(quant::QuantSpec spec, quant::ParseWeightQuantSpec(c.spec));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<quant::WeightQuantizer> q, quant::MakeWeightQuantizer(spec));
  std::unique_ptr<Layer> layer;
  quant::WeightQuantizer* quantizer = q.get();
  Parameter* weight;
  Parameter* bias;
  float weight_scale;
  const Tensor* cpu_wq;
  Shape input;
  int64_t k_forward, k_data;  // reduction lengths of y and dx
  if (c.conv) {
    auto l = std::make_unique<quant::QuantizedConv2d>("qconv", kConv, rng, std::move(q));
    weight = &l->weight();
    bias = &l->bias();
    weight_scale = l->weight_scale();
    cpu_wq = &l->quantized_weight();
    input = kConvInput;
    k_forward = kConv.in_channels * kConv.kernel * kConv.kernel + 1;
    k_data = kConv.out_channels * kConv.kernel * kConv.kernel;
    layer = std::move(l);
  } else {
    auto l = std::make_unique<quant::QuantizedLinear>("qfc", kLinear, rng, std::move(q));
    weight = &l->weight();
    bias = &l->bias();
    weight_scale = l->weight_scale();
    cpu_wq = &l->quantized_weight();
    input = kLinearInput;
    k_forward = kLinear.in_features + 1;
    k_data = kLinear.out_features;
    layer = std::move(l);
  }
  ASSERT_OK_AND_ASSIGN(Shape output, layer->OutputShape(input));
  // Multiples of 1/4: dL/dwq and dL/dbias are exact (see the top of this file).
  std::uniform_int_distribution<int> quarters_x(-8, 8), quarters_dy(-4, 4);
  Tensor x(input), dy(output);
  for (int64_t i = 0; i < x.size(); ++i) x[i] = 0.25f * static_cast<float>(quarters_x(rng));
  for (int64_t i = 0; i < dy.size(); ++i) dy[i] = 0.25f * static_cast<float>(quarters_dy(rng));
  std::vector<Parameter*> qparams;
  quantizer->CollectParameters(&qparams);

  // GPU first: the device copy is taken before the CPU's Forward initialises QIL's c and d.
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<GpuRig> rig,
                       GpuRig::Create(layer.get(), input, &CompileQuantLayer));
  Tensor gpu_y, gpu_dx;
  ASSERT_THAT(rig->Forward(Mode::kTrain, x, &gpu_y), IsOk());
  ASSERT_OK_AND_ASSIGN(Tensor gpu_wq, rig->Read(QuantizedWeight(rig->twin()), weight->value));
  ASSERT_THAT(rig->Backward(dy, &gpu_dx), IsOk());
  ASSERT_OK_AND_ASSIGN(Tensor gpu_dw, rig->Grad(*weight));
  ASSERT_OK_AND_ASSIGN(Tensor gpu_db, rig->Grad(*bias));
  std::vector<Tensor> gpu_qvalue, gpu_qgrad;
  for (Parameter* p : qparams) {
    ASSERT_OK_AND_ASSIGN(Tensor v, rig->Value(*p));
    ASSERT_OK_AND_ASSIGN(Tensor g, rig->Grad(*p));
    gpu_qvalue.push_back(v);
    gpu_qgrad.push_back(g);
  }

  RunContext ctx;
  Tensor y, dx;
  layer->Forward(ctx, x, &y);
  layer->Backward(ctx, dy, &dx);

  // The quantizer's own parameters after Forward (QIL: initialised from w on both sides).
  for (size_t k = 0; k < qparams.size(); ++k) {
    ExpectScalarWithin(qparams[k]->name + " value", qparams[k]->value[0], gpu_qvalue[k][0],
                       4 * kU * std::fabs(qparams[k]->value[0]));
  }

  // wq: equal up to the scalars' rounding, or one level apart.
  const int64_t n = weight->value.size();
  const double gap = weight_scale * LargestGap(quantizer->Levels());
  const double wq_noise = 8 * kU * MaxAbs(*cpu_wq);
  const int64_t flips = CountFlips("wq", *cpu_wq, gpu_wq, wq_noise, gap, AllowedFlips(n));

  // The bound sums S: the same products on absolute values.
  const PlainRun reference = RunPlain(c.conv, *cpu_wq, bias->value, x, dy);
  const PlainRun s = RunPlain(c.conv, Abs(*cpu_wq), Abs(bias->value), Abs(x), Abs(dy));
  // Each side's product error, plus wq's own difference (wq_noise relative to |wq|).
  auto product_bound = [&](int64_t k, const Tensor& sums, double flip_term) {
    std::vector<double> tol(static_cast<size_t>(sums.size()));
    for (int64_t i = 0; i < sums.size(); ++i) {
      tol[static_cast<size_t>(i)] = (2.0 * k + 16) * kU * sums[i] + flips * flip_term;
    }
    return tol;
  };
  ExpectWithin("y", y, gpu_y, product_bound(k_forward, s.y, gap * MaxAbs(x)));
  ExpectWithin("dx", dx, gpu_dx, product_bound(k_data, s.dx, gap * MaxAbs(dy)));
  // Exact sums: dL/dbias is the same bits, and dL/dwq too (reference.dw).
  CountFlips("dbias", bias->grad, gpu_db, 0.0, 0.0, 0);

  // dw = the quantizer's backward of g = weight_scale * dL/dwq, the same exact g on both sides, so
  // dw_i differs only through what its factor reads: rel_i bounds that factor's relative
  // difference (elementary functions: CUDA tanhf and expf 2 ulp, logf 1 ulp, glibc 1 ulp; scalars
  // from reductions ~1 ulp; 1 ulp <= 2u).
  const quant::Method method = spec.method;
  std::vector<double> rel(static_cast<size_t>(n), 8 * kU);  // SAWB, binary, ternary: scalars only
  double gamma = 1.0, c_value = 0.0, half_width = 1.0;
  if (method == quant::Method::kQil) {
    auto* qil = dynamic_cast<quant::QilWeightQuantizer*>(quantizer);
    ASSERT_NE(qil, nullptr);
    gamma = std::max(qil->gamma().value[0], quant::QilWeightQuantizer::kMinGamma);
    c_value = qil->c().value[0];
    half_width = std::max(std::fabs(qil->d().value[0]), quant::QilWeightQuantizer::kMinHalfWidth);
  }
  for (int64_t i = 0; i < n; ++i) {
    const double w = weight->value[i];
    if (method == quant::Method::kDorefa) {
      // t = tanh w and m: 6u each between the sides; 1 - t^2 then moves 12u t^2 / (1 - t^2).
      const double t2 = std::tanh(w) * std::tanh(w);
      rel[static_cast<size_t>(i)] = (24 + 12 * t2 / (1 - t2)) * kU;
    } else if (method == quant::Method::kQil) {
      // u^gamma = expf(gamma logf(u)): logf's error is relative to ln u, so it grows with |ln u|.
      const double u = std::clamp((std::fabs(w) - c_value) * 0.5 / half_width + 0.5, 0.0, 1.0);
      const double log_u = u > 0.0 && u < 1.0 ? std::fabs(std::log(u)) : 0.0;
      rel[static_cast<size_t>(i)] = (16 + 8 * gamma * log_u) * kU;
    }
  }
  std::vector<double> dw_tol(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    dw_tol[static_cast<size_t>(i)] = rel[static_cast<size_t>(i)] * std::fabs(weight->grad[i]);
  }
  if (method == quant::Method::kDorefa) {
    // The arg-max also gets sign(w_a)(1 - t_a^2)(-sum_j g_j t_j / m^2), a sum the CPU rounds in
    // float lanes: (n + 4) u sum |g_j t_j|, plus its terms' own differences (6u each).
    int64_t a = 0;
    for (int64_t i = 1; i < n; ++i) {
      if (std::fabs(weight->value[i]) > std::fabs(weight->value[a])) a = i;
    }
    const double m = std::max(std::tanh(std::fabs(weight->value[a])), 1e-12f);
    double sum_gt = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      sum_gt += std::fabs(weight_scale * reference.dw[i] * std::tanh(weight->value[i]));
    }
    const double ta = std::tanh(weight->value[a]);
    dw_tol[static_cast<size_t>(a)] += (1 - ta * ta) * (n + 30) * kU * sum_gt / (m * m);
  }
  ExpectWithin("dw", weight->grad, gpu_dw, dw_tol);

  if (method == quant::Method::kQil) {
    // Sums in double of terms that differ by rel_i: |c term_i| = |dw_i|, |d term_i| <= |dw_i|
    // (|a - c| <= d inside the interval), |gamma term_i| = |g_i| u^gamma |ln u| (its ln u, logf's,
    // within 2u of the CPU's relative to itself).
    double bound[3] = {0.0, 0.0, 0.0};
    for (int64_t i = 0; i < n; ++i) {
      const double r = rel[static_cast<size_t>(i)];
      bound[0] += r * std::fabs(weight->grad[i]);
      bound[1] += r * std::fabs(weight->grad[i]);
      const double u =
          std::clamp((std::fabs(weight->value[i]) - c_value) * 0.5 / half_width + 0.5, 0.0, 1.0);
      if (u > 0.0 && u < 1.0) {
        bound[2] += (r + 4 * kU) * std::fabs(weight_scale * reference.dw[i]) * std::pow(u, gamma) *
                    std::fabs(std::log(u));
      }
    }
    ASSERT_EQ(qparams.size(), 3u);
    for (size_t k = 0; k < 3; ++k) {
      ExpectScalarWithin(qparams[k]->name + " grad", qparams[k]->grad[0], gpu_qgrad[k][0],
                         bound[k] + 2 * kU * std::fabs(qparams[k]->grad[0]));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Quantizers, GpuQuantizedWeightTest,
    ::testing::Values(WeightCase{"dorefa:bits=2", true}, WeightCase{"dorefa:bits=2", false},
                      WeightCase{"dorefa:bits=4", true}, WeightCase{"dorefa:bits=4", false},
                      WeightCase{"sawb:bits=2", true}, WeightCase{"sawb:bits=2", false},
                      WeightCase{"qil:bits=3", true}, WeightCase{"qil:bits=3", false},
                      WeightCase{"qil:bits=3,gamma=0.7", true},
                      WeightCase{"qil:bits=3,gamma=0.7", false}, WeightCase{"binary", true},
                      WeightCase{"binary", false}, WeightCase{"ternary", true},
                      WeightCase{"ternary", false}),
    CaseName);

// ---- Activation quantizers ----------------------------------------------------------------------

class GpuActivationQuantizerTest : public ::testing::TestWithParam<std::string> {};

std::string ActivationName(const ::testing::TestParamInfo<std::string>& info) {
  std::string name = info.param;
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

TEST_P(GpuActivationQuantizerTest, MatchesTheCpuLayer) {
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(quant::QuantSpec spec, quant::ParseActivationQuantSpec(GetParam()));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<quant::ActivationQuantizer> layer,
                       quant::MakeActivationQuantizer("aq", spec));
  std::mt19937_64 rng(5);
  const Shape shape = {4, 8, 6, 6};
  // Below 0, inside and above every method's range (DoReFa [0, 1], PACT [0, alpha = 2], QIL's
  // interval from these statistics).
  const Tensor x = nn::testing::RandomTensor(shape, rng, -0.5f, 2.5f);
  // dy in multiples of 1/64: the masked sums (PACT's alpha, QIL's c gradient) are exact on both
  // sides, so those gradients must agree to the final rounding.
  Tensor dy(shape);
  std::uniform_int_distribution<int> steps(-64, 64);
  for (int64_t i = 0; i < dy.size(); ++i) dy[i] = static_cast<float>(steps(rng)) / 64.0f;
  const int64_t n = x.size();
  std::vector<Parameter*> params;
  layer->CollectParameters(&params);

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<GpuRig> rig,
                       GpuRig::Create(layer.get(), shape, &CompileQuantLayer));
  Tensor gpu_y, gpu_dx;
  ASSERT_THAT(rig->Forward(Mode::kTrain, x, &gpu_y), IsOk());
  ASSERT_THAT(rig->Backward(dy, &gpu_dx), IsOk());
  std::vector<float> gpu_value, gpu_grad;
  for (Parameter* p : params) {
    ASSERT_OK_AND_ASSIGN(Tensor v, rig->Value(*p));
    ASSERT_OK_AND_ASSIGN(Tensor g, rig->Grad(*p));
    gpu_value.push_back(v[0]);
    gpu_grad.push_back(g[0]);
  }
  // Without dx the parameter gradients are still written (as on the CPU).
  for (Parameter* p : params) ASSERT_THAT(rig->ZeroGrad(*p), IsOk());
  ASSERT_THAT(rig->Backward(dy, nullptr), IsOk());
  for (size_t k = 0; k < params.size(); ++k) {
    ASSERT_OK_AND_ASSIGN(Tensor g, rig->Grad(*params[k]));
    EXPECT_EQ(g[0], gpu_grad[k]) << params[k]->name << " without dx";
  }

  RunContext ctx;
  Tensor y, dx;
  layer->Forward(ctx, x, &y);
  layer->Backward(ctx, dy, &dx);

  for (size_t k = 0; k < params.size(); ++k) {
    ExpectScalarWithin(params[k]->name + " value", params[k]->value[0], gpu_value[k],
                       4 * kU * std::fabs(params[k]->value[0]));
  }
  const std::vector<float> levels = layer->Levels();
  const double gap = LargestGap(levels);
  if (spec.method == quant::Method::kQil) {
    // c and d come from a double reduction in another order: they may differ by an ulp, and an
    // element then land on the neighbouring level or cross the interval's end.
    const int64_t flips = CountFlips("y", y, gpu_y, 0.0, gap, AllowedFlips(n));
    auto* qil = dynamic_cast<quant::QilActivationQuantizer*>(layer.get());
    const double c = qil->c().value[0];
    const double d =
        std::max(std::fabs(qil->d().value[0]), quant::QilActivationQuantizer::kMinHalfWidth);
    const double inv_2d = 0.5 / d;
    std::vector<double> dx_tol(static_cast<size_t>(n));
    double sum_gx = 0.0;
    int64_t mask_flips = 0;
    for (int64_t i = 0; i < n; ++i) {
      dx_tol[static_cast<size_t>(i)] = 4 * kU * std::fabs(dx[i]);
      if ((dx[i] == 0.0f) != (gpu_dx[i] == 0.0f) && dy[i] != 0.0f) ++mask_flips;
      sum_gx += std::fabs(dy[i] * (x[i] - c));
    }
    EXPECT_LE(mask_flips, AllowedFlips(n) - flips) << "dx masks";
    // Skip the masked-flip elements in the element-wise check (counted above).
    for (int64_t i = 0; i < n; ++i) {
      if ((dx[i] == 0.0f) != (gpu_dx[i] == 0.0f)) dx_tol[static_cast<size_t>(i)] = 1e30;
    }
    ExpectWithin("dx", dx, gpu_dx, dx_tol);
    // c: an exact sum times 1 / (2d), rounded once per side. d: the CPU sums the float products
    // dy (x - c) in float lanes, (n + 4) u sum |term|. An element whose mask differs moves each by
    // at most |dy| / (2d) (|x - c| ~ d at the interval's ends; twice that allowed).
    const double flip_term = mask_flips * MaxAbs(dy) * inv_2d;
    ExpectScalarWithin("c grad", params[0]->grad[0], gpu_grad[0],
                       4 * kU * std::fabs(params[0]->grad[0]) + flip_term);
    ExpectScalarWithin("d grad", params[1]->grad[0], gpu_grad[1],
                       (n + 4) * kU * sum_gx * inv_2d / d + 2 * flip_term);
  } else {
    // Same scalars, same element-wise arithmetic: identical.
    CountFlips("y", y, gpu_y, 0.0, gap, 0);
    CountFlips("dx", dx, gpu_dx, 0.0, 0.0, 0);
    if (spec.method == quant::Method::kPact) {
      auto* pact = dynamic_cast<quant::PactActivationQuantizer*>(layer.get());
      // An exact sum plus l2 alpha, rounded once per side.
      ExpectScalarWithin("alpha grad", params[0]->grad[0], gpu_grad[0],
                         4 * kU * std::fabs(params[0]->grad[0]));
      // The L2 term is in it: the data term (exact here) plus l2 * alpha.
      ASSERT_NE(spec.pact_l2, 0.0f);
      const float alpha = pact->effective_alpha();
      double data = 0.0;
      for (int64_t i = 0; i < n; ++i) data += x[i] >= alpha ? dy[i] : 0.0;
      const double want = data + static_cast<double>(spec.pact_l2) * pact->alpha().value[0];
      EXPECT_NEAR(gpu_grad[0], want, 4 * kU * std::fabs(want));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Quantizers, GpuActivationQuantizerTest,
                         ::testing::Values("dorefa:bits=2", "dorefa:bits=4",
                                           "pact:bits=2,alpha=2,l2=0.01",
                                           "pact:bits=4,alpha=2,l2=0.01", "qil:bits=2",
                                           "qil:bits=4"),
                         ActivationName);

// ---- Evaluation mode, through CompileLayer ------------------------------------------------------

// QIL activations -> QIL-quantized conv -> PACT, first run in Mode::kEval: QIL initialises its
// intervals from this first input on both sides (the CPU does not look at the mode), and the
// output is the training-mode math.
TEST(GpuQuantLayersTest, EvalModeMatchesTheCpuLayers) {
  QTRAIN_REQUIRE_GPU();
  std::mt19937_64 rng(3);
  Sequential model("net");
  auto* aq = model.Emplace<quant::QilActivationQuantizer>("aq", quant::QilOptions{.bits = 3});
  auto* conv = model.Emplace<quant::QuantizedConv2d>(
      "conv", kConv, rng,
      std::make_unique<quant::QilWeightQuantizer>(quant::QilOptions{.bits = 3}));
  auto* pact = model.Emplace<quant::PactActivationQuantizer>(
      "pact", quant::PactOptions{.bits = 2, .alpha_init = 1.0f, .l2 = 0.0f});
  const Tensor x = nn::testing::RandomTensor(kConvInput, rng, -0.5f, 2.5f);

  ASSERT_OK_AND_ASSIGN(std::unique_ptr<GpuRig> rig,
                       GpuRig::Create(&model, kConvInput, &CompileLayer));
  Tensor gpu_y;
  ASSERT_THAT(rig->Forward(Mode::kEval, x, &gpu_y), IsOk());
  auto& wq = dynamic_cast<quant::QilWeightQuantizer&>(conv->quantizer());
  ASSERT_OK_AND_ASSIGN(Tensor aq_d, rig->Value(aq->d()));
  ASSERT_OK_AND_ASSIGN(Tensor conv_d, rig->Value(wq.d()));

  RunContext ctx;
  ctx.mode = Mode::kEval;
  Tensor y;
  model.Forward(ctx, x, &y);

  EXPECT_NEAR(aq_d[0], aq->d().value[0], 4 * kU * aq->d().value[0]);
  EXPECT_NEAR(conv_d[0], wq.d().value[0], 4 * kU * wq.d().value[0]);
  EXPECT_GT(wq.d().value[0], 0.0f);
  // The output is PACT's: on its codebook; the conv's float noise may move a rare element that
  // sits on a rounding boundary to the neighbouring level.
  const double gap = LargestGap(pact->Levels());
  CountFlips("y", y, gpu_y, 4 * kU * pact->effective_alpha(), gap, AllowedFlips(y.size()));
}

// ---- What CompileQuantLayer leaves and refuses --------------------------------------------------

// A weight quantizer without CUDA kernels.
class HalvingQuantizer : public quant::WeightQuantizer {
 public:
  std::string Describe() const override { return "halving"; }
  int bits() const override { return 8; }
  void Forward(const RunContext&, const Tensor& w, Tensor* wq) override {
    *wq = w;
    for (int64_t i = 0; i < wq->size(); ++i) (*wq)[i] *= 0.5f;
  }
  void Backward(const RunContext&, const Tensor&, const Tensor& dwq, Tensor* dw) override {
    *dw = dwq;
  }
  std::vector<float> Levels() const override { return {}; }
};

// An activation quantizer without CUDA kernels.
class SignQuantizer : public quant::ActivationQuantizer {
 public:
  using quant::ActivationQuantizer::ActivationQuantizer;
  std::string Describe() const override { return "sign"; }
  int bits() const override { return 1; }
  std::vector<float> Levels() const override { return {-1.0f, 1.0f}; }
  void Forward(RunContext&, const Tensor& x, Tensor* y) override { *y = x; }
  void Backward(RunContext&, const Tensor& dy, Tensor* dx) override { *dx = dy; }
};

TEST(GpuQuantLayersTest, PlainLayersAreLeftToCompileLayer) {
  QTRAIN_REQUIRE_GPU();
  std::mt19937_64 rng(1);
  Conv2d conv("conv", kConv, rng);
  Relu relu("relu");
  for (Layer* layer : std::initializer_list<Layer*>{&conv, &relu}) {
    absl::StatusOr<std::unique_ptr<GpuLayer>> twin = CompileQuantLayer(layer, nullptr);
    ASSERT_THAT(twin, IsOk());
    EXPECT_EQ(*twin, nullptr) << layer->name();
  }
}

TEST(GpuQuantLayersTest, UnknownQuantizersAreRefusedByName) {
  QTRAIN_REQUIRE_GPU();
  std::mt19937_64 rng(1);
  quant::QuantizedLinear fc("odd_fc", kLinear, rng, std::make_unique<HalvingQuantizer>());
  EXPECT_THAT(CompileQuantLayer(&fc, nullptr).status(),
              StatusIs(absl::StatusCode::kUnimplemented,
                       ::testing::AllOf(HasSubstr("odd_fc"), HasSubstr("halving"))));
  Sequential model("net");
  model.Emplace<SignQuantizer>("odd_aq");
  EXPECT_THAT(CompileLayer(&model, nullptr).status(),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("odd_aq")));
}

}  // namespace
}  // namespace qtrain::nn::cuda
