// NcclCommunicator on real GPUs: W ranks as W threads of this process, one CUDA device each (NCCL
// does not allow two ranks of one communicator on one device), W = the visible devices, at most 4.
// With one GPU every case runs at W = 1 (the algorithms still encode, exchange and decode); cases
// that need a peer (timeouts) skip below 2 GPUs; without a GPU everything skips.
//
// Expectations come from the host: the test captures every blob a rank sends (the payload hook),
// unpacks it (compression/packed_blob.h) and decodes it with the CPU codec, in rank order, as the
// algorithm does on the device. The CPU and GPU decoders may round a decoded value differently
// in the last bit (FMA contraction, another operation order), so the comparison allows a few
// ulps of the magnitudes involved (kUlpSlack below); the fp32 path and the cross-rank comparison
// are exact.
//
// Every communicator has a short timeout, so a bug fails the test instead of hanging it.
#include "worker/comm/nccl_communicator.h"

#include <cuda_runtime_api.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/cuda/cuda_util.h"
#include "common/testing/cuda_testing.h"
#include "common/testing/status_matchers.h"
#include "compression/codec.h"
#include "compression/packed_blob.h"
#include "compression/rng.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/comm/bucket_codec.h"

namespace qtrain::comm {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::AllOf;
using ::testing::AnyOf;
using ::testing::HasSubstr;

constexpr double kTestTimeoutSeconds = 60.0;
// Relative slack per decoded term: 4 ulps of float (2^-23 each).
constexpr double kUlpSlack = 4.0 * 0x1p-23;

int WorldForTest() { return std::min(cuda::DeviceCount(), 4); }

// Rank r's gradient at `step`: pseudo-random in [-(r+1)/10, (r+1)/10] (ranks differ in scale,
// so TernGrad's local scales differ).
std::vector<float> Input(int rank, int step, size_t n) {
  std::vector<float> g(n);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t bits = compression::Mix32(static_cast<uint32_t>(i) * compression::kRngGolden +
                                             static_cast<uint32_t>(rank) * 7919u +
                                             static_cast<uint32_t>(step) * 104729u);
    g[i] = (compression::Uniform24(bits) * 2.0f - 1.0f) * 0.1f * static_cast<float>(rank + 1);
  }
  return g;
}

// Hands rank 0's NCCL id to the other threads.
class IdBox {
 public:
  absl::Status Exchange(int rank, std::span<uint8_t> id) {
    std::unique_lock<std::mutex> lock(mu_);
    if (rank == 0) {
      id_.assign(id.begin(), id.end());
      ready_ = true;
      cv_.notify_all();
      return absl::OkStatus();
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return ready_; })) {
      return absl::DeadlineExceededError("rank 0 never published the NCCL id");
    }
    std::copy(id_.begin(), id_.end(), id.begin());
    return absl::OkStatus();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool ready_ = false;
  std::vector<uint8_t> id_;
};

// Runs body(comm, rank) on W threads, one communicator per thread and device. `options_for`
// gives each rank's options (hooks differ per rank).
void RunWorld(int w, const std::function<NcclOptions(int rank)>& options_for,
              const std::function<void(NcclCommunicator& comm, int rank)>& body) {
  IdBox box;
  std::vector<std::thread> threads;
  for (int r = 0; r < w; ++r) {
    threads.emplace_back([&, r] {
      ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
      NcclBootstrap bootstrap;
      bootstrap.rank = r;
      bootstrap.world_size = w;
      bootstrap.local_rank = r;
      bootstrap.device = r;
      bootstrap.exchange_id = [&box, r](std::span<uint8_t> id) { return box.Exchange(r, id); };
      auto comm = NcclCommunicator::Create(bootstrap, options_for(r));
      ASSERT_THAT(comm, IsOk()) << "rank " << r;
      body(**comm, r);
    });
  }
  for (auto& t : threads) t.join();
}

NcclOptions Options(const std::string& spec, AllreduceAlgorithm algorithm) {
  NcclOptions options;
  options.codec_spec = spec;
  options.algorithm = algorithm;
  options.timeout_seconds = kTestTimeoutSeconds;
  options.seed = 42;
  return options;
}

// One captured blob.
struct Sent {
  std::string what;
  int slice = -1;
  std::vector<uint8_t> bytes;
};

// Copies the blob to the host (test only: synchronizes the communicator's stream).
Sent Capture(const NcclPayloadInfo& info) {
  auto stream = static_cast<cudaStream_t>(info.cuda_stream);
  uint64_t size = 0;
  EXPECT_EQ(cudaMemcpyAsync(&size, info.d_blob_bytes, 8, cudaMemcpyDeviceToHost, stream),
            cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  EXPECT_GT(size, 0u);
  EXPECT_LE(size, info.capacity);
  Sent sent;
  sent.what = std::string(info.what);
  sent.slice = info.slice;
  sent.bytes.resize(std::min<uint64_t>(size, info.capacity));
  EXPECT_EQ(cudaMemcpyAsync(sent.bytes.data(), info.d_blob, sent.bytes.size(),
                            cudaMemcpyDeviceToHost, stream),
            cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  return sent;
}

// The CPU decode of a captured blob of n elements (1-D).
std::vector<float> DecodeOnHost(const compression::Codec& codec, const Sent& sent, size_t n) {
  absl::StatusOr<compression::EncodedTensor> tensor =
      compression::UnpackBlob(sent.bytes, n, std::span<const int64_t>());
  EXPECT_THAT(tensor, IsOk()) << sent.what << " " << sent.slice;
  std::vector<float> decoded(n, 0.0f);
  if (tensor.ok()) {
    EXPECT_THAT(codec.DecodeAdd(*tensor, decoded), IsOk());
  }
  return decoded;
}

std::vector<float> ScalesOf(const Sent& sent, size_t n) {
  absl::StatusOr<compression::EncodedTensor> tensor =
      compression::UnpackBlob(sent.bytes, n, std::span<const int64_t>());
  return tensor.ok() ? tensor->scales : std::vector<float>();
}

// Checks got[i] against expected[i] within kUlpSlack of magnitude[i] (plus a denormal floor).
void ExpectNear(std::span<const float> got, std::span<const float> expected,
                std::span<const double> magnitude, const std::string& what) {
  ASSERT_EQ(got.size(), expected.size()) << what;
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double bound = kUlpSlack * magnitude[i] + 1e-30;
    if (std::fabs(static_cast<double>(got[i]) - expected[i]) > bound && reported++ < 5) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", expected "
                    << expected[i] << " (bound " << bound << ")";
    }
  }
}

// A loopback port that was free a moment ago (bind port 0, read it, close).
int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  socklen_t length = sizeof(a);
  EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &length), 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

bool BitEqual(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

// ---- Pure host rules -------------------------------------------------------------------------

TEST(AllreduceAlgorithmTest, ParsesNamesAndResolvesAutoLikeTheMpiAdapter) {
  // Host-only, but gated like the rest so that ctest reports this binary as Skipped (not Passed)
  // on a machine where none of its GPU cases ran.
  QTRAIN_REQUIRE_GPU();
  ASSERT_OK_AND_ASSIGN(AllreduceAlgorithm a, ParseAllreduceAlgorithm("auto"));
  EXPECT_EQ(a, AllreduceAlgorithm::kAuto);
  ASSERT_OK_AND_ASSIGN(a, ParseAllreduceAlgorithm("reduce_scatter"));
  EXPECT_EQ(a, AllreduceAlgorithm::kReduceScatter);
  EXPECT_THAT(ParseAllreduceAlgorithm("ring"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("allgather")));
  EXPECT_EQ(ResolveAllreduceAlgorithm(AllreduceAlgorithm::kAuto, 4, 1 << 24), AllreduceAlgorithm::kAllgather);
  EXPECT_EQ(ResolveAllreduceAlgorithm(AllreduceAlgorithm::kAuto, 8, 1 << 24),
            AllreduceAlgorithm::kReduceScatter);
  EXPECT_EQ(ResolveAllreduceAlgorithm(AllreduceAlgorithm::kAuto, 8, 1000), AllreduceAlgorithm::kAllgather);
  EXPECT_EQ(ResolveAllreduceAlgorithm(AllreduceAlgorithm::kAllgather, 8, 1 << 24),
            AllreduceAlgorithm::kAllgather);
  EXPECT_STREQ(AllreduceAlgorithmName(AllreduceAlgorithm::kReduceScatter), "reduce_scatter");
}

// ---- Start-up --------------------------------------------------------------------------------

TEST(NcclCommunicatorTest, BadSpecOrCodecWithoutCudaVersionFailsBeforeAnyCollective) {
  QTRAIN_REQUIRE_GPU();
  NcclBootstrap single;
  EXPECT_THAT(NcclCommunicator::Create(single, Options("nope", AllreduceAlgorithm::kAuto)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(
      NcclCommunicator::Create(single, Options("qsgd:coding=elias", AllreduceAlgorithm::kAuto)),
      StatusIs(absl::StatusCode::kUnimplemented));
  NcclOptions bad_timeout = Options("fp32", AllreduceAlgorithm::kAuto);
  bad_timeout.timeout_seconds = 0;
  EXPECT_THAT(NcclCommunicator::Create(single, bad_timeout),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("timeout")));
  NcclBootstrap two;  // two ranks need an id exchange
  two.world_size = 2;
  EXPECT_THAT(NcclCommunicator::Create(two, Options("fp32", AllreduceAlgorithm::kAuto)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("exchange_id")));
}

TEST(NcclCommunicatorTest, RendezvousBootstrapStartsTheCommunicator) {
  QTRAIN_REQUIRE_GPU();
  const int w = WorldForTest();
  const int port = FreePort();
  std::vector<std::vector<uint64_t>> gathered(w);
  std::vector<std::thread> threads;
  for (int r = 0; r < w; ++r) {
    threads.emplace_back([&, r] {
      ASSERT_EQ(cudaSetDevice(r), cudaSuccess);
      LaunchEnv env{"127.0.0.1", port, r, w, r};
      RendezvousOptions rv;
      rv.timeout_seconds = 30;
      rv.bind_addr = "127.0.0.1";
      auto comm = NcclCommunicator::Create(BootstrapFromLaunchEnv(env, rv),
                                           Options("fp32", AllreduceAlgorithm::kAuto));
      ASSERT_THAT(comm, IsOk()) << "rank " << r;
      EXPECT_EQ((*comm)->device(), r);
      EXPECT_THAT((*comm)->Describe(), HasSubstr(absl::StrCat("rank ", r, " of ", w)));
      EXPECT_THAT((*comm)->Barrier(), IsOk());
      auto all = (*comm)->AllGatherU64(1000 + r);
      ASSERT_THAT(all, IsOk());
      gathered[r] = *all;
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < w; ++r) {
    ASSERT_EQ(gathered[r].size(), static_cast<size_t>(w)) << "rank " << r;
    for (int k = 0; k < w; ++k) EXPECT_EQ(gathered[r][k], 1000u + k);
  }
}

// ---- Small collectives -----------------------------------------------------------------------

TEST(NcclCommunicatorTest, BroadcastAllReduceSumAllGatherAndBarrier) {
  QTRAIN_REQUIRE_GPU();
  const int w = WorldForTest();
  const int root = w - 1;
  RunWorld(
      w, [](int) { return Options("fp32", AllreduceAlgorithm::kAuto); },
      [&](NcclCommunicator& comm, int r) {
        std::vector<float> data(1001, -1.0f);
        if (r == root) {
          for (size_t i = 0; i < data.size(); ++i) data[i] = 0.5f * static_cast<float>(i);
        }
        ASSERT_THAT(comm.Broadcast(data, root), IsOk());
        for (size_t i = 0; i < data.size(); ++i) {
          ASSERT_EQ(data[i], 0.5f * static_cast<float>(i)) << "rank " << r << " i " << i;
        }
        std::vector<double> sums = {1.0 * r, 0.25, 1e10 + r};
        ASSERT_THAT(comm.AllReduceSum(sums), IsOk());
        EXPECT_EQ(sums[0], w * (w - 1) / 2.0);
        EXPECT_EQ(sums[1], 0.25 * w);
        EXPECT_EQ(sums[2], 1e10 * w + w * (w - 1) / 2.0);
        auto all = comm.AllGatherU64(0xABCD0000u + r);
        ASSERT_THAT(all, IsOk());
        for (int k = 0; k < w; ++k) EXPECT_EQ((*all)[k], 0xABCD0000u + k);
        EXPECT_THAT(comm.Barrier(), IsOk());
        EXPECT_THAT(comm.Broadcast(data, w), StatusIs(absl::StatusCode::kInvalidArgument));
        EXPECT_THAT(comm.AllReduceMean("", data, nullptr),
                    StatusIs(absl::StatusCode::kInvalidArgument));
        EXPECT_THAT(comm.AllReduceMean("empty", std::span<float>(), nullptr), IsOk());
        EXPECT_TRUE(comm.SupportsDeviceBuffers());
        EXPECT_THAT(comm.ResidualKeys(), ::testing::IsEmpty());
        EXPECT_THAT(comm.SetResidual("k", data), StatusIs(absl::StatusCode::kFailedPrecondition));
      });
}

// ---- fp32 ------------------------------------------------------------------------------------

TEST(NcclCommunicatorTest, Fp32IsTheExactMeanOnEveryRankHostAndDevice) {
  QTRAIN_REQUIRE_GPU();
  const int w = WorldForTest();
  const size_t n = 1000003;  // odd: exercises the division kernel's tail
  // Multiples of 1/4 below 2^6: every partial sum is exact in float, whatever NCCL's order.
  auto value = [](int r, size_t i) {
    return static_cast<float>(static_cast<int>((i * 7 + r * 13) % 64) - 32) * 0.25f;
  };
  std::vector<float> expected(n);
  for (size_t i = 0; i < n; ++i) {
    float sum = 0.0f;
    for (int r = 0; r < w; ++r) sum += value(r, i);
    expected[i] = sum / static_cast<float>(w);
  }
  RunWorld(
      w, [](int) { return Options("fp32", AllreduceAlgorithm::kAuto); },
      [&](NcclCommunicator& comm, int r) {
        std::vector<float> data(n);
        for (size_t i = 0; i < n; ++i) data[i] = value(r, i);
        StepStats stats;
        ASSERT_THAT(comm.AllReduceMean("grads", data, &stats), IsOk());
        EXPECT_TRUE(BitEqual(data, expected)) << "host path, rank " << r;
        EXPECT_EQ(stats.calls, 1);
        EXPECT_EQ(stats.bytes_sent, 4 * n);
        EXPECT_EQ(stats.bytes_received, 4 * n);
        // The host path waits, so its (event-timed) seconds are in; one rank may do no work.
        if (w > 1) {
          EXPECT_GT(stats.communicate_seconds, 0.0);
        }

        // The device path, ordered on a caller stream.
        cudaStream_t caller = nullptr;
        ASSERT_EQ(cudaStreamCreateWithFlags(&caller, cudaStreamNonBlocking), cudaSuccess);
        ASSERT_OK_AND_ASSIGN(auto d, cuda::DeviceArray<float>::Create(n));
        for (size_t i = 0; i < n; ++i) data[i] = value(r, i);
        ASSERT_THAT(d.CopyFromHost(data), IsOk());
        // A pageable cudaMemcpy may return before its DMA lands; `caller` does not wait for the
        // legacy stream.
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        StepStats device_stats;
        ASSERT_THAT(comm.AllReduceMeanDevice("grads", d.data(), n, caller, &device_stats), IsOk());
        std::vector<float> result(n);
        ASSERT_EQ(cudaMemcpyAsync(result.data(), d.data(), 4 * n, cudaMemcpyDeviceToHost, caller),
                  cudaSuccess);
        ASSERT_EQ(cudaStreamSynchronize(caller), cudaSuccess);
        EXPECT_TRUE(BitEqual(result, expected)) << "device path, rank " << r;
        EXPECT_EQ(device_stats.bytes_sent, 4 * n);
        ASSERT_THAT(comm.Synchronize(), IsOk());
        cudaStreamDestroy(caller);
      });
}

// ---- Compressed ------------------------------------------------------------------------------

struct CodecCase {
  std::string spec;
  AllreduceAlgorithm algorithm;
};

std::string CaseName(const ::testing::TestParamInfo<CodecCase>& info) {
  std::string name = absl::StrCat(info.param.spec, "_", AllreduceAlgorithmName(info.param.algorithm));
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

class NcclCompressedTest : public ::testing::TestWithParam<CodecCase> {};

// Allgather: the result is the mean of all ranks' decoded payloads (CPU decode, rank order), on
// every rank bit for bit; error feedback keeps residual = v - decode(own payload); TernGrad's
// payloads all carry the shared (maximum) scale. Two steps, so the second starts from non-zero
// residuals.
TEST_P(NcclCompressedTest, AllgatherIsTheMeanOfTheDecodedPayloads) {
  QTRAIN_REQUIRE_GPU();
  if (GetParam().algorithm != AllreduceAlgorithm::kAllgather) GTEST_SKIP() << "allgather case";
  const int w = WorldForTest();
  const std::string spec = GetParam().spec;
  constexpr int kSteps = 2;
  const size_t n = 50001;
  ASSERT_OK_AND_ASSIGN(auto cpu, BucketCodec::Create(spec, FeedbackChoice::kOn));
  // [step][rank]
  std::vector<std::vector<std::vector<Sent>>> sent(kSteps, std::vector<std::vector<Sent>>(w));
  std::vector<std::vector<std::vector<float>>> results(kSteps,
                                                       std::vector<std::vector<float>>(w));
  std::vector<std::vector<std::vector<float>>> residuals(kSteps,
                                                         std::vector<std::vector<float>>(w));
  RunWorld(
      w,
      [&](int r) {
        NcclOptions options = Options(spec, AllreduceAlgorithm::kAllgather);
        options.error_feedback = FeedbackChoice::kOn;
        options.payload_hook_for_testing = [&sent, r](const NcclPayloadInfo& info) {
          int step = 0;
          while (step + 1 < kSteps && !sent[step][r].empty()) ++step;
          sent[step][r].push_back(Capture(info));
        };
        return options;
      },
      [&](NcclCommunicator& comm, int r) {
        for (int step = 0; step < kSteps; ++step) {
          comm.SetStep(step);
          std::vector<float> data = Input(r, step, n);
          StepStats stats;
          ASSERT_THAT(comm.AllReduceMean("b", data, &stats), IsOk()) << "rank " << r;
          results[step][r] = data;
          EXPECT_EQ(stats.calls, 1);
          EXPECT_GT(stats.bytes_sent, 0u);
          EXPECT_EQ(stats.bytes_received, (w - 1) * stats.bytes_sent);
          EXPECT_GT(stats.encode_seconds + stats.communicate_seconds + stats.decode_seconds, 0.0);
          std::span<const float> residual = comm.Residual("b");
          residuals[step][r].assign(residual.begin(), residual.end());
          EXPECT_THAT(comm.ResidualKeys(), ::testing::ElementsAre("b"));
        }
      });
  for (int step = 0; step < kSteps; ++step) {
    // Expected mean, from the captured payloads.
    std::vector<float> expected(n, 0.0f);
    std::vector<double> magnitude(n, 0.0);
    for (int r = 0; r < w; ++r) {
      ASSERT_EQ(sent[step][r].size(), 1u) << "rank " << r << " sends one blob per bucket";
      EXPECT_EQ(sent[step][r][0].what, "allgather");
      const std::vector<float> decoded = DecodeOnHost(cpu->codec(), sent[step][r][0], n);
      for (size_t i = 0; i < n; ++i) {
        expected[i] += decoded[i];
        magnitude[i] += std::fabs(decoded[i]);
      }
      // Error feedback: residual = (input + old residual) - decoded.
      const std::vector<float> input = Input(r, step, n);
      ASSERT_EQ(residuals[step][r].size(), n);
      std::vector<float> residual_expected(n);
      std::vector<double> bound(n);
      for (size_t i = 0; i < n; ++i) {
        const float old = step == 0 ? 0.0f : residuals[step - 1][r][i];
        const float v = input[i] + old;
        residual_expected[i] = v - decoded[i];
        bound[i] = 2.0 * (std::fabs(v) + std::fabs(decoded[i]));
      }
      ExpectNear(residuals[step][r], residual_expected, bound,
                 absl::StrCat(spec, " residual of rank ", r, " step ", step));
    }
    for (size_t i = 0; i < n; ++i) {
      expected[i] = expected[i] / static_cast<float>(w);
      magnitude[i] = (w + 1) * magnitude[i] / w;
    }
    for (int r = 0; r < w; ++r) {
      ExpectNear(results[step][r], expected, magnitude,
                 absl::StrCat(spec, " allgather result of rank ", r, " step ", step));
      EXPECT_TRUE(BitEqual(results[step][r], results[step][0]))
          << "rank " << r << " differs from rank 0 at step " << step;
    }
    if (cpu->shares_scale()) {
      const std::vector<float> scale0 = ScalesOf(sent[step][0][0], n);
      for (int r = 1; r < w; ++r) {
        EXPECT_EQ(ScalesOf(sent[step][r][0], n), scale0) << "terngrad scales are not shared";
      }
    }
  }
}

// Reduce-scatter (CNTK scheme): slice j of the result is the decode of rank j's re-encoded
// aggregate, on every rank bit for bit; and the aggregate encoded the mean of all ranks' slice-j
// payloads (checked through the aggregator's error feedback: mean = decode(aggregate) + its
// residual, on the first step where the old residual is zero).
TEST_P(NcclCompressedTest, ReduceScatterDecodesTheReencodedMeans) {
  QTRAIN_REQUIRE_GPU();
  if (GetParam().algorithm != AllreduceAlgorithm::kReduceScatter) GTEST_SKIP() << "reduce-scatter";
  const int w = WorldForTest();
  const std::string spec = GetParam().spec;
  const size_t n = 40003;  // not a multiple of W: slices differ in length
  auto begin = [&](int j) { return n * j / w; };
  auto length = [&](int j) { return begin(j + 1) - begin(j); };
  ASSERT_OK_AND_ASSIGN(auto cpu, BucketCodec::Create(spec, FeedbackChoice::kOn));
  std::vector<std::vector<Sent>> sent(w);
  std::vector<std::vector<float>> results(w);
  std::vector<std::vector<float>> agg_residual(w);
  RunWorld(
      w,
      [&](int r) {
        NcclOptions options = Options(spec, AllreduceAlgorithm::kReduceScatter);
        options.error_feedback = FeedbackChoice::kOn;
        options.payload_hook_for_testing = [&sent, r](const NcclPayloadInfo& info) {
          sent[r].push_back(Capture(info));
        };
        return options;
      },
      [&](NcclCommunicator& comm, int r) {
        std::vector<float> data = Input(r, 0, n);
        ASSERT_THAT(comm.AllReduceMeanDevice("b", nullptr, 0, nullptr, nullptr), IsOk());
        ASSERT_THAT(comm.AllReduceMean("b", data, nullptr), IsOk()) << "rank " << r;
        results[r] = data;
        std::span<const float> residual = comm.Residual("b/agg");
        agg_residual[r].assign(residual.begin(), residual.end());
        std::vector<std::string> keys;
        for (int j = 0; j < w; ++j) keys.push_back(absl::StrCat("b/rs", j));
        keys.push_back("b/agg");
        std::sort(keys.begin(), keys.end());
        EXPECT_EQ(comm.ResidualKeys(), keys);
      });
  std::vector<float> expected(n);
  std::vector<double> magnitude(n);
  for (int j = 0; j < w; ++j) {
    const size_t len = length(j);
    // Rank s's slice-j payload, and rank j's aggregate.
    std::vector<float> mean(len, 0.0f);
    std::vector<double> mean_magnitude(len, 0.0);
    for (int s = 0; s < w; ++s) {
      const Sent* slice = nullptr;
      for (const Sent& x : sent[s]) {
        if (x.what == "slice" && x.slice == j) slice = &x;
      }
      ASSERT_NE(slice, nullptr) << "rank " << s << " sent no slice " << j;
      const std::vector<float> decoded = DecodeOnHost(cpu->codec(), *slice, len);
      for (size_t i = 0; i < len; ++i) {
        mean[i] += decoded[i];
        mean_magnitude[i] += std::fabs(decoded[i]);
      }
    }
    for (size_t i = 0; i < len; ++i) mean[i] = mean[i] / static_cast<float>(w);
    const Sent* aggregate = nullptr;
    for (const Sent& x : sent[j]) {
      if (x.what == "aggregate") aggregate = &x;
    }
    ASSERT_NE(aggregate, nullptr) << "rank " << j << " sent no aggregate";
    const std::vector<float> decoded = DecodeOnHost(cpu->codec(), *aggregate, len);
    ASSERT_EQ(agg_residual[j].size(), len);
    std::vector<float> reconstructed(len);
    std::vector<double> bound(len);
    for (size_t i = 0; i < len; ++i) {
      reconstructed[i] = decoded[i] + agg_residual[j][i];
      bound[i] = (w + 2) * (mean_magnitude[i] / w) + 2.0 * (std::fabs(decoded[i]) +
                                                              std::fabs(agg_residual[j][i]));
      expected[begin(j) + i] = decoded[i];
      magnitude[begin(j) + i] = 2.0 * std::fabs(decoded[i]);
    }
    ExpectNear(reconstructed, mean, bound,
               absl::StrCat(spec, ": aggregate of rank ", j, " + its residual vs the mean"));
  }
  for (int r = 0; r < w; ++r) {
    ExpectNear(results[r], expected, magnitude, absl::StrCat(spec, " result of rank ", r));
    EXPECT_TRUE(BitEqual(results[r], results[0])) << "rank " << r << " differs from rank 0";
  }
}

// A corrupt payload from the last rank is INVALID_ARGUMENT naming it, on every rank that decodes
// it, never a crash or a hang; the next bucket works again.
TEST_P(NcclCompressedTest, CorruptPayloadIsReportedNamingItsRank) {
  QTRAIN_REQUIRE_GPU();
  const int w = WorldForTest();
  const int culprit = w - 1;
  std::atomic<bool> corrupt{true};
  RunWorld(
      w,
      [&](int r) {
        NcclOptions options = Options(GetParam().spec, GetParam().algorithm);
        if (r == culprit) {
          options.payload_hook_for_testing = [&corrupt](const NcclPayloadInfo& info) {
            if (!corrupt.load()) return;
            // The blob starts with its magic number (compression/packed_blob.h).
            EXPECT_EQ(cudaMemsetAsync(info.d_blob, 0xA5, 4,
                                      static_cast<cudaStream_t>(info.cuda_stream)),
                      cudaSuccess);
          };
        }
        return options;
      },
      [&](NcclCommunicator& comm, int r) {
        comm.SetStep(3);
        std::vector<float> data = Input(r, 0, 30011);
        EXPECT_THAT(comm.AllReduceMean("bucket", data, nullptr),
                    StatusIs(absl::StatusCode::kInvalidArgument,
                             AllOf(HasSubstr(absl::StrCat("from rank ", culprit)),
                                   HasSubstr("bucket 'bucket'"), HasSubstr("step 3"))))
            << "rank " << r;
        // Everyone has seen the error before anyone gets here; switch corruption off.
        ASSERT_THAT(comm.Barrier(), IsOk());
        if (r == culprit) corrupt = false;
        ASSERT_THAT(comm.Barrier(), IsOk());
        data = Input(r, 1, 30011);
        EXPECT_THAT(comm.AllReduceMean("bucket", data, nullptr), IsOk()) << "rank " << r;
      });
}

INSTANTIATE_TEST_SUITE_P(
    Codecs, NcclCompressedTest,
    ::testing::Values(CodecCase{"onebit", AllreduceAlgorithm::kAllgather},
                      CodecCase{"onebit", AllreduceAlgorithm::kReduceScatter},
                      CodecCase{"terngrad", AllreduceAlgorithm::kAllgather},
                      CodecCase{"terngrad", AllreduceAlgorithm::kReduceScatter},
                      CodecCase{"qsgd:levels=16", AllreduceAlgorithm::kAllgather},
                      CodecCase{"qsgd:levels=16", AllreduceAlgorithm::kReduceScatter},
                      CodecCase{"threshold:tau=0.02", AllreduceAlgorithm::kAllgather},
                      CodecCase{"threshold:tau=0.02", AllreduceAlgorithm::kReduceScatter},
                      CodecCase{"fp16", AllreduceAlgorithm::kAllgather},
                      CodecCase{"fp16", AllreduceAlgorithm::kReduceScatter}),
    CaseName);

// ---- Residuals -------------------------------------------------------------------------------

TEST(NcclCommunicatorTest, ResidualsRoundTripAndSizesAreChecked) {
  QTRAIN_REQUIRE_GPU();
  RunWorld(
      1, [](int) { return Options("onebit", AllreduceAlgorithm::kAllgather); },
      [&](NcclCommunicator& comm, int) {
        std::vector<float> values(777);
        for (size_t i = 0; i < values.size(); ++i) values[i] = 0.001f * static_cast<float>(i);
        ASSERT_THAT(comm.SetResidual("w", values), IsOk());
        std::span<const float> back = comm.Residual("w");
        EXPECT_TRUE(BitEqual(back, values));
        EXPECT_THAT(comm.ResidualKeys(), ::testing::ElementsAre("w"));
        EXPECT_TRUE(comm.Residual("absent").empty());
        std::vector<float> data(776, 0.5f);  // one element fewer than the residual
        EXPECT_THAT(comm.AllReduceMean("w", data, nullptr),
                    StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("residual")));
      });
  RunWorld(
      1,
      [](int) {
        NcclOptions options = Options("qsgd:levels=16", AllreduceAlgorithm::kAllgather);
        options.error_feedback = FeedbackChoice::kOff;
        return options;
      },
      [&](NcclCommunicator& comm, int) {
        std::vector<float> values(8, 1.0f);
        EXPECT_THAT(comm.SetResidual("w", values),
                    StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("error feedback")));
      });
}

// ---- Faults ----------------------------------------------------------------------------------

// Rank 1 never joins: rank 0's host-path call ends with DEADLINE_EXCEEDED naming the bucket, the
// rank and the step, and the communicator refuses further calls.
TEST(NcclCommunicatorTest, MissingPeerTimesOutNamingBucketRankAndStep) {
  QTRAIN_REQUIRE_GPU();
  if (cuda::DeviceCount() < 2) GTEST_SKIP() << "needs 2 GPUs";
  std::atomic<bool> rank0_done{false};
  RunWorld(
      2,
      [](int) {
        NcclOptions options = Options("fp32", AllreduceAlgorithm::kAuto);
        options.timeout_seconds = 3.0;
        return options;
      },
      [&](NcclCommunicator& comm, int r) {
        if (r == 1) {
          while (!rank0_done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
          return;  // destroyed without ever joining
        }
        comm.SetStep(7);
        std::vector<float> data(4096, 1.0f);
        EXPECT_THAT(comm.AllReduceMean("stalled", data, nullptr),
                    StatusIs(absl::StatusCode::kDeadlineExceeded,
                             AllOf(HasSubstr("bucket 'stalled'"), HasSubstr("rank 0 of 2"),
                                   HasSubstr("step 7"))));
        EXPECT_THAT(comm.Barrier(), StatusIs(absl::StatusCode::kFailedPrecondition,
                                             HasSubstr("earlier failure")));
        rank0_done = true;
      });
}

// The same on the device path, where the call returns before the result exists: the watchdog
// aborts NCCL after the timeout, so the caller's stream does not stay blocked, and the next call
// reports the timeout.
TEST(NcclCommunicatorTest, WatchdogEndsAStalledDeviceCall) {
  QTRAIN_REQUIRE_GPU();
  if (cuda::DeviceCount() < 2) GTEST_SKIP() << "needs 2 GPUs";
  std::atomic<bool> rank0_done{false};
  RunWorld(
      2,
      [](int) {
        NcclOptions options = Options("fp32", AllreduceAlgorithm::kAuto);
        options.timeout_seconds = 3.0;
        return options;
      },
      [&](NcclCommunicator& comm, int r) {
        // A first allreduce together, so that NCCL has connected the ranks: the stalled call
        // below then enqueues at once and only its completion waits.
        std::vector<float> warm(4096, 1.0f);
        ASSERT_THAT(comm.AllReduceMean("warm", warm, nullptr), IsOk());
        if (r == 1) {
          while (!rank0_done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
          return;
        }
        comm.SetStep(9);
        cudaStream_t caller = nullptr;
        ASSERT_EQ(cudaStreamCreateWithFlags(&caller, cudaStreamNonBlocking), cudaSuccess);
        ASSERT_OK_AND_ASSIGN(auto d, cuda::DeviceArray<float>::Create(4096));
        ASSERT_THAT(comm.AllReduceMeanDevice("stalled", d.data(), 4096, caller, nullptr), IsOk());
        const auto start = std::chrono::steady_clock::now();
        EXPECT_EQ(cudaStreamSynchronize(caller), cudaSuccess);  // returns once NCCL is aborted
        EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(60));
        EXPECT_THAT(comm.Barrier(), StatusIs(absl::StatusCode::kFailedPrecondition,
                                             AllOf(HasSubstr("timed out"),
                                                   HasSubstr("bucket 'stalled'"),
                                                   HasSubstr("step 9"))));
        cudaStreamDestroy(caller);
        rank0_done = true;
      });
}

}  // namespace
}  // namespace qtrain::comm
