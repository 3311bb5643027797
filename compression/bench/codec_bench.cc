// codec_bench: Google Benchmark micro-benchmarks of every codec beside the memcpy yardstick.
//
//   BM_Memcpy/<n>               copy n floats (the yardstick)
//   BM_Encode/<spec>/<n>        Encode
//   BM_EncodeEF/<spec>/<n>      EncodeWithFeedback (fused error feedback)
//   BM_DecodeAdd/<spec>/<n>     DecodeAdd into an accumulator
//
// Bytes processed count the fp32 input (4n bytes); `bits_per_element` counts payload and scales.
// Before anything is timed, each codec's fast path is checked bit for bit against its scalar
// reference on the same input (payload, scales, residual and decoded sum); a mismatch aborts.
// After the run a summary table gives each figure as a ratio to BM_Memcpy of the same n.
//
// Flags: the usual --benchmark_* flags, plus --sizes=1048576,26214400 and --codecs=spec;spec.
// Run on one core (taskset -c 0) for the figures the README reports.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "benchmark/benchmark.h"
#include "common/malloc_tuning.h"
#include "compression/builtin_codecs.h"
#include "compression/codec.h"
#include "compression/codec_registry.h"

namespace qtrain::compression {
namespace {

const std::vector<std::string> kDefaultSpecs = {
    "fp32",      "fp16", "onebit", "threshold", "qsgd:levels=16,bucket=512,coding=dense",
    "qsgd:levels=16,bucket=512,coding=elias", "terngrad"};

// Gradient-like data: N(0, 1e-3^2), fixed seed.
const std::vector<float>& Input(size_t n) {
  static std::map<size_t, std::vector<float>> cache;
  auto& v = cache[n];
  if (v.empty()) {
    v.resize(n);
    std::mt19937 gen(1234);
    std::normal_distribution<float> dist(0.0f, 1e-3f);
    for (auto& x : v) x = dist(gen);
  }
  return v;
}

void Die(const std::string& what) {
  std::fprintf(stderr, "codec_bench: %s\n", what.c_str());
  std::exit(1);
}

void Check(const absl::Status& s, const std::string& what) {
  if (!s.ok()) Die(what + ": " + s.ToString());
}

double BitsPerElement(const EncodedTensor& t) {
  return t.num_elements == 0 ? 0.0
                             : 8.0 * (t.payload.size() + 4.0 * t.scales.size()) / t.num_elements;
}

bool SameBits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

// The fast path must equal the reference path before its speed means anything.
void VerifyAgainstReference(const CodecRegistry& registry, const std::string& spec, size_t n) {
  auto fast = registry.CreateFromSpec(spec, {KernelPath::kAuto});
  auto ref = registry.CreateFromSpec(spec, {KernelPath::kReference});
  Check(fast.status(), spec);
  Check(ref.status(), spec);
  const auto& x = Input(n);
  EncodedTensor ef, er;
  Rng rf(7), rr(7);
  Check((*fast)->Encode(x, {}, rf, &ef), spec + " encode");
  Check((*ref)->Encode(x, {}, rr, &er), spec + " reference encode");
  if (ef.payload != er.payload || !SameBits(ef.scales, er.scales) || ef.params != er.params) {
    Die(spec + ": fast Encode differs from the reference");
  }
  std::vector<float> df(n, 0.5f), dr(n, 0.5f);
  Check((*fast)->DecodeAdd(ef, std::span<float>(df)), spec + " decode");
  Check((*ref)->DecodeAdd(er, std::span<float>(dr)), spec + " reference decode");
  if (!SameBits(df, dr)) Die(spec + ": fast DecodeAdd differs from the reference");
  std::vector<float> resf(n, 1e-4f), resr(n, 1e-4f);
  Check((*fast)->EncodeWithFeedback(x, std::span<float>(resf), {}, rf, &ef), spec + " EF");
  Check((*ref)->EncodeWithFeedback(x, std::span<float>(resr), {}, rr, &er), spec + " ref EF");
  if (ef.payload != er.payload || !SameBits(resf, resr)) {
    Die(spec + ": fast EncodeWithFeedback differs from the reference");
  }
}

void BM_Memcpy(benchmark::State& state, size_t n) {
  const auto& x = Input(n);
  std::vector<float> dst(n);
  for (auto _ : state) {
    std::memcpy(dst.data(), x.data(), 4 * n);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * 4 * n);
}

void BM_Encode(benchmark::State& state, const Codec* codec, size_t n) {
  const auto& x = Input(n);
  EncodedTensor out;
  Rng rng(1);
  for (auto _ : state) {
    Check(codec->Encode(x, {}, rng, &out), "encode");
    benchmark::DoNotOptimize(out.payload.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * 4 * n);
  state.counters["bits_per_element"] = BitsPerElement(out);
}

void BM_EncodeEF(benchmark::State& state, const Codec* codec, size_t n) {
  const auto& x = Input(n);
  std::vector<float> residual(n, 0.0f);
  EncodedTensor out;
  Rng rng(1);
  for (auto _ : state) {
    Check(codec->EncodeWithFeedback(x, std::span<float>(residual), {}, rng, &out), "encode EF");
    benchmark::DoNotOptimize(out.payload.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * 4 * n);
  state.counters["bits_per_element"] = BitsPerElement(out);
}

void BM_DecodeAdd(benchmark::State& state, const Codec* codec, size_t n) {
  const auto& x = Input(n);
  EncodedTensor in;
  Rng rng(1);
  Check(codec->Encode(x, {}, rng, &in), "encode");
  std::vector<float> acc(n, 0.0f);
  for (auto _ : state) {
    Check(codec->DecodeAdd(in, std::span<float>(acc)), "decode");
    benchmark::DoNotOptimize(acc.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * 4 * n);
  state.counters["bits_per_element"] = BitsPerElement(in);
}

// Records bytes/second of every run so a ratio table can follow the usual console output.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.error_occurred || r.run_type != Run::RT_Iteration) continue;
      auto it = r.counters.find("bytes_per_second");
      Result& res = results_[r.benchmark_name()];
      res.bytes_per_second = it == r.counters.end() ? 0.0 : double(it->second);
      auto b = r.counters.find("bits_per_element");
      if (b != r.counters.end()) res.bits = double(b->second);
    }
    ConsoleReporter::ReportRuns(runs);
  }
  struct Result {
    double bytes_per_second = 0;
    double bits = -1;
  };
  const std::map<std::string, Result>& results() const { return results_; }

 private:
  std::map<std::string, Result> results_;
};

void PrintSummary(const SummaryReporter& reporter, const std::vector<std::string>& specs,
                  const std::vector<size_t>& sizes) {
  const auto& res = reporter.results();
  auto get = [&](const std::string& name) -> const SummaryReporter::Result* {
    auto it = res.find(name);
    return it == res.end() ? nullptr : &it->second;
  };
  std::printf("\nSummary (GB/s of fp32 input; x = ratio to BM_Memcpy of the same n, same run)\n");
  std::printf("| codec | n | bits/elt | Encode | EncodeEF | DecodeAdd |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (size_t n : sizes) {
    const auto* mem = get(absl::StrFormat("BM_Memcpy/%d", n));
    if (mem == nullptr || mem->bytes_per_second <= 0) continue;
    std::printf("| memcpy | %zu | 32 | %.2f | | |\n", n, mem->bytes_per_second / 1e9);
    for (const auto& spec : specs) {
      std::string cells[3];
      double bits = -1;
      const char* kinds[3] = {"BM_Encode", "BM_EncodeEF", "BM_DecodeAdd"};
      for (int k = 0; k < 3; ++k) {
        const auto* r = get(absl::StrFormat("%s/%s/%d", kinds[k], spec, n));
        if (r == nullptr) continue;
        if (r->bits >= 0) bits = r->bits;
        cells[k] = absl::StrFormat("%.2f (%.2fx)", r->bytes_per_second / 1e9,
                                   r->bytes_per_second / mem->bytes_per_second);
      }
      std::printf("| %s | %zu | %.3f | %s | %s | %s |\n", spec.c_str(), n, bits,
                  cells[0].c_str(), cells[1].c_str(), cells[2].c_str());
    }
  }
}

// Removes and returns --name=value from argv.
std::string TakeFlag(int* argc, char** argv, const std::string& name, const std::string& dflt) {
  std::string prefix = "--" + name + "=";
  std::string value = dflt;
  int j = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) {
      value = argv[i] + prefix.size();
    } else {
      argv[j++] = argv[i];
    }
  }
  *argc = j;
  return value;
}

}  // namespace
}  // namespace qtrain::compression

int main(int argc, char** argv) {
  qtrain::KeepLargeAllocationsInHeap();  // common/malloc_tuning.h
  using namespace qtrain::compression;
  std::string sizes_flag = TakeFlag(&argc, argv, "sizes", "1048576,26214400");
  std::string specs_flag = TakeFlag(&argc, argv, "codecs", "");
  std::vector<size_t> sizes;
  for (auto s : absl::StrSplit(sizes_flag, ',', absl::SkipEmpty())) {
    size_t n = 0;
    if (!absl::SimpleAtoi(s, &n) || n == 0 || n > kMaxElements) {
      std::fprintf(stderr, "codec_bench: --sizes has a bad entry '%s'\n", std::string(s).c_str());
      return 2;
    }
    sizes.push_back(n);
  }
  std::vector<std::string> specs = kDefaultSpecs;
  if (!specs_flag.empty()) specs = absl::StrSplit(specs_flag, ';', absl::SkipEmpty());

  CodecRegistry registry;
  Check(RegisterBuiltinCodecs(&registry), "registering codecs");
  std::vector<std::unique_ptr<Codec>> codecs;
  for (const auto& spec : specs) {
    auto codec = registry.CreateFromSpec(spec);
    if (!codec.ok()) {
      std::fprintf(stderr, "codec_bench: --codecs: %s\n", codec.status().ToString().c_str());
      return 2;
    }
    codecs.push_back(std::move(*codec));
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;

  for (size_t n : sizes) {
    for (const auto& spec : specs) VerifyAgainstReference(registry, spec, n);
    benchmark::RegisterBenchmark(absl::StrFormat("BM_Memcpy/%d", n).c_str(), BM_Memcpy, n)
        ->Unit(benchmark::kMillisecond);
    for (size_t i = 0; i < specs.size(); ++i) {
      const Codec* c = codecs[i].get();
      using Fn = void (*)(benchmark::State&, const Codec*, size_t);
      const std::pair<const char*, Fn> kinds[] = {
          {"BM_Encode", BM_Encode}, {"BM_EncodeEF", BM_EncodeEF}, {"BM_DecodeAdd", BM_DecodeAdd}};
      for (auto [name, fn] : kinds) {
        benchmark::RegisterBenchmark(absl::StrFormat("%s/%s/%d", name, specs[i], n).c_str(), fn, c,
                                     n)
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  PrintSummary(reporter, specs, sizes);
  benchmark::Shutdown();
  return 0;
}
