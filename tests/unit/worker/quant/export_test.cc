// Tests of worker/quant/export.h, packed_model.h, packed_format.h and export_command.h: export,
// reload and packed inference agree with the fake-quantized model for every method and model;
// sizes; and every way a packed file can be bad.
#include "worker/quant/export.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/framed_file.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/worker/nn/nn_test_util.h"
#include "worker/kernels/cpu/softmax_xent.h"
#include "worker/kernels/cpu/thread_pool.h"
#include "worker/nn/model.h"
#include "worker/quant/export_command.h"
#include "worker/quant/packed_format.h"
#include "worker/quant/packed_model.h"
#include "worker/train/checkpoint.h"

namespace qtrain::quant {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("qtrain_export_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

struct Case {
  std::string model;
  std::string quant = "none";
  std::string wq = "none";
  std::string aq = "none";
  bool fp_first_last = true;
  bool fpsc = true;
  nn::ShortcutKind shortcut = nn::ShortcutKind::kZeroPad;
  std::string label;  // for the test name
};

Case MakeCase(std::string model, std::string quant, std::string wq, std::string aq,
              std::string label = "") {
  Case c;
  c.model = std::move(model);
  c.quant = std::move(quant);
  c.wq = std::move(wq);
  c.aq = std::move(aq);
  c.label = std::move(label);
  return c;
}

// A model of `c` on 1x8x8 inputs with 5 classes, trained for two SGD steps on random data (so
// batch-norm statistics, PACT alpha and QIL intervals have moved), then settled in eval mode.
struct Trained {
  QuantConfig config;
  ModelDescription description;
  std::unique_ptr<nn::Sequential> model;
};

Trained Train(const Case& c, const nn::Shape& input, int classes, const kernels::CpuContext& cpu) {
  Trained t;
  auto config = MakeQuantConfig(c.quant, c.wq, c.aq, c.fp_first_last, c.fpsc);
  EXPECT_THAT(config, IsOk());
  t.config = *config;
  auto factory = QuantLayerFactory::Create(t.config);
  EXPECT_THAT(factory, IsOk());
  nn::ModelSpec spec{.name = c.model,
                     .input = input,
                     .num_classes = classes,
                     .seed = 3,
                     .resnet_shortcut = c.shortcut,
                     .factory = factory->get()};
  auto model = nn::BuildModel(spec);
  EXPECT_THAT(model, IsOk());
  t.model = *std::move(model);
  t.description = {c.model, input, classes, c.shortcut, t.config, "test"};
  std::mt19937_64 rng(11);
  nn::RunContext ctx;
  ctx.cpu = cpu;
  std::vector<nn::Parameter*> params;
  t.model->CollectParameters(&params);
  constexpr int64_t kBatch = 16;
  nn::Shape batch_shape = {kBatch};
  batch_shape.insert(batch_shape.end(), input.begin(), input.end());
  for (int step = 0; step < 2; ++step) {
    const nn::Tensor x = nn::testing::RandomTensor(batch_shape, rng, -2.0f, 2.0f);
    std::vector<int32_t> labels(kBatch);
    for (int64_t i = 0; i < kBatch; ++i) labels[i] = static_cast<int32_t>(rng() % classes);
    ctx.mode = nn::Mode::kTrain;
    nn::Tensor logits, dlogits;
    t.model->Forward(ctx, x, &logits);
    dlogits.Resize(logits.shape());
    auto r = kernels::SoftmaxCrossEntropy(cpu, kBatch, classes, logits.data(), labels.data(),
                                          dlogits.data());
    EXPECT_THAT(r, IsOk());
    t.model->Backward(ctx, dlogits, nullptr);
    for (nn::Parameter* p : params) {
      for (int64_t i = 0; i < p->value.size(); ++i) p->value[i] -= 0.05f * p->grad[i];
    }
  }
  SettleQuantizers(*t.model, cpu, nn::testing::RandomTensor(batch_shape, rng, -2.0f, 2.0f));
  return t;
}

class ExportTest : public ::testing::TestWithParam<Case> {};

TEST_P(ExportTest, PackedPredictionsEqualFakeQuantized) {
  const Case& c = GetParam();
  kernels::ThreadPool pool(2);
  kernels::CpuContext cpu;
  cpu.pool = &pool;
  const nn::Shape input = {1, 8, 8};
  constexpr int kClasses = 5;
  Trained t = Train(c, input, kClasses, cpu);
  const std::string path = TempPath(c.label + ".qpack");
  ExportStats stats;
  ASSERT_THAT(ExportPackedModel(*t.model, t.description, path, &stats), IsOk());
  EXPECT_GT(stats.packed_layers, 0);
  EXPECT_EQ(stats.file_bytes, static_cast<int64_t>(std::filesystem::file_size(path)));
  EXPECT_LT(stats.max_affine_error, 1e-5);
  auto packed = LoadPackedModel(path);
  ASSERT_THAT(packed, IsOk());
  EXPECT_EQ((*packed)->quant_config(), t.config.ToString());

  // 200 test images in batches of 64 (the last one partial).
  std::mt19937_64 rng(99);
  constexpr int64_t kImages = 200, kBatch = 64;
  nn::RunContext ctx;
  ctx.cpu = cpu;
  ctx.mode = nn::Mode::kEval;
  int64_t differ = 0, far = 0;
  double worst = 0.0;
  for (int64_t b = 0; b < kImages; b += kBatch) {
    const int64_t m = std::min(kBatch, kImages - b);
    const nn::Tensor x = nn::testing::RandomTensor({m, 1, 8, 8}, rng, -2.0f, 2.0f);
    nn::Tensor fake;
    t.model->Forward(ctx, x, &fake);
    std::vector<float> got(static_cast<size_t>(m * kClasses));
    (*packed)->Predict(cpu, x.data(), m, got.data());
    for (int64_t i = 0; i < m; ++i) {
      const float* ref = fake.data() + i * kClasses;
      const float* row = got.data() + i * kClasses;
      differ += std::max_element(ref, ref + kClasses) - ref !=
                std::max_element(row, row + kClasses) - row;
      double scale = 1e-30;
      for (int k = 0; k < kClasses; ++k) scale = std::max(scale, std::fabs(double{ref[k]}));
      double diff = 0.0;
      for (int k = 0; k < kClasses; ++k) {
        diff = std::max(diff, std::fabs(double{row[k]} - ref[k]) / scale);
      }
      worst = std::max(worst, diff);
      if (diff > 1e-4) ++far;
    }
  }
  EXPECT_EQ(differ, 0) << (*packed)->Describe();
  // Each packed layer's output equals the FP32 convolution of the same input to ~1e-6 relative
  // (float summation order); rarely that moves a value across a rounding boundary of the next
  // activation quantizer, and one activation code then differs by one step downstream. In
  // these random 8x8 networks that shows in at most 1% of the images (deep resnet20 only).
  EXPECT_LE(far, kImages / 100) << "images whose logits differ by more than 1e-4 (worst " << worst
                                << ")\n" << (*packed)->Describe();
  EXPECT_LT(worst, 0.5);
}

std::vector<Case> Cases() {
  struct Method {
    std::string label, quant, wq, aq;
  };
  const std::vector<Method> methods = {
      {"dorefa22", "dorefa:w=2,a=2", "none", "none"},
      {"dorefa44", "dorefa:w=4,a=4", "none", "none"},
      {"sawb_pact22", "none", "sawb:bits=2", "pact:bits=2,alpha=3"},
      {"sawb_pact33", "none", "sawb:bits=3", "pact:bits=3,alpha=3"},
      {"qil33", "qil:w=3,a=3", "none", "none"},
      {"binary", "none", "binary", "none"},
      {"ternary", "none", "ternary", "none"},
      {"w1a1", "none", "binary", "pact:bits=1,alpha=1"},
      {"w2a2", "none", "ternary", "dorefa:bits=2"},
      {"w1a2", "none", "sawb:bits=1", "qil:bits=2"},
      // Power-of-two weights: FP32 path (full-precision activations, as L-DNQ results), popcount
      // GEMM (3 levels as 2-bit integers, 2-bit activations), integer GEMM (9 levels as 5-bit).
      {"pow2_3", "none", "pow2:levels=3", "none"},
      {"pow2_3_a2", "none", "pow2:levels=3", "pact:bits=2,alpha=3"},
      {"pow2_9_a4", "none", "pow2:levels=9", "dorefa:bits=4"},
  };
  std::vector<Case> cases;
  for (const std::string model : {"cnn", "mlp", "resnet20"}) {
    for (const Method& m : methods) {
      cases.push_back(MakeCase(model, m.quant, m.wq, m.aq, model + "_" + m.label));
    }
  }
  // Quantized first and last layers (the first reads full-precision images: FP32 path).
  cases.push_back(MakeCase("cnn", "none", "sawb:bits=2", "pact:bits=2,alpha=3",
                           "cnn_all_quantized"));
  cases.back().fp_first_last = false;
  cases.push_back(MakeCase("mlp", "dorefa:w=2,a=2", "none", "none", "mlp_all_quantized"));
  cases.back().fp_first_last = false;
  cases.push_back(MakeCase("cnn", "none", "pow2:levels=5", "none", "cnn_pow2_all_quantized"));
  cases.back().fp_first_last = false;
  // Quantized shortcuts, with projections (quantized 1x1 shortcut convolutions).
  cases.push_back(MakeCase("resnet20", "none", "sawb:bits=2", "pact:bits=2,alpha=3",
                           "resnet20_nofpsc_projection"));
  cases.back().fpsc = false;
  cases.back().shortcut = nn::ShortcutKind::kProjection;
  cases.push_back(MakeCase("resnet20", "qil:w=3,a=3", "none", "none", "resnet20_nofpsc_qil"));
  cases.back().fpsc = false;
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Methods, ExportTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.label; });

TEST(PackedFormatTest, DenseCodesRoundTripAtEveryWidth) {
  std::mt19937_64 rng(5);
  for (int bits = 1; bits <= 8; ++bits) {
    for (int64_t count : {0, 1, 7, 8, 9, 63, 1000}) {
      std::vector<uint8_t> codes(static_cast<size_t>(count));
      for (uint8_t& c : codes) c = static_cast<uint8_t>(rng() % (1u << bits));
      const std::string packed = PackCodesDense(codes, bits);
      EXPECT_EQ(static_cast<int64_t>(packed.size()), (count * bits + 7) / 8);
      std::vector<uint8_t> back(static_cast<size_t>(count), 0xFF);
      ASSERT_TRUE(UnpackCodesDense(packed, count, bits, back.data()));
      EXPECT_EQ(back, codes) << bits << " bits, " << count << " codes";
      if (count > 0) {
        EXPECT_FALSE(UnpackCodesDense(packed.substr(1), count, bits, back.data()));
      }
    }
  }
}

// The real model size at 28x28: 2-bit export is at most 1/12 of FP32.
TEST(ExportSizeTest, TwoBitCnnIsAtMostATwelfthOfFp32) {
  kernels::CpuContext cpu;
  for (const Case& c : {MakeCase("cnn", "none", "sawb:bits=2", "pact:bits=2"),
                        MakeCase("cnn", "dorefa:w=2,a=2", "none", "none"),
                        MakeCase("cnn", "none", "ternary", "none")}) {
    auto config = MakeQuantConfig(c.quant, c.wq, c.aq, true, true);
    ASSERT_THAT(config, IsOk());
    auto factory = QuantLayerFactory::Create(*config);
    ASSERT_THAT(factory, IsOk());
    auto model = nn::BuildModel({.name = "cnn", .input = {1, 28, 28}, .num_classes = 10,
                                 .factory = factory->get()});
    ASSERT_THAT(model, IsOk());
    std::mt19937_64 rng(1);
    SettleQuantizers(**model, cpu, nn::testing::RandomTensor({2, 1, 28, 28}, rng));
    const std::string path = TempPath("size.qpack");
    ExportStats stats;
    ASSERT_THAT(ExportPackedModel(**model, {"cnn", {1, 28, 28}, 10, nn::ShortcutKind::kZeroPad,
                                            *config, ""},
                                  path, &stats),
                IsOk());
    EXPECT_EQ(stats.fp32_bytes, 4 * nn::CountParameters(**model));
    EXPECT_LE(stats.file_bytes * 12, stats.fp32_bytes)
        << config->ToString() << ": " << stats.file_bytes << " bytes vs " << stats.fp32_bytes;
  }
}

// Power-of-two weights go through the low-bit kernels as small integers where their input is a
// quantized activation, and their codes are stored at ceil(log2(levels)) bits.
TEST(ExportPow2Test, RunsOnTheLowbitKernelsAsIntegers) {
  kernels::CpuContext cpu;
  struct Want {
    std::string wq, aq, describe;
    int stored_bits;
  };
  for (const Want& want : {Want{"pow2:levels=3", "pact:bits=2", "lowbit W2A2 popcount", 2},
                           Want{"pow2:levels=5", "pact:bits=4", "lowbit W3A4 integer", 3},
                           Want{"pow2:levels=7", "dorefa:bits=2", "lowbit W4A2 integer", 3},
                           Want{"pow2:levels=9", "dorefa:bits=4", "lowbit W5A4 integer", 4}}) {
    Trained t = Train(MakeCase("cnn", "none", want.wq, want.aq), {1, 8, 8}, 5, cpu);
    const std::string path = TempPath("pow2.qpack");
    ExportStats stats;
    ASSERT_THAT(ExportPackedModel(*t.model, t.description, path, &stats), IsOk());
    EXPECT_EQ(stats.level_table_layers, 0);
    auto file = ReadPackedModelFile(path);
    ASSERT_THAT(file, IsOk());
    int packed = 0;
    for (const pb::PackedLayer& l : file->layers()) {
      if (l.kind() != pb::PackedLayer::PACKED_CONV2D &&
          l.kind() != pb::PackedLayer::PACKED_LINEAR) {
        continue;
      }
      ++packed;
      EXPECT_EQ(l.weight().bits(), want.stored_bits) << want.wq;
      EXPECT_EQ(l.weight().code_values_size(), t.config.weight.pow2_levels);
      EXPECT_EQ(l.weight().levels_size(), 0);
      EXPECT_EQ(static_cast<int64_t>(l.weight().codes().size()),
                DenseCodeBytes(l.weight().rows() * l.weight().cols(), want.stored_bits));
    }
    EXPECT_EQ(packed, stats.packed_layers);
    auto model = LoadPackedModel(path);
    ASSERT_THAT(model, IsOk());
    const std::string describe = (*model)->Describe();
    EXPECT_THAT(describe, HasSubstr(want.describe)) << describe;
    EXPECT_THAT(describe,
                HasSubstr(absl::StrCat("(", t.config.weight.pow2_levels, " integer levels)")));
  }
}

class PackedFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const Case c = MakeCase("cnn", "none", "sawb:bits=2", "pact:bits=2,alpha=3");
    kernels::CpuContext cpu;
    trained_ = Train(c, {1, 8, 8}, 5, cpu);
    path_ = TempPath("file_test.qpack");
    ASSERT_THAT(ExportPackedModel(*trained_.model, trained_.description, path_, nullptr), IsOk());
    std::ifstream in(path_, std::ios::binary);
    bytes_.assign(std::istreambuf_iterator<char>(in), {});
    auto file = ReadPackedModelFile(path_);
    ASSERT_THAT(file, IsOk());
    file_ = *file;
  }

  std::string WriteBytes(const std::string& name, const std::string& bytes) {
    const std::string p = TempPath(name);
    std::ofstream(p, std::ios::binary | std::ios::trunc).write(bytes.data(), bytes.size());
    return p;
  }
  std::string WriteProto(const std::string& name, const pb::PackedModel& m) {
    const std::string p = TempPath(name);
    EXPECT_THAT(WritePackedModelFile(p, m), IsOk());
    return p;
  }

  Trained trained_;
  std::string path_;
  std::string bytes_;
  pb::PackedModel file_;
};

TEST_F(PackedFileTest, MissingFileIsNotFound) {
  EXPECT_THAT(LoadPackedModel(TempPath("absent.qpack")),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("absent.qpack")));
}

TEST_F(PackedFileTest, CorruptBodyFailsItsChecksum) {
  std::string bad = bytes_;
  bad[bad.size() / 2] ^= 0x10;
  const std::string p = WriteBytes("corrupt.qpack", bad);
  EXPECT_THAT(LoadPackedModel(p),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("corrupt.qpack")));
}

TEST_F(PackedFileTest, TruncatedFileIsDataLoss) {
  for (size_t keep : {size_t{0}, size_t{5}, ::qtrain::kFramedHeaderBytes, bytes_.size() - 1}) {
    const std::string p = WriteBytes("truncated.qpack", bytes_.substr(0, keep));
    EXPECT_THAT(LoadPackedModel(p),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr("truncated.qpack")))
        << keep << " bytes";
  }
}

TEST_F(PackedFileTest, WrongMagicIsDataLoss) {
  std::string bad = bytes_;
  bad.replace(0, 8, "QTRNCKPT");  // a checkpoint is not a packed model
  EXPECT_THAT(LoadPackedModel(WriteBytes("magic.qpack", bad)),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("QTRNPACK")));
}

TEST_F(PackedFileTest, NewerVersionIsFailedPrecondition) {
  std::string bad = bytes_;
  bad[8] = 3;
  EXPECT_THAT(LoadPackedModel(WriteBytes("version.qpack", bad)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("version 3")));
}

TEST_F(PackedFileTest, InconsistentLayerIsDataLoss) {
  pb::PackedModel m = file_;
  for (pb::PackedLayer& l : *m.mutable_layers()) {
    if (l.kind() == pb::PackedLayer::PACKED_CONV2D) {
      l.mutable_weight()->mutable_codes()->pop_back();
      break;
    }
  }
  EXPECT_THAT(LoadPackedModel(WriteProto("short_codes.qpack", m)),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("bytes of codes")));

  m = file_;
  for (pb::PackedLayer& l : *m.mutable_layers()) {
    if (l.kind() == pb::PackedLayer::ACTIVATION_QUANTIZER) {
      l.mutable_activation()->set_scale(l.activation().scale() * 2);
      break;
    }
  }
  EXPECT_THAT(LoadPackedModel(WriteProto("codebook.qpack", m)),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("codebook")));
}

TEST(PackedPow2FileTest, BadCodeValuesAreDataLoss) {
  kernels::CpuContext cpu;
  Trained t =
      Train(MakeCase("cnn", "none", "pow2:levels=5", "pact:bits=2,alpha=3"), {1, 8, 8}, 5, cpu);
  const std::string path = TempPath("pow2_file.qpack");
  ASSERT_THAT(ExportPackedModel(*t.model, t.description, path, nullptr), IsOk());
  auto file = ReadPackedModelFile(path);
  ASSERT_THAT(file, IsOk());
  auto edit = [&](auto change) {
    pb::PackedModel m = *file;
    for (pb::PackedLayer& l : *m.mutable_layers()) {
      if (l.kind() == pb::PackedLayer::PACKED_CONV2D) {
        change(l.mutable_weight());
        break;
      }
    }
    const std::string p = TempPath("pow2_bad.qpack");
    EXPECT_THAT(WritePackedModelFile(p, m), IsOk());
    return LoadPackedModel(p).status();
  };
  // Four values for 3-bit codes: index 4 (the level +2) points past them.
  EXPECT_THAT(edit([](pb::PackedWeight* w) { w->mutable_code_values()->RemoveLast(); }),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("beyond its 4 code values")));
  EXPECT_THAT(edit([](pb::PackedWeight* w) {
                for (int j = 0; j < 4; ++j) w->add_code_values(0);
              }),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("9 code values for 3-bit codes")));
  EXPECT_THAT(edit([](pb::PackedWeight* w) { w->set_code_values(0, -300); }),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("at most 256")));
  EXPECT_THAT(edit([](pb::PackedWeight* w) {
                for (int j = 0; j < 8; ++j) w->add_levels(0.0f);
              }),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("both a level table and code")));
}

TEST_F(PackedFileTest, ConfigThatDoesNotMatchTheLayersIsInvalid) {
  // Another bit width: the rebuilt model's quantizers disagree with the stored weights.
  pb::PackedModel m = file_;
  m.set_weight_spec("sawb:bits=3");
  auto config = MakeQuantConfig("", "sawb:bits=3", m.activation_spec(), true, true);
  ASSERT_THAT(config, IsOk());
  m.set_quant_config(config->ToString());
  EXPECT_THAT(LoadPackedModel(WriteProto("bits.qpack", m)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("3-bit")));

  // A config string that its own specs do not give.
  m = file_;
  m.set_quant_config("w=dorefa:bits=2;a=none;first_last=fp;fpsc=on");
  EXPECT_THAT(LoadPackedModel(WriteProto("string.qpack", m)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("does not match")));

  // Another model: its layers differ.
  m = file_;
  m.set_model("mlp");
  EXPECT_THAT(LoadPackedModel(WriteProto("model.qpack", m)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer")));

  // Activations full precision: the layers' kinds differ.
  m = file_;
  m.set_activation_spec("none");
  config = MakeQuantConfig("", m.weight_spec(), "none", true, true);
  m.set_quant_config(config->ToString());
  EXPECT_THAT(LoadPackedModel(WriteProto("aq.qpack", m)),
              StatusIs(absl::StatusCode::kInvalidArgument));

  // A hostile header.
  m = file_;
  m.clear_input_shape();
  for (int64_t d : {1, 1 << 20, 1 << 20}) m.add_input_shape(d);
  EXPECT_THAT(LoadPackedModel(WriteProto("huge.qpack", m)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("input shape")));
}

TEST_F(PackedFileTest, ExportBeforeAnyForwardIsFailedPrecondition) {
  auto config = MakeQuantConfig("", "sawb:bits=2", "pact:bits=2", true, true);
  auto factory = QuantLayerFactory::Create(*config);
  auto model = nn::BuildModel({.name = "mlp", .input = {1, 4, 4}, .num_classes = 3,
                               .factory = factory->get()});
  ASSERT_THAT(model, IsOk());
  EXPECT_THAT(ExportPackedModel(**model, {"mlp", {1, 4, 4}, 3, nn::ShortcutKind::kZeroPad,
                                          *config, ""},
                                TempPath("unsettled.qpack"), nullptr),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("fc2")));
}

// The CLI entry points end to end on a synthetic data set and a checkpoint.
TEST(ExportCommandTest, ExportThenEvalAgree) {
  const std::string dir = TempPath("ckpt");
  std::filesystem::create_directories(dir);
  ModelSource source;
  source.model = "cnn";
  source.data = "synthetic:n=64,test=100,classes=4,shape=1x8x8,seed=3";
  source.wq = "sawb:bits=2";
  source.aq = "pact:bits=2,alpha=3";
  source.threads = 2;
  auto config = MakeQuantConfig("", source.wq, source.aq, true, true);
  ASSERT_THAT(config, IsOk());
  {
    kernels::CpuContext cpu;
    Trained t = Train(MakeCase("cnn", "none", source.wq, source.aq), {1, 8, 8}, 4, cpu);
    pb::Checkpoint ckpt;
    ckpt.set_model("cnn");
    for (int64_t d : {1, 8, 8}) ckpt.add_input_shape(d);
    ckpt.set_num_classes(4);
    ckpt.set_settings("model=cnn quant=" + config->ToString());
    std::vector<nn::Parameter*> params;
    t.model->CollectParameters(&params);
    std::vector<nn::Buffer*> buffers;
    t.model->CollectBuffers(&buffers);
    train::CaptureState(params, buffers, nullptr, &ckpt);
    ASSERT_THAT(train::WriteCheckpointFile(dir + "/" + kCheckpointFileName, ckpt), IsOk());
  }
  ExportCommandOptions export_options;
  export_options.source = source;
  export_options.checkpoint_dir = dir;
  auto stats = RunExport(export_options);
  ASSERT_THAT(stats, IsOk());
  EXPECT_GT(stats->file_bytes, 0);

  EvalCommandOptions eval;
  eval.source = source;
  eval.checkpoint_dir = dir;
  eval.packed = dir + "/model.qpack";
  eval.batch_size = 32;
  auto report = RunEval(eval);
  ASSERT_THAT(report, IsOk());
  EXPECT_EQ(report->images, 100);
  EXPECT_TRUE(report->has_fake && report->has_packed);
  EXPECT_EQ(report->differing_predictions, 0);
  EXPECT_EQ(report->packed_accuracy, report->fake_accuracy);
  EXPECT_LT(report->max_relative_logit_diff, 1e-4);
  EXPECT_THAT(RunEvalCommand(eval), IsOk());
  EXPECT_THAT(RunExportCommand(export_options), IsOk());

  // Flags that do not match the checkpoint or the packed file.
  EvalCommandOptions other = eval;
  other.source.aq = "pact:bits=3,alpha=3";
  EXPECT_THAT(RunEval(other), StatusIs(absl::StatusCode::kFailedPrecondition,
                                       HasSubstr("was trained with")));
  other.checkpoint_dir.clear();
  EXPECT_THAT(RunEval(other), StatusIs(absl::StatusCode::kInvalidArgument,
                                       HasSubstr("the flags give")));
  EvalCommandOptions neither;
  neither.source = source;
  EXPECT_THAT(RunEval(neither),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace qtrain::quant
