// The only file of qtrain that includes mpi.h (see mpi_communicator.h for the contract).
#include "worker/comm/mpi_communicator.h"

#include <mpi.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/timer.h"
#include "compression/codec.h"

namespace qtrain::comm {

namespace {

using Clock = std::chrono::steady_clock;

// kAuto's rule (documented in the header).

// Upper bound on the serialized size of any codec's payload for n elements (the worst is about
// 9 bytes per element: onebit with bucket=1 or qsgd with bucket=1), plus the envelope. Announced
// sizes above it are refused before anything of that size is allocated.
uint64_t MaxMessageBytes(uint64_t n) { return 16 * n + 4096; }

// The installed Abseil's string_view is its own type, not std::string_view.
absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status MpiErrorToStatus(int rc, std::string_view context) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) length = 0;
  int error_class = rc;
  if (MPI_Error_class(rc, &error_class) != MPI_SUCCESS) error_class = MPI_ERR_OTHER;
  std::string message =
      absl::StrCat(AsAbsl(context), ": MPI error ", rc, " (", absl::string_view(text, length), ")");
  switch (error_class) {
    case MPI_ERR_ARG:
    case MPI_ERR_COUNT:
    case MPI_ERR_TYPE:
    case MPI_ERR_BUFFER:
    case MPI_ERR_ROOT:
    case MPI_ERR_OP:
      return absl::InvalidArgumentError(message);
    default:
      return absl::UnavailableError(message);
  }
}

// A tag of (bucket key, element count) sent with every size exchange: ranks that call
// collectives in different orders are caught at once instead of decoding each other's buckets.
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

// Same code as `status`, message prefixed.
absl::Status Annotate(const absl::Status& status, std::string_view prefix) {
  return absl::Status(status.code(), absl::StrCat(AsAbsl(prefix), ": ", status.message()));
}

// Slice j of a bucket of n elements split into w: [n*j/w, n*(j+1)/w).
uint64_t SliceBegin(uint64_t n, int j, int w) {
  return n * static_cast<uint64_t>(j) / static_cast<uint64_t>(w);
}

}  // namespace


// ---- Impl ------------------------------------------------------------------------------------

struct MpiCommunicator::Impl {
  // What one public call is doing, for error messages, and when it must give up.
  struct Op {
    std::string name;
    std::string key;  // bucket key, "" for other collectives
    Clock::time_point deadline;
    double timeout_seconds;
  };

  Impl(MpiOptions options_in, MPI_Comm comm_in, int rank_in, int size_in,
       std::unique_ptr<BucketCodec> codec_in)
      : options(std::move(options_in)),
        comm(comm_in),
        rank(rank_in),
        size(size_in),
        codec(std::move(codec_in)),
        rng(RankSeed(options.seed, rank_in)) {}

  absl::StatusOr<Op> Start(std::string_view name, std::string_view key);
  std::string Where(const Op& op, std::string_view phase) const;
  // Polls `request` until it completes or op's deadline passes. Adds the wait to *seconds.
  absl::Status Wait(MPI_Request* request, const Op& op, std::string_view phase, double* seconds);
  // Starts a collective with `post` (returns an MPI error code) and waits for it.
  template <typename Post>
  absl::Status Collective(const Op& op, std::string_view phase, double* seconds, Post post) {
    MPI_Request request = MPI_REQUEST_NULL;
    const int rc = post(&request);
    if (rc != MPI_SUCCESS) {
      return MpiErrorToStatus(rc, absl::StrCat(Where(op, phase), " could not start"));
    }
    return Wait(&request, op, phase, seconds);
  }

  absl::Status AllReduceFp32(const Op& op, std::span<float> data, StepStats* stats);
  absl::Status AllgatherMean(const Op& op, std::span<float> data, StepStats* stats);
  absl::Status ReduceScatterMean(const Op& op, std::span<float> data, StepStats* stats);

  // Agrees on the element-wise maximum of `scales` (TernGrad). A rank whose Prepare failed
  // (`local_error`) contributes +inf, so every rank sees the failure: the result is then that
  // error on the failing rank and ABORTED elsewhere.
  absl::Status ShareScales(const Op& op, const absl::Status& local_error, StepStats* stats);
  // Serializes `encoded` into send_bytes (with checksum and the test hook).
  void SerializeForSend(const compression::EncodedTensor& encoded, std::string* out);
  // All-gathers send_bytes: sizes first (a negative size marks a rank that failed, `local_error`
  // on this rank), then MPI_Iallgatherv into recv_bytes / recv_counts / recv_displs. Rank r's
  // message may be at most max_bytes[r].
  // `tag_elements` is the element count that goes into the bucket tag.
  absl::Status AllgatherBytes(const Op& op, const absl::Status& local_error,
                              std::span<const uint64_t> max_bytes, uint64_t tag_elements,
                              StepStats* stats);
  // Rank `peer` sent a different bucket tag: the ranks' collective sequences diverged.
  absl::Status Diverged(const Op& op, std::string_view phase, int peer) const {
    return absl::FailedPreconditionError(absl::StrCat(
        Where(op, phase), ": rank ", peer, " is exchanging a different bucket (another key or ",
        "size): ranks called collectives in different orders"));
  }
  // Parses the message of `source` in recv_bytes.
  absl::StatusOr<compression::EncodedTensor> ParseFrom(const Op& op, int source,
                                                       uint64_t max_bytes) const;
  // Adds the payload into `out`: TernGrad with a shared scale accumulates ternary counts
  // (checking the payload's scale), everything else decodes-and-adds.
  absl::Status DecodeInto(const Op& op, int source, const compression::EncodedTensor& tensor,
                          std::span<float> out, const float* shared_scale);

  MpiOptions options;
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  std::unique_ptr<BucketCodec> codec;  // null: fp32 (plain allreduce)
  compression::Rng rng;
  int64_t step = 0;
  uint64_t collectives = 0;  // public collective calls made

  // A request left outstanding by a timeout (MPI cannot cancel collectives), and what it was.
  MPI_Request stalled = MPI_REQUEST_NULL;
  std::string stalled_what;

  // Every buffer MPI reads or writes is a member: after a timeout MPI may still touch it, and
  // calls are refused until the request completes, so none is reused or freed meanwhile.
  std::vector<float> floats;
  std::vector<float> floats_send;  // the fp32 allreduce's send buffer
  std::vector<double> doubles;
  uint64_t u64_send = 0;
  std::vector<uint64_t> u64s;
  std::vector<float> scales;
  std::vector<int64_t> send_sizes;  // pairs: [size or -1, bucket tag]
  std::vector<int64_t> recv_sizes;
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
  std::string send_bytes;
  std::vector<uint8_t> recv_bytes;
  // Not touched by MPI.
  std::vector<int32_t> ternary;
  compression::EncodedTensor encoded;
  std::string scratch;
};

absl::StatusOr<MpiCommunicator::Impl::Op> MpiCommunicator::Impl::Start(std::string_view name,
                                                                       std::string_view key) {
  if (stalled != MPI_REQUEST_NULL) {
    return absl::FailedPreconditionError(
        absl::StrCat("MPI ", AsAbsl(name), " refused on rank ", rank,
                     ": an earlier call timed out and its request is "
                     "still outstanding (",
                     stalled_what, "); call WaitPending or abort the job"));
  }
  ++collectives;
  const double timeout = options.timeout_seconds;
  return Op{std::string(name), std::string(key),
            Clock::now() +
                std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout)),
            timeout};
}

std::string MpiCommunicator::Impl::Where(const Op& op, std::string_view phase) const {
  return absl::StrCat("MPI ", op.name,
                      op.key.empty() ? "" : absl::StrCat(" of bucket '", op.key, "'"), " (",
                      AsAbsl(phase), ") on rank ", rank, " of ", size, " at step ", step,
                      ", collective #", collectives);
}

absl::Status MpiCommunicator::Impl::Wait(MPI_Request* request, const Op& op, std::string_view phase,
                                         double* seconds) {
  Timer timer;
  int polls = 0;
  int sleep_us = 0;
  while (true) {
    int done = 0;
    const int rc = MPI_Test(request, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
      if (seconds != nullptr) *seconds += timer.Seconds();
      return MpiErrorToStatus(rc, Where(op, phase));
    }
    if (done) break;
    if (Clock::now() >= op.deadline) {
      stalled = *request;
      *request = MPI_REQUEST_NULL;
      stalled_what = Where(op, phase);
      if (seconds != nullptr) *seconds += timer.Seconds();
      return absl::DeadlineExceededError(absl::StrCat(
          stalled_what, " timed out after ", op.timeout_seconds,
          " s: a peer has not joined (stalled, or calling collectives in another order; a dead "
          "peer normally makes mpirun end the job)"));
    }
    if (++polls > 32 && options.max_poll_sleep_us > 0) {
      sleep_us = std::min(std::max(1, 2 * sleep_us), options.max_poll_sleep_us);
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    }
  }
  if (seconds != nullptr) *seconds += timer.Seconds();
  return absl::OkStatus();
}

absl::Status MpiCommunicator::Impl::AllReduceFp32(const Op& op, std::span<float> data,
                                                  StepStats* stats) {
  if (data.size() > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrCat(Where(op, "fp32 allreduce"), ": ", data.size(), " elements is over INT_MAX"));
  }
  // A separate (internal) send buffer, not MPI_IN_PLACE: for in-place calls Open MPI 4.1's
  // non-blocking allreduce (libnbc) always takes its binomial reduce + broadcast, about 3x slower
  // than its ring on a 1 Gbit/s link.
  Timer timer;
  floats_send.assign(data.begin(), data.end());
  floats.resize(data.size());
  stats->encode_seconds += timer.Seconds();
  RETURN_IF_ERROR(
      Collective(op, "fp32 allreduce", &stats->communicate_seconds, [&](MPI_Request* request) {
        return MPI_Iallreduce(floats_send.data(), floats.data(), static_cast<int>(floats.size()),
                              MPI_FLOAT, MPI_SUM, comm, request);
      }));
  timer.Reset();
  const float w = static_cast<float>(size);
  for (size_t i = 0; i < data.size(); ++i) data[i] = floats[i] / w;
  stats->decode_seconds += timer.Seconds();
  stats->bytes_sent += 4 * data.size();
  stats->bytes_received += 4 * data.size();
  return absl::OkStatus();
}

absl::Status MpiCommunicator::Impl::ShareScales(const Op& op, const absl::Status& local_error,
                                                StepStats* stats) {
  if (!local_error.ok()) {
    std::fill(scales.begin(), scales.end(), std::numeric_limits<float>::infinity());
  }
  RETURN_IF_ERROR(Collective(
      op, "terngrad scale max-allreduce", &stats->communicate_seconds, [&](MPI_Request* request) {
        return MPI_Iallreduce(MPI_IN_PLACE, scales.data(), static_cast<int>(scales.size()),
                              MPI_FLOAT, MPI_MAX, comm, request);
      }));
  if (!local_error.ok()) return local_error;
  for (float s : scales) {
    if (!std::isfinite(s)) {
      return absl::AbortedError(absl::StrCat(
          Where(op, "terngrad scale max-allreduce"),
          ": a peer could not encode its gradient (not finite; that rank's error names it)"));
    }
  }
  return absl::OkStatus();
}

void MpiCommunicator::Impl::SerializeForSend(const compression::EncodedTensor& tensor,
                                             std::string* out) {
  *out = compression::Serialize(tensor, options.checksum);
  if (options.payload_hook_for_testing) options.payload_hook_for_testing(out);
}

absl::Status MpiCommunicator::Impl::AllgatherBytes(const Op& op, const absl::Status& local_error,
                                                   std::span<const uint64_t> max_bytes,
                                                   uint64_t tag_elements, StepStats* stats) {
  const int64_t tag = BucketTag(op.key, tag_elements);
  send_sizes = {local_error.ok() ? static_cast<int64_t>(send_bytes.size()) : -1, tag};
  recv_sizes.assign(2 * size, 0);
  RETURN_IF_ERROR(
      Collective(op, "size allgather", &stats->communicate_seconds, [&](MPI_Request* request) {
        return MPI_Iallgather(send_sizes.data(), 2, MPI_INT64_T, recv_sizes.data(), 2, MPI_INT64_T,
                              comm, request);
      }));
  // Every rank sees the same sizes and tags, so every rank takes the same branch below.
  for (int r = 0; r < size; ++r) {
    if (recv_sizes[2 * r + 1] != tag) return Diverged(op, "size allgather", r);
  }
  if (!local_error.ok()) return local_error;
  recv_counts.assign(size, 0);
  recv_displs.assign(size, 0);
  int64_t total = 0;
  for (int r = 0; r < size; ++r) {
    const int64_t s = recv_sizes[2 * r];
    if (s < 0) {
      return absl::AbortedError(
          absl::StrCat(Where(op, "size allgather"), ": rank ", r,
                       " could not encode or aggregate its part (its error says why)"));
    }
    if (static_cast<uint64_t>(s) > max_bytes[r]) {
      return absl::InvalidArgumentError(absl::StrCat(Where(op, "size allgather"), ": rank ", r,
                                                     " announces a payload of ", s,
                                                     " bytes, over the limit of ", max_bytes[r]));
    }
    if (total + s > INT_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(op, "size allgather"),
                       ": the payloads of all ranks exceed 2 GiB; use smaller buckets"));
    }
    recv_displs[r] = static_cast<int>(total);
    recv_counts[r] = static_cast<int>(s);
    total += s;
  }
  recv_bytes.resize(static_cast<size_t>(total));
  RETURN_IF_ERROR(
      Collective(op, "payload allgatherv", &stats->communicate_seconds, [&](MPI_Request* request) {
        return MPI_Iallgatherv(send_bytes.data(), static_cast<int>(send_bytes.size()), MPI_BYTE,
                               recv_bytes.data(), recv_counts.data(), recv_displs.data(), MPI_BYTE,
                               comm, request);
      }));
  stats->bytes_sent += send_bytes.size();
  stats->bytes_received += static_cast<uint64_t>(total) - send_bytes.size();
  return absl::OkStatus();
}

absl::StatusOr<compression::EncodedTensor> MpiCommunicator::Impl::ParseFrom(
    const Op& op, int source, uint64_t max_bytes) const {
  std::span<const uint8_t> bytes(recv_bytes.data() + recv_displs[source],
                                 static_cast<size_t>(recv_counts[source]));
  absl::StatusOr<compression::EncodedTensor> tensor = compression::Parse(bytes, max_bytes);
  if (!tensor.ok()) {
    return Annotate(tensor.status(),
                    absl::StrCat(Where(op, "decode"), ": payload from rank ", source));
  }
  return tensor;
}

absl::Status MpiCommunicator::Impl::DecodeInto(const Op& op, int source,
                                               const compression::EncodedTensor& tensor,
                                               std::span<float> out, const float* shared_scale) {
  absl::Status status;
  if (shared_scale != nullptr) {
    if (tensor.scales.size() != 1 ||
        std::bit_cast<uint32_t>(tensor.scales[0]) != std::bit_cast<uint32_t>(*shared_scale)) {
      status = absl::InvalidArgumentError(absl::StrCat(
          "terngrad payload's scale ",
          tensor.scales.size() == 1 ? absl::StrCat(tensor.scales[0]) : std::string("(missing)"),
          " is not the shared scale ", *shared_scale));
    } else {
      status = codec->terngrad()->AccumulateTernary(tensor, ternary);
    }
  } else {
    status = codec->codec().DecodeAdd(tensor, out);
  }
  if (!status.ok()) {
    return Annotate(status, absl::StrCat(Where(op, "decode"), ": payload from rank ", source));
  }
  return absl::OkStatus();
}

absl::Status MpiCommunicator::Impl::AllgatherMean(const Op& op, std::span<float> data,
                                                  StepStats* stats) {
  const uint64_t n = data.size();
  Timer timer;
  float scale = 0.0f;
  absl::Status local_error;
  absl::StatusOr<float> prepared = codec->Prepare(op.key, data);
  if (prepared.ok()) {
    scale = *prepared;
  } else {
    local_error = Annotate(prepared.status(), Where(op, "encode"));
  }
  if (codec->shares_scale()) {
    scales.assign(1, scale);
    stats->encode_seconds += timer.Seconds();
    RETURN_IF_ERROR(ShareScales(op, local_error, stats));
    timer.Reset();
    scale = scales[0];
  }
  if (local_error.ok()) {
    absl::Status encoded_ok = codec->Encode(op.key, data, scale, rng, &encoded);
    if (encoded_ok.ok()) {
      SerializeForSend(encoded, &send_bytes);
    } else {
      local_error = Annotate(encoded_ok, Where(op, "encode"));
    }
  }
  if (!local_error.ok()) send_bytes.clear();
  stats->encode_seconds += timer.Seconds();

  const uint64_t limit = MaxMessageBytes(n);
  std::vector<uint64_t> limits(size, limit);
  RETURN_IF_ERROR(AllgatherBytes(op, local_error, limits, n, stats));

  timer.Reset();
  std::fill(data.begin(), data.end(), 0.0f);
  const bool ternary_sum = codec->shares_scale();
  if (ternary_sum) ternary.assign(n, 0);
  for (int r = 0; r < size; ++r) {
    ASSIGN_OR_RETURN(compression::EncodedTensor tensor, ParseFrom(op, r, limit));
    RETURN_IF_ERROR(DecodeInto(op, r, tensor, data, ternary_sum ? &scale : nullptr));
  }
  const float w = static_cast<float>(size);
  if (ternary_sum) {
    for (uint64_t i = 0; i < n; ++i) data[i] = (static_cast<float>(ternary[i]) * scale) / w;
  } else {
    for (uint64_t i = 0; i < n; ++i) data[i] = data[i] / w;
  }
  stats->decode_seconds += timer.Seconds();
  return absl::OkStatus();
}

absl::Status MpiCommunicator::Impl::ReduceScatterMean(const Op& op, std::span<float> data,
                                                      StepStats* stats) {
  const uint64_t n = data.size();
  const int w = size;
  auto begin = [&](int j) { return SliceBegin(n, j, w); };
  auto length = [&](int j) { return begin(j + 1) - begin(j); };
  // Bound every message count and displacement by INT_MAX up front (the same verdict on every
  // rank, since n and w are the same everywhere).
  {
    uint64_t send_bound = 0;
    uint64_t max_slice = 0;
    for (int j = 0; j < w; ++j) {
      send_bound += MaxMessageBytes(length(j));
      max_slice = std::max(max_slice, length(j));
    }
    if (send_bound > INT_MAX || MaxMessageBytes(max_slice) * w > INT_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(op, "reduce-scatter"), ": a bucket of ", n,
                       " elements may exceed 2 GiB of payload per message; use smaller buckets"));
    }
  }
  auto slice_key = [&](int j) { return absl::StrCat(op.key, "/rs", j); };

  // 1. Prepare every non-empty slice (TernGrad: local scales), agree on scales.
  Timer timer;
  absl::Status local_error;
  scales.assign(w, 0.0f);
  for (int j = 0; j < w && local_error.ok(); ++j) {
    if (length(j) == 0) continue;
    absl::StatusOr<float> prepared =
        codec->Prepare(slice_key(j), data.subspan(begin(j), length(j)));
    if (prepared.ok()) {
      scales[j] = *prepared;
    } else {
      local_error = Annotate(prepared.status(), Where(op, "encode"));
    }
  }
  if (codec->shares_scale()) {
    stats->encode_seconds += timer.Seconds();
    RETURN_IF_ERROR(ShareScales(op, local_error, stats));
    timer.Reset();
  }

  // 2. Encode slice j for rank j.
  send_bytes.clear();
  const int64_t tag = BucketTag(op.key, n);
  send_sizes.assign(2 * w, tag);  // [size for rank j, tag] pairs
  for (int j = 0; j < w; ++j) send_sizes[2 * j] = 0;
  for (int j = 0; j < w && local_error.ok(); ++j) {
    if (length(j) == 0) continue;
    absl::Status encoded_ok =
        codec->Encode(slice_key(j), data.subspan(begin(j), length(j)), scales[j], rng, &encoded);
    if (!encoded_ok.ok()) {
      local_error = Annotate(encoded_ok, Where(op, "encode"));
      break;
    }
    SerializeForSend(encoded, &scratch);
    send_sizes[2 * j] = static_cast<int64_t>(scratch.size());
    send_bytes += scratch;
  }
  if (!local_error.ok()) {
    send_bytes.clear();
    for (int j = 0; j < w; ++j) send_sizes[2 * j] = -1;
  }
  stats->encode_seconds += timer.Seconds();

  // 3. Sizes, then the slices themselves.
  recv_sizes.assign(2 * w, 0);
  RETURN_IF_ERROR(
      Collective(op, "size alltoall", &stats->communicate_seconds, [&](MPI_Request* request) {
        return MPI_Ialltoall(send_sizes.data(), 2, MPI_INT64_T, recv_sizes.data(), 2, MPI_INT64_T,
                             comm, request);
      }));
  for (int j = 0; j < w; ++j) {
    if (recv_sizes[2 * j + 1] != tag) return Diverged(op, "size alltoall", j);
  }
  if (!local_error.ok()) return local_error;
  const uint64_t own_length = length(rank);
  const uint64_t own_limit = MaxMessageBytes(own_length);
  send_counts.assign(w, 0);
  send_displs.assign(w, 0);
  recv_counts.assign(w, 0);
  recv_displs.assign(w, 0);
  int64_t send_total = 0;
  int64_t recv_total = 0;
  for (int j = 0; j < w; ++j) {
    send_displs[j] = static_cast<int>(send_total);
    send_counts[j] = static_cast<int>(send_sizes[2 * j]);
    send_total += send_sizes[2 * j];
    const int64_t s = recv_sizes[2 * j];
    // A bad size seen only here makes this rank fail while its peers go on to the alltoallv and
    // time out there: acceptable for what is a bug or corruption, never silent.
    if (s < 0) {
      return absl::AbortedError(absl::StrCat(Where(op, "size alltoall"), ": rank ", j,
                                             " could not encode its slices (its error says why)"));
    }
    if (static_cast<uint64_t>(s) > own_limit || (own_length == 0 && s != 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(Where(op, "size alltoall"), ": rank ", j, " announces a slice payload of ",
                       s, " bytes, over the limit of ", own_length == 0 ? 0 : own_limit));
    }
    recv_displs[j] = static_cast<int>(recv_total);
    recv_counts[j] = static_cast<int>(s);
    recv_total += s;
  }
  recv_bytes.resize(static_cast<size_t>(recv_total));
  RETURN_IF_ERROR(
      Collective(op, "slice alltoallv", &stats->communicate_seconds, [&](MPI_Request* request) {
        return MPI_Ialltoallv(send_bytes.data(), send_counts.data(), send_displs.data(), MPI_BYTE,
                              recv_bytes.data(), recv_counts.data(), recv_displs.data(), MPI_BYTE,
                              comm, request);
      }));
  stats->bytes_sent += static_cast<uint64_t>(send_total - send_sizes[2 * rank]);
  stats->bytes_received += static_cast<uint64_t>(recv_total - recv_sizes[2 * rank]);

  // 4. The owner sums its slice from every rank, averages, and re-encodes with its own residual.
  timer.Reset();
  absl::Status aggregate_error;
  std::vector<float>& mean = floats;  // not touched by MPI in this algorithm
  mean.assign(own_length, 0.0f);
  if (own_length > 0) {
    const bool ternary_sum = codec->shares_scale();
    if (ternary_sum) ternary.assign(own_length, 0);
    for (int s = 0; s < w && aggregate_error.ok(); ++s) {
      absl::StatusOr<compression::EncodedTensor> tensor = ParseFrom(op, s, own_limit);
      if (!tensor.ok()) {
        aggregate_error = tensor.status();
        break;
      }
      aggregate_error =
          DecodeInto(op, s, *tensor, std::span<float>(mean), ternary_sum ? &scales[rank] : nullptr);
    }
    if (aggregate_error.ok()) {
      const float wf = static_cast<float>(w);
      if (ternary_sum) {
        for (uint64_t i = 0; i < own_length; ++i) {
          mean[i] = (static_cast<float>(ternary[i]) * scales[rank]) / wf;
        }
      } else {
        for (uint64_t i = 0; i < own_length; ++i) mean[i] = mean[i] / wf;
      }
    }
  }
  stats->decode_seconds += timer.Seconds();
  timer.Reset();
  send_bytes.clear();
  if (aggregate_error.ok() && own_length > 0) {
    const std::string aggregate_key = absl::StrCat(op.key, "/agg");
    absl::StatusOr<float> prepared = codec->Prepare(aggregate_key, mean);
    absl::Status encoded_ok = prepared.status();
    if (encoded_ok.ok()) encoded_ok = codec->Encode(aggregate_key, mean, *prepared, rng, &encoded);
    if (encoded_ok.ok()) {
      SerializeForSend(encoded, &send_bytes);
    } else {
      aggregate_error = Annotate(encoded_ok, Where(op, "re-encode"));
    }
  }
  if (!aggregate_error.ok()) send_bytes.clear();
  stats->encode_seconds += timer.Seconds();

  // 5. All-gather the re-encoded slices; everyone (the owner too) decodes them into place.
  std::vector<uint64_t> limits(w);
  for (int j = 0; j < w; ++j) limits[j] = length(j) == 0 ? 0 : MaxMessageBytes(length(j));
  RETURN_IF_ERROR(AllgatherBytes(op, aggregate_error, limits, n, stats));
  timer.Reset();
  for (int j = 0; j < w; ++j) {
    if (length(j) == 0) continue;
    ASSIGN_OR_RETURN(compression::EncodedTensor tensor, ParseFrom(op, j, limits[j]));
    std::span<float> slice = data.subspan(begin(j), length(j));
    std::fill(slice.begin(), slice.end(), 0.0f);
    RETURN_IF_ERROR(DecodeInto(op, j, tensor, slice, nullptr));
  }
  stats->decode_seconds += timer.Seconds();
  return absl::OkStatus();
}

// ---- MpiCommunicator ------------------------------------------------------------------------

MpiCommunicator::MpiCommunicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MpiCommunicator::~MpiCommunicator() {
  if (impl_ == nullptr) return;
  if (impl_->stalled != MPI_REQUEST_NULL) {
    QTRAIN_LOG(WARNING) << "destroying an MPI communicator with an outstanding request ("
                        << impl_->stalled_what << "); its buffers are leaked on purpose";
    (void)impl_.release();
    return;
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && impl_->comm != MPI_COMM_NULL) MPI_Comm_free(&impl_->comm);
}

absl::StatusOr<std::unique_ptr<MpiCommunicator>> MpiCommunicator::Create(
    const MpiOptions& options) {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    return absl::FailedPreconditionError(
        "MpiCommunicator::Create: MPI is not initialized (call InitMpi first) or already "
        "finalized");
  }
  if (!(options.timeout_seconds > 0.0) || !std::isfinite(options.timeout_seconds)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MPI timeout must be a finite number of seconds > 0; got ", options.timeout_seconds));
  }
  if (options.fp32_warmup_steps < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("fp32_warmup_steps must be >= 0; got ", options.fp32_warmup_steps));
  }
  if (options.max_poll_sleep_us < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_poll_sleep_us must be >= 0; got ", options.max_poll_sleep_us));
  }
  // Validate the spec before any collective, so a bad spec fails on every rank alike.
  ASSIGN_OR_RETURN(std::unique_ptr<BucketCodec> codec,
                   BucketCodec::Create(options.codec_spec, options.error_feedback));
  if (codec->passthrough()) codec.reset();

  MPI_Comm comm = MPI_COMM_NULL;
  int rc = MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  if (rc != MPI_SUCCESS) return MpiErrorToStatus(rc, "MPI_Comm_dup(MPI_COMM_WORLD)");
  rc = MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int rank = 0;
  int size = 1;
  if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(comm, &rank);
  if (rc == MPI_SUCCESS) rc = MPI_Comm_size(comm, &size);
  if (rc != MPI_SUCCESS) {
    MPI_Comm_free(&comm);
    return MpiErrorToStatus(rc, "setting up the MPI communicator");
  }
  return std::unique_ptr<MpiCommunicator>(
      new MpiCommunicator(std::make_unique<Impl>(options, comm, rank, size, std::move(codec))));
}

int MpiCommunicator::rank() const { return impl_->rank; }
int MpiCommunicator::world_size() const { return impl_->size; }

std::string MpiCommunicator::Describe() const {
  const Impl& m = *impl_;
  return absl::StrCat(
      "mpi: rank ", m.rank, " of ", m.size, ", codec ",
      m.codec == nullptr ? std::string("fp32 (MPI_Allreduce)") : m.codec->Describe(),
      m.codec != nullptr && m.options.fp32_warmup_steps > 0
          ? absl::StrCat(" after ", m.options.fp32_warmup_steps, " fp32 warm-up steps")
          : std::string(),
      ", algorithm ", AllreduceAlgorithmName(m.options.algorithm), ", timeout ",
      m.options.timeout_seconds, " s");
}

void MpiCommunicator::SetStep(int64_t step) { impl_->step = step; }

absl::Status MpiCommunicator::AllReduceMean(std::string_view key, std::span<float> data,
                                            StepStats* stats) {
  Impl& m = *impl_;
  if (key.empty()) return absl::InvalidArgumentError("MPI AllReduceMean: empty bucket key");
  if (data.size() > compression::kMaxElements) {
    return absl::InvalidArgumentError(absl::StrCat("MPI AllReduceMean of bucket '", AsAbsl(key),
                                                   "': ", data.size(), " elements is over ",
                                                   compression::kMaxElements));
  }
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("AllReduceMean", key));
  StepStats local;
  local.calls = 1;
  absl::Status status;
  if (data.empty()) {
    status = absl::OkStatus();  // every rank passes the same size: nothing to exchange
  } else if (m.codec == nullptr || m.step < m.options.fp32_warmup_steps) {
    status = m.AllReduceFp32(op, data, &local);
  } else if (ResolveAllreduceAlgorithm(m.options.algorithm, m.size, data.size()) ==
             AllreduceAlgorithm::kAllgather) {
    status = m.AllgatherMean(op, data, &local);
  } else {
    status = m.ReduceScatterMean(op, data, &local);
  }
  if (stats != nullptr) *stats += local;
  return status;
}

absl::Status MpiCommunicator::Broadcast(std::span<float> data, int root) {
  Impl& m = *impl_;
  if (root < 0 || root >= m.size) {
    return absl::InvalidArgumentError(
        absl::StrCat("MPI Broadcast: root ", root, " is not a rank of a world of ", m.size));
  }
  if (data.size() > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrCat("MPI Broadcast: ", data.size(), " elements is over INT_MAX"));
  }
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("Broadcast", ""));
  if (m.rank == root) {
    m.floats.assign(data.begin(), data.end());
  } else {
    m.floats.resize(data.size());
  }
  RETURN_IF_ERROR(
      m.Collective(op, absl::StrCat("bcast from rank ", root), nullptr, [&](MPI_Request* request) {
        return MPI_Ibcast(m.floats.data(), static_cast<int>(m.floats.size()), MPI_FLOAT, root,
                          m.comm, request);
      }));
  if (m.rank != root) std::copy(m.floats.begin(), m.floats.end(), data.begin());
  return absl::OkStatus();
}

absl::Status MpiCommunicator::AllReduceSum(std::span<double> values) {
  Impl& m = *impl_;
  if (values.size() > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError("MPI AllReduceSum: over INT_MAX values");
  }
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("AllReduceSum", ""));
  m.doubles.assign(values.begin(), values.end());
  RETURN_IF_ERROR(m.Collective(op, "double allreduce", nullptr, [&](MPI_Request* request) {
    return MPI_Iallreduce(MPI_IN_PLACE, m.doubles.data(), static_cast<int>(m.doubles.size()),
                          MPI_DOUBLE, MPI_SUM, m.comm, request);
  }));
  std::copy(m.doubles.begin(), m.doubles.end(), values.begin());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint64_t>> MpiCommunicator::AllGatherU64(uint64_t value) {
  Impl& m = *impl_;
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("AllGatherU64", ""));
  m.u64_send = value;
  m.u64s.assign(m.size, 0);
  RETURN_IF_ERROR(m.Collective(op, "uint64 allgather", nullptr, [&](MPI_Request* request) {
    return MPI_Iallgather(&m.u64_send, 1, MPI_UINT64_T, m.u64s.data(), 1, MPI_UINT64_T, m.comm,
                          request);
  }));
  return m.u64s;
}

absl::Status MpiCommunicator::Barrier() {
  Impl& m = *impl_;
  ASSIGN_OR_RETURN(Impl::Op op, m.Start("Barrier", ""));
  return m.Collective(op, "barrier", nullptr,
                      [&](MPI_Request* request) { return MPI_Ibarrier(m.comm, request); });
}

std::vector<std::string> MpiCommunicator::ResidualKeys() const {
  if (impl_->codec == nullptr) return {};
  return impl_->codec->ResidualKeys();
}

std::span<const float> MpiCommunicator::Residual(std::string_view key) const {
  if (impl_->codec == nullptr) return {};
  return impl_->codec->Residual(key);
}

absl::Status MpiCommunicator::SetResidual(std::string_view key, std::span<const float> values) {
  if (impl_->codec == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot set residual '", AsAbsl(key), "': codec fp32 keeps no residuals"));
  }
  return impl_->codec->SetResidual(key, values);
}

absl::Status MpiCommunicator::WaitPending(double timeout_seconds) {
  Impl& m = *impl_;
  if (m.stalled == MPI_REQUEST_NULL) return absl::OkStatus();
  MPI_Request request = m.stalled;
  m.stalled = MPI_REQUEST_NULL;
  const std::string what = m.stalled_what;
  Impl::Op op{absl::StrCat("WaitPending for [", what, "]"), "",
              Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(std::max(0.0, timeout_seconds))),
              timeout_seconds};
  absl::Status status = m.Wait(&request, op, "completing the stalled request", nullptr);
  if (!status.ok() && m.stalled == MPI_REQUEST_NULL && request != MPI_REQUEST_NULL) {
    m.stalled = request;  // an MPI error left it outstanding
    m.stalled_what = what;
  }
  return status;
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateMpiCommunicator(const MpiOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<MpiCommunicator> communicator, MpiCommunicator::Create(options));
  return std::unique_ptr<Communicator>(std::move(communicator));
}

// ---- Process-level helpers --------------------------------------------------------------------

absl::Status InitMpi(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return absl::OkStatus();
  int provided = MPI_THREAD_SINGLE;
  const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided);
  if (rc != MPI_SUCCESS) return MpiErrorToStatus(rc, "MPI_Init_thread");
  if (provided < MPI_THREAD_SERIALIZED) {
    QTRAIN_LOG(WARNING) << "the MPI library provides thread level " << provided
                        << ", below MPI_THREAD_SERIALIZED: call communicators from the main "
                           "thread only";
  }
  return absl::OkStatus();
}

absl::Status FinalizeMpi() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return absl::OkStatus();
  const int rc = MPI_Finalize();
  if (rc != MPI_SUCCESS) return MpiErrorToStatus(rc, "MPI_Finalize");
  return absl::OkStatus();
}

void AbortMpi(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

bool LaunchedByMpirun() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  return false;
}

}  // namespace qtrain::comm
