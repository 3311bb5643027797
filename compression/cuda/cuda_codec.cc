#include "compression/cuda/cuda_codec.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <mutex>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/cuda/cuda_util.h"
#include "common/status_macros.h"
#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/cuda/blob_check.h"
#include "compression/cuda/codec_kernels.h"
#include "compression/fp16.h"
#include "compression/onebit.h"
#include "compression/packed_blob.h"
#include "compression/qsgd.h"
#include "compression/terngrad.h"
#include "compression/threshold.h"

namespace qtrain::compression::cuda {

// The device view of the formats must be the host's.
static_assert(kDevBlobMagic == kBlobMagic);
static_assert(kDevBlobHeaderBytes == kBlobHeaderBytes);
static_assert(kDevBlobReservedNonFinite == kBlobReservedNonFinite);
static_assert(kDevMaxElements == kMaxElements);
static_assert(kDevFp16 == static_cast<uint32_t>(CodecId::kFp16));
static_assert(kDevOneBit == static_cast<uint32_t>(CodecId::kOneBit));
static_assert(kDevThreshold == static_cast<uint32_t>(CodecId::kThreshold));
static_assert(kDevQsgd == static_cast<uint32_t>(CodecId::kQsgd));
static_assert(kDevTernGrad == static_cast<uint32_t>(CodecId::kTernGrad));
// The kernels write format version 1 of every codec.
static_assert(Fp16Codec::kFormatVersion == 1 && OneBitCodec::kFormatVersion == 1 &&
              ThresholdCodec::kFormatVersion == 1 && QsgdCodec::kFormatVersion == 1 &&
              TernGradCodec::kFormatVersion == 1);
static_assert(sizeof(EntryRun) == 24 && sizeof(TernPartial) == 24);

struct CudaCodec::Settings {
  CodecId id = CodecId::kFp16;
  bool feedback = false;
  float tau = 0.0f;         // threshold
  uint32_t levels = 0;      // qsgd
  uint32_t bucket = 0;      // qsgd
  uint32_t bits = 0;        // qsgd
  float clip_sigma = 0.0f;  // terngrad
  bool shared = false;      // terngrad
};

namespace {

constexpr uint32_t kVersion = 1;

bool Aligned(const void* p, uintptr_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

absl::Status CheckShape(std::span<const int64_t> shape, uint64_t n, const char* what) {
  if (n > kMaxElements) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": tensor of ", n, " elements exceeds the limit of ", kMaxElements));
  }
  if (!shape.empty()) {
    ASSIGN_OR_RETURN(uint64_t product, ShapeElements(shape));
    if (product != n) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": shape [", absl::StrJoin(shape, ","),
                                                     "] has ", product, " elements, n is ", n));
    }
  }
  return absl::OkStatus();
}

// Once per device: the default stream-ordered pool keeps freed memory instead of returning it to
// the driver at every synchronization (its release threshold is 0 by default), so the per-call
// scratch of threshold and terngrad costs a pool lookup, not a fresh mapping (on an H200, with
// 25.6M floats: terngrad encode 247 -> 189 us, threshold encode 385 -> 336 us).
absl::Status KeepPoolMemory() {
  static std::mutex mu;
  static std::set<int> done;
  int device = 0;
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(device) != 0) return absl::OkStatus();
  cudaMemPool_t pool;
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaDeviceGetDefaultMemPool(&pool, device));
  uint64_t threshold = std::numeric_limits<uint64_t>::max();
  QTRAIN_CUDA_RETURN_IF_ERROR(
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  done.insert(device);
  return absl::OkStatus();
}

// Device scratch from the stream-ordered pool, freed (stream-ordered) by Release.
class StreamScratch {
 public:
  static absl::StatusOr<StreamScratch> Allocate(uint64_t bytes, cudaStream_t stream) {
    RETURN_IF_ERROR(KeepPoolMemory());
    StreamScratch s;
    s.stream_ = stream;
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&s.data_, bytes < 16 ? 16 : bytes, stream));
    return s;
  }
  StreamScratch(StreamScratch&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), stream_(o.stream_) {}
  StreamScratch& operator=(StreamScratch&&) = delete;
  ~StreamScratch() {
    if (data_ != nullptr) cudaFreeAsync(data_, stream_);  // error paths only
  }
  void* data() const { return data_; }
  // Frees after the work enqueued so far; reports the error.
  absl::Status Release() {
    void* p = std::exchange(data_, nullptr);
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaFreeAsync(p, stream_));
    return absl::OkStatus();
  }

 private:
  StreamScratch() = default;
  void* data_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

absl::Status Launch(cudaError_t error, const char* kernel) {
  if (error == cudaSuccess) return absl::OkStatus();
  return qtrain::cuda::CudaStatus(error, kernel);
}

// The header write of a fixed-size blob, with its layout.
struct FixedBlob {
  HeaderWrite header;
  DevBlobLayout layout;
  uint64_t payload_words;
};

FixedBlob MakeFixedBlob(uint8_t* blob, CodecId id, uint32_t num_scales,
                        std::span<const uint32_t> params, uint64_t payload_bytes,
                        uint64_t* d_blob_bytes) {
  FixedBlob f;
  f.header.blob = blob;
  f.header.codec = static_cast<uint32_t>(id);
  f.header.version = kVersion;
  f.header.num_scales = num_scales;
  f.header.num_params = static_cast<uint32_t>(params.size());
  for (size_t k = 0; k < params.size(); ++k) f.header.params[k] = params[k];
  f.header.payload_bytes = payload_bytes;
  f.header.blob_bytes_out = d_blob_bytes;
  f.layout = BlobLayoutFor(num_scales, f.header.num_params, payload_bytes);
  f.payload_words = (payload_bytes + 3) / 4;
  return f;
}

}  // namespace

CudaCodec::CudaCodec(std::unique_ptr<Codec> cpu, std::unique_ptr<Settings> settings)
    : cpu_(std::move(cpu)), settings_(std::move(settings)) {}

CudaCodec::~CudaCodec() = default;

absl::StatusOr<std::unique_ptr<CudaCodec>> CudaCodec::Create(const pb::CodecConfig& config) {
  CodecRegistry registry;
  RETURN_IF_ERROR(RegisterBuiltinCodecs(&registry));
  ASSIGN_OR_RETURN(std::unique_ptr<Codec> cpu, registry.Create(config));
  auto settings = std::make_unique<Settings>();
  settings->id = cpu->id();
  settings->feedback = compression::ErrorFeedbackEnabled(config, *cpu);
  switch (cpu->id()) {
    case CodecId::kFp32:
      return absl::UnimplementedError(
          "cuda codec: fp32 needs no codec (sum the floats directly, e.g. with ncclAllReduce)");
    case CodecId::kFp16:
    case CodecId::kOneBit:
      break;
    case CodecId::kThreshold:
      settings->tau = static_cast<const ThresholdCodec&>(*cpu).tau();
      break;
    case CodecId::kQsgd: {
      const auto& q = static_cast<const QsgdCodec&>(*cpu);
      if (q.coding() != QsgdCodec::Coding::kDense) {
        return absl::UnimplementedError(
            absl::StrCat("cuda codec: ", q.Spec(),
                         ": the Elias coding has no GPU encoder (it stays on the CPU); use "
                         "coding=dense"));
      }
      settings->levels = q.levels();
      settings->bucket = q.bucket();
      settings->bits = static_cast<uint32_t>(q.code_bits());
      break;
    }
    case CodecId::kTernGrad: {
      const auto& t = static_cast<const TernGradCodec&>(*cpu);
      settings->clip_sigma = t.clip_sigma();
      settings->shared = t.shared_scale();
      break;
    }
  }
  return std::unique_ptr<CudaCodec>(new CudaCodec(std::move(cpu), std::move(settings)));
}

absl::StatusOr<std::unique_ptr<CudaCodec>> CudaCodec::CreateFromSpec(std::string_view spec) {
  CodecRegistry registry;
  RETURN_IF_ERROR(RegisterBuiltinCodecs(&registry));
  ASSIGN_OR_RETURN(pb::CodecConfig config, registry.ParseSpec(spec));
  return Create(config);
}

CodecId CudaCodec::id() const { return settings_->id; }
std::string CudaCodec::Spec() const { return cpu_->Spec(); }
pb::CodecConfig CudaCodec::Config() const { return cpu_->Config(); }
bool CudaCodec::ErrorFeedbackEnabled() const { return settings_->feedback; }
bool CudaCodec::fixed_size() const { return settings_->id != CodecId::kThreshold; }
bool CudaCodec::shared_scale() const { return settings_->shared; }

uint64_t CudaCodec::MaxBlobBytes(std::span<const int64_t> shape, uint64_t n) const {
  if (n > kMaxElements) return 0;
  const Settings& s = *settings_;
  switch (s.id) {
    case CodecId::kFp16:
      return BlobLayoutFor(0, 0, 2 * n).total;
    case CodecId::kOneBit: {
      const uint64_t column = std::min<uint64_t>(
          static_cast<const OneBitCodec&>(*cpu_).ColumnLength(shape), std::max<uint64_t>(n, 1));
      const uint64_t columns = (n + column - 1) / column;
      return BlobLayoutFor(static_cast<uint32_t>(2 * columns), 1, (n + 7) / 8).total;
    }
    case CodecId::kThreshold:
      return BlobLayoutFor(1, 1, n).total;
    case CodecId::kQsgd: {
      const uint64_t buckets = (n + s.bucket - 1) / s.bucket;
      return BlobLayoutFor(static_cast<uint32_t>(buckets), 2, (n * s.bits + 7) / 8).total;
    }
    case CodecId::kTernGrad:
      return BlobLayoutFor(1, 0, (n + 3) / 4).total;
    case CodecId::kFp32:
      break;
  }
  return 0;
}

absl::Status CudaCodec::CheckEncodeArgs(const float* d_grad, uint64_t n,
                                        std::span<const int64_t> shape, const void* d_blob,
                                        uint64_t capacity, const uint64_t* d_blob_bytes) const {
  const std::string what = absl::StrCat("cuda ", CodecName(id()), " encode");
  RETURN_IF_ERROR(CheckShape(shape, n, what.c_str()));
  if (n > 0 && (d_grad == nullptr || !Aligned(d_grad, 4))) {
    return absl::InvalidArgumentError(absl::StrCat(what,
                                                   ": gradient pointer is null or not "
                                                   "float-aligned"));
  }
  if (d_blob == nullptr || !Aligned(d_blob, 16)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": blob pointer is null or not 16-byte aligned"));
  }
  if (d_blob_bytes != nullptr && !Aligned(d_blob_bytes, 8)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": blob size pointer is not aligned"));
  }
  const uint64_t needed = MaxBlobBytes(shape, n);
  if (capacity < needed) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": blob capacity ", capacity,
                                                   " bytes is below the ", needed,
                                                   " bytes this tensor may need"));
  }
  return absl::OkStatus();
}

absl::Status CudaCodec::EncodeWithFeedback(const float* d_grad, float* d_residual, uint64_t n,
                                           std::span<const int64_t> shape, uint32_t stream_key,
                                           void* d_blob, uint64_t capacity, uint64_t* d_blob_bytes,
                                           cudaStream_t stream) const {
  RETURN_IF_ERROR(CheckEncodeArgs(d_grad, n, shape, d_blob, capacity, d_blob_bytes));
  if (d_residual != nullptr && !Aligned(d_residual, 4)) {
    return absl::InvalidArgumentError("cuda encode: residual pointer is not float-aligned");
  }
  const Settings& s = *settings_;
  uint8_t* blob = static_cast<uint8_t*>(d_blob);
  switch (s.id) {
    case CodecId::kFp16: {
      const FixedBlob f = MakeFixedBlob(blob, s.id, 0, {}, 2 * n, d_blob_bytes);
      RETURN_IF_ERROR(Launch(LaunchWriteHeader(f.header, stream), "fp16 header"));
      Fp16EncodeArgs a;
      a.grad = d_grad;
      a.residual = d_residual;
      a.n = n;
      a.blob = blob;
      a.payload_offset = f.layout.payload_offset;
      return Launch(LaunchFp16Encode(a, stream), "fp16 encode");
    }
    case CodecId::kOneBit: {
      const uint32_t column = static_cast<uint32_t>(std::min<uint64_t>(
          static_cast<const OneBitCodec&>(*cpu_).ColumnLength(shape), std::max<uint64_t>(n, 1)));
      const uint64_t columns = (n + column - 1) / column;
      const uint32_t params[1] = {column};
      const FixedBlob f = MakeFixedBlob(blob, s.id, static_cast<uint32_t>(2 * columns), params,
                                        (n + 7) / 8, d_blob_bytes);
      RETURN_IF_ERROR(Launch(LaunchWriteHeader(f.header, stream), "onebit header"));
      OneBitEncodeArgs a;
      a.grad = d_grad;
      a.residual = d_residual;
      a.n = n;
      a.column = column;
      a.blob = blob;
      a.scales_offset = f.layout.scales_offset;
      a.payload_offset = f.layout.payload_offset;
      a.payload_words = f.payload_words;
      a.atomic_bits = columns > 1 && column % 32 != 0;
      if (a.atomic_bits) {
        QTRAIN_CUDA_RETURN_IF_ERROR(
            cudaMemsetAsync(blob + f.layout.payload_offset, 0, 4 * f.payload_words, stream));
      }
      return Launch(LaunchOneBitEncode(a, stream), "onebit encode");
    }
    case CodecId::kQsgd: {
      const uint64_t buckets = (n + s.bucket - 1) / s.bucket;
      const uint32_t params[2] = {s.levels, s.bucket};
      const FixedBlob f = MakeFixedBlob(blob, s.id, static_cast<uint32_t>(buckets), params,
                                        (n * s.bits + 7) / 8, d_blob_bytes);
      RETURN_IF_ERROR(Launch(LaunchWriteHeader(f.header, stream), "qsgd header"));
      QsgdEncodeArgs a;
      a.grad = d_grad;
      a.residual = d_residual;
      a.n = n;
      a.levels = s.levels;
      a.bucket = s.bucket;
      a.bits = s.bits;
      a.key = stream_key;
      a.blob = blob;
      a.scales_offset = f.layout.scales_offset;
      a.payload_offset = f.layout.payload_offset;
      a.payload_words = f.payload_words;
      a.atomic_bits = buckets > 1 && s.bucket % 32 != 0;
      if (a.atomic_bits) {
        QTRAIN_CUDA_RETURN_IF_ERROR(
            cudaMemsetAsync(blob + f.layout.payload_offset, 0, 4 * f.payload_words, stream));
      }
      return Launch(LaunchQsgdEncode(a, stream), "qsgd encode");
    }
    case CodecId::kTernGrad:
      if (s.shared) {
        return absl::FailedPreconditionError(
            "cuda terngrad is in shared-scale mode (shared=1): EncodeWithFeedback needs a scale "
            "agreed across workers; use PrepareScale and EncodeWithScale");
      }
      return EncodeTernGrad(d_grad, d_residual, d_residual, n, stream_key, nullptr, d_blob,
                            d_blob_bytes, stream);
    case CodecId::kThreshold: {
      ASSIGN_OR_RETURN(StreamScratch scratch,
                       StreamScratch::Allocate(ThresholdEncodeScratchBytes(n), stream));
      ThresholdEncodeArgs a;
      a.grad = d_grad;
      a.residual = d_residual;
      a.n = n;
      a.tau = s.tau;
      a.blob = blob;
      a.blob_bytes_out = d_blob_bytes;
      a.scratch = scratch.data();
      RETURN_IF_ERROR(Launch(LaunchThresholdEncode(a, stream), "threshold encode"));
      return scratch.Release();
    }
    case CodecId::kFp32:
      break;
  }
  return absl::InternalError("cuda codec: unreachable codec id");
}

absl::Status CudaCodec::EncodeTernGrad(const float* d_x, const float* d_y, float* d_residual,
                                       uint64_t n, uint32_t stream_key, const float* d_shared_scale,
                                       void* d_blob, uint64_t* d_blob_bytes,
                                       cudaStream_t stream) const {
  const Settings& s = *settings_;
  uint8_t* blob = static_cast<uint8_t*>(d_blob);
  const FixedBlob f = MakeFixedBlob(blob, s.id, 1, {}, (n + 3) / 4, d_blob_bytes);
  const uint32_t blocks = TernStatsBlocks(n);
  const uint64_t partial_bytes = uint64_t{blocks} * sizeof(TernPartial);
  ASSIGN_OR_RETURN(StreamScratch scratch, StreamScratch::Allocate(partial_bytes + 16, stream));
  auto* partials = static_cast<TernPartial*>(scratch.data());
  float* local = reinterpret_cast<float*>(static_cast<uint8_t*>(scratch.data()) + partial_bytes);
  RETURN_IF_ERROR(Launch(LaunchWriteHeader(f.header, stream), "terngrad header"));
  TernStatsArgs st;
  st.x = d_x;
  st.y = const_cast<float*>(d_y);  // read only: write_sum is false
  st.write_sum = false;
  st.sums = s.clip_sigma > 0.0f;
  st.n = n;
  st.partials = partials;
  st.clip_sigma = s.clip_sigma;
  st.local_out = local;
  RETURN_IF_ERROR(Launch(LaunchTernLocalScale(st, stream), "terngrad statistics"));
  TernarizeArgs t;
  t.x = d_x;
  t.y = d_y;
  t.residual = d_residual;
  t.n = n;
  t.clip_at = local;
  t.scale = d_shared_scale != nullptr ? d_shared_scale : local;
  t.key = stream_key;
  t.blob = blob;
  t.scales_offset = f.layout.scales_offset;
  t.payload_offset = f.layout.payload_offset;
  t.payload_words = f.payload_words;
  RETURN_IF_ERROR(Launch(LaunchTernarize(t, stream), "terngrad ternarize"));
  return scratch.Release();
}

absl::Status CudaCodec::PrepareScale(const float* d_grad, float* d_residual, uint64_t n,
                                     float* d_scale, cudaStream_t stream) const {
  if (settings_->id != CodecId::kTernGrad) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda ", CodecName(id()), ": PrepareScale is for terngrad (a shared scale) only"));
  }
  RETURN_IF_ERROR(CheckShape({}, n, "cuda terngrad PrepareScale"));
  if ((n > 0 && (d_grad == nullptr || !Aligned(d_grad, 4))) || d_scale == nullptr ||
      !Aligned(d_scale, 4) || (d_residual != nullptr && !Aligned(d_residual, 4))) {
    return absl::InvalidArgumentError(
        "cuda terngrad PrepareScale: a pointer is null or not float-aligned");
  }
  const uint32_t blocks = TernStatsBlocks(n);
  ASSIGN_OR_RETURN(StreamScratch scratch,
                   StreamScratch::Allocate(uint64_t{blocks} * sizeof(TernPartial), stream));
  TernStatsArgs st;
  st.x = d_grad;
  st.y = d_residual;
  st.write_sum = d_residual != nullptr;
  st.sums = settings_->clip_sigma > 0.0f;
  st.n = n;
  st.partials = static_cast<TernPartial*>(scratch.data());
  st.clip_sigma = settings_->clip_sigma;
  st.local_out = d_scale;
  RETURN_IF_ERROR(Launch(LaunchTernLocalScale(st, stream), "terngrad statistics"));
  return scratch.Release();
}

absl::Status CudaCodec::EncodeWithScale(const float* d_grad, float* d_residual, uint64_t n,
                                        std::span<const int64_t> shape, uint32_t stream_key,
                                        const float* d_scale, void* d_blob, uint64_t capacity,
                                        uint64_t* d_blob_bytes, cudaStream_t stream) const {
  if (settings_->id != CodecId::kTernGrad) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda ", CodecName(id()), ": EncodeWithScale is for terngrad (a shared scale) only"));
  }
  const float* v = d_residual != nullptr ? d_residual : d_grad;
  RETURN_IF_ERROR(CheckEncodeArgs(v, n, shape, d_blob, capacity, d_blob_bytes));
  if (d_scale == nullptr || !Aligned(d_scale, 4)) {
    return absl::InvalidArgumentError(
        "cuda terngrad EncodeWithScale: scale pointer is null or not float-aligned");
  }
  return EncodeTernGrad(v, nullptr, d_residual, n, stream_key, d_scale, d_blob, d_blob_bytes,
                        stream);
}

absl::Status CudaCodec::DecodeAdd(const void* d_blob, uint64_t blob_bytes, uint64_t n,
                                  std::span<const int64_t> shape, float* d_out, int32_t* d_error,
                                  cudaStream_t stream) const {
  const std::string what = absl::StrCat("cuda ", CodecName(id()), " decode");
  RETURN_IF_ERROR(CheckShape(shape, n, what.c_str()));
  if ((n > 0 && (d_out == nullptr || !Aligned(d_out, 4))) || d_error == nullptr ||
      !Aligned(d_error, 4)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": output or error pointer is null or misaligned"));
  }
  if (d_blob == nullptr || !Aligned(d_blob, 16)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": blob pointer is null or not 16-byte aligned"));
  }
  if (blob_bytes < kBlobHeaderBytes || blob_bytes % kBlobAlignment != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": a blob of ", blob_bytes, " bytes is malformed (blobs are at least ",
                     kBlobHeaderBytes, " bytes, a multiple of ", kBlobAlignment, ")"));
  }
  const Settings& s = *settings_;
  const uint8_t* blob = static_cast<const uint8_t*>(d_blob);
  DecodeExpect expect;
  expect.codec = static_cast<uint32_t>(s.id);
  expect.max_version = kVersion;
  expect.n = n;
  expect.blob_bytes = blob_bytes;
  expect.levels = s.levels;
  expect.bucket = s.bucket;
  expect.code_bits = s.bits;
  RETURN_IF_ERROR(Launch(LaunchCheckHeader(blob, expect, d_error, stream), "blob header check"));
  DecodeArgs a;
  a.blob = blob;
  a.n = n;
  a.out = d_out;
  a.error = d_error;
  switch (s.id) {
    case CodecId::kFp16:
      return Launch(LaunchFp16DecodeAdd(a, stream), "fp16 decode");
    case CodecId::kOneBit:
      return Launch(LaunchOneBitDecodeAdd(a, stream), "onebit decode");
    case CodecId::kQsgd: {
      QsgdDecodeArgs q;
      q.d = a;
      q.levels = s.levels;
      q.bucket = s.bucket;
      q.bits = s.bits;
      return Launch(LaunchQsgdDecodeAdd(q, stream), "qsgd decode");
    }
    case CodecId::kTernGrad:
      return Launch(LaunchTernDecodeAdd(a, stream), "terngrad decode");
    case CodecId::kThreshold: {
      ASSIGN_OR_RETURN(StreamScratch scratch,
                       StreamScratch::Allocate(ThresholdDecodeScratchBytes(blob_bytes), stream));
      ThresholdDecodeArgs t;
      t.d = a;
      t.blob_bytes = blob_bytes;
      t.scratch = scratch.data();
      RETURN_IF_ERROR(Launch(LaunchThresholdDecodeAdd(t, stream), "threshold decode"));
      return scratch.Release();
    }
    case CodecId::kFp32:
      break;
  }
  return absl::InternalError("cuda codec: unreachable codec id");
}

absl::Status CudaCodec::CheckDecodeError(int32_t* d_error, std::string_view source,
                                         cudaStream_t stream) {
  if (d_error == nullptr) return absl::InvalidArgumentError("CheckDecodeError: null error word");
  int32_t code = 0;
  QTRAIN_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(&code, d_error, sizeof(code), cudaMemcpyDeviceToHost, stream));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  if (code == kDecodeOk) return absl::OkStatus();
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_error, 0, sizeof(int32_t), stream));
  return absl::InvalidArgumentError(absl::StrCat(
      std::string(source), ": GPU decode rejected the blob: ", DecodeErrorMessage(code),
      " (decode error ", code, ")"));
}

}  // namespace qtrain::compression::cuda
