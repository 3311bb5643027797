// allreduce_bench: the full compressed allreduce of NcclCommunicator (encode with error feedback
// + communicate + decode, AllReduceMeanDevice end to end) against the ncclAllReduce fp32
// yardstick, per codec, bucket size and algorithm, on this job's GPUs. Start it with one rank per
// GPU through deploy/launch-local.sh (or torchrun); it needs no MPI. Rank 0 prints the table and
// writes --json.
//
//   bash deploy/launch-local.sh -n 2 -- build/bin/allreduce_bench [--codecs=fp32,onebit,...]
//        [--sizes_mb=16,64,256] [--allreduce=allgather|reduce_scatter|both] [--iters=20]
//        [--warmup=3] [--json=out.json] [--label=nvlink]
//
// Method. Each rank holds a gradient of n = MB * 2^20 / 4 floats, uniform in [-0.1, 0.1] on a
// grid of 2^-10 (so fp32 sums are exact), different per rank. Every iteration restores that
// gradient (an untimed device copy), aligns the ranks (Barrier), records a CUDA event on the
// caller stream, calls AllReduceMeanDevice and records a second event after it (the caller
// stream waits for the result): the time is the GPU time between the two events, which includes
// every host synchronization the algorithm makes. A case reports the median over --iters
// iterations after --warmup untimed ones, taken as the maximum over ranks (the slowest rank
// decides a step). Before timing, the first warm-up result is verified: fp32 against the exact
// mean, compressed codecs for bit-identity across ranks and finite values (what a compressed
// mean should be is the unit tests' business).
//
// Columns: algbw = 4n bytes / time (GB/s of fp32 gradient averaged, nccl-tests' algorithm
// bandwidth), speedup = fp32 time / codec time at the same size in the same run, bytes/rank =
// what this rank put into the collectives (StepStats::bytes_sent) per call.
//
// Codecs: fp32 (ncclAllReduce), onebit (error feedback on by default), terngrad, qsgd
// (qsgd:levels=16, dense), threshold (--threshold_spec: default tau=0.09 with error feedback
// off, i.e. a fixed ~10% density on this input; with feedback on the density would drift with
// the residual over the iterations), fp16.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/cuda/cuda_util.h"
#include "common/status_macros.h"
#include "compression/rng.h"
#include "worker/comm/nccl_communicator.h"
#include "worker/comm/rendezvous.h"

ABSL_FLAG(std::string, codecs, "fp32,onebit,terngrad,qsgd,threshold,fp16",
          "Comma-separated: fp32, onebit, terngrad, qsgd, threshold, fp16 (fp32 always runs: it is "
          "the yardstick).");
ABSL_FLAG(std::string, sizes_mb, "16,64,256", "Bucket sizes in MiB of fp32 gradient.");
ABSL_FLAG(std::string, allreduce, "both", "Compressed algorithm: allgather, reduce_scatter or both.");
ABSL_FLAG(int, iters, 20, "Timed iterations per case.");
ABSL_FLAG(int, warmup, 3, "Untimed iterations per case (the first is verified).");
ABSL_FLAG(std::string, json, "", "Write the results here (rank 0).");
ABSL_FLAG(std::string, label, "", "A name for this run in the table and JSON, e.g. nvlink or socket.");
ABSL_FLAG(std::string, threshold_spec, "threshold:tau=0.09,ef=0", "Spec of the threshold codec.");
ABSL_FLAG(double, timeout, 120.0, "Communicator timeout in seconds.");

namespace qtrain::comm {
namespace {

struct Case {
  std::string codec;  // short name
  std::string spec;
  AllreduceAlgorithm algorithm;
};

struct Result {
  std::string codec;
  std::string spec;
  std::string algorithm;  // "-" for fp32
  int mb = 0;
  uint64_t n = 0;
  double ms_median = 0;
  double ms_mean = 0;
  double ms_min = 0;
  double algbw_gbps = 0;
  double speedup = 0;
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
  bool verified = false;
};

std::string SpecFor(const std::string& codec) {
  if (codec == "qsgd") return "qsgd:levels=16";
  if (codec == "threshold") return absl::GetFlag(FLAGS_threshold_spec);
  return codec;
}

// Rank r's gradient element i: k / 1024 with k in [-102, 102].
float GradientAt(int rank, uint64_t i) {
  const uint32_t bits = compression::Mix32(static_cast<uint32_t>(i) * compression::kRngGolden +
                                           static_cast<uint32_t>(rank) * 0x632BE5ABu +
                                           static_cast<uint32_t>(i >> 32));
  return static_cast<float>(static_cast<int>(bits % 205u) - 102) / 1024.0f;
}

uint64_t HashFloats(const std::vector<float>& v) {
  uint64_t h = 1469598103934665603ull;
  for (float x : v) {
    h ^= std::bit_cast<uint32_t>(x);
    h *= 1099511628211ull;
  }
  return h;
}

// The maximum of `value` over ranks (AllGatherU64 of the bits; non-negative doubles order as
// their bit patterns do).
absl::StatusOr<double> MaxOverRanks(Communicator& comm, double value) {
  ASSIGN_OR_RETURN(std::vector<uint64_t> all, comm.AllGatherU64(std::bit_cast<uint64_t>(value)));
  double best = 0;
  for (uint64_t bits : all) best = std::max(best, std::bit_cast<double>(bits));
  return best;
}

absl::Status Check(cudaError_t error, const char* what) {
  return cuda::CudaStatus(error, what);
}

class Bench {
 public:
  Bench(LaunchEnv env, int device) : env_(std::move(env)), device_(device) {}

  absl::Status Init(uint64_t max_n) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&start_));
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&end_));
    ASSIGN_OR_RETURN(pristine_, cuda::DeviceArray<float>::Create(max_n));
    ASSIGN_OR_RETURN(work_, cuda::DeviceArray<float>::Create(max_n));
    std::vector<float> host(max_n);
    for (uint64_t i = 0; i < max_n; ++i) host[i] = GradientAt(env_.rank, i);
    RETURN_IF_ERROR(pristine_.CopyFromHost(host));
    // A pageable cudaMemcpy may return before its DMA lands, and stream_ does not wait for it.
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    return absl::OkStatus();
  }

  // A communicator for one case (all sizes reuse it: each size has its own bucket key).
  absl::StatusOr<std::unique_ptr<NcclCommunicator>> Connect(const Case& c) {
    NcclOptions options;
    options.codec_spec = c.spec;
    options.algorithm = c.algorithm;
    options.timeout_seconds = absl::GetFlag(FLAGS_timeout);
    options.seed = 1;
    NcclBootstrap bootstrap = BootstrapFromLaunchEnv(env_);
    bootstrap.device = device_;
    return NcclCommunicator::Create(bootstrap, options);
  }

  // Runs one case at one size; fills times (ms) and the stats of one call; verifies the first
  // warm-up result.
  absl::Status RunCase(NcclCommunicator* comm, const Case& c, uint64_t n, Result* result) {
    const std::string key = absl::StrCat("bench/", n);
    const int warmup = std::max(1, absl::GetFlag(FLAGS_warmup));
    const int iters = std::max(1, absl::GetFlag(FLAGS_iters));
    std::vector<double> ms;
    for (int it = 0; it < warmup + iters; ++it) {
      RETURN_IF_ERROR(Check(cudaMemcpyAsync(work_.data(), pristine_.data(), 4 * n,
                                            cudaMemcpyDeviceToDevice, stream_),
                            "restoring the gradient"));
      RETURN_IF_ERROR(Check(cudaStreamSynchronize(stream_), "restoring the gradient"));
      RETURN_IF_ERROR(comm->Barrier());
      StepStats stats;
      RETURN_IF_ERROR(Check(cudaEventRecord(start_, stream_), "start event"));
      RETURN_IF_ERROR(comm->AllReduceMeanDevice(key, work_.data(), n, stream_, &stats));
      RETURN_IF_ERROR(Check(cudaEventRecord(end_, stream_), "end event"));
      RETURN_IF_ERROR(Check(cudaEventSynchronize(end_), "end event"));
      RETURN_IF_ERROR(comm->Synchronize());
      float elapsed = 0;
      RETURN_IF_ERROR(Check(cudaEventElapsedTime(&elapsed, start_, end_), "elapsed time"));
      if (it == 0) {
        result->bytes_sent = stats.bytes_sent;
        result->bytes_received = stats.bytes_received;
        ASSIGN_OR_RETURN(result->verified, Verify(*comm, c, n));
      }
      if (it >= warmup) ms.push_back(elapsed);
    }
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    double median = sorted[sorted.size() / 2];
    if (sorted.size() % 2 == 0) median = 0.5 * (sorted[sorted.size() / 2 - 1] + median);
    double mean = 0;
    for (double x : ms) mean += x;
    mean /= static_cast<double>(ms.size());
    ASSIGN_OR_RETURN(result->ms_median, MaxOverRanks(*comm, median));
    ASSIGN_OR_RETURN(result->ms_mean, MaxOverRanks(*comm, mean));
    ASSIGN_OR_RETURN(result->ms_min, MaxOverRanks(*comm, sorted.front()));
    result->algbw_gbps = 4.0 * static_cast<double>(n) / (result->ms_median * 1e-3) / 1e9;
    return absl::OkStatus();
  }

 private:
  // fp32: exactly the mean of every rank's gradient. Compressed: the same bits on every rank,
  // all finite.
  absl::StatusOr<bool> Verify(NcclCommunicator& comm, const Case& c, uint64_t n) {
    std::vector<float> got(n);
    RETURN_IF_ERROR(Check(cudaMemcpy(got.data(), work_.data(), 4 * n, cudaMemcpyDeviceToHost),
                          "reading the result"));
    bool ok = true;
    if (c.codec == "fp32") {
      const float w = static_cast<float>(env_.world_size);
      for (uint64_t i = 0; i < n && ok; ++i) {
        float sum = 0;
        for (int r = 0; r < env_.world_size; ++r) sum += GradientAt(r, i);
        if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(sum / w)) {
          std::fprintf(stderr, "rank %d: fp32 element %llu is %.9g, expected %.9g\n", env_.rank,
                       static_cast<unsigned long long>(i), got[i], sum / w);
          ok = false;
        }
      }
    } else {
      for (uint64_t i = 0; i < n && ok; ++i) {
        if (!std::isfinite(got[i])) {
          std::fprintf(stderr, "rank %d: %s element %llu is %g\n", env_.rank, c.spec.c_str(),
                       static_cast<unsigned long long>(i), got[i]);
          ok = false;
        }
      }
    }
    ASSIGN_OR_RETURN(std::vector<uint64_t> hashes, comm.AllGatherU64(HashFloats(got)));
    for (int r = 0; r < env_.world_size; ++r) {
      if (hashes[r] != hashes[0]) {
        std::fprintf(stderr, "rank %d: the %s result of rank %d differs from rank 0's\n",
                     env_.rank, c.spec.c_str(), r);
        ok = false;
      }
    }
    ASSIGN_OR_RETURN(double failures, comm.AllReduceSumScalar(ok ? 0.0 : 1.0));
    return failures == 0.0;
  }

  LaunchEnv env_;
  int device_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t end_ = nullptr;
  cuda::DeviceArray<float> pristine_;
  cuda::DeviceArray<float> work_;
};

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Times NcclCommunicator's compressed allreduce against ncclAllReduce fp32. Run one rank "
      "per GPU: bash deploy/launch-local.sh -n <GPUs> -- allreduce_bench [flags]");
  absl::ParseCommandLine(argc, argv);

  // The launcher's variables; a plain start is one rank.
  LaunchEnv env{"127.0.0.1", 29500, 0, 1, 0};
  if (std::getenv("WORLD_SIZE") != nullptr || std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr) {
    absl::StatusOr<LaunchEnv> from_env = LaunchEnvFromEnvironment();
    if (!from_env.ok()) {
      std::fprintf(stderr, "allreduce_bench: %s\n", from_env.status().ToString().c_str());
      return 2;
    }
    env = *from_env;
  }
  const int devices = cuda::DeviceCount();
  if (devices == 0) {
    std::fprintf(stderr, "allreduce_bench: no CUDA device\n");
    return 1;
  }
  const int device = devices == 1 ? 0 : env.local_rank;
  if (device >= devices) {
    std::fprintf(stderr, "allreduce_bench: LOCAL_RANK %d but only %d CUDA devices\n",
                 env.local_rank, devices);
    return 2;
  }

  std::vector<int> sizes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sizes_mb), ',', absl::SkipEmpty())) {
    int mb = 0;
    if (!absl::SimpleAtoi(s, &mb) || mb <= 0) {
      std::fprintf(stderr, "allreduce_bench: bad --sizes_mb entry '%s'\n", std::string(s).c_str());
      return 2;
    }
    sizes.push_back(mb);
  }
  std::vector<AllreduceAlgorithm> algorithms;
  const std::string which = absl::GetFlag(FLAGS_allreduce);
  if (which == "both") {
    algorithms = {AllreduceAlgorithm::kAllgather, AllreduceAlgorithm::kReduceScatter};
  } else {
    absl::StatusOr<AllreduceAlgorithm> a = ParseAllreduceAlgorithm(which);
    if (!a.ok() || *a == AllreduceAlgorithm::kAuto) {
      std::fprintf(stderr, "allreduce_bench: --allreduce must be allgather, reduce_scatter or both\n");
      return 2;
    }
    algorithms = {*a};
  }
  std::vector<Case> cases;
  cases.push_back({"fp32", "fp32", AllreduceAlgorithm::kAuto});
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_codecs), ',', absl::SkipEmpty())) {
    const std::string codec(name);
    if (codec == "fp32") continue;
    if (codec != "onebit" && codec != "terngrad" && codec != "qsgd" && codec != "threshold" &&
        codec != "fp16") {
      std::fprintf(stderr, "allreduce_bench: unknown codec '%s'\n", codec.c_str());
      return 2;
    }
    for (AllreduceAlgorithm a : algorithms) cases.push_back({codec, SpecFor(codec), a});
  }

  uint64_t max_n = 0;
  for (int mb : sizes) max_n = std::max<uint64_t>(max_n, static_cast<uint64_t>(mb) << 18);
  Bench bench(env, device);
  if (absl::Status s = bench.Init(max_n); !s.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", env.rank, s.ToString().c_str());
    return 1;
  }
  const std::string label = absl::GetFlag(FLAGS_label);
  const char* p2p = std::getenv("NCCL_P2P_DISABLE");
  const char* shm = std::getenv("NCCL_SHM_DISABLE");
  if (env.rank == 0) {
    std::printf("allreduce_bench%s%s: %d ranks, device %s, NCCL_P2P_DISABLE=%s NCCL_SHM_DISABLE=%s, "
                "median of %d iterations after %d warm-up\n",
                label.empty() ? "" : " ", label.c_str(), env.world_size,
                cuda::DeviceName(device).value_or("?").c_str(), p2p ? p2p : "-", shm ? shm : "-",
                absl::GetFlag(FLAGS_iters), absl::GetFlag(FLAGS_warmup));
    std::printf("%-10s %-15s %6s %10s %9s %8s %14s %s\n", "codec", "algorithm", "MB", "ms",
                "GB/s", "speedup", "bytes/rank", "verified");
    std::fflush(stdout);
  }
  std::vector<Result> results;
  std::vector<double> fp32_ms(sizes.size(), 0.0);  // cases[0] is fp32: it fills these first
  bool all_verified = true;
  for (const Case& c : cases) {
    absl::StatusOr<std::unique_ptr<NcclCommunicator>> comm = bench.Connect(c);
    if (!comm.ok()) {
      std::fprintf(stderr, "rank %d: %s: %s\n", env.rank, c.spec.c_str(),
                   comm.status().ToString().c_str());
      return 1;
    }
    for (size_t k = 0; k < sizes.size(); ++k) {
      const int mb = sizes[k];
      const uint64_t n = static_cast<uint64_t>(mb) << 18;  // MiB of fp32
      Result r;
      r.codec = c.codec;
      r.spec = c.spec;
      r.algorithm = c.codec == "fp32" ? "-" : AllreduceAlgorithmName(c.algorithm);
      r.mb = mb;
      r.n = n;
      if (absl::Status s = bench.RunCase(comm->get(), c, n, &r); !s.ok()) {
        std::fprintf(stderr, "rank %d: %s at %d MB: %s\n", env.rank, c.spec.c_str(), mb,
                     s.ToString().c_str());
        return 1;
      }
      if (c.codec == "fp32") fp32_ms[k] = r.ms_median;
      r.speedup = fp32_ms[k] / r.ms_median;
      all_verified = all_verified && r.verified;
      if (env.rank == 0) {
        std::printf("%-10s %-15s %6d %10.3f %9.2f %7.2fx %14llu %s\n", r.codec.c_str(),
                    r.algorithm.c_str(), mb, r.ms_median, r.algbw_gbps, r.speedup,
                    static_cast<unsigned long long>(r.bytes_sent), r.verified ? "yes" : "NO");
        std::fflush(stdout);
      }
      results.push_back(r);
    }
  }
  if (env.rank == 0 && !absl::GetFlag(FLAGS_json).empty()) {
    std::ofstream out(absl::GetFlag(FLAGS_json));
    out << "{\"bench\": \"allreduce_bench\", \"label\": \"" << JsonEscape(label)
        << "\", \"world_size\": " << env.world_size << ", \"device\": \""
        << JsonEscape(cuda::DeviceName(device).value_or("?")) << "\", \"nccl_p2p_disable\": \""
        << (p2p ? p2p : "") << "\", \"nccl_shm_disable\": \"" << (shm ? shm : "")
        << "\", \"iters\": " << absl::GetFlag(FLAGS_iters)
        << ", \"warmup\": " << absl::GetFlag(FLAGS_warmup) << ", \"results\": [";
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      out << (i ? ", " : "") << "\n  "
          << absl::StrFormat(
                 "{\"codec\": \"%s\", \"spec\": \"%s\", \"algorithm\": \"%s\", \"mb\": %d, "
                 "\"n\": %d, \"ms\": %.6f, \"ms_mean\": %.6f, \"ms_min\": %.6f, "
                 "\"algbw_gbps\": %.4f, \"speedup_vs_fp32\": %.4f, \"bytes_sent_per_rank\": %d, "
                 "\"bytes_received_per_rank\": %d, \"verified\": %s}",
                 JsonEscape(r.codec), JsonEscape(r.spec), r.algorithm, r.mb, r.n, r.ms_median,
                 r.ms_mean, r.ms_min, r.algbw_gbps, r.speedup, r.bytes_sent, r.bytes_received,
                 r.verified ? "true" : "false");
    }
    out << "\n]}\n";
    if (!out.good()) {
      std::fprintf(stderr, "allreduce_bench: could not write %s\n",
                   absl::GetFlag(FLAGS_json).c_str());
      return 1;
    }
  }
  if (!all_verified) {
    if (env.rank == 0) std::fprintf(stderr, "allreduce_bench: some results failed verification\n");
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace qtrain::comm

int main(int argc, char** argv) { return qtrain::comm::Main(argc, argv); }
