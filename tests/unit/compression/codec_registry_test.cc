#include "compression/codec_registry.h"

#include "common/testing/status_matchers.h"
#include "compression/builtin_codecs.h"
#include "compression/fp32.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::compression {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

class CodecRegistryTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_THAT(RegisterBuiltinCodecs(&registry_), IsOk()); }
  CodecRegistry registry_;
};

TEST_F(CodecRegistryTest, UnknownCodecListsValidNames) {
  EXPECT_THAT(registry_.ParseSpec("zstd:level=3"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("unknown codec 'zstd'"), HasSubstr("fp32"), HasSubstr("fp16"))));
}

TEST_F(CodecRegistryTest, UnknownKeyListsValidKeys) {
  EXPECT_THAT(registry_.ParseSpec("fp16:levels=3"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("no key 'levels'"), HasSubstr("valid keys: ef"))));
}

TEST_F(CodecRegistryTest, MalformedItemsAreErrors) {
  EXPECT_THAT(registry_.ParseSpec("fp16:ef"), StatusIs(absl::StatusCode::kInvalidArgument,
                                                       HasSubstr("expected KEY=VALUE")));
  EXPECT_THAT(registry_.ParseSpec("fp16:ef=1,ef=0"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("twice")));
  EXPECT_THAT(registry_.ParseSpec("fp16:ef=maybe"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a boolean")));
  EXPECT_THAT(registry_.ParseSpec("fp16:"), IsOk());
}

TEST_F(CodecRegistryTest, ErrorFeedbackOverride) {
  ASSERT_OK_AND_ASSIGN(auto config, registry_.ParseSpec("fp16"));
  ASSERT_OK_AND_ASSIGN(auto codec, registry_.Create(config));
  EXPECT_FALSE(ErrorFeedbackEnabled(config, *codec));
  ASSERT_OK_AND_ASSIGN(config, registry_.ParseSpec(" fp16 : ef = 1 "));
  EXPECT_TRUE(ErrorFeedbackEnabled(config, *codec));
}

TEST_F(CodecRegistryTest, DuplicateRegistrationFails) {
  EXPECT_THAT(registry_.Register(Fp32Registration()), StatusIs(absl::StatusCode::kAlreadyExists));
  CodecRegistration empty;
  empty.name = "nothing";
  EXPECT_THAT(registry_.Register(empty), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(CodecRegistryTest, CreateRejectsUnknownId) {
  pb::CodecConfig config;
  config.set_codec(static_cast<pb::CodecId>(99));
  EXPECT_THAT(registry_.Create(config), StatusIs(absl::StatusCode::kInvalidArgument,
                                                 HasSubstr("unknown codec id 99")));
}

TEST(SpecArgsTest, TypedGettersCheckRanges) {
  SpecArgs args("demo", {{"a", "17"}, {"b", "0.5"}, {"c", "x"}, {"big", "99999999999"}});
  EXPECT_EQ(*args.GetUint("a", 1, 0, 100), 17u);
  EXPECT_EQ(*args.GetUint("missing", 5, 0, 100), 5u);
  EXPECT_THAT(args.GetUint("a", 1, 0, 10), StatusIs(absl::StatusCode::kInvalidArgument,
                                                    HasSubstr("demo: a=17 is not an integer in [0, 10]")));
  EXPECT_THAT(args.GetUint("big", 1, 0, 100), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_FLOAT_EQ(*args.GetFloat("b", 0, 0, 1), 0.5f);
  EXPECT_THAT(args.GetFloat("c", 0, 0, 1), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(*args.GetChoice("c", 0, {"y", "x"}), 1);
  EXPECT_THAT(args.GetChoice("c", 0, {"p", "q"}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not one of: p, q")));
}

}  // namespace
}  // namespace qtrain::compression
