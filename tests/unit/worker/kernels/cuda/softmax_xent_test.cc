#include "worker/kernels/cuda/softmax_xent.h"

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/kernels/cpu/kernel_test_util.h"
#include "tests/unit/worker/kernels/cuda/gpu_test_util.h"
#include "worker/kernels/cpu/softmax_xent.h"

namespace qtrain::kernels::cuda {
namespace {

using ::qtrain::kernels::testing::RandomVector;
using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using testing::Download;
using testing::ExpectBitsEqual;
using testing::GpuTest;
using testing::Poisoned;
using testing::Upload;

const CpuContext kCpu{};

std::vector<int32_t> RandomLabels(int64_t batch, int64_t classes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(classes - 1));
  std::vector<int32_t> labels(batch);
  for (int32_t& l : labels) l = dist(rng);
  return labels;
}

class SoftmaxXentGpuTest : public GpuTest {
 protected:
  struct GpuResult {
    absl::StatusOr<SoftmaxXentResult> result;
    std::vector<float> dlogits;
    SoftmaxXentDeviceResult raw;
  };

  GpuResult Run(int64_t batch, int64_t classes, const std::vector<float>& logits,
                const std::vector<int32_t>& labels, bool want_grad) {
    auto dz = Upload(logits);
    auto dl = Upload(labels);
    auto grad = Poisoned(want_grad ? logits.size() : 0);
    auto result = Upload(std::vector<SoftmaxXentDeviceResult>(1));
    auto ws = Workspace(SoftmaxXentWorkspaceBytes(batch));
    EXPECT_THAT(cuda::SoftmaxCrossEntropy(ctx_, batch, classes, dz.data(), dl.data(),
                                          want_grad ? grad.data() : nullptr, result.data(),
                                          ws.data()),
                IsOk());
    GpuResult r{FetchSoftmaxXentResult(ctx_, result.data(), classes), Download(grad),
                Download(result)[0]};
    return r;
  }
};

TEST_F(SoftmaxXentGpuTest, LossGradientAndAccuracyMatchCpu) {
  struct Case {
    int64_t batch, classes;
  };
  // A single logit, CIFAR-like rows, rows wider than a warp (1000 classes), odd shapes, and more
  // rows than one grid-stride round of warps (4096 blocks x 8 rows = 32768).
  for (const Case& c : {Case{1, 1}, Case{3, 10}, Case{128, 10}, Case{64, 1000}, Case{1000, 37},
                        Case{40000, 3}}) {
    for (bool want_grad : {true, false}) {
      SCOPED_TRACE(::testing::Message() << c.batch << "x" << c.classes << (want_grad ? "" : " eval"));
      std::vector<float> logits = RandomVector(c.batch * c.classes, 81, -4.0f, 4.0f);
      // A coarse grid in every other row: exact ties for the first-arg-max rule.
      for (int64_t i = 0; i < c.batch; i += 2) {
        for (int64_t j = 0; j < c.classes; ++j) {
          float& v = logits[i * c.classes + j];
          v = std::round(v / 2.0f) * 2.0f;
        }
      }
      const std::vector<int32_t> labels = RandomLabels(c.batch, c.classes, 82);
      std::vector<float> want_grad_values(want_grad ? c.batch * c.classes : 0);
      absl::StatusOr<SoftmaxXentResult> want =
          kernels::SoftmaxCrossEntropy(kCpu, c.batch, c.classes, logits.data(), labels.data(),
                                       want_grad ? want_grad_values.data() : nullptr);
      ASSERT_TRUE(want.ok()) << want.status();
      GpuResult got = Run(c.batch, c.classes, logits, labels, want_grad);
      ASSERT_TRUE(got.result.ok()) << got.result.status();
      EXPECT_EQ(got.result->correct, want->correct);
      // Row losses are positive: two double sums of batch terms in different orders differ by
      // <= batch * 2^-53 relative; each row loss log(sum) + max - z_label (terms below ~10) may
      // differ by a few double ulps (exp/log differ from glibc in the last place): 1e-13.
      EXPECT_NEAR(got.result->mean_loss, want->mean_loss,
                  c.batch * std::ldexp(1.0, -52) * std::fabs(want->mean_loss) + 1e-13);
      EXPECT_EQ(got.raw.bad_row, -1);
      if (want_grad) {
        // Both compute each gradient in double and round once; the doubles differ by a few
        // 1e-16 (exp's last place and the row sum's order), absolutely, since p and the one-hot
        // are O(1): so |diff| <= 1 float ulp of the result plus ~1e-15 / batch.
        const double scale = 1.0 / static_cast<double>(c.batch);
        int64_t bad = 0;
        for (size_t i = 0; i < want_grad_values.size() && bad < 5; ++i) {
          const double tol = testing::FloatUlp(want_grad_values[i]) + 1e-14 * scale;
          if (!(std::fabs(got.dlogits[i] - want_grad_values[i]) <= tol)) {
            ++bad;
            ADD_FAILURE() << "dlogits[" << i << "]: cpu " << want_grad_values[i] << " gpu "
                          << got.dlogits[i];
          }
        }
      }
    }
  }
}

TEST_F(SoftmaxXentGpuTest, NanLogitsFollowTheCpuArgmaxRule) {
  const int64_t classes = 40;  // wider than a warp, so the NaN rule crosses lanes
  std::vector<float> logits = RandomVector(4 * classes, 83, -1.0f, 1.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  logits[0 * classes + 0] = nan;      // row 0: NaN first -> arg-max 0
  logits[1 * classes + 33] = nan;     // row 1: NaN later -> skipped
  logits[1 * classes + 35] = 5.0f;    //        the real maximum
  logits[2 * classes + 3] = 7.0f;     // row 2: tie between 3 and 39 -> 3
  logits[2 * classes + 39] = 7.0f;
  for (int64_t j = 0; j < classes; ++j) logits[3 * classes + j] = -std::numeric_limits<float>::infinity();
  const std::vector<int32_t> labels = {0, 35, 3, 0};
  absl::StatusOr<SoftmaxXentResult> want =
      kernels::SoftmaxCrossEntropy(kCpu, 4, classes, logits.data(), labels.data(), nullptr);
  ASSERT_TRUE(want.ok());
  GpuResult got = Run(4, classes, logits, labels, /*want_grad=*/false);
  ASSERT_TRUE(got.result.ok()) << got.result.status();
  EXPECT_EQ(got.result->correct, want->correct);
  EXPECT_EQ(got.result->correct, 4);
  EXPECT_TRUE(std::isnan(want->mean_loss));
  EXPECT_TRUE(std::isnan(got.result->mean_loss));
}

TEST_F(SoftmaxXentGpuTest, BadLabelGivesTheCpuStatusAndZeroGradient) {
  const int64_t batch = 50, classes = 10;
  const std::vector<float> logits = RandomVector(batch * classes, 84, -1.0f, 1.0f);
  std::vector<int32_t> labels = RandomLabels(batch, classes, 85);
  labels[17] = 10;  // first bad row
  labels[30] = -2;
  std::vector<float> unused(batch * classes);
  const absl::StatusOr<SoftmaxXentResult> want =
      kernels::SoftmaxCrossEntropy(kCpu, batch, classes, logits.data(), labels.data(),
                                   unused.data());
  ASSERT_FALSE(want.ok());
  GpuResult got = Run(batch, classes, logits, labels, /*want_grad=*/true);
  ASSERT_FALSE(got.result.ok());
  EXPECT_EQ(got.result.status(), want.status());
  EXPECT_EQ(got.raw.bad_row, 17);
  EXPECT_EQ(got.raw.bad_label, 10);
  EXPECT_TRUE(std::isnan(got.raw.mean_loss));
  for (int64_t j = 0; j < classes; ++j) {
    EXPECT_EQ(got.dlogits[17 * classes + j], 0.0f);
    EXPECT_EQ(got.dlogits[30 * classes + j], 0.0f);
  }
  // No sticky state: the next good batch is fine.
  labels[17] = 1;
  labels[30] = 2;
  GpuResult again = Run(batch, classes, logits, labels, /*want_grad=*/true);
  EXPECT_TRUE(again.result.ok()) << again.result.status();
}

TEST_F(SoftmaxXentGpuTest, IsDeterministic) {
  const int64_t batch = 4096, classes = 100;
  const std::vector<float> logits = RandomVector(batch * classes, 86, -3.0f, 3.0f);
  const std::vector<int32_t> labels = RandomLabels(batch, classes, 87);
  GpuResult first = Run(batch, classes, logits, labels, true);
  GpuResult second = Run(batch, classes, logits, labels, true);
  ASSERT_TRUE(first.result.ok());
  ASSERT_TRUE(second.result.ok());
  EXPECT_TRUE(testing::SameBits(first.raw.mean_loss, second.raw.mean_loss));
  EXPECT_EQ(first.raw.correct, second.raw.correct);
  ExpectBitsEqual(first.dlogits, second.dlogits, "dlogits");
}

// ---- Host side ---------------------------------------------------------------------------------

TEST(SoftmaxXentHostTest, DeviceResultConversion) {
  SoftmaxXentDeviceResult ok{1.25, 7, -1, 0, 0};
  absl::StatusOr<SoftmaxXentResult> r = SoftmaxXentResultFromDevice(ok, 10);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->mean_loss, 1.25);
  EXPECT_EQ(r->correct, 7);

  // Same message as the CPU kernel for the same bad batch.
  std::vector<float> logits(3 * 4, 0.0f);
  std::vector<int32_t> labels = {0, 4, 1};
  const absl::StatusOr<SoftmaxXentResult> cpu =
      kernels::SoftmaxCrossEntropy(kCpu, 3, 4, logits.data(), labels.data(), nullptr);
  SoftmaxXentDeviceResult bad{std::numeric_limits<double>::quiet_NaN(), 0, 1, 4, 0};
  EXPECT_EQ(SoftmaxXentResultFromDevice(bad, 4).status(), cpu.status());
}

TEST(SoftmaxXentHostTest, WorkspaceAndArguments) {
  EXPECT_EQ(SoftmaxXentWorkspaceBytes(0), 0u);
  EXPECT_EQ(SoftmaxXentWorkspaceBytes(1), 16u + 16u);
  EXPECT_EQ(SoftmaxXentWorkspaceBytes(5), 48u + 32u);
  const CudaContext ctx;
  float v = 0.0f;
  int32_t label = 0;
  SoftmaxXentDeviceResult result{};
  alignas(16) unsigned char ws[32];
  EXPECT_THAT(cuda::SoftmaxCrossEntropy(ctx, 0, 3, &v, &label, nullptr, &result, ws),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("batch")));
  EXPECT_THAT(cuda::SoftmaxCrossEntropy(ctx, 1, 0, &v, &label, nullptr, &result, ws),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("classes")));
  EXPECT_THAT(cuda::SoftmaxCrossEntropy(ctx, 1, 3, &v, &label, nullptr, nullptr, ws),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("result")));
  EXPECT_THAT(cuda::SoftmaxCrossEntropy(ctx, 1, 3, &v, &label, nullptr, &result, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("workspace")));
  EXPECT_THAT(FetchSoftmaxXentResult(ctx, nullptr, 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::kernels::cuda
