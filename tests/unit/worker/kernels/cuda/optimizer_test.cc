#include "worker/kernels/cuda/optimizer.h"

#include <memory>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "tests/unit/worker/kernels/cuda/gpu_test_util.h"
#include "worker/nn/layer.h"
#include "worker/train/optimizer.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::kernels::testing::RandomVector;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::DeviceArray;
using testing::Download;
using testing::ExpectBitsEqual;
using testing::GpuTest;
using testing::Upload;
using testing::UploadInto;
using testing::UploadOne;

const CpuContext kCpu{};

// The documented mapping from an nn::Parameter under train::SgdOptions to an SgdTensor.
SgdTensor Describe(const nn::Parameter& p, const train::SgdOptions& o, float* param,
                   const float* grad, float* momentum) {
  SgdTensor t;
  t.param = param;
  t.grad = grad;
  t.momentum = momentum;
  t.size = p.value.size();
  t.lr_scale = p.lr_scale;
  t.group_lr_scale = p.kind == nn::ParamKind::kQuantizer ? o.quantizer_lr_scale : 1.0f;
  t.weight_decay = p.kind == nn::ParamKind::kWeight ? o.weight_decay : 0.0f;
  return t;
}

struct ParamSpec {
  nn::ParamKind kind;
  float lr_scale;
  int64_t size;
};

// Every kind (decay on kWeight only, the quantizer group scale on kQuantizer, QIL's 0.01
// lr_scale), sizes around a chunk (2^14) and above one grid-stride round (2^20).
std::vector<ParamSpec> Specs() {
  return {{nn::ParamKind::kWeight, 1.0f, 1000},
          {nn::ParamKind::kBias, 1.0f, 3},
          {nn::ParamKind::kNormScale, 1.0f, 16384},
          {nn::ParamKind::kNormShift, 1.0f, 16385},
          {nn::ParamKind::kQuantizer, 0.01f, 1},
          {nn::ParamKind::kQuantizer, 1.0f, 1},
          {nn::ParamKind::kWeight, 1.0f, 300000},
          {nn::ParamKind::kWeight, 1.0f, kThreads * kElementwiseMaxBlocks + 7}};
}

std::vector<train::SgdOptions> AllOptions() {
  train::SgdOptions plain;  // momentum 0.9, decay 5e-4
  train::SgdOptions nesterov;
  nesterov.nesterov = true;
  nesterov.quantizer_lr_scale = 0.1f;
  train::SgdOptions no_momentum;
  no_momentum.momentum = 0.0f;
  no_momentum.weight_decay = 1e-2f;
  return {plain, nesterov, no_momentum};
}

constexpr float kLrs[] = {0.1f, 0.05f, 0.0123f};

class OptimizerGpuTest : public GpuTest {
 protected:
  enum class Form { kSingle, kMultiTensor };

  // Runs three steps on the CPU (train::Sgd) and on the GPU, and compares every parameter and
  // momentum buffer bit for bit.
  void CompareWithCpu(const train::SgdOptions& options, Form form) {
    const std::vector<ParamSpec> specs = Specs();
    std::vector<std::unique_ptr<nn::Parameter>> params;
    std::vector<nn::Parameter*> raw;
    std::vector<DeviceArray<float>> d_param, d_grad, d_momentum;
    for (size_t k = 0; k < specs.size(); ++k) {
      auto p = std::make_unique<nn::Parameter>();
      p->name = "p" + std::to_string(k);
      p->kind = specs[k].kind;
      p->lr_scale = specs[k].lr_scale;
      p->value = nn::Tensor({specs[k].size});
      p->grad = nn::Tensor({specs[k].size});
      const std::vector<float> init = RandomVector(specs[k].size, 100 + k, -1.0f, 1.0f);
      std::copy(init.begin(), init.end(), p->value.data());
      d_param.push_back(Upload(init));
      d_grad.push_back(Upload(std::vector<float>(specs[k].size, 0.0f)));
      d_momentum.push_back(Upload(std::vector<float>(specs[k].size, 0.0f)));
      raw.push_back(p.get());
      params.push_back(std::move(p));
    }
    train::Sgd sgd(raw, options);
    std::vector<SgdTensor> tensors;
    for (size_t k = 0; k < specs.size(); ++k) {
      tensors.push_back(
          Describe(*params[k], options, d_param[k].data(), d_grad[k].data(), d_momentum[k].data()));
    }
    absl::StatusOr<std::vector<SgdChunk>> plan = PlanSgdChunks(tensors);
    ASSERT_TRUE(plan.ok()) << plan.status();
    auto d_tensors = Upload(tensors);
    auto d_chunks = Upload(*plan);
    auto lr = Upload(std::vector<float>{0.0f});
    const SgdStepOptions step_options{options.momentum, options.nesterov};

    for (int step = 0; step < 3; ++step) {
      for (size_t k = 0; k < specs.size(); ++k) {
        const std::vector<float> g = RandomVector(specs[k].size, 1000 * step + k, -2.0f, 2.0f);
        std::copy(g.begin(), g.end(), params[k]->grad.data());
        UploadInto(d_grad[k], g);
      }
      sgd.Step(kCpu, kLrs[step]);
      UploadOne(lr.data(), kLrs[step]);  // the graph-friendly way: the rate lives on the device
      if (form == Form::kSingle) {
        for (const SgdTensor& t : tensors) {
          ASSERT_THAT(SgdStep(ctx_, step_options, lr.data(), t), IsOk());
        }
      } else {
        ASSERT_THAT(SgdStepMultiTensor(ctx_, step_options, lr.data(), d_tensors.data(),
                                       d_chunks.data(), static_cast<int64_t>(plan->size())),
                    IsOk());
      }
      Sync();
    }
    for (size_t k = 0; k < specs.size(); ++k) {
      SCOPED_TRACE(::testing::Message() << "tensor " << k << " size " << specs[k].size);
      const std::span<const float> w = params[k]->value.span();
      const std::span<const float> v = sgd.momentum()[k].span();
      ExpectBitsEqual(std::vector<float>(w.begin(), w.end()), Download(d_param[k]), "param");
      ExpectBitsEqual(std::vector<float>(v.begin(), v.end()), Download(d_momentum[k]),
                      "momentum");
    }
  }
};

TEST_F(OptimizerGpuTest, SingleTensorStepMatchesCpuExactly) {
  for (const train::SgdOptions& o : AllOptions()) {
    SCOPED_TRACE(::testing::Message() << "momentum " << o.momentum << " nesterov " << o.nesterov);
    CompareWithCpu(o, Form::kSingle);
  }
}

TEST_F(OptimizerGpuTest, MultiTensorStepMatchesCpuExactly) {
  for (const train::SgdOptions& o : AllOptions()) {
    SCOPED_TRACE(::testing::Message() << "momentum " << o.momentum << " nesterov " << o.nesterov);
    CompareWithCpu(o, Form::kMultiTensor);
  }
}

TEST_F(OptimizerGpuTest, EmptyPlanLaunchesNothing) {
  auto lr = Upload(std::vector<float>{0.1f});
  EXPECT_THAT(SgdStepMultiTensor(ctx_, SgdStepOptions{}, lr.data(), nullptr, nullptr, 0), IsOk());
  EXPECT_THAT(SgdStep(ctx_, SgdStepOptions{}, lr.data(), SgdTensor{}), IsOk());
  Sync();
}

// ---- Host side ---------------------------------------------------------------------------------

TEST(OptimizerPlanTest, ChunksCoverEveryElementOnceInTensorOrder) {
  float dummy = 0.0f;
  std::vector<SgdTensor> tensors(5);
  const int64_t sizes[] = {10, 0, 16, 17, 1};
  for (int k = 0; k < 5; ++k) {
    tensors[k].param = &dummy;
    tensors[k].grad = &dummy;
    tensors[k].momentum = &dummy;
    tensors[k].size = sizes[k];
  }
  absl::StatusOr<std::vector<SgdChunk>> plan = PlanSgdChunks(tensors, 8);
  ASSERT_TRUE(plan.ok()) << plan.status();
  // 10 -> 8 + 2; 0 -> none; 16 -> 8 + 8; 17 -> 8 + 8 + 1; 1 -> 1.
  ASSERT_EQ(plan->size(), 8u);
  std::vector<std::vector<int>> seen(5);
  for (int k = 0; k < 5; ++k) seen[k].assign(sizes[k], 0);
  int last_tensor = 0;
  for (const SgdChunk& c : *plan) {
    EXPECT_GE(c.tensor, last_tensor);
    last_tensor = c.tensor;
    EXPECT_LT(c.begin, c.end);
    EXPECT_LE(c.end - c.begin, 8);
    for (int64_t i = c.begin; i < c.end; ++i) ++seen[c.tensor][i];
  }
  for (int k = 0; k < 5; ++k) {
    for (int count : seen[k]) EXPECT_EQ(count, 1) << "tensor " << k;
  }
  // The default chunk is one 256-thread block's 64 elements per thread.
  EXPECT_EQ(kSgdChunkElements, 64 * kThreads);
}

TEST(OptimizerPlanTest, BadDescriptorsAndOptionsAreInvalidArgument) {
  float dummy = 0.0f;
  SgdTensor t;
  t.param = &dummy;
  t.grad = &dummy;
  t.momentum = &dummy;
  t.size = -1;
  EXPECT_THAT(PlanSgdChunks(std::vector<SgdTensor>{t}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("negative")));
  t.size = 4;
  t.grad = nullptr;
  EXPECT_THAT(PlanSgdChunks(std::vector<SgdTensor>{t}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("null")));
  t.grad = &dummy;
  EXPECT_THAT(PlanSgdChunks(std::vector<SgdTensor>{t}, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  SgdTensor empty;  // size 0, null pointers: allowed, no chunks
  absl::StatusOr<std::vector<SgdChunk>> plan = PlanSgdChunks(std::vector<SgdTensor>{empty});
  ASSERT_TRUE(plan.ok());
  EXPECT_TRUE(plan->empty());

  // The same rules and words as train::ValidateSgdOptions.
  SgdStepOptions o;
  o.momentum = 1.0f;
  train::SgdOptions cpu;
  cpu.momentum = 1.0f;
  EXPECT_EQ(ValidateSgdStepOptions(o), train::ValidateSgdOptions(cpu));
  o.momentum = 0.0f;
  o.nesterov = true;
  cpu.momentum = 0.0f;
  cpu.nesterov = true;
  EXPECT_EQ(ValidateSgdStepOptions(o), train::ValidateSgdOptions(cpu));
  EXPECT_THAT(ValidateSgdStepOptions(SgdStepOptions{}), IsOk());

  const CudaContext ctx;
  EXPECT_THAT(SgdStep(ctx, o, &dummy, t), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(SgdStep(ctx, SgdStepOptions{}, nullptr, t),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("lr")));
  EXPECT_THAT(SgdStepMultiTensor(ctx, SgdStepOptions{}, &dummy, nullptr, nullptr, 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::kernels::cuda
