#include "worker/data/data_spec.h"

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/data/idx_dataset.h"

namespace qtrain::data {
namespace {

using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

TEST(ParseDataSpecTest, FashionMnistDefaultsToTheInstalledDirectory) {
  ASSERT_OK_AND_ASSIGN(DataSpec spec, ParseDataSpec("fashion-mnist"));
  EXPECT_EQ(spec.source, DataSource::kFashionMnist);
  EXPECT_EQ(spec.dir, kFashionMnistDefaultDir);
  ASSERT_OK_AND_ASSIGN(DataSpec other, ParseDataSpec("fashion-mnist:/data/fm"));
  EXPECT_EQ(other.dir, "/data/fm");
}

TEST(ParseDataSpecTest, IdxAndCifarTakeTheRestVerbatim) {
  ASSERT_OK_AND_ASSIGN(DataSpec idx, ParseDataSpec("idx:/data/mnist"));
  EXPECT_EQ(idx.source, DataSource::kIdx);
  EXPECT_EQ(idx.dir, "/data/mnist");
  ASSERT_OK_AND_ASSIGN(DataSpec cifar, ParseDataSpec("cifar10:/odd:dir,with=chars"));
  EXPECT_EQ(cifar.source, DataSource::kCifar10);
  EXPECT_EQ(cifar.dir, "/odd:dir,with=chars");
}

TEST(ParseDataSpecTest, SyntheticDefaultsAndKeys) {
  ASSERT_OK_AND_ASSIGN(DataSpec plain, ParseDataSpec("synthetic"));
  EXPECT_EQ(plain.source, DataSource::kSynthetic);
  EXPECT_EQ(plain.synthetic.train_size, SyntheticOptions{}.train_size);
  ASSERT_OK_AND_ASSIGN(DataSpec s,
                       ParseDataSpec("synthetic:n=512,test=128,classes=4,shape=3x8x9,seed=7,"
                                     "noise=0.25"));
  EXPECT_EQ(s.synthetic.train_size, 512);
  EXPECT_EQ(s.synthetic.test_size, 128);
  EXPECT_EQ(s.synthetic.num_classes, 4);
  EXPECT_EQ(s.synthetic.channels, 3);
  EXPECT_EQ(s.synthetic.height, 8);
  EXPECT_EQ(s.synthetic.width, 9);
  EXPECT_EQ(s.synthetic.seed, 7u);
  EXPECT_EQ(s.synthetic.noise, 0.25);
  ASSERT_OK_AND_ASSIGN(DataSpec partial, ParseDataSpec("synthetic:classes=3"));
  EXPECT_EQ(partial.synthetic.num_classes, 3);
  EXPECT_EQ(partial.synthetic.height, 28);
}

TEST(ParseDataSpecTest, ToStringRoundTrips) {
  for (const char* text : {"fashion-mnist", "idx:/a/b", "cifar10:/c", "synthetic",
                           "synthetic:n=10,test=0,classes=2,shape=1x2x3,seed=9,noise=0.5"}) {
    ASSERT_OK_AND_ASSIGN(DataSpec spec, ParseDataSpec(text));
    const std::string canonical = DataSpecToString(spec);
    ASSERT_OK_AND_ASSIGN(DataSpec again, ParseDataSpec(canonical));
    EXPECT_EQ(DataSpecToString(again), canonical) << text;
    EXPECT_EQ(again.source, spec.source);
    EXPECT_EQ(again.dir, spec.dir);
  }
}

TEST(ParseDataSpecTest, UnknownFormsListTheValidOnes) {
  for (const char* text : {"", "mnist", "cifar100:/x", "FASHION-MNIST", ":x"}) {
    EXPECT_THAT(ParseDataSpec(text),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("valid forms: fashion-mnist, fashion-mnist:<dir>, idx:<dir>")))
        << text;
  }
}

TEST(ParseDataSpecTest, MissingDirectoryIsInvalidArgument) {
  for (const char* text : {"idx", "idx:", "cifar10", "cifar10:", "fashion-mnist:", "synthetic:"}) {
    EXPECT_THAT(ParseDataSpec(text), StatusIs(absl::StatusCode::kInvalidArgument)) << text;
  }
}

TEST(ParseDataSpecTest, BadSyntheticKeysAndValues) {
  EXPECT_THAT(ParseDataSpec("synthetic:size=3"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("unknown synthetic data spec key 'size'; valid keys: n, test")));
  EXPECT_THAT(ParseDataSpec("synthetic:n=abc"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("n=abc")));
  EXPECT_THAT(ParseDataSpec("synthetic:n"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseDataSpec("synthetic:n=1,n=2"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("given twice")));
  EXPECT_THAT(ParseDataSpec("synthetic:shape=3x32"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("shape=3x32")));
  EXPECT_THAT(ParseDataSpec("synthetic:shape=3x32xq"),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseDataSpec("synthetic:classes=1"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("classes=1")));
  EXPECT_THAT(ParseDataSpec("synthetic:n=-5"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseDataSpec("synthetic:noise=x"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseDataSpec("synthetic:n=1,"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseDataSpec("synthetic:seed=-1"), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::data
