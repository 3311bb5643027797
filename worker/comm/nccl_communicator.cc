// The only file of qtrain that includes nccl.h (see nccl_communicator.h for the contract).
#include "worker/comm/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/cuda/cuda_util.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "compression/codec.h"
#include "compression/cuda/cuda_codec.h"
#include "compression/rng.h"
#include "worker/comm/nccl_kernels.h"

namespace qtrain::comm {

namespace {

using Clock = std::chrono::steady_clock;
using nccl_internal::SlotHeader;
using CudaCodec = compression::cuda::CudaCodec;

static_assert(kNcclIdBytes == NCCL_UNIQUE_ID_BYTES, "kNcclIdBytes must match nccl.h");

constexpr uint64_t kSlotHeaderBytes = sizeof(SlotHeader);

// kAuto's rule (the MPI adapter's; documented in the header).

// The longest the destructor waits for the stream and for ncclCommFinalize before aborting.
constexpr double kMaxDestroySeconds = 30.0;

// What a timeline interval measured (StepStats field).
enum Phase : int { kNone = -1, kEncode = 0, kCommunicate = 1, kDecode = 2 };

// The installed Abseil's string_view is its own type, not std::string_view.
absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

uint64_t RoundUp16(uint64_t x) { return (x + 15) / 16 * 16; }

// A tag of (bucket key, element count), as the MPI adapter's: ranks that call collectives in
// different orders are caught instead of decoding each other's buckets.
int64_t BucketTag(std::string_view key, uint64_t n) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (char c : key) {
    h ^= static_cast<uint8_t>(c);
    h *= 1099511628211ull;
  }
  h ^= n;
  h *= 1099511628211ull;
  return static_cast<int64_t>(h);
}

uint64_t SliceBegin(uint64_t n, int j, int w) {
  return n * static_cast<uint64_t>(j) / static_cast<uint64_t>(w);
}

absl::Status Annotate(const absl::Status& status, std::string_view prefix) {
  return absl::Status(status.code(), absl::StrCat(AsAbsl(prefix), ": ", status.message()));
}

std::string NcclText(ncclResult_t result, ncclComm_t comm) {
  const char* last = ncclGetLastError(comm);
  return absl::StrCat(ncclGetErrorString(result), " (ncclResult ", static_cast<int>(result), ")",
                      last != nullptr && last[0] != '\0' ? absl::StrCat(": ", last) : "");
}

absl::Status NcclError(ncclResult_t result, ncclComm_t comm, std::string_view where) {
  const std::string message = absl::StrCat(AsAbsl(where), ": NCCL error ", NcclText(result, comm));
  if (result == ncclInvalidArgument || result == ncclInvalidUsage) {
    return absl::InvalidArgumentError(message);
  }
  return absl::UnavailableError(message);
}

// NCCL reads NCCL_NVLS_ENABLE at communicator creation. NVLink SHARP multicast needs fabric
// manager support that shared GPU hosts often lack, so it is off unless the environment says
// otherwise (launchers export it too). Once per process, before any NCCL call.
void DefaultNvlsOff() {
  static std::once_flag once;
  std::call_once(once, [] { setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0); });
}

// Owning pinned host memory, grown on demand.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (data_ != nullptr) cudaFreeHost(data_);
  }
  absl::Status Ensure(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    if (data_ != nullptr) cudaFreeHost(data_);
    data_ = nullptr;
    bytes_ = 0;
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMallocHost(&data_, bytes));
    bytes_ = bytes;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace


NcclBootstrap BootstrapFromLaunchEnv(const LaunchEnv& env, const RendezvousOptions& options) {
  NcclBootstrap bootstrap;
  bootstrap.rank = env.rank;
  bootstrap.world_size = env.world_size;
  bootstrap.local_rank = env.local_rank;
  bootstrap.exchange_id = [env, options](std::span<uint8_t> id) -> absl::Status {
    ASSIGN_OR_RETURN(std::unique_ptr<Rendezvous> rendezvous, Rendezvous::Connect(env, options));
    ASSIGN_OR_RETURN(std::string bytes,
                     rendezvous->Broadcast(std::string_view(
                         reinterpret_cast<const char*>(id.data()), id.size())));
    if (bytes.size() != id.size()) {
      return absl::InvalidArgumentError(absl::StrCat("rendezvous: rank 0 sent a ", bytes.size(),
                                                     "-byte NCCL id; ", id.size(),
                                                     " bytes expected"));
    }
    std::memcpy(id.data(), bytes.data(), id.size());
    return rendezvous->Barrier();
  };
  return bootstrap;
}

NcclBootstrap BootstrapOverCommunicator(Communicator* comm, int local_rank) {
  NcclBootstrap bootstrap;
  bootstrap.rank = comm->rank();
  bootstrap.world_size = comm->world_size();
  bootstrap.local_rank = local_rank;
  bootstrap.exchange_id = [comm](std::span<uint8_t> id) -> absl::Status {
    for (size_t at = 0; at < id.size(); at += 8) {
      uint64_t word = 0;
      const size_t bytes = std::min<size_t>(8, id.size() - at);
      std::memcpy(&word, id.data() + at, bytes);
      ASSIGN_OR_RETURN(std::vector<uint64_t> words, comm->AllGatherU64(word));
      if (words.empty()) return absl::InternalError("AllGatherU64 returned no values");
      std::memcpy(id.data() + at, &words[0], bytes);  // rank 0's word
    }
    return absl::OkStatus();
  };
  return bootstrap;
}

// ---- Impl ------------------------------------------------------------------------------------

struct NcclCommunicator::Impl {
  // What one public call is doing, for error messages, and when it must give up.
  struct Op {
    std::string name;
    std::string key;  // bucket key, "" for other collectives
    Clock::time_point deadline;
  };
  // CUDA events recorded on `stream` between the phases of one call; kinds[i] is what the
  // interval marks[i-1] -> marks[i] measured. `deadline`: when the watchdog gives up on it.
  struct Timeline {
    std::vector<cudaEvent_t> marks;
    std::vector<int> kinds;
    Clock::time_point deadline;
    std::string what;
  };

  Impl(NcclOptions options_in, int rank_in, int size_in, int device_in)
      : options(std::move(options_in)),
        rank(rank_in),
        size(size_in),
        device(device_in),
        rng(RankSeed(options.seed, rank_in)) {}
  ~Impl();

  // ---- Calls, errors, waiting ----
  absl::StatusOr<Op> Start(std::string_view name, std::string_view key);
  std::string Where(const Op& op, std::string_view phase) const;
  absl::Status Cuda(cudaError_t error, const Op& op, std::string_view phase) const {
    if (error == cudaSuccess) return absl::OkStatus();
    return cuda::CudaStatus(error, Where(op, phase));
  }
  // Records the first failure and aborts the NCCL communicator. Caller holds mu.
  void AbortLocked(const absl::Status& status);
  absl::Status FailedLocked() const {
    return absl::FailedPreconditionError(absl::StrCat(
        "NCCL communicator of rank ", rank, " is unusable after an earlier failure: ",
        failure.ToString()));
  }
  // A failure recorded while this call ran (by the watchdog, or by an earlier phase): its own
  // code (DEADLINE_EXCEEDED, UNAVAILABLE), with this call's context. Caller holds mu.
  absl::Status FailedDuringLocked(const Op& op, std::string_view phase) const {
    return absl::Status(failure.code(), absl::StrCat(Where(op, phase), " gave up: ",
                                                     failure.message()));
  }
  // An Op for a local step (residual access): selects the device, counts no collective.
  Op LocalOp(std::string_view name, std::string_view key) {
    cudaSetDevice(device);
    return Op{std::string(name), std::string(key),
              Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(options.timeout_seconds))};
  }
  // Runs `post` (NCCL calls) inside ncclGroupStart/End and waits until NCCL has enqueued them
  // (non-blocking communicator), or the deadline passes.
  template <typename Post>
  absl::Status Nccl(const Op& op, std::string_view phase, Post post);
  // Waits until everything enqueued on `stream` so far is done, polling with op's deadline and
  // NCCL's asynchronous error state.
  absl::Status WaitHost(const Op& op, std::string_view phase);

  // ---- Timing ----
  absl::Status Mark(const Op& op, int kind);
  // Moves the current timeline to `pending` (the watchdog watches it from then on).
  void FinishTimeline(const Op& op);
  // Adds the intervals of completed pending timelines to `unclaimed`, recycles their events.
  void Reap();
  void ClaimTimes(StepStats* stats) {
    stats->encode_seconds += unclaimed.encode_seconds;
    stats->communicate_seconds += unclaimed.communicate_seconds;
    stats->decode_seconds += unclaimed.decode_seconds;
    unclaimed = StepStats();
  }
  void WatchdogLoop();

  // ---- Buffers ----
  template <typename T>
  absl::Status Ensure(const Op& op, cuda::DeviceArray<T>& array, size_t n);
  // The device residual of `key` with n elements (created as zeros on first use).
  absl::StatusOr<float*> ResidualFor(const Op& op, const std::string& key, uint64_t n);

  // ---- Algorithms ----
  absl::Status Run(const Op& op, float* d_data, uint64_t n, cudaStream_t caller,
                   StepStats* stats);
  absl::Status AllReduceFp32(const Op& op, float* d_data, uint64_t n, StepStats* stats);
  absl::Status AllgatherMean(const Op& op, float* d_data, uint64_t n, StepStats* stats);
  absl::Status ReduceScatterMean(const Op& op, float* d_data, uint64_t n, StepStats* stats);

  // Encodes n floats at d_input with `residual` (null: no feedback) into d_blob. TernGrad with
  // `share_scale`: prepares the local scale into *d_scale, agrees on the maximum with the peers,
  // then encodes with it; without: encodes with its local scale. Enqueues the scale collective
  // even when the local prepare failed (so peers do not wait for it).
  absl::Status EncodeBlob(const Op& op, const float* d_input, float* residual, uint64_t n,
                          float* d_scale, void* d_blob, uint64_t capacity, uint64_t* d_blob_bytes);
  void CallHook(std::string_view what, int slice, void* d_blob, const uint64_t* d_blob_bytes,
                uint64_t capacity) {
    if (!options.payload_hook_for_testing) return;
    NcclPayloadInfo info;
    info.what = what;
    info.slice = slice;
    info.d_blob = d_blob;
    info.d_blob_bytes = d_blob_bytes;
    info.capacity = capacity;
    info.cuda_stream = stream;
    options.payload_hook_for_testing(info);
  }
  // Checks the slot headers of all ranks after an exchange: the bucket tag (FAILED_PRECONDITION
  // naming the first diverging rank), this rank's own failure (`local_error`), a rank that failed
  // (ABORTED "rank r <failed_what>"), a size over caps[r] (INVALID_ARGUMENT).
  absl::Status CheckHeaders(const Op& op, std::string_view phase, const SlotHeader* headers,
                            int64_t tag, std::span<const uint64_t> caps,
                            const absl::Status& local_error, std::string_view failed_what) const;
  // The first non-zero decode error word among errors[0..count) (host copy), as the codec's
  // INVALID_ARGUMENT naming the source rank; `base` is the device array they were copied from.
  absl::Status CheckDecodeErrors(const Op& op, std::string_view what, const int32_t* host_errors,
                                 int32_t* d_errors, int count);

  NcclOptions options;
  const int rank;
  const int size;
  const int device;
  std::string device_name;
  ncclComm_t comm = nullptr;  // guarded by mu once the watchdog runs
  cudaStream_t stream = nullptr;
  std::unique_ptr<BucketCodec> meta;  // spec and error-feedback decision (never encodes here)
  std::unique_ptr<CudaCodec> codec;   // null: fp32
  bool feedback = false;
  bool shares_scale = false;
  compression::Rng rng;
  int64_t step = 0;
  uint64_t collectives = 0;

  std::map<std::string, cuda::DeviceArray<float>, std::less<>> residuals;
  std::map<std::string, std::vector<float>, std::less<>> residual_host;  // Residual()'s copies

  // Device buffers, grown to the largest bucket.
  cuda::DeviceArray<uint8_t> send_buf, recv_buf, gather_buf, blob_buf, header_buf;
  cuda::DeviceArray<float> mean_buf, io_floats, scales;
  cuda::DeviceArray<int32_t> errors;
  cuda::DeviceArray<uint64_t> blob_bytes;
  cuda::DeviceArray<double> io_doubles;
  cuda::DeviceArray<uint64_t> io_u64;
  PinnedBuffer host;      // headers and error words read back
  PinnedBuffer host_io;   // host-span staging

  cudaEvent_t caller_ready = nullptr;  // recorded on the caller's stream
  cudaEvent_t done = nullptr;          // recorded on `stream` at the end of a call
  cudaEvent_t sync_event = nullptr;    // WaitHost's
  std::vector<cudaEvent_t> free_events;
  Timeline current;
  StepStats unclaimed;  // seconds of completed timelines not yet given to a call

  // Shared with the watchdog.
  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;
  absl::Status failure;            // the first fatal error (then comm is aborted)
  std::deque<Timeline> pending;    // timelines of calls that returned before completing
  std::thread watchdog;
};

NcclCommunicator::Impl::~Impl() {
  if (watchdog.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
    watchdog.join();
  }
  cudaSetDevice(device);
  if (comm != nullptr) {
    const double limit = std::min(options.timeout_seconds, kMaxDestroySeconds);
    const Clock::time_point deadline =
        Clock::now() +
        std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(limit));
    // 1. Let enqueued work finish (an unfinished collective means a peer is missing: abort).
    bool idle = false;
    while (true) {
      const cudaError_t q = stream == nullptr ? cudaSuccess : cudaStreamQuery(stream);
      if (q != cudaErrorNotReady) {
        idle = q == cudaSuccess;
        break;
      }
      if (Clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    // 2. Finalize (non-blocking, polled), then destroy; abort when anything is stuck.
    bool finalized = false;
    if (idle) {
      ncclResult_t state = ncclCommFinalize(comm);
      while (state == ncclInProgress && Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        if (ncclCommGetAsyncError(comm, &state) != ncclSuccess) break;
      }
      finalized = state == ncclSuccess;
    }
    if (finalized) {
      ncclCommDestroy(comm);
    } else {
      QTRAIN_LOG(WARNING) << "NCCL communicator of rank " << rank
                          << " did not drain within " << limit << " s; aborting it";
      ncclCommAbort(comm);
    }
    comm = nullptr;
  }
  if (stream != nullptr) cudaStreamSynchronize(stream);  // drained or aborted: returns
  for (Timeline& t : pending) {
    for (cudaEvent_t e : t.marks) free_events.push_back(e);
  }
  for (cudaEvent_t e : current.marks) free_events.push_back(e);
  for (cudaEvent_t e : free_events) cudaEventDestroy(e);
  for (cudaEvent_t e : {caller_ready, done, sync_event}) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  if (stream != nullptr) cudaStreamDestroy(stream);
}

absl::StatusOr<NcclCommunicator::Impl::Op> NcclCommunicator::Impl::Start(std::string_view name,
                                                                         std::string_view key) {
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!failure.ok()) {
      return Annotate(FailedLocked(), absl::StrCat("NCCL ", AsAbsl(name), " refused"));
    }
  }
  const cudaError_t set = cudaSetDevice(device);
  if (set != cudaSuccess) {
    return cuda::CudaStatus(set, absl::StrCat("NCCL ", AsAbsl(name), ": cudaSetDevice(", device,
                                              ")"));
  }
  ++collectives;
  return Op{std::string(name), std::string(key),
            Clock::now() + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(options.timeout_seconds))};
}

std::string NcclCommunicator::Impl::Where(const Op& op, std::string_view phase) const {
  return absl::StrCat("NCCL ", op.name,
                      op.key.empty() ? "" : absl::StrCat(" of bucket '", op.key, "'"), " (",
                      AsAbsl(phase), ") on rank ", rank, " of ", size, " at step ", step,
                      ", collective #", collectives);
}

void NcclCommunicator::Impl::AbortLocked(const absl::Status& status) {
  if (failure.ok()) failure = status;
  if (comm != nullptr) {
    QTRAIN_LOG(ERROR) << "aborting the NCCL communicator of rank " << rank << ": "
                      << status.ToString();
    ncclCommAbort(comm);
    comm = nullptr;
  }
}

template <typename Post>
absl::Status NcclCommunicator::Impl::Nccl(const Op& op, std::string_view phase, Post post) {
  std::lock_guard<std::mutex> lock(mu);
  if (!failure.ok()) return FailedDuringLocked(op, phase);
  ncclResult_t result = ncclGroupStart();
  if (result != ncclSuccess) {
    const absl::Status status = NcclError(result, comm, Where(op, phase));
    AbortLocked(status);
    return status;
  }
  const ncclResult_t posted = post();
  result = ncclGroupEnd();
  if (posted != ncclSuccess && posted != ncclInProgress) {
    const absl::Status status = NcclError(posted, comm, Where(op, phase));
    AbortLocked(status);
    return status;
  }
  int polls = 0;
  while (result == ncclInProgress) {
    if (Clock::now() >= op.deadline) {
      const absl::Status status = absl::DeadlineExceededError(
          absl::StrCat(Where(op, phase), " could not be enqueued within ", options.timeout_seconds,
                       " s (NCCL is still connecting to a peer that has not joined)"));
      AbortLocked(status);
      return status;
    }
    if (++polls > 64) std::this_thread::sleep_for(std::chrono::microseconds(50));
    if (ncclCommGetAsyncError(comm, &result) != ncclSuccess) break;
  }
  if (result != ncclSuccess) {
    const absl::Status status = NcclError(result, comm, Where(op, phase));
    AbortLocked(status);
    return status;
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Impl::WaitHost(const Op& op, std::string_view phase) {
  RETURN_IF_ERROR(Cuda(cudaEventRecord(sync_event, stream), op, phase));
  int polls = 0;
  int sleep_us = 0;
  while (true) {
    const cudaError_t q = cudaEventQuery(sync_event);
    if (q == cudaSuccess) return absl::OkStatus();
    if (q != cudaErrorNotReady) return Cuda(q, op, phase);
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!failure.ok()) return FailedDuringLocked(op, phase);
      ncclResult_t state = ncclSuccess;
      if (comm != nullptr && ncclCommGetAsyncError(comm, &state) == ncclSuccess &&
          state != ncclSuccess && state != ncclInProgress) {
        const absl::Status status = NcclError(
            state, comm, absl::StrCat(Where(op, phase), ": a collective failed (a peer is gone?)"));
        AbortLocked(status);
        return status;
      }
      if (Clock::now() >= op.deadline) {
        const absl::Status status = absl::DeadlineExceededError(absl::StrCat(
            Where(op, phase), " timed out after ", options.timeout_seconds,
            " s: a peer has not joined (stalled, dead, or calling collectives in another order)"));
        AbortLocked(status);
        return status;
      }
    }
    // Spin briefly (a bucket's sync usually comes within microseconds), then back off.
    if (++polls > 256) {
      sleep_us = std::min(std::max(2, 2 * sleep_us), 200);
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    } else {
      std::this_thread::yield();
    }
  }
}

absl::Status NcclCommunicator::Impl::Mark(const Op& op, int kind) {
  cudaEvent_t event = nullptr;
  if (!free_events.empty()) {
    event = free_events.back();
    free_events.pop_back();
  } else {
    RETURN_IF_ERROR(Cuda(cudaEventCreate(&event), op, "timing event"));
  }
  const cudaError_t recorded = cudaEventRecord(event, stream);
  if (recorded != cudaSuccess) {
    free_events.push_back(event);
    return Cuda(recorded, op, "timing event");
  }
  current.marks.push_back(event);
  current.kinds.push_back(kind);
  return absl::OkStatus();
}

void NcclCommunicator::Impl::FinishTimeline(const Op& op) {
  if (current.marks.empty()) return;
  current.deadline = op.deadline;
  current.what = Where(op, "completion");
  std::lock_guard<std::mutex> lock(mu);
  pending.push_back(std::move(current));
  current = Timeline();
}

void NcclCommunicator::Impl::Reap() {
  std::lock_guard<std::mutex> lock(mu);
  while (!pending.empty()) {
    Timeline& t = pending.front();
    const cudaError_t q = cudaEventQuery(t.marks.back());
    if (q == cudaErrorNotReady) break;
    if (q == cudaSuccess) {
      for (size_t i = 1; i < t.marks.size(); ++i) {
        float ms = 0.0f;
        if (cudaEventElapsedTime(&ms, t.marks[i - 1], t.marks[i]) != cudaSuccess) continue;
        const double s = 1e-3 * static_cast<double>(ms);
        switch (t.kinds[i]) {
          case kEncode:
            unclaimed.encode_seconds += s;
            break;
          case kCommunicate:
            unclaimed.communicate_seconds += s;
            break;
          case kDecode:
            unclaimed.decode_seconds += s;
            break;
          default:
            break;
        }
      }
    }
    for (cudaEvent_t e : t.marks) free_events.push_back(e);
    pending.pop_front();
  }
}

void NcclCommunicator::Impl::WatchdogLoop() {
  cudaSetDevice(device);
  std::unique_lock<std::mutex> lock(mu);
  while (!stopping) {
    cv.wait_for(lock, std::chrono::milliseconds(50));
    if (stopping || !failure.ok() || comm == nullptr) continue;
    const Clock::time_point now = Clock::now();
    for (const Timeline& t : pending) {
      if (now < t.deadline) break;  // deadlines grow along the queue
      if (cudaEventQuery(t.marks.back()) == cudaErrorNotReady) {
        AbortLocked(absl::DeadlineExceededError(absl::StrCat(
            t.what, " timed out after ", options.timeout_seconds,
            " s: a peer has not joined (stalled, dead, or calling collectives in another order)")));
        break;
      }
    }
    if (comm == nullptr) continue;
    ncclResult_t state = ncclSuccess;
    if (ncclCommGetAsyncError(comm, &state) == ncclSuccess && state != ncclSuccess &&
        state != ncclInProgress) {
      AbortLocked(NcclError(state, comm,
                            absl::StrCat("NCCL communicator of rank ", rank, " of ", size,
                                         " at step ", step, ": a collective failed")));
    }
  }
}

template <typename T>
absl::Status NcclCommunicator::Impl::Ensure(const Op& op, cuda::DeviceArray<T>& array, size_t n) {
  if (array.size() >= n) return absl::OkStatus();
  // Earlier work may still read the old buffer: wait for it before freeing.
  RETURN_IF_ERROR(WaitHost(op, "growing buffers"));
  const size_t grown = std::max(n, array.size() + array.size() / 4);
  array = cuda::DeviceArray<T>();  // free first: the old and new buffer need not fit together
  absl::StatusOr<cuda::DeviceArray<T>> created = cuda::DeviceArray<T>::Create(grown);
  if (!created.ok()) return Annotate(created.status(), Where(op, "allocating buffers"));
  array = std::move(created).value();
  return absl::OkStatus();
}

absl::StatusOr<float*> NcclCommunicator::Impl::ResidualFor(const Op& op, const std::string& key,
                                                           uint64_t n) {
  auto it = residuals.find(key);
  if (it == residuals.end()) {
    absl::StatusOr<cuda::DeviceArray<float>> created =
        cuda::DeviceArray<float>::Create(static_cast<size_t>(n));
    if (!created.ok()) return Annotate(created.status(), Where(op, "allocating a residual"));
    it = residuals.emplace(key, std::move(created).value()).first;
    if (n > 0) {
      RETURN_IF_ERROR(Cuda(cudaMemsetAsync(it->second.data(), 0, 4 * n, stream), op,
                           "zeroing a residual"));
    }
  }
  if (it->second.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat(Where(op, "encode"), ": tensor '", key,
                                                   "' has ", n, " elements but its residual has ",
                                                   it->second.size()));
  }
  return it->second.data();
}

absl::Status NcclCommunicator::Impl::EncodeBlob(const Op& op, const float* d_input,
                                                float* residual, uint64_t n, float* d_scale,
                                                void* d_blob, uint64_t capacity,
                                                uint64_t* d_blob_bytes) {
  const std::span<const int64_t> shape;  // buckets are 1-D, as in the MPI adapter
  const uint32_t stream_key = rng.NextStream();
  absl::Status status;
  if (!shares_scale) {
    status = codec->EncodeWithFeedback(d_input, residual, n, shape, stream_key, d_blob, capacity,
                                       d_blob_bytes, stream);
  } else {
    status = codec->PrepareScale(d_input, residual, n, d_scale, stream);
    if (status.ok()) {
      status = codec->EncodeWithScale(d_input, residual, n, shape, stream_key, d_scale, d_blob,
                                      capacity, d_blob_bytes, stream);
    }
  }
  return status.ok() ? status : Annotate(status, Where(op, "encode"));
}

absl::Status NcclCommunicator::Impl::CheckHeaders(const Op& op, std::string_view phase,
                                                  const SlotHeader* headers, int64_t tag,
                                                  std::span<const uint64_t> caps,
                                                  const absl::Status& local_error,
                                                  std::string_view failed_what) const {
  for (int r = 0; r < size; ++r) {
    if (headers[r].tag != tag) {
      return absl::FailedPreconditionError(absl::StrCat(
          Where(op, phase), ": rank ", r, " is exchanging a different bucket (another key or ",
          "size): ranks called collectives in different orders"));
    }
  }
  if (!local_error.ok()) return local_error;
  for (int r = 0; r < size; ++r) {
    if (headers[r].size < 0) {
      return absl::AbortedError(absl::StrCat(Where(op, phase), ": rank ", r, " ",
                                             AsAbsl(failed_what), " (its error says why)"));
    }
    const uint64_t announced = static_cast<uint64_t>(headers[r].size);
    if (announced > caps[r] || announced % 16 != 0 || (caps[r] > 0 && announced == 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          Where(op, phase), ": rank ", r, " announces a payload of ", headers[r].size,
          " bytes; a blob here is a non-zero multiple of 16 of at most ", caps[r]));
    }
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Impl::CheckDecodeErrors(const Op& op, std::string_view what,
                                                       const int32_t* host_errors,
                                                       int32_t* d_errors, int count) {
  for (int r = 0; r < count; ++r) {
    if (host_errors[r] == 0) continue;
    absl::Status status = CudaCodec::CheckDecodeError(
        d_errors + r, absl::StrCat(AsAbsl(what), " from rank ", r), stream);
    if (status.ok()) {  // the word was read back as non-zero; never OK
      status = absl::InvalidArgumentError(absl::StrCat(AsAbsl(what), " from rank ", r,
                                                       ": decode error code ", host_errors[r]));
    }
    return Annotate(status, Where(op, "decode"));
  }
  return absl::OkStatus();
}

// ---- Algorithms ------------------------------------------------------------------------------

absl::Status NcclCommunicator::Impl::Run(const Op& op, float* d_data, uint64_t n,
                                         cudaStream_t caller, StepStats* stats) {
  // Our stream starts after the caller's work that produced the gradient.
  RETURN_IF_ERROR(Cuda(cudaEventRecord(caller_ready, caller), op, "ordering after the caller"));
  RETURN_IF_ERROR(Cuda(cudaStreamWaitEvent(stream, caller_ready, 0), op, "ordering after the caller"));
  absl::Status status = Mark(op, kNone);
  if (status.ok()) {
    if (codec == nullptr) {
      status = AllReduceFp32(op, d_data, n, stats);
    } else if (ResolveAllreduceAlgorithm(options.algorithm, size, n) == AllreduceAlgorithm::kAllgather) {
      status = AllgatherMean(op, d_data, n, stats);
    } else {
      status = ReduceScatterMean(op, d_data, n, stats);
    }
  }
  // The caller's later work waits for ours, even after an error (an aborted NCCL kernel returns).
  absl::Status ordered = Cuda(cudaEventRecord(done, stream), op, "ordering the caller after");
  if (ordered.ok()) {
    ordered = Cuda(cudaStreamWaitEvent(caller, done, 0), op, "ordering the caller after");
  }
  FinishTimeline(op);
  return status.ok() ? ordered : status;
}

absl::Status NcclCommunicator::Impl::AllReduceFp32(const Op& op, float* d_data, uint64_t n,
                                                   StepStats* stats) {
  // A power-of-two world averages inside the collective (ncclAvg): scaling by 2^-k is exact, so
  // the bits equal sum-then-divide and the extra pass over the bucket is saved. Otherwise
  // ncclAvg's pre-multiplication by 1/W would round differently: sum, then divide.
  const bool power_of_two = (size & (size - 1)) == 0;
  RETURN_IF_ERROR(Nccl(op, "fp32 allreduce", [&] {
    return ncclAllReduce(d_data, d_data, static_cast<size_t>(n), ncclFloat32,
                         power_of_two ? ncclAvg : ncclSum, comm, stream);
  }));
  RETURN_IF_ERROR(Mark(op, kCommunicate));
  if (!power_of_two) {
    RETURN_IF_ERROR(Cuda(nccl_internal::LaunchDivideInPlace(d_data, n, static_cast<float>(size),
                                                            stream),
                         op, "divide"));
  }
  RETURN_IF_ERROR(Mark(op, kDecode));
  stats->bytes_sent += 4 * n;
  stats->bytes_received += 4 * n;
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Impl::AllgatherMean(const Op& op, float* d_data, uint64_t n,
                                                   StepStats* stats) {
  const int w = size;
  const int64_t tag = BucketTag(op.key, n);
  const std::span<const int64_t> shape;
  const uint64_t cap = codec->MaxBlobBytes(shape, n);
  const bool fixed = codec->fixed_size();
  const uint64_t slot = kSlotHeaderBytes + RoundUp16(cap);

  RETURN_IF_ERROR(Ensure(op, errors, static_cast<size_t>(w)));
  RETURN_IF_ERROR(Ensure(op, blob_bytes, 1));
  RETURN_IF_ERROR(Ensure(op, scales, 1));
  if (fixed) {
    RETURN_IF_ERROR(Ensure(op, gather_buf, static_cast<size_t>(w * slot)));
  } else {
    RETURN_IF_ERROR(Ensure(op, blob_buf, static_cast<size_t>(RoundUp16(cap))));
    RETURN_IF_ERROR(Ensure(op, header_buf, static_cast<size_t>(w * kSlotHeaderBytes)));
  }
  RETURN_IF_ERROR(host.Ensure(static_cast<size_t>(w) * (kSlotHeaderBytes + 4)));
  SlotHeader* host_headers = host.as<SlotHeader>();
  int32_t* host_errors = reinterpret_cast<int32_t*>(host_headers + w);

  float* residual = nullptr;
  if (feedback) {
    ASSIGN_OR_RETURN(residual, ResidualFor(op, op.key, n));
  }

  // 1. Encode this rank's blob behind its slot header.
  uint8_t* own_header = fixed ? gather_buf.data() + rank * slot : header_buf.data() + rank * kSlotHeaderBytes;
  uint8_t* own_blob = fixed ? own_header + kSlotHeaderBytes : blob_buf.data();
  absl::Status local_error;
  if (shares_scale) {
    // PrepareScale, the max-allreduce, then the encode: the collective runs even after a local
    // failure (the scale becomes +inf), so that no peer waits for it.
    const std::span<const int64_t> no_shape;
    local_error = codec->PrepareScale(d_data, residual, n, scales.data(), stream);
    if (!local_error.ok()) {
      local_error = Annotate(local_error, Where(op, "encode"));
      RETURN_IF_ERROR(Cuda(nccl_internal::LaunchFill(scales.data(), 1,
                                                     std::numeric_limits<float>::infinity(),
                                                     stream),
                           op, "encode"));
    }
    RETURN_IF_ERROR(Mark(op, kEncode));
    RETURN_IF_ERROR(Nccl(op, "terngrad scale max-allreduce", [&] {
      return ncclAllReduce(scales.data(), scales.data(), 1, ncclFloat32, ncclMax, comm, stream);
    }));
    RETURN_IF_ERROR(Mark(op, kCommunicate));
    if (local_error.ok()) {
      const uint32_t stream_key = rng.NextStream();
      local_error = codec->EncodeWithScale(d_data, residual, n, no_shape, stream_key,
                                           scales.data(), own_blob, cap, blob_bytes.data(),
                                           stream);
      if (!local_error.ok()) local_error = Annotate(local_error, Where(op, "encode"));
    }
  } else {
    local_error = EncodeBlob(op, d_data, residual, n, nullptr, own_blob, cap, blob_bytes.data());
  }
  if (local_error.ok()) CallHook("allgather", -1, own_blob, blob_bytes.data(), cap);
  RETURN_IF_ERROR(Cuda(nccl_internal::LaunchWriteSlotHeader(
                           reinterpret_cast<SlotHeader*>(own_header), tag,
                           blob_bytes.data(), nullptr, 0, nullptr, 0, 0,
                           local_error.ok() ? 0 : 1, stream),
                       op, "slot header"));
  RETURN_IF_ERROR(Mark(op, kEncode));

  // 2. Exchange.
  std::vector<uint64_t> caps(w, cap);
  std::vector<uint64_t> sizes(w, cap);
  uint64_t stride = slot;
  uint64_t blob_offset = kSlotHeaderBytes;
  if (fixed) {
    RETURN_IF_ERROR(Nccl(op, "payload allgather", [&] {
      return ncclAllGather(own_header, gather_buf.data(), static_cast<size_t>(slot), ncclUint8,
                           comm, stream);
    }));
    RETURN_IF_ERROR(Mark(op, kCommunicate));
    stats->bytes_sent += slot;
    stats->bytes_received += (w - 1) * slot;
  } else {
    RETURN_IF_ERROR(Nccl(op, "size allgather", [&] {
      return ncclAllGather(own_header, header_buf.data(), kSlotHeaderBytes, ncclUint8, comm,
                           stream);
    }));
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(host_headers, header_buf.data(), w * kSlotHeaderBytes,
                                         cudaMemcpyDeviceToHost, stream),
                         op, "size allgather"));
    RETURN_IF_ERROR(Mark(op, kCommunicate));
    RETURN_IF_ERROR(WaitHost(op, "size allgather"));
    RETURN_IF_ERROR(CheckHeaders(op, "size allgather", host_headers, tag, caps, local_error,
                                 "could not encode its bucket"));
    uint64_t max_size = 0;
    for (int r = 0; r < w; ++r) {
      sizes[r] = static_cast<uint64_t>(host_headers[r].size);
      max_size = std::max(max_size, sizes[r]);
    }
    stride = std::max<uint64_t>(16, RoundUp16(max_size));  // <= RoundUp16(cap): blob_buf holds it
    blob_offset = 0;
    RETURN_IF_ERROR(Ensure(op, gather_buf, static_cast<size_t>(w * stride)));
    RETURN_IF_ERROR(Nccl(op, "payload allgather", [&] {
      return ncclAllGather(own_blob, gather_buf.data(), static_cast<size_t>(stride), ncclUint8,
                           comm, stream);
    }));
    RETURN_IF_ERROR(Mark(op, kCommunicate));
    stats->bytes_sent += stride;
    stats->bytes_received += (w - 1) * stride;
  }

  // 3. Decode-and-add every rank's blob in rank order, then divide.
  RETURN_IF_ERROR(Cuda(cudaMemsetAsync(d_data, 0, 4 * n, stream), op, "decode"));
  RETURN_IF_ERROR(Cuda(cudaMemsetAsync(errors.data(), 0, 4 * w, stream), op, "decode"));
  for (int r = 0; r < w; ++r) {
    const absl::Status decoded =
        codec->DecodeAdd(gather_buf.data() + r * stride + blob_offset, sizes[r], n, shape, d_data,
                         errors.data() + r, stream);
    if (!decoded.ok()) return Annotate(decoded, Where(op, "decode"));
  }
  if (w > 1) {
    RETURN_IF_ERROR(Cuda(nccl_internal::LaunchDivideInPlace(d_data, n, static_cast<float>(w),
                                                            stream),
                         op, "divide"));
  }
  RETURN_IF_ERROR(Mark(op, kDecode));

  // 4. The one host sync of the bucket: headers (fixed-size path) and decode error words.
  RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(host_errors, errors.data(), 4 * w, cudaMemcpyDeviceToHost,
                                       stream),
                       op, "reading decode errors"));
  if (fixed) {
    RETURN_IF_ERROR(Cuda(cudaMemcpy2DAsync(host_headers, kSlotHeaderBytes, gather_buf.data(),
                                           static_cast<size_t>(slot), kSlotHeaderBytes, w,
                                           cudaMemcpyDeviceToHost, stream),
                         op, "reading headers"));
  }
  RETURN_IF_ERROR(WaitHost(op, "end of bucket"));
  if (fixed) {
    RETURN_IF_ERROR(CheckHeaders(op, "payload allgather", host_headers, tag, caps, local_error,
                                 "could not encode its bucket"));
  }
  return CheckDecodeErrors(op, "payload", host_errors, errors.data(), w);
}

absl::Status NcclCommunicator::Impl::ReduceScatterMean(const Op& op, float* d_data, uint64_t n,
                                                       StepStats* stats) {
  const int w = size;
  const int64_t tag = BucketTag(op.key, n);
  const std::span<const int64_t> shape;
  auto begin = [&](int j) { return SliceBegin(n, j, w); };
  auto length = [&](int j) { return begin(j + 1) - begin(j); };
  const bool fixed = codec->fixed_size();
  std::vector<uint64_t> caps(w, 0);
  uint64_t max_cap = 0;
  for (int j = 0; j < w; ++j) {
    caps[j] = length(j) == 0 ? 0 : codec->MaxBlobBytes(shape, length(j));
    max_cap = std::max(max_cap, caps[j]);
  }
  const uint64_t slot = kSlotHeaderBytes + RoundUp16(max_cap);
  const uint64_t own_length = length(rank);
  const uint64_t own_cap = caps[rank];

  RETURN_IF_ERROR(Ensure(op, send_buf, static_cast<size_t>(w * slot)));
  RETURN_IF_ERROR(Ensure(op, recv_buf, static_cast<size_t>(w * slot)));
  RETURN_IF_ERROR(Ensure(op, gather_buf, static_cast<size_t>(w * slot)));
  RETURN_IF_ERROR(Ensure(op, header_buf, static_cast<size_t>(w * kSlotHeaderBytes)));
  RETURN_IF_ERROR(Ensure(op, errors, static_cast<size_t>(2 * w)));
  RETURN_IF_ERROR(Ensure(op, blob_bytes, static_cast<size_t>(w + 1)));
  RETURN_IF_ERROR(Ensure(op, scales, static_cast<size_t>(w + 1)));
  RETURN_IF_ERROR(Ensure(op, mean_buf, static_cast<size_t>(std::max<uint64_t>(1, own_length))));
  // Host mirror: recv headers, own send headers, gathered headers (W each), 2W error words.
  RETURN_IF_ERROR(host.Ensure(static_cast<size_t>(w) * (3 * kSlotHeaderBytes + 8)));
  SlotHeader* host_recv = host.as<SlotHeader>();
  SlotHeader* host_sent = host_recv + w;
  SlotHeader* host_gathered = host_sent + w;
  int32_t* host_errors = reinterpret_cast<int32_t*>(host_gathered + w);
  auto slice_key = [&](int j) { return absl::StrCat(op.key, "/rs", j); };

  // 1. TernGrad: local scales of every non-empty slice, then the shared maxima.
  absl::Status local_error;
  std::vector<float*> slice_residual(w, nullptr);
  if (feedback) {
    for (int j = 0; j < w; ++j) {
      if (length(j) == 0) continue;
      ASSIGN_OR_RETURN(slice_residual[j], ResidualFor(op, slice_key(j), length(j)));
    }
  }
  if (shares_scale) {
    RETURN_IF_ERROR(Cuda(cudaMemsetAsync(scales.data(), 0, 4 * (w + 1), stream), op, "encode"));
    for (int j = 0; j < w && local_error.ok(); ++j) {
      if (length(j) == 0) continue;
      local_error = codec->PrepareScale(d_data + begin(j), slice_residual[j], length(j),
                                        scales.data() + j, stream);
      if (!local_error.ok()) local_error = Annotate(local_error, Where(op, "encode"));
    }
    if (!local_error.ok()) {
      RETURN_IF_ERROR(Cuda(nccl_internal::LaunchFill(scales.data(), w,
                                                     std::numeric_limits<float>::infinity(),
                                                     stream),
                           op, "encode"));
    }
    RETURN_IF_ERROR(Mark(op, kEncode));
    RETURN_IF_ERROR(Nccl(op, "terngrad scale max-allreduce", [&] {
      return ncclAllReduce(scales.data(), scales.data(), static_cast<size_t>(w), ncclFloat32,
                           ncclMax, comm, stream);
    }));
    RETURN_IF_ERROR(Mark(op, kCommunicate));
  }

  // 2. Encode slice j for rank j into send slot j.
  for (int j = 0; j < w && local_error.ok(); ++j) {
    if (length(j) == 0) continue;
    uint8_t* blob = send_buf.data() + j * slot + kSlotHeaderBytes;
    if (shares_scale) {
      const uint32_t stream_key = rng.NextStream();
      local_error = codec->EncodeWithScale(d_data + begin(j), slice_residual[j], length(j), shape,
                                           stream_key, scales.data() + j, blob, caps[j],
                                           blob_bytes.data() + j, stream);
      if (!local_error.ok()) local_error = Annotate(local_error, Where(op, "encode"));
    } else {
      local_error = EncodeBlob(op, d_data + begin(j), slice_residual[j], length(j), nullptr, blob,
                               caps[j], blob_bytes.data() + j);
    }
    if (local_error.ok()) CallHook("slice", j, blob, blob_bytes.data() + j, caps[j]);
  }
  for (int j = 0; j < w; ++j) {
    RETURN_IF_ERROR(Cuda(nccl_internal::LaunchWriteSlotHeader(
                             reinterpret_cast<SlotHeader*>(send_buf.data() + j * slot), tag,
                             length(j) == 0 ? nullptr : blob_bytes.data() + j, nullptr, 0,
                             nullptr, 0, 0, local_error.ok() ? 0 : 1, stream),
                         op, "slot header"));
  }
  RETURN_IF_ERROR(Mark(op, kEncode));

  // 3. Slice j goes to rank j (send/recv in one group; our own slice is a device copy).
  std::vector<uint64_t> recv_sizes(w, own_cap);
  std::vector<uint64_t> recv_caps(w, own_cap);
  if (fixed) {
    RETURN_IF_ERROR(Nccl(op, "slice exchange", [&] {
      for (int j = 0; j < w; ++j) {
        if (j == rank) continue;
        ncclResult_t r = ncclSend(send_buf.data() + j * slot, static_cast<size_t>(slot),
                                  ncclUint8, j, comm, stream);
        if (r == ncclSuccess) {
          r = ncclRecv(recv_buf.data() + j * slot, static_cast<size_t>(slot), ncclUint8, j, comm,
                       stream);
        }
        if (r != ncclSuccess) return r;
      }
      return ncclSuccess;
    }));
    for (int j = 0; j < w; ++j) {
      if (j == rank) continue;
      stats->bytes_sent += slot;
      stats->bytes_received += slot;
    }
  } else {
    // Headers first (the sizes), read on the host, then exactly the announced bytes.
    RETURN_IF_ERROR(Nccl(op, "size exchange", [&] {
      for (int j = 0; j < w; ++j) {
        if (j == rank) continue;
        ncclResult_t r = ncclSend(send_buf.data() + j * slot, kSlotHeaderBytes, ncclUint8, j, comm,
                                  stream);
        if (r == ncclSuccess) {
          r = ncclRecv(recv_buf.data() + j * slot, kSlotHeaderBytes, ncclUint8, j, comm, stream);
        }
        if (r != ncclSuccess) return r;
      }
      return ncclSuccess;
    }));
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(recv_buf.data() + rank * slot,
                                         send_buf.data() + rank * slot, kSlotHeaderBytes,
                                         cudaMemcpyDeviceToDevice, stream),
                         op, "size exchange"));
    RETURN_IF_ERROR(Cuda(cudaMemcpy2DAsync(host_recv, kSlotHeaderBytes, recv_buf.data(),
                                           static_cast<size_t>(slot), kSlotHeaderBytes, w,
                                           cudaMemcpyDeviceToHost, stream),
                         op, "size exchange"));
    RETURN_IF_ERROR(Cuda(cudaMemcpy2DAsync(host_sent, kSlotHeaderBytes, send_buf.data(),
                                           static_cast<size_t>(slot), kSlotHeaderBytes, w,
                                           cudaMemcpyDeviceToHost, stream),
                         op, "size exchange"));
    RETURN_IF_ERROR(WaitHost(op, "size exchange"));
    RETURN_IF_ERROR(CheckHeaders(op, "size exchange", host_recv, tag, recv_caps, local_error,
                                 "could not encode its slices"));
    for (int j = 0; j < w; ++j) recv_sizes[j] = static_cast<uint64_t>(host_recv[j].size);
    RETURN_IF_ERROR(Nccl(op, "slice exchange", [&] {
      for (int j = 0; j < w; ++j) {
        if (j == rank) continue;
        ncclResult_t r = ncclSuccess;
        const uint64_t send_size = static_cast<uint64_t>(host_sent[j].size);
        if (send_size > 0) {
          r = ncclSend(send_buf.data() + j * slot + kSlotHeaderBytes,
                       static_cast<size_t>(send_size), ncclUint8, j, comm, stream);
        }
        if (r == ncclSuccess && recv_sizes[j] > 0) {
          r = ncclRecv(recv_buf.data() + j * slot + kSlotHeaderBytes,
                       static_cast<size_t>(recv_sizes[j]), ncclUint8, j, comm, stream);
        }
        if (r != ncclSuccess) return r;
      }
      return ncclSuccess;
    }));
    for (int j = 0; j < w; ++j) {
      if (j == rank) continue;
      stats->bytes_sent += static_cast<uint64_t>(host_sent[j].size);
      stats->bytes_received += recv_sizes[j];
    }
  }
  RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(recv_buf.data() + rank * slot, send_buf.data() + rank * slot,
                                       static_cast<size_t>(slot), cudaMemcpyDeviceToDevice, stream),
                       op, "slice exchange"));
  RETURN_IF_ERROR(Mark(op, kCommunicate));

  // 4. The owner sums its slice from every rank in rank order and averages. A payload the host
  // already refuses makes this rank's aggregate fail (its header says so), but it still takes
  // part in the remaining collectives, so that no peer waits for it.
  absl::Status aggregate_error;
  RETURN_IF_ERROR(Cuda(cudaMemsetAsync(errors.data(), 0, 8 * w, stream), op, "decode"));
  if (own_length > 0) {
    RETURN_IF_ERROR(Cuda(cudaMemsetAsync(mean_buf.data(), 0, 4 * own_length, stream), op, "decode"));
    for (int s = 0; s < w && aggregate_error.ok(); ++s) {
      const absl::Status decoded =
          codec->DecodeAdd(recv_buf.data() + s * slot + kSlotHeaderBytes, recv_sizes[s],
                           own_length, shape, mean_buf.data(), errors.data() + s, stream);
      if (!decoded.ok()) {
        aggregate_error = Annotate(
            decoded, absl::StrCat(Where(op, "decode"), ": slice payload from rank ", s));
      }
    }
    if (w > 1) {
      RETURN_IF_ERROR(Cuda(nccl_internal::LaunchDivideInPlace(mean_buf.data(), own_length,
                                                              static_cast<float>(w), stream),
                           op, "divide"));
    }
  }
  RETURN_IF_ERROR(Mark(op, kDecode));

  // 5. Re-encode the mean with the aggregator residual. Fixed size: straight into our slot of the
  // gather buffer (in-place allgather); threshold: into our (now free) send slot.
  uint8_t* agg_slot = fixed ? gather_buf.data() + rank * slot : send_buf.data() + rank * slot;
  uint8_t* agg_header = fixed ? agg_slot : header_buf.data() + rank * kSlotHeaderBytes;
  uint8_t* agg_blob = agg_slot + kSlotHeaderBytes;
  if (own_length > 0 && aggregate_error.ok()) {
    float* agg_residual = nullptr;
    if (feedback) {
      ASSIGN_OR_RETURN(agg_residual, ResidualFor(op, absl::StrCat(op.key, "/agg"), own_length));
    }
    // TernGrad: the aggregator's local scale (no sharing: one encoder per slice).
    aggregate_error = EncodeBlob(op, mean_buf.data(), agg_residual, own_length, scales.data() + w,
                                 agg_blob, own_cap, blob_bytes.data() + w);
    if (aggregate_error.ok()) CallHook("aggregate", rank, agg_blob, blob_bytes.data() + w, own_cap);
  }
  // The header is -1 when our inputs were bad (a decode error, a peer's failed or foreign slot),
  // so every rank learns it from the allgather.
  RETURN_IF_ERROR(Cuda(nccl_internal::LaunchWriteSlotHeader(
                           reinterpret_cast<SlotHeader*>(agg_header), tag,
                           own_length == 0 ? nullptr : blob_bytes.data() + w, errors.data(), w,
                           recv_buf.data(), w, slot, aggregate_error.ok() ? 0 : 1, stream),
                       op, "slot header"));
  RETURN_IF_ERROR(Mark(op, kEncode));

  // 6. All-gather the re-encoded slices.
  std::vector<uint64_t> gathered_sizes(caps);
  uint64_t stride = slot;
  uint64_t blob_offset = kSlotHeaderBytes;
  if (fixed) {
    RETURN_IF_ERROR(Nccl(op, "aggregate allgather", [&] {
      return ncclAllGather(agg_slot, gather_buf.data(), static_cast<size_t>(slot), ncclUint8,
                           comm, stream);
    }));
    stats->bytes_sent += slot;
    stats->bytes_received += (w - 1) * slot;
  } else {
    RETURN_IF_ERROR(Nccl(op, "aggregate size allgather", [&] {
      return ncclAllGather(agg_header, header_buf.data(), kSlotHeaderBytes, ncclUint8, comm,
                           stream);
    }));
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(host_gathered, header_buf.data(), w * kSlotHeaderBytes,
                                         cudaMemcpyDeviceToHost, stream),
                         op, "aggregate size allgather"));
    RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(host_errors, errors.data(), 4 * w,
                                         cudaMemcpyDeviceToHost, stream),
                         op, "reading decode errors"));
    RETURN_IF_ERROR(WaitHost(op, "aggregate size allgather"));
    // Our own aggregation problems first: they name the culprit.
    RETURN_IF_ERROR(CheckDecodeErrors(op, "slice payload", host_errors, errors.data(), w));
    RETURN_IF_ERROR(CheckHeaders(op, "aggregate size allgather", host_gathered, tag, caps,
                                 aggregate_error, "could not aggregate its slice"));
    uint64_t max_size = 0;
    for (int j = 0; j < w; ++j) {
      gathered_sizes[j] = static_cast<uint64_t>(host_gathered[j].size);
      max_size = std::max(max_size, gathered_sizes[j]);
    }
    stride = std::max<uint64_t>(16, RoundUp16(max_size));
    blob_offset = 0;
    // The send slot holds RoundUp16(max_cap) >= stride bytes after agg_blob.
    RETURN_IF_ERROR(Nccl(op, "aggregate allgather", [&] {
      return ncclAllGather(agg_blob, gather_buf.data(), static_cast<size_t>(stride), ncclUint8,
                           comm, stream);
    }));
    stats->bytes_sent += stride;
    stats->bytes_received += (w - 1) * stride;
  }
  RETURN_IF_ERROR(Mark(op, kCommunicate));

  // 7. Every rank decodes every re-encoded slice into place.
  for (int j = 0; j < w; ++j) {
    if (length(j) == 0) continue;
    RETURN_IF_ERROR(Cuda(cudaMemsetAsync(d_data + begin(j), 0, 4 * length(j), stream), op, "decode"));
    const absl::Status decoded =
        codec->DecodeAdd(gather_buf.data() + j * stride + blob_offset, gathered_sizes[j],
                         length(j), shape, d_data + begin(j), errors.data() + w + j, stream);
    if (!decoded.ok()) return Annotate(decoded, Where(op, "decode"));
  }
  RETURN_IF_ERROR(Mark(op, kDecode));

  // 8. The end-of-bucket sync: headers of both exchanges (fixed size) and all error words.
  RETURN_IF_ERROR(Cuda(cudaMemcpyAsync(host_errors, errors.data(), 8 * w, cudaMemcpyDeviceToHost,
                                       stream),
                       op, "reading decode errors"));
  if (fixed) {
    RETURN_IF_ERROR(Cuda(cudaMemcpy2DAsync(host_recv, kSlotHeaderBytes, recv_buf.data(),
                                           static_cast<size_t>(slot), kSlotHeaderBytes, w,
                                           cudaMemcpyDeviceToHost, stream),
                         op, "reading headers"));
    RETURN_IF_ERROR(Cuda(cudaMemcpy2DAsync(host_gathered, kSlotHeaderBytes, gather_buf.data(),
                                           static_cast<size_t>(slot), kSlotHeaderBytes, w,
                                           cudaMemcpyDeviceToHost, stream),
                         op, "reading headers"));
  }
  RETURN_IF_ERROR(WaitHost(op, "end of bucket"));
  if (fixed) {
    RETURN_IF_ERROR(CheckHeaders(op, "slice exchange", host_recv, tag, recv_caps, local_error,
                                 "could not encode its slices"));
    RETURN_IF_ERROR(CheckDecodeErrors(op, "slice payload", host_errors, errors.data(), w));
    RETURN_IF_ERROR(CheckHeaders(op, "aggregate allgather", host_gathered, tag, caps,
                                 aggregate_error, "could not aggregate its slice"));
  }
  return CheckDecodeErrors(op, "aggregated payload", host_errors + w, errors.data() + w, w);
}

// ---- NcclCommunicator -----------------------------------------------------------------------

NcclCommunicator::NcclCommunicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

NcclCommunicator::~NcclCommunicator() = default;

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(
    const NcclBootstrap& bootstrap, const NcclOptions& options) {
  if (!(options.timeout_seconds > 0.0) || !std::isfinite(options.timeout_seconds)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "NCCL timeout must be a finite number of seconds > 0; got ", options.timeout_seconds));
  }
  const int w = bootstrap.world_size;
  const int rank = bootstrap.rank;
  if (w < 1 || rank < 0 || rank >= w) {
    return absl::InvalidArgumentError(
        absl::StrCat("NCCL communicator: rank ", rank, " is not in a world of ", w));
  }
  if (w > 1 && !bootstrap.exchange_id) {
    return absl::InvalidArgumentError(
        "NCCL communicator: a world of several ranks needs a bootstrap exchange_id");
  }
  // Validate the spec before any collective, so a bad spec fails on every rank alike.
  ASSIGN_OR_RETURN(std::unique_ptr<BucketCodec> meta,
                   BucketCodec::Create(options.codec_spec, options.error_feedback));
  std::unique_ptr<CudaCodec> codec;
  if (!meta->passthrough()) {
    ASSIGN_OR_RETURN(codec, CudaCodec::CreateFromSpec(options.codec_spec));
  }
  const int devices = cuda::DeviceCount();
  if (devices == 0) {
    return absl::FailedPreconditionError("NCCL communicator: no CUDA device on this machine");
  }
  int device = bootstrap.device;
  if (device < 0) device = devices == 1 ? 0 : bootstrap.local_rank;
  if (device >= devices) {
    return absl::FailedPreconditionError(absl::StrCat(
        "NCCL communicator: rank ", rank, " (local rank ", bootstrap.local_rank,
        ") wants CUDA device ", device, " but only ", devices,
        " are visible: start at most one rank per GPU on each machine"));
  }
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  DefaultNvlsOff();

  auto impl = std::make_unique<Impl>(options, rank, w, device);
  impl->device_name = cuda::DeviceName(device).value_or("?");
  impl->feedback = codec != nullptr && meta->feedback_on();
  impl->shares_scale = codec != nullptr && meta->shares_scale();
  impl->meta = std::move(meta);
  impl->codec = std::move(codec);
  int least_priority = 0;
  int greatest_priority = 0;
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority));
  QTRAIN_CUDA_RETURN_IF_ERROR(
      cudaStreamCreateWithPriority(&impl->stream, cudaStreamNonBlocking, greatest_priority));
  QTRAIN_CUDA_RETURN_IF_ERROR(
      cudaEventCreateWithFlags(&impl->caller_ready, cudaEventDisableTiming));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&impl->done, cudaEventDisableTiming));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&impl->sync_event, cudaEventDisableTiming));

  // The unique id: made by rank 0, carried to the others by the bootstrap.
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank == 0) {
    const ncclResult_t made = ncclGetUniqueId(&id);
    if (made != ncclSuccess) {
      return NcclError(made, nullptr, "NCCL start-up: ncclGetUniqueId on rank 0");
    }
  }
  if (w > 1) {
    absl::Status exchanged = bootstrap.exchange_id(
        std::span<uint8_t>(reinterpret_cast<uint8_t*>(id.internal), sizeof(id.internal)));
    if (!exchanged.ok()) {
      return Annotate(exchanged,
                      absl::StrCat("NCCL start-up on rank ", rank, " of ", w,
                                   ": exchanging the unique id"));
    }
  }

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // every call returns at once; we poll with our deadlines
  config.commName = "qtrain";
  const Clock::time_point deadline =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double>(options.timeout_seconds));
  const std::string where = absl::StrCat("NCCL start-up on rank ", rank, " of ", w, " (device ",
                                         device, ")");
  ncclResult_t state = ncclCommInitRankConfig(&impl->comm, w, id, rank, &config);
  if (state != ncclSuccess && state != ncclInProgress) {
    absl::Status status = NcclError(state, impl->comm, where);
    if (impl->comm != nullptr) {
      ncclCommAbort(impl->comm);
      impl->comm = nullptr;
    }
    return status;
  }
  while (state == ncclInProgress) {
    if (Clock::now() >= deadline) {
      ncclCommAbort(impl->comm);
      impl->comm = nullptr;
      return absl::DeadlineExceededError(absl::StrCat(
          where, " did not finish within ", options.timeout_seconds,
          " s: not every rank joined (check that all ranks started and can reach each other)"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(500));
    if (ncclCommGetAsyncError(impl->comm, &state) != ncclSuccess) break;
  }
  if (state != ncclSuccess) {
    absl::Status status = NcclError(state, impl->comm, where);
    ncclCommAbort(impl->comm);
    impl->comm = nullptr;
    return status;
  }
  Impl* raw = impl.get();
  impl->watchdog = std::thread([raw] { raw->WatchdogLoop(); });
  return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(std::move(impl)));
}

int NcclCommunicator::rank() const { return impl_->rank; }
int NcclCommunicator::world_size() const { return impl_->size; }
int NcclCommunicator::device() const { return impl_->device; }

std::string NcclCommunicator::Describe() const {
  const Impl& m = *impl_;
  return absl::StrCat("nccl: rank ", m.rank, " of ", m.size, " on device ", m.device, " (",
                      m.device_name, "), codec ",
                      m.codec == nullptr ? std::string("fp32 (ncclAllReduce)") : m.meta->Describe(),
                      ", algorithm ", AllreduceAlgorithmName(m.options.algorithm), ", timeout ",
                      m.options.timeout_seconds, " s");
}

void NcclCommunicator::SetStep(int64_t step) { impl_->step = step; }

absl::Status NcclCommunicator::AllReduceMeanDevice(std::string_view key, float* d_data, size_t n,
                                                   void* cuda_stream, StepStats* stats) {
  Impl& m = *impl_;
  if (key.empty()) return absl::InvalidArgumentError("NCCL AllReduceMean: empty bucket key");
  if (n > compression::kMaxElements) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL AllReduceMean of bucket '", AsAbsl(key),
                                                   "': ", n, " elements is over ",
                                                   compression::kMaxElements));
  }
  if (n > 0 && d_data == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("NCCL AllReduceMean of bucket '", AsAbsl(key), "': null device pointer"));
  }
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("AllReduceMean", key));
  StepStats local;
  local.calls = 1;
  m.Reap();
  absl::Status status;
  if (n > 0) {  // every rank passes the same size: nothing to exchange for 0
    status = m.Run(op, d_data, n, static_cast<cudaStream_t>(cuda_stream), &local);
  }
  m.Reap();  // a compressed bucket is complete here; an fp32 one usually is not yet
  m.ClaimTimes(&local);
  if (stats != nullptr) *stats += local;
  return status;
}

absl::Status NcclCommunicator::AllReduceMean(std::string_view key, std::span<float> data,
                                             StepStats* stats) {
  Impl& m = *impl_;
  if (key.empty()) return absl::InvalidArgumentError("NCCL AllReduceMean: empty bucket key");
  if (data.size() > compression::kMaxElements) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL AllReduceMean of bucket '", AsAbsl(key),
                                                   "': ", data.size(), " elements is over ",
                                                   compression::kMaxElements));
  }
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("AllReduceMean", key));
  StepStats local;
  local.calls = 1;
  m.Reap();
  absl::Status status;
  const size_t n = data.size();
  if (n > 0) {
    status = m.Ensure(op, m.io_floats, n);
    if (status.ok()) status = m.host_io.Ensure(4 * n);
    if (status.ok()) {
      std::memcpy(m.host_io.as<float>(), data.data(), 4 * n);
      status = m.Cuda(cudaMemcpyAsync(m.io_floats.data(), m.host_io.as<float>(), 4 * n,
                                      cudaMemcpyHostToDevice, m.stream),
                      op, "copy in");
    }
    if (status.ok()) status = m.Run(op, m.io_floats.data(), n, m.stream, &local);
    if (status.ok()) {
      status = m.Cuda(cudaMemcpyAsync(m.host_io.as<float>(), m.io_floats.data(), 4 * n,
                                      cudaMemcpyDeviceToHost, m.stream),
                      op, "copy out");
    }
    if (status.ok()) status = m.WaitHost(op, "waiting for the result");
    if (status.ok()) std::memcpy(data.data(), m.host_io.as<float>(), 4 * n);
  }
  m.Reap();
  m.ClaimTimes(&local);
  if (stats != nullptr) *stats += local;
  return status;
}

absl::Status NcclCommunicator::Broadcast(std::span<float> data, int root) {
  Impl& m = *impl_;
  if (root < 0 || root >= m.size) {
    return absl::InvalidArgumentError(
        absl::StrCat("NCCL Broadcast: root ", root, " is not a rank of a world of ", m.size));
  }
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("Broadcast", ""));
  const size_t n = data.size();
  if (n == 0) return absl::OkStatus();
  RETURN_IF_ERROR(m.Ensure(op, m.io_floats, n));
  RETURN_IF_ERROR(m.host_io.Ensure(4 * n));
  if (m.rank == root) {
    std::memcpy(m.host_io.as<float>(), data.data(), 4 * n);
    RETURN_IF_ERROR(m.Cuda(cudaMemcpyAsync(m.io_floats.data(), m.host_io.as<float>(), 4 * n,
                                           cudaMemcpyHostToDevice, m.stream),
                           op, "copy in"));
  }
  RETURN_IF_ERROR(m.Nccl(op, absl::StrCat("bcast from rank ", root), [&] {
    return ncclBroadcast(m.io_floats.data(), m.io_floats.data(), n, ncclFloat32, root, m.comm,
                         m.stream);
  }));
  if (m.rank != root) {
    RETURN_IF_ERROR(m.Cuda(cudaMemcpyAsync(m.host_io.as<float>(), m.io_floats.data(), 4 * n,
                                           cudaMemcpyDeviceToHost, m.stream),
                           op, "copy out"));
  }
  RETURN_IF_ERROR(m.WaitHost(op, absl::StrCat("bcast from rank ", root)));
  if (m.rank != root) std::memcpy(data.data(), m.host_io.as<float>(), 4 * n);
  return absl::OkStatus();
}

absl::Status NcclCommunicator::AllReduceSum(std::span<double> values) {
  Impl& m = *impl_;
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("AllReduceSum", ""));
  const size_t n = values.size();
  if (n == 0) return absl::OkStatus();
  RETURN_IF_ERROR(m.Ensure(op, m.io_doubles, n));
  RETURN_IF_ERROR(m.host_io.Ensure(8 * n));
  std::memcpy(m.host_io.as<double>(), values.data(), 8 * n);
  RETURN_IF_ERROR(m.Cuda(cudaMemcpyAsync(m.io_doubles.data(), m.host_io.as<double>(), 8 * n,
                                         cudaMemcpyHostToDevice, m.stream),
                         op, "copy in"));
  RETURN_IF_ERROR(m.Nccl(op, "double allreduce", [&] {
    return ncclAllReduce(m.io_doubles.data(), m.io_doubles.data(), n, ncclFloat64, ncclSum,
                         m.comm, m.stream);
  }));
  RETURN_IF_ERROR(m.Cuda(cudaMemcpyAsync(m.host_io.as<double>(), m.io_doubles.data(), 8 * n,
                                         cudaMemcpyDeviceToHost, m.stream),
                         op, "copy out"));
  RETURN_IF_ERROR(m.WaitHost(op, "double allreduce"));
  std::memcpy(values.data(), m.host_io.as<double>(), 8 * n);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint64_t>> NcclCommunicator::AllGatherU64(uint64_t value) {
  Impl& m = *impl_;
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("AllGatherU64", ""));
  const size_t w = static_cast<size_t>(m.size);
  RETURN_IF_ERROR(m.Ensure(op, m.io_u64, w));
  RETURN_IF_ERROR(m.host_io.Ensure(8 * w));
  m.host_io.as<uint64_t>()[m.rank] = value;
  RETURN_IF_ERROR(m.Cuda(cudaMemcpyAsync(m.io_u64.data() + m.rank, m.host_io.as<uint64_t>() + m.rank,
                                         8, cudaMemcpyHostToDevice, m.stream),
                         op, "copy in"));
  RETURN_IF_ERROR(m.Nccl(op, "uint64 allgather", [&] {
    return ncclAllGather(m.io_u64.data() + m.rank, m.io_u64.data(), 1, ncclUint64, m.comm,
                         m.stream);
  }));
  RETURN_IF_ERROR(m.Cuda(cudaMemcpyAsync(m.host_io.as<uint64_t>(), m.io_u64.data(), 8 * w,
                                         cudaMemcpyDeviceToHost, m.stream),
                         op, "copy out"));
  RETURN_IF_ERROR(m.WaitHost(op, "uint64 allgather"));
  return std::vector<uint64_t>(m.host_io.as<uint64_t>(), m.host_io.as<uint64_t>() + w);
}

absl::Status NcclCommunicator::Barrier() {
  Impl& m = *impl_;
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("Barrier", ""));
  RETURN_IF_ERROR(m.Ensure(op, m.io_u64, static_cast<size_t>(m.size)));
  RETURN_IF_ERROR(m.Nccl(op, "barrier", [&] {
    return ncclAllReduce(m.io_u64.data(), m.io_u64.data(), 1, ncclUint64, ncclMax, m.comm,
                         m.stream);
  }));
  return m.WaitHost(op, "barrier");
}

absl::Status NcclCommunicator::Synchronize() {
  Impl& m = *impl_;
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("Synchronize", ""));
  RETURN_IF_ERROR(m.WaitHost(op, "draining the stream"));
  m.Reap();
  std::lock_guard<std::mutex> lock(m.mu);
  return m.failure.ok() ? absl::OkStatus() : m.FailedLocked();
}

std::vector<std::string> NcclCommunicator::ResidualKeys() const {
  std::vector<std::string> keys;
  keys.reserve(impl_->residuals.size());
  for (const auto& [key, array] : impl_->residuals) keys.push_back(key);
  return keys;
}

std::span<const float> NcclCommunicator::Residual(std::string_view key) const {
  Impl& m = *impl_;
  auto it = m.residuals.find(key);
  if (it == m.residuals.end()) return {};
  absl::Status status = m.WaitHost(m.LocalOp("Residual", key), "reading a residual");
  std::vector<float>& copy = m.residual_host[std::string(key)];
  copy.assign(it->second.size(), 0.0f);
  if (status.ok()) status = it->second.CopyToHost(std::span<float>(copy));
  if (!status.ok()) {
    QTRAIN_LOG(ERROR) << "NCCL residual '" << std::string(key)
                      << "' could not be read: " << status.ToString();
    m.residual_host.erase(std::string(key));
    return {};
  }
  return copy;
}

absl::Status NcclCommunicator::SetResidual(std::string_view key, std::span<const float> values) {
  Impl& m = *impl_;
  if (m.codec == nullptr || !m.feedback) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot set residual '", AsAbsl(key), "': ",
        m.codec == nullptr ? std::string("codec fp32 keeps no residuals")
                           : absl::StrCat("error feedback is off for ", m.meta->Describe())));
  }
  const Impl::Op op = m.LocalOp("SetResidual", key);
  RETURN_IF_ERROR(m.WaitHost(op, "replacing a residual"));  // no kernel may still use the old one
  ASSIGN_OR_RETURN(cuda::DeviceArray<float> array, cuda::DeviceArray<float>::Create(values.size()));
  if (!values.empty()) {
    // On the communicator's stream, so that the kernels that read it are ordered after the copy.
    RETURN_IF_ERROR(m.Cuda(cudaMemcpyAsync(array.data(), values.data(), 4 * values.size(),
                                           cudaMemcpyHostToDevice, m.stream),
                           op, "replacing a residual"));
    RETURN_IF_ERROR(m.WaitHost(op, "replacing a residual"));
  }
  m.residuals.insert_or_assign(std::string(key), std::move(array));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(
    const NcclBootstrap& bootstrap, const NcclOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<NcclCommunicator> communicator,
                   NcclCommunicator::Create(bootstrap, options));
  return std::unique_ptr<Communicator>(std::move(communicator));
}

}  // namespace qtrain::comm
