#include "worker/quant/quant_spec.h"

#include <string>
#include <utility>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/quant/qil.h"

namespace qtrain::quant {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

TEST(QuantSpecTest, ParsesWeightSpecs) {
  ASSERT_OK_AND_ASSIGN(QuantSpec s, ParseWeightQuantSpec("sawb:bits=2"));
  EXPECT_EQ(s.method, Method::kSawb);
  EXPECT_EQ(s.bits, 2);
  ASSERT_OK_AND_ASSIGN(s, ParseWeightQuantSpec("dorefa:bits=4"));
  EXPECT_EQ(s.method, Method::kDorefa);
  ASSERT_OK_AND_ASSIGN(s, ParseWeightQuantSpec("qil:bits=3,gamma=0.5"));
  EXPECT_EQ(s.method, Method::kQil);
  EXPECT_EQ(s.qil_gamma, 0.5f);
  ASSERT_OK_AND_ASSIGN(s, ParseWeightQuantSpec("binary"));
  EXPECT_EQ(s.method, Method::kBinary);
  EXPECT_EQ(s.bits, 1);
  ASSERT_OK_AND_ASSIGN(s, ParseWeightQuantSpec("ternary"));
  EXPECT_EQ(s.bits, 2);
  ASSERT_OK_AND_ASSIGN(s, ParseWeightQuantSpec("none"));
  EXPECT_EQ(s.method, Method::kNone);
  ASSERT_OK_AND_ASSIGN(s, ParseWeightQuantSpec("fp32"));
  EXPECT_EQ(s.method, Method::kNone);
}

TEST(QuantSpecTest, ParsesPow2Levels) {
  // bits: the width of a level index, ceil(log2(levels)).
  for (const auto& [levels, bits] : {std::pair{3, 2}, {5, 3}, {7, 3}, {9, 4}}) {
    ASSERT_OK_AND_ASSIGN(QuantSpec s,
                         ParseWeightQuantSpec("pow2:levels=" + std::to_string(levels)));
    EXPECT_EQ(s.method, Method::kPow2);
    EXPECT_EQ(s.pow2_levels, levels);
    EXPECT_EQ(s.bits, bits);
  }
  EXPECT_THAT(ParseWeightQuantSpec("pow2"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("needs levels=L")));
  EXPECT_THAT(ParseWeightQuantSpec("pow2:levels=4"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("3, 5, 7 or 9")));
  EXPECT_THAT(ParseWeightQuantSpec("pow2:bits=2"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown key 'bits'")));
  EXPECT_THAT(ParseActivationQuantSpec("pow2:levels=3"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown method 'pow2'")));
  EXPECT_THAT(MakeActivationQuantizer("aq", QuantSpec{.method = Method::kPow2, .bits = 2,
                                                      .pow2_levels = 3}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("does not quantize")));
  EXPECT_THAT(MakeWeightQuantizer(QuantSpec{.method = Method::kPow2, .bits = 2, .pow2_levels = 4}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("levels 3, 5, 7 or 9")));
}

TEST(QuantSpecTest, ParsesActivationSpecs) {
  ASSERT_OK_AND_ASSIGN(QuantSpec s, ParseActivationQuantSpec("pact:bits=2,alpha=10,l2=0.0002"));
  EXPECT_EQ(s.method, Method::kPact);
  EXPECT_EQ(s.bits, 2);
  EXPECT_EQ(s.pact_alpha, 10.0f);
  EXPECT_FLOAT_EQ(s.pact_l2, 2e-4f);
  ASSERT_OK_AND_ASSIGN(s, ParseActivationQuantSpec("qil:bits=1"));
  EXPECT_EQ(s.method, Method::kQil);
  ASSERT_OK_AND_ASSIGN(s, ParseActivationQuantSpec("dorefa:bits=8"));
  EXPECT_EQ(s.bits, 8);
}

TEST(QuantSpecTest, ToStringRoundTrips) {
  for (const char* spec : {"sawb:bits=2", "dorefa:bits=3", "qil:bits=4", "binary", "ternary",
                           "pow2:levels=7", "none"}) {
    ASSERT_OK_AND_ASSIGN(QuantSpec s, ParseWeightQuantSpec(spec));
    EXPECT_EQ(s.ToString(), spec);
  }
  ASSERT_OK_AND_ASSIGN(QuantSpec s, ParseActivationQuantSpec("pact:bits=2,alpha=6,l2=0.5"));
  EXPECT_EQ(s.ToString(), "pact:bits=2,alpha=6,l2=0.5");
}

TEST(QuantSpecTest, ErrorsNameValidMethodsAndKeys) {
  EXPECT_THAT(ParseWeightQuantSpec("lsq:bits=2"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("unknown method 'lsq'"), HasSubstr("sawb:bits="),
                             HasSubstr("ternary"))));
  EXPECT_THAT(ParseWeightQuantSpec("pact:bits=2"),  // activation-only
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown method 'pact'")));
  EXPECT_THAT(ParseActivationQuantSpec("sawb:bits=2"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("pact:bits=,alpha=,l2=")));
  EXPECT_THAT(ParseActivationQuantSpec("pact:bits=2,beta=3"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("unknown key 'beta' for pact (valid keys: bits, alpha, l2)")));
  EXPECT_THAT(ParseWeightQuantSpec("sawb"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("needs bits=K")));
  EXPECT_THAT(ParseWeightQuantSpec("sawb:bits=9"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("[1, 8]")));
  EXPECT_THAT(ParseWeightQuantSpec("qil:bits=1"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("[2, 8]")));
  EXPECT_THAT(ParseWeightQuantSpec("sawb:bits=two"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseWeightQuantSpec("sawb:bits=2,bits=3"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("given twice")));
  EXPECT_THAT(ParseWeightQuantSpec("sawb:"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseWeightQuantSpec("sawb:bits"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseWeightQuantSpec("binary:bits=2"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseActivationQuantSpec("pact:bits=2,alpha=-1"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("alpha must be > 0")));
  EXPECT_THAT(ParseActivationQuantSpec("pact:bits=2,l2=x"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("l2 must be a number")));
  EXPECT_THAT(ParseActivationQuantSpec(""), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(QuantSpecTest, ParsesCombinedSpec) {
  ASSERT_OK_AND_ASSIGN(LayerQuantSpecs s, ParseQuantSpec("qil:w=3,a=3"));
  EXPECT_EQ(s.weight.method, Method::kQil);
  EXPECT_EQ(s.weight.bits, 3);
  EXPECT_EQ(s.activation.method, Method::kQil);
  EXPECT_EQ(s.activation.bits, 3);
  ASSERT_OK_AND_ASSIGN(s, ParseQuantSpec("dorefa:w=1,a=2"));
  EXPECT_EQ(s.weight.bits, 1);
  EXPECT_EQ(s.activation.bits, 2);
  ASSERT_OK_AND_ASSIGN(s, ParseQuantSpec("none"));
  EXPECT_EQ(s.weight.method, Method::kNone);
  EXPECT_THAT(ParseQuantSpec("qil:w=3"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("needs both")));
  EXPECT_THAT(ParseQuantSpec("qil:w=1,a=3"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("[2, 8]")));
  EXPECT_THAT(ParseQuantSpec("sawb:w=2,a=2"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown method 'sawb'")));
  EXPECT_THAT(ParseQuantSpec("qil:w=3,a=3,x=1"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown key 'x'")));
}

TEST(QuantSpecTest, FactoriesBuildEveryMethod) {
  for (const char* spec : {"dorefa:bits=2", "sawb:bits=3", "qil:bits=3", "binary", "ternary",
                           "pow2:levels=3", "pow2:levels=9"}) {
    ASSERT_OK_AND_ASSIGN(QuantSpec s, ParseWeightQuantSpec(spec));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<WeightQuantizer> q, MakeWeightQuantizer(s));
    ASSERT_NE(q, nullptr) << spec;
    EXPECT_EQ(q->bits(), s.bits) << spec;
  }
  for (const char* spec : {"dorefa:bits=2", "pact:bits=3", "qil:bits=3"}) {
    ASSERT_OK_AND_ASSIGN(QuantSpec s, ParseActivationQuantSpec(spec));
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<ActivationQuantizer> q, MakeActivationQuantizer("aq", s));
    ASSERT_NE(q, nullptr) << spec;
    EXPECT_EQ(q->bits(), s.bits);
    EXPECT_EQ(q->name(), "aq");
  }
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<WeightQuantizer> none, MakeWeightQuantizer(QuantSpec{}));
  EXPECT_EQ(none, nullptr);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<ActivationQuantizer> none_a,
                       MakeActivationQuantizer("aq", QuantSpec{}));
  EXPECT_EQ(none_a, nullptr);
  EXPECT_THAT(MakeWeightQuantizer(QuantSpec{.method = Method::kPact, .bits = 2}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("does not quantize weights")));
  EXPECT_THAT(
      MakeActivationQuantizer("aq", QuantSpec{.method = Method::kSawb, .bits = 2}),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("does not quantize activations")));
  EXPECT_THAT(MakeWeightQuantizer(QuantSpec{.method = Method::kQil, .bits = 1}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(MakeActivationQuantizer("aq", QuantSpec{.method = Method::kPact, .bits = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::quant
