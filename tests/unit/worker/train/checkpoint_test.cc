#include "worker/train/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::train {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "c.qtrn").string();
    w_.name = "fc.weight";
    w_.value = nn::Tensor({2, 2}, {1, 2, 3, 4});
    w_.grad = nn::Tensor({2, 2});
    b_.name = "bn.running_mean";
    b_.value = nn::Tensor({2}, {0.5f, -0.5f});
    ckpt_.set_model("mlp");
    ckpt_.set_epoch(3);
    ckpt_.set_step(300);
    std::vector<nn::Tensor> momentum;
    momentum.emplace_back(nn::Shape{2, 2});
    momentum[0].Fill(0.25f);
    CaptureState({&w_}, {&b_}, &momentum, &ckpt_);
  }

  std::string ReadAll() {
    std::ifstream in(path_, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  void WriteAll(const std::string& bytes) {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out << bytes;
  }

  std::filesystem::path dir_;
  std::string path_;
  nn::Parameter w_;
  nn::Buffer b_;
  pb::Checkpoint ckpt_;
};

TEST_F(CheckpointTest, RoundTripRestoresEverything) {
  ASSERT_THAT(WriteCheckpointFile(path_, ckpt_), IsOk());
  EXPECT_FALSE(std::filesystem::exists(path_ + ".tmp." + std::to_string(::getpid())));
  ASSERT_OK_AND_ASSIGN(pb::Checkpoint back, ReadCheckpointFile(path_));
  EXPECT_EQ(back.epoch(), 3);
  EXPECT_EQ(back.step(), 300);
  w_.value.Fill(0);
  b_.value.Fill(0);
  std::vector<nn::Tensor> momentum;
  momentum.emplace_back(nn::Shape{2, 2});
  ASSERT_THAT(RestoreState(back, {&w_}, {&b_}, &momentum), IsOk());
  EXPECT_EQ(w_.value[3], 4.0f);
  EXPECT_EQ(b_.value[1], -0.5f);
  EXPECT_EQ(momentum[0][2], 0.25f);
}

TEST_F(CheckpointTest, MissingFileIsNotFound) {
  EXPECT_THAT(ReadCheckpointFile((dir_ / "none").string()), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(CheckpointTest, BadMagicIsDataLoss) {
  ASSERT_THAT(WriteCheckpointFile(path_, ckpt_), IsOk());
  std::string bytes = ReadAll();
  bytes[0] = 'X';
  WriteAll(bytes);
  EXPECT_THAT(ReadCheckpointFile(path_), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("magic")));
}

TEST_F(CheckpointTest, TruncationIsDataLoss) {
  ASSERT_THAT(WriteCheckpointFile(path_, ckpt_), IsOk());
  std::string bytes = ReadAll();
  WriteAll(bytes.substr(0, bytes.size() - 3));
  EXPECT_THAT(ReadCheckpointFile(path_), StatusIs(absl::StatusCode::kDataLoss));
  WriteAll(bytes.substr(0, 10));
  EXPECT_THAT(ReadCheckpointFile(path_), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("truncated")));
}

TEST_F(CheckpointTest, FlippedBodyByteFailsChecksum) {
  ASSERT_THAT(WriteCheckpointFile(path_, ckpt_), IsOk());
  std::string bytes = ReadAll();
  bytes[bytes.size() - 5] ^= 0x01;
  WriteAll(bytes);
  EXPECT_THAT(ReadCheckpointFile(path_), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("checksum")));
}

TEST_F(CheckpointTest, HugeDeclaredLengthIsRejectedWithoutAllocating) {
  ASSERT_THAT(WriteCheckpointFile(path_, ckpt_), IsOk());
  std::string bytes = ReadAll();
  for (int i = 16; i < 24; ++i) bytes[i] = char(0x7f);
  WriteAll(bytes);
  EXPECT_THAT(ReadCheckpointFile(path_), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("limit")));
}

TEST_F(CheckpointTest, NewerVersionIsFailedPrecondition) {
  ASSERT_THAT(WriteCheckpointFile(path_, ckpt_), IsOk());
  std::string bytes = ReadAll();
  bytes[8] = 9;
  WriteAll(bytes);
  EXPECT_THAT(ReadCheckpointFile(path_),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("format version 9")));
}

TEST_F(CheckpointTest, MismatchedModelChangesNothing) {
  nn::Parameter other;
  other.name = "fc.weight";
  other.value = nn::Tensor({3, 2});
  other.value.Fill(7);
  EXPECT_THAT(RestoreState(ckpt_, {&other}, {&b_}, nullptr),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("fc.weight")));
  EXPECT_EQ(other.value[0], 7.0f);
  nn::Parameter renamed = w_;
  renamed.name = "fc2.weight";
  renamed.value.Fill(7);
  b_.value.Fill(9);
  EXPECT_THAT(RestoreState(ckpt_, {&renamed}, {&b_}, nullptr),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(renamed.value[0], 7.0f);
  EXPECT_EQ(b_.value[0], 9.0f);
}

}  // namespace
}  // namespace qtrain::train
