// The CUDA cases of codec_bench (compiled into the codec_bench executable when QTRAIN_HAVE_CUDA):
//
//   BM_CudaMemcpy/<n>               device-to-device cudaMemcpyAsync of n floats (the yardstick)
//   BM_CudaEncodeEF/<codec>/<n>     CudaCodec::EncodeWithFeedback (grad + residual -> blob,
//   residual) BM_CudaDecodeAdd/<codec>/<n>    CudaCodec::DecodeAdd (validate the blob, out +=
//   decode)
//
// for codec in onebit, threshold, qsgd (levels=16, bucket=512, dense), terngrad, fp16 and
// n in 1<<20, 25.6M (25600000) and 64M (67108864) floats of N(0, 1e-3^2) gradient.
//
// Timing: CUDA events around each call (UseManualTime). Bytes counted per call, the bytes the
// operation must move: memcpy 2 * 4n (read + write); encode-EF 4n grad + 4n residual read + 4n
// residual write + the blob; decode-add 4n read + 4n write of out + the blob. bytes_per_second is
// that over the event time; x_memcpy is it divided by BM_CudaMemcpy's bytes_per_second for the
// same n, measured in this process (the median of 21 copies), so each figure is printed beside
// its yardstick. (terngrad's encode reads v twice, for its per-tensor scale; the count above
// still charges it the 12n of the fused ideal.)
//
// Before anything is timed, each (codec, n) is checked: the GPU blob, unpacked, decodes on the
// CPU to the same bits as the GPU decode-add; a mismatch or a decode error fails the case.
// Without a CUDA device every case reports SkipWithError("no CUDA device").
//
// The cases are registered when the program starts (this file's object is part of the
// executable, so nothing drops it); --benchmark_filter=BM_Cuda selects them.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "benchmark/benchmark.h"
#include "common/cuda/cuda_util.h"
#include "common/status_macros.h"
#include "compression/cuda/cuda_codec.h"
#include "compression/packed_blob.h"

namespace qtrain::compression::cuda {
namespace {

struct CodecCase {
  const char* name;
  const char* spec;
};
constexpr CodecCase kCodecs[] = {
    {"onebit", "onebit"},
    {"threshold", "threshold"},
    {"qsgd", "qsgd:levels=16,bucket=512,coding=dense"},
    {"terngrad", "terngrad"},
    {"fp16", "fp16"},
};
constexpr uint64_t kSizes[] = {uint64_t{1} << 20, 25600000, uint64_t{64} << 20};

// Device data per n, made once: the gradient, a residual, an accumulator, a copy target.
struct DeviceData {
  qtrain::cuda::DeviceArray<float> grad, residual, out, copy;
  qtrain::cuda::Stream stream;
  qtrain::cuda::Event start, stop;
};

// Returns null (and *error) on failure.
DeviceData* Data(uint64_t n, std::string* error) {
  static std::map<uint64_t, std::unique_ptr<DeviceData>> cache;
  auto& slot = cache[n];
  if (slot != nullptr) return slot.get();
  auto d = std::make_unique<DeviceData>();
  auto fail = [&](const absl::Status& s) {
    *error = s.ToString();
    return nullptr;
  };
  auto grad = qtrain::cuda::DeviceArray<float>::Create(n);
  auto residual = qtrain::cuda::DeviceArray<float>::Create(n);
  auto out = qtrain::cuda::DeviceArray<float>::Create(n);
  auto copy = qtrain::cuda::DeviceArray<float>::Create(n);
  auto stream = qtrain::cuda::Stream::Create();
  auto start = qtrain::cuda::Event::Create();
  auto stop = qtrain::cuda::Event::Create();
  for (const absl::Status& s : {grad.status(), residual.status(), out.status(), copy.status(),
                                stream.status(), start.status(), stop.status()}) {
    if (!s.ok()) return fail(s);
  }
  d->grad = std::move(*grad);
  d->residual = std::move(*residual);
  d->out = std::move(*out);
  d->copy = std::move(*copy);
  d->stream = std::move(*stream);
  d->start = std::move(*start);
  d->stop = std::move(*stop);
  std::vector<float> host(n);
  std::mt19937 gen(1234);
  std::normal_distribution<float> dist(0.0f, 1e-3f);
  for (auto& x : host) x = dist(gen);
  if (absl::Status s = d->grad.CopyFromHost(host); !s.ok()) return fail(s);
  if (cudaMemset(d->residual.data(), 0, 4 * n) != cudaSuccess ||
      cudaMemset(d->out.data(), 0, 4 * n) != cudaSuccess ||
      cudaDeviceSynchronize() != cudaSuccess) {
    return fail(absl::InternalError("cudaMemset failed"));
  }
  slot = std::move(d);
  return slot.get();
}

// Milliseconds of `op` on the data's stream, between two events.
template <typename Op>
absl::StatusOr<float> TimeMs(DeviceData* d, Op op) {
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaEventRecord(d->start.get(), d->stream.get()));
  RETURN_IF_ERROR(op());
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaEventRecord(d->stop.get(), d->stream.get()));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(d->stop.get()));
  float ms = 0;
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, d->start.get(), d->stop.get()));
  return ms;
}

absl::Status Copy(DeviceData* d, uint64_t n) {
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d->copy.data(), d->grad.data(), 4 * n,
                                              cudaMemcpyDeviceToDevice, d->stream.get()));
  return absl::OkStatus();
}

// The yardstick: bytes per second of a device-to-device copy of n floats (2 * 4n bytes moved),
// the median of 21 timed copies after a warm-up; 0 on failure.
double MemcpyBandwidth(uint64_t n) {
  static std::map<uint64_t, double> cache;
  if (auto it = cache.find(n); it != cache.end()) return it->second;
  std::string error;
  DeviceData* d = Data(n, &error);
  if (d == nullptr) return 0;
  std::vector<float> ms;
  for (int k = 0; k < 22; ++k) {
    auto t = TimeMs(d, [&] { return Copy(d, n); });
    if (!t.ok()) return 0;
    if (k > 0) ms.push_back(*t);
  }
  std::sort(ms.begin(), ms.end());
  const double bw = 8.0 * n / (ms[ms.size() / 2] * 1e-3);
  cache[n] = bw;
  return bw;
}

void Report(benchmark::State& state, uint64_t n, double bytes_per_call, double seconds,
            double blob_bytes) {
  const double bw = seconds > 0 ? bytes_per_call * state.iterations() / seconds : 0;
  state.SetBytesProcessed(static_cast<int64_t>(bytes_per_call * state.iterations()));
  const double memcpy_bw = MemcpyBandwidth(n);
  state.counters["x_memcpy"] = memcpy_bw > 0 ? bw / memcpy_bw : 0;
  if (blob_bytes > 0) state.counters["bits_per_element"] = 8.0 * blob_bytes / n;
}

void BM_CudaMemcpy(benchmark::State& state, uint64_t n) {
  if (qtrain::cuda::DeviceCount() == 0) return state.SkipWithError("no CUDA device");
  std::string error;
  DeviceData* d = Data(n, &error);
  if (d == nullptr) return state.SkipWithError(error.c_str());
  double seconds = 0;
  for (auto _ : state) {
    auto ms = TimeMs(d, [&] { return Copy(d, n); });
    if (!ms.ok()) return state.SkipWithError(ms.status().ToString().c_str());
    state.SetIterationTime(*ms * 1e-3);
    seconds += *ms * 1e-3;
  }
  Report(state, n, 8.0 * n, seconds, 0);
}

// One encode with feedback into a fresh blob; returns the blob and the size it reported.
struct Encoded {
  qtrain::cuda::DeviceArray<uint8_t> blob;
  uint64_t bytes = 0;
};
absl::StatusOr<Encoded> EncodeOnce(const CudaCodec& codec, DeviceData* d, uint64_t n,
                                   float* residual) {
  Encoded e;
  ASSIGN_OR_RETURN(e.blob, qtrain::cuda::DeviceArray<uint8_t>::Create(codec.MaxBlobBytes({}, n)));
  ASSIGN_OR_RETURN(auto size, qtrain::cuda::DeviceArray<uint64_t>::Create(1));
  RETURN_IF_ERROR(codec.EncodeWithFeedback(d->grad.data(), residual, n, {}, 7, e.blob.data(),
                                           e.blob.size(), size.data(), d->stream.get()));
  RETURN_IF_ERROR(d->stream.Synchronize());
  QTRAIN_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(&e.bytes, size.data(), sizeof(uint64_t), cudaMemcpyDeviceToHost));
  return e;
}

// The GPU blob, unpacked, decodes on the CPU to the GPU decode-add's bits (checked once per
// codec and n).
absl::Status Verify(const CudaCodec& codec, DeviceData* d, uint64_t n) {
  static std::set<std::pair<std::string, uint64_t>> verified;
  if (verified.count({codec.Spec(), n})) return absl::OkStatus();
  ASSIGN_OR_RETURN(auto residual, qtrain::cuda::DeviceArray<float>::Create(n));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemset(residual.data(), 0, 4 * n));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  ASSIGN_OR_RETURN(Encoded e, EncodeOnce(codec, d, n, residual.data()));
  std::vector<uint8_t> blob(e.bytes);
  QTRAIN_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(blob.data(), e.blob.data(), e.bytes, cudaMemcpyDeviceToHost));
  ASSIGN_OR_RETURN(EncodedTensor t, UnpackBlob(blob, n, {}));
  std::vector<float> on_cpu(n, 0.0f), on_gpu(n, 0.0f);
  RETURN_IF_ERROR(codec.cpu_codec().DecodeAdd(t, std::span<float>(on_cpu)));
  ASSIGN_OR_RETURN(auto out, qtrain::cuda::DeviceArray<float>::Create(n));
  ASSIGN_OR_RETURN(auto error, qtrain::cuda::DeviceArray<int32_t>::Create(1));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemset(out.data(), 0, 4 * n));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemset(error.data(), 0, 4));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  RETURN_IF_ERROR(
      codec.DecodeAdd(e.blob.data(), e.bytes, n, {}, out.data(), error.data(), d->stream.get()));
  RETURN_IF_ERROR(CudaCodec::CheckDecodeError(error.data(), "verification", d->stream.get()));
  RETURN_IF_ERROR(out.CopyToHost(std::span<float>(on_gpu)));
  if (std::memcmp(on_cpu.data(), on_gpu.data(), 4 * n) != 0) {
    return absl::InternalError("GPU decode-add differs from the CPU decode of the same blob");
  }
  verified.insert({codec.Spec(), n});
  return absl::OkStatus();
}

void BM_CudaEncodeEF(benchmark::State& state, const char* spec, uint64_t n) {
  if (qtrain::cuda::DeviceCount() == 0) return state.SkipWithError("no CUDA device");
  auto codec = CudaCodec::CreateFromSpec(spec);
  if (!codec.ok()) return state.SkipWithError(codec.status().ToString().c_str());
  std::string error;
  DeviceData* d = Data(n, &error);
  if (d == nullptr) return state.SkipWithError(error.c_str());
  if (absl::Status s = Verify(**codec, d, n); !s.ok()) {
    return state.SkipWithError(s.ToString().c_str());
  }
  const uint64_t capacity = (*codec)->MaxBlobBytes({}, n);
  auto blob = qtrain::cuda::DeviceArray<uint8_t>::Create(capacity);
  auto size = qtrain::cuda::DeviceArray<uint64_t>::Create(1);
  if (!blob.ok() || !size.ok()) return state.SkipWithError("blob allocation failed");
  // Each case starts from a zero residual.
  if (cudaMemset(d->residual.data(), 0, 4 * n) != cudaSuccess ||
      cudaDeviceSynchronize() != cudaSuccess) {
    return state.SkipWithError("cudaMemset failed");
  }
  uint32_t key = 0;
  double seconds = 0;
  for (auto _ : state) {
    auto ms = TimeMs(d, [&] {
      return (*codec)->EncodeWithFeedback(d->grad.data(), d->residual.data(), n, {}, ++key,
                                          blob->data(), capacity, size->data(), d->stream.get());
    });
    if (!ms.ok()) return state.SkipWithError(ms.status().ToString().c_str());
    state.SetIterationTime(*ms * 1e-3);
    seconds += *ms * 1e-3;
  }
  uint64_t blob_bytes = 0;
  if (cudaMemcpy(&blob_bytes, size->data(), 8, cudaMemcpyDeviceToHost) != cudaSuccess) {
    return state.SkipWithError("reading the blob size failed");
  }
  Report(state, n, 12.0 * n + blob_bytes, seconds, blob_bytes);
}

void BM_CudaDecodeAdd(benchmark::State& state, const char* spec, uint64_t n) {
  if (qtrain::cuda::DeviceCount() == 0) return state.SkipWithError("no CUDA device");
  auto codec = CudaCodec::CreateFromSpec(spec);
  if (!codec.ok()) return state.SkipWithError(codec.status().ToString().c_str());
  std::string error;
  DeviceData* d = Data(n, &error);
  if (d == nullptr) return state.SkipWithError(error.c_str());
  if (absl::Status s = Verify(**codec, d, n); !s.ok()) {
    return state.SkipWithError(s.ToString().c_str());
  }
  auto residual = qtrain::cuda::DeviceArray<float>::Create(n);
  auto d_error = qtrain::cuda::DeviceArray<int32_t>::Create(1);
  if (!residual.ok() || !d_error.ok()) return state.SkipWithError("allocation failed");
  if (cudaMemset(residual->data(), 0, 4 * n) != cudaSuccess ||
      cudaMemset(d_error->data(), 0, 4) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
    return state.SkipWithError("cudaMemset failed");
  }
  auto encoded = EncodeOnce(**codec, d, n, residual->data());
  if (!encoded.ok()) return state.SkipWithError(encoded.status().ToString().c_str());
  double seconds = 0;
  for (auto _ : state) {
    auto ms = TimeMs(d, [&] {
      return (*codec)->DecodeAdd(encoded->blob.data(), encoded->bytes, n, {}, d->out.data(),
                                 d_error->data(), d->stream.get());
    });
    if (!ms.ok()) return state.SkipWithError(ms.status().ToString().c_str());
    state.SetIterationTime(*ms * 1e-3);
    seconds += *ms * 1e-3;
  }
  if (absl::Status s = CudaCodec::CheckDecodeError(d_error->data(), "benchmark", d->stream.get());
      !s.ok()) {
    return state.SkipWithError(s.ToString().c_str());
  }
  Report(state, n, 8.0 * n + encoded->bytes, seconds, static_cast<double>(encoded->bytes));
}

int RegisterCudaBenchmarks() {
  for (uint64_t n : kSizes) {
    benchmark::RegisterBenchmark(absl::StrFormat("BM_CudaMemcpy/%d", n).c_str(), BM_CudaMemcpy, n)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
    for (const CodecCase& c : kCodecs) {
      benchmark::RegisterBenchmark(absl::StrFormat("BM_CudaEncodeEF/%s/%d", c.name, n).c_str(),
                                   BM_CudaEncodeEF, c.spec, n)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(absl::StrFormat("BM_CudaDecodeAdd/%s/%d", c.name, n).c_str(),
                                   BM_CudaDecodeAdd, c.spec, n)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    }
  }
  return 0;
}

[[maybe_unused]] const int kCudaBenchmarksRegistered = RegisterCudaBenchmarks();

}  // namespace
}  // namespace qtrain::compression::cuda
