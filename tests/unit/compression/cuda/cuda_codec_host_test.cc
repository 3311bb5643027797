// Host-side tests of compression/cuda/cuda_codec.h that need no GPU: creation and its errors,
// spec and settings, blob sizes against the CPU codecs' packed blobs, and the argument checks
// that return before anything is enqueued (fake device pointers are never dereferenced there).
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/testing/status_matchers.h"
#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/cuda/cuda_codec.h"
#include "compression/packed_blob.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::compression::cuda {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

// Addresses that are never dereferenced: every call below fails its host-side checks first.
float* FakeFloats(uintptr_t address) { return reinterpret_cast<float*>(address); }
void* FakeBlob(uintptr_t address) { return reinterpret_cast<void*>(address); }

TEST(CudaCodecHostTest, CreatesTheFiveCodecs) {
  const struct {
    const char* spec;
    CodecId id;
    bool fixed;
    bool feedback;
  } cases[] = {
      {"onebit", CodecId::kOneBit, true, true},
      {"onebit:bucket=64,ef=0", CodecId::kOneBit, true, false},
      {"threshold:tau=0.01", CodecId::kThreshold, false, true},
      {"qsgd", CodecId::kQsgd, true, false},
      {"qsgd:levels=4,bucket=128,ef=1", CodecId::kQsgd, true, true},
      {"terngrad", CodecId::kTernGrad, true, false},
      {"terngrad:shared=1", CodecId::kTernGrad, true, false},
      {"fp16", CodecId::kFp16, true, false},
  };
  CodecRegistry registry;
  ASSERT_THAT(RegisterBuiltinCodecs(&registry), IsOk());
  for (const auto& c : cases) {
    ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec(c.spec));
    EXPECT_EQ(codec->id(), c.id) << c.spec;
    EXPECT_EQ(codec->fixed_size(), c.fixed) << c.spec;
    EXPECT_EQ(codec->ErrorFeedbackEnabled(), c.feedback) << c.spec;
    ASSERT_OK_AND_ASSIGN(auto cpu, registry.CreateFromSpec(c.spec));
    EXPECT_EQ(codec->Spec(), cpu->Spec());
    EXPECT_EQ(codec->Config().DebugString(), cpu->Config().DebugString());
    ASSERT_OK_AND_ASSIGN(auto again, CudaCodec::Create(codec->Config()));
    EXPECT_EQ(again->Spec(), codec->Spec());
  }
  ASSERT_OK_AND_ASSIGN(auto shared, CudaCodec::CreateFromSpec("terngrad:shared=1"));
  EXPECT_TRUE(shared->shared_scale());
}

TEST(CudaCodecHostTest, RefusesFp32EliasAndBadSpecs) {
  EXPECT_THAT(CudaCodec::CreateFromSpec("fp32"),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("fp32 needs no codec")));
  EXPECT_THAT(CudaCodec::CreateFromSpec("qsgd:coding=elias"),
              StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("Elias")));
  EXPECT_THAT(CudaCodec::CreateFromSpec("nosuch"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CudaCodec::CreateFromSpec("qsgd:levels=0"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  pb::CodecConfig config;
  config.set_codec(pb::CODEC_ONEBIT);
  config.mutable_qsgd();  // settings of another codec
  EXPECT_THAT(CudaCodec::Create(config), StatusIs(absl::StatusCode::kInvalidArgument));
}

// Fixed-size codecs: MaxBlobBytes is exactly the packed size of the CPU encoding; threshold's is
// an upper bound (one byte per element).
TEST(CudaCodecHostTest, MaxBlobBytesMatchesPackedCpuBlobs) {
  CodecRegistry registry;
  ASSERT_THAT(RegisterBuiltinCodecs(&registry), IsOk());
  std::mt19937 gen(1);
  for (const char* spec : {"onebit", "onebit:bucket=100", "threshold:tau=0.0001", "qsgd",
                           "qsgd:levels=1,bucket=7", "terngrad", "fp16"}) {
    ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec(spec));
    ASSERT_OK_AND_ASSIGN(auto cpu, registry.CreateFromSpec(spec));
    for (const std::vector<int64_t>& shape :
         {std::vector<int64_t>{}, std::vector<int64_t>{1}, std::vector<int64_t>{7},
          std::vector<int64_t>{3, 300}, std::vector<int64_t>{2, 1000, 3},
          std::vector<int64_t>{5000}, std::vector<int64_t>{0}}) {
      uint64_t n = 1;
      for (int64_t d : shape) n *= d;
      if (shape.empty()) n = 4099;
      std::vector<float> x(n);
      std::normal_distribution<float> dist;
      for (auto& v : x) v = dist(gen);
      EncodedTensor t;
      Rng rng(2);
      ASSERT_THAT(cpu->Encode(x, shape, rng, &t), IsOk());
      std::vector<uint8_t> blob;
      ASSERT_THAT(PackBlob(t, &blob), IsOk());
      const uint64_t max = codec->MaxBlobBytes(shape, n);
      EXPECT_EQ(max % 16, 0u);
      if (codec->fixed_size()) {
        EXPECT_EQ(max, blob.size()) << spec << " n=" << n;
      } else {
        EXPECT_GE(max, blob.size()) << spec << " n=" << n;
        EXPECT_EQ(max, ComputeLayout(1, 1, n).total_bytes);
      }
    }
  }
}

TEST(CudaCodecHostTest, EncodeArgumentErrorsEnqueueNothing) {
  ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec("onebit"));
  const uint64_t cap = codec->MaxBlobBytes({}, 100);
  float* grad = FakeFloats(0x10000);
  float* res = FakeFloats(0x20000);
  void* blob = FakeBlob(0x30000);
  const std::vector<int64_t> bad_shape = {3, 3};
  EXPECT_THAT(codec->EncodeWithFeedback(grad, res, 100, bad_shape, 0, blob, cap, nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("shape")));
  EXPECT_THAT(codec->EncodeWithFeedback(grad, res, uint64_t{1} << 31, {}, 0, blob, ~uint64_t{0},
                                        nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("limit")));
  EXPECT_THAT(codec->EncodeWithFeedback(nullptr, res, 100, {}, 0, blob, cap, nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("gradient")));
  EXPECT_THAT(
      codec->EncodeWithFeedback(grad, res, 100, {}, 0, FakeBlob(0x30008), cap, nullptr, nullptr),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("16-byte")));
  EXPECT_THAT(codec->EncodeWithFeedback(grad, res, 100, {}, 0, nullptr, cap, nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(codec->EncodeWithFeedback(grad, res, 100, {}, 0, blob, cap - 16, nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("capacity")));
  EXPECT_THAT(
      codec->EncodeWithFeedback(grad, FakeFloats(0x20002), 100, {}, 0, blob, cap, nullptr, nullptr),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("residual")));
  // Shared-scale terngrad refuses the one-step encode.
  ASSERT_OK_AND_ASSIGN(auto shared, CudaCodec::CreateFromSpec("terngrad:shared=1"));
  EXPECT_THAT(shared->EncodeWithFeedback(grad, res, 100, {}, 0, blob, shared->MaxBlobBytes({}, 100),
                                         nullptr, nullptr),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("PrepareScale")));
  // The shared-scale steps are terngrad's only.
  float* scale = FakeFloats(0x40000);
  EXPECT_THAT(codec->PrepareScale(grad, res, 100, scale, nullptr),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(codec->EncodeWithScale(grad, res, 100, {}, 0, scale, blob, cap, nullptr, nullptr),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(shared->PrepareScale(grad, res, 100, nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(shared->EncodeWithScale(grad, res, 100, {}, 0, nullptr, blob,
                                      shared->MaxBlobBytes({}, 100), nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("scale")));
}

TEST(CudaCodecHostTest, DecodeArgumentErrorsEnqueueNothing) {
  ASSERT_OK_AND_ASSIGN(auto codec, CudaCodec::CreateFromSpec("qsgd"));
  float* out = FakeFloats(0x10000);
  int32_t* error = reinterpret_cast<int32_t*>(0x20000);
  void* blob = FakeBlob(0x30000);
  EXPECT_THAT(codec->DecodeAdd(blob, 40, 100, {}, out, error, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("malformed")));
  EXPECT_THAT(codec->DecodeAdd(blob, 16, 100, {}, out, error, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("malformed")));
  EXPECT_THAT(codec->DecodeAdd(FakeBlob(0x30004), 64, 100, {}, out, error, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("16-byte")));
  EXPECT_THAT(codec->DecodeAdd(blob, 64, 100, {}, out, nullptr, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(codec->DecodeAdd(blob, 64, 100, {}, nullptr, error, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const std::vector<int64_t> bad_shape = {7, 7};
  EXPECT_THAT(codec->DecodeAdd(blob, 64, 100, bad_shape, out, error, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("shape")));
  EXPECT_THAT(codec->DecodeAdd(blob, 64, uint64_t{1} << 40, {}, out, error, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("limit")));
  EXPECT_THAT(CudaCodec::CheckDecodeError(nullptr, "rank 0", nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// The registered codecs without a GPU encoder say so.
TEST(CudaCodecHostTest, EveryBuiltinButFp32HasAGpuCodec) {
  CodecRegistry registry;
  ASSERT_THAT(RegisterBuiltinCodecs(&registry), IsOk());
  for (const std::string& name : registry.Names()) {
    auto codec = CudaCodec::CreateFromSpec(name);
    if (name == "fp32") {
      EXPECT_THAT(codec, StatusIs(absl::StatusCode::kUnimplemented)) << name;
    } else {
      EXPECT_THAT(codec, IsOk()) << name;
    }
  }
  EXPECT_THAT(CudaCodec::CreateFromSpec("qsgd:coding=elias"),
              StatusIs(absl::StatusCode::kUnimplemented));
}

}  // namespace
}  // namespace qtrain::compression::cuda
