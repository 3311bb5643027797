#include "server/ps_core.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include <fcntl.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "common/crc32.h"
#include "common/framed_file.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "compression/wire.h"

namespace qtrain::server {
namespace {

constexpr FrameFormat kCheckpointFormat{"QTRNPSCK", 1, "server checkpoint"};
constexpr uint64_t kMaxCheckpointBytes = uint64_t{16} << 30;
constexpr uint32_t kJournalMagic = 0x4E4A5451;  // "QTJN" (little-endian)
constexpr size_t kJournalHeaderBytes = 12;      // magic, body length, CRC-32 of the body
constexpr int kCheckpointHistory = 16;          // rounds per bucket kept in a checkpoint
constexpr uint32_t kMaxHandoverPieces = 1 << 16;
constexpr uint64_t kMaxHandoverBytes = uint64_t{16} << 30;
constexpr uint64_t kFnvOffset = 14695981039346656037ull;
constexpr uint64_t kFnvPrime = 1099511628211ull;

uint64_t Fnv(uint64_t h, const void* data, size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < size; ++i) h = (h ^ p[i]) * kFnvPrime;
  return h;
}
template <typename T>
uint64_t FnvValue(uint64_t h, const T& v) {
  return Fnv(h, &v, sizeof(v));
}

// A refusal the client acts on: "<REASON>: message".
absl::Status Refuse(absl::StatusCode code, pb::PsErrorReason reason, const std::string& message) {
  return absl::Status(code, absl::StrCat(pb::PsErrorReason_Name(reason), ": ", message));
}

std::string BucketKey(uint32_t bucket) { return absl::StrCat("b", bucket); }

double SteadySeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

absl::Status ValidateServerCoreOptions(const ServerCoreOptions& o) {
  if (o.num_shards < 1 || o.num_shards > 4096) {
    return absl::InvalidArgumentError(absl::StrCat("--num_shards must be in [1, 4096], got ", o.num_shards));
  }
  if (o.shard < 0 || o.shard >= o.num_shards) {
    return absl::InvalidArgumentError(
        absl::StrCat("--shard must be in [0, ", o.num_shards, "), got ", o.shard));
  }
  if (o.world_size < 1 || o.world_size > 65536) {
    return absl::InvalidArgumentError(absl::StrCat("--workers must be in [1, 65536], got ", o.world_size));
  }
  if (!(o.step_deadline_seconds > 0) || !std::isfinite(o.step_deadline_seconds)) {
    return absl::InvalidArgumentError("--step_deadline must be a number of seconds > 0");
  }
  if (!(o.heartbeat_timeout_seconds > 0) || !std::isfinite(o.heartbeat_timeout_seconds)) {
    return absl::InvalidArgumentError("--heartbeat_timeout must be a number of seconds > 0");
  }
  if (o.staleness < 0) return absl::InvalidArgumentError("--staleness must be >= 0");
  if (o.max_message_bytes < 4096) {
    return absl::InvalidArgumentError("--max_message_mb is too small (at least 4 KiB)");
  }
  if (o.checkpoint_every < 1) return absl::InvalidArgumentError("--checkpoint_every must be >= 1");
  if (o.history < 1) return absl::InvalidArgumentError("history must be >= 1");
  if (o.collective_history < 1) return absl::InvalidArgumentError("collective_history must be >= 1");
  return absl::OkStatus();
}

std::string ServerJournalPath(const std::string& dir, int shard) {
  return absl::StrCat(dir, "/qserver.shard", shard, ".journal");
}

std::string ServerCheckpointPath(const std::string& dir, int shard) {
  return (std::filesystem::path(dir) / absl::StrCat("qserver.shard", shard, ".ckpt")).string();
}

ServerCore::ServerCore(const ServerCoreOptions& options)
    : options_(options), rng_(comm::RankSeed(options.seed, 1'000'000 + options.shard)) {}

absl::StatusOr<std::unique_ptr<ServerCore>> ServerCore::Create(const ServerCoreOptions& options) {
  RETURN_IF_ERROR(ValidateServerCoreOptions(options));
  ServerCoreOptions o = options;
  if (!o.clock) o.clock = SteadySeconds;
  std::unique_ptr<ServerCore> core(new ServerCore(o));
  absl::StatusOr<std::unique_ptr<comm::BucketCodec>> codec =
      comm::BucketCodec::Create(o.codec_spec, o.downlink_feedback);
  if (!codec.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--codec: ", codec.status().message()));
  }
  core->codec_ = std::move(*codec);
  if (!o.checkpoint_dir.empty()) {
    RETURN_IF_ERROR(core->Restore());
    std::lock_guard<std::mutex> lock(core->mu_);
    RETURN_IF_ERROR(core->OpenJournalLocked());
  }
  return core;
}

ServerCore::~ServerCore() {
  if (journal_fd_ >= 0) ::close(journal_fd_);
}

absl::Status ServerCore::OpenJournalLocked() {
  std::error_code ec;
  std::filesystem::create_directories(options_.checkpoint_dir, ec);
  if (ec) {
    return absl::UnavailableError(absl::StrCat("cannot create --checkpoint_dir ",
                                               options_.checkpoint_dir, ": ", ec.message()));
  }
  // The restored state (with the journal's rounds) goes into a fresh checkpoint first, so the
  // journal can start empty.
  const std::string path = ServerJournalPath(options_.checkpoint_dir, options_.shard);
  if (restored_) RETURN_IF_ERROR(WriteCheckpointLocked());
  journal_fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (journal_fd_ < 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot open the round journal ", path, ": ", std::strerror(errno)));
  }
  if (::ftruncate(journal_fd_, 0) != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot truncate the round journal ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

void ServerCore::AppendJournalLocked(uint32_t bucket_id, const Bucket& b, const Round& round) {
  if (journal_fd_ < 0) return;
  pb::PsRound record;
  record.set_bucket(bucket_id);
  record.set_step(round.step);
  record.set_contributors(round.contributors);
  record.set_encoded(round.encoded);
  record.set_elements(b.elements);
  const std::string body = record.SerializeAsString();
  const uint32_t header[3] = {kJournalMagic, static_cast<uint32_t>(body.size()),
                              Crc32(body.data(), body.size())};
  std::string bytes(reinterpret_cast<const char*>(header), kJournalHeaderBytes);
  bytes += body;
  // One write() per record: a killed server leaves whole records plus at most one torn tail,
  // and the record reaches the OS before any worker can pull the round.
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(journal_fd_, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      QTRAIN_LOG(ERROR) << "round journal write failed (" << std::strerror(errno)
                        << "); a server restart may now lose rounds the workers have seen";
      ::close(journal_fd_);
      journal_fd_ = -1;
      return;
    }
    done += static_cast<size_t>(n);
  }
}

absl::Status ServerCore::ReplayJournalLocked() {
  const std::string path = ServerJournalPath(options_.checkpoint_dir, options_.shard);
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) return absl::OkStatus();  // none: nothing closed since the checkpoint
  std::string bytes;
  char chunk[1 << 16];
  for (size_t n; (n = std::fread(chunk, 1, sizeof(chunk), file)) > 0;) bytes.append(chunk, n);
  const bool read_error = std::ferror(file) != 0;
  std::fclose(file);
  if (read_error) return absl::UnavailableError(absl::StrCat("cannot read ", path));
  size_t at = 0;
  int replayed = 0;
  while (at < bytes.size()) {
    uint32_t header[3] = {0, 0, 0};
    if (bytes.size() - at < kJournalHeaderBytes) break;  // torn tail
    std::memcpy(header, bytes.data() + at, kJournalHeaderBytes);
    if (header[0] != kJournalMagic) {
      return absl::DataLossError(absl::StrCat("round journal ", path, ": bad record magic at byte ",
                                              at));
    }
    if (bytes.size() - at - kJournalHeaderBytes < header[1]) break;  // torn tail
    const char* body = bytes.data() + at + kJournalHeaderBytes;
    pb::PsRound record;
    if (Crc32(body, header[1]) != header[2] || !record.ParseFromArray(body, header[1])) {
      // Only the last record can be torn by a kill; anything else is damage.
      if (at + kJournalHeaderBytes + header[1] == bytes.size()) break;
      return absl::DataLossError(absl::StrCat("round journal ", path, ": record at byte ", at,
                                              " is corrupt"));
    }
    at += kJournalHeaderBytes + header[1];
    if (record.bucket() % options_.num_shards != static_cast<uint32_t>(options_.shard) ||
        record.elements() <= 0 || record.step() < 0) {
      return absl::DataLossError(absl::StrCat("round journal ", path, ": a record of bucket ",
                                              record.bucket(), " is inconsistent"));
    }
    Bucket& b = buckets_[record.bucket()];
    if (b.elements != 0 && b.elements != record.elements()) {
      return absl::DataLossError(absl::StrCat("round journal ", path, ": bucket ",
                                              record.bucket(), " changes its element count"));
    }
    b.elements = record.elements();
    if (b.open_step >= 0 && record.step() < b.open_step) continue;  // in the checkpoint already
    if (b.open_step >= 0 && record.step() > b.open_step) {
      return absl::DataLossError(absl::StrCat("round journal ", path, ": bucket ",
                                              record.bucket(), " jumps from round ", b.open_step,
                                              " to ", record.step()));
    }
    Round round;
    round.step = record.step();
    round.contributors = record.contributors();
    round.encoded = record.encoded();
    b.history.push_back(std::move(round));
    while (static_cast<int>(b.history.size()) > options_.history) b.history.pop_front();
    b.open_step = record.step() + 1;
    ++version_;
    ++replayed;
  }
  if (at < bytes.size()) {
    QTRAIN_LOG(WARNING) << "round journal " << path << ": ignored a torn last record ("
                        << bytes.size() - at << " bytes; no worker had seen it)";
  }
  if (replayed > 0) {
    QTRAIN_LOG(INFO) << "round journal " << path << ": replayed " << replayed
                     << " rounds closed after the checkpoint";
  }
  return absl::OkStatus();
}

absl::Status ServerCore::Reject(absl::Status status) {
  ++rejected_;
  return status;
}

absl::Status ServerCore::CheckToken(const std::string& token) const {
  if (options_.token.empty() || token == options_.token) return absl::OkStatus();
  return absl::UnauthenticatedError("missing or wrong token");
}

absl::Status ServerCore::CheckShard(uint32_t shard) const {
  if (static_cast<int64_t>(shard) != options_.shard) {
    return Refuse(absl::StatusCode::kInvalidArgument, pb::WRONG_SHARD,
                  absl::StrCat("this server is shard ", options_.shard, " of ",
                               options_.num_shards, ", the request is for shard ", shard));
  }
  return absl::OkStatus();
}

absl::Status ServerCore::CheckWorker(int id) {
  auto it = workers_.find(id);
  if (it == workers_.end() || !(it->second.live || it->second.joining)) {
    return Refuse(absl::StatusCode::kFailedPrecondition, pb::NOT_REGISTERED,
                  absl::StrCat("worker ", id,
                               it == workers_.end() ? " is not registered"
                                                    : " was dropped (no heartbeat or left)",
                               "; register again"));
  }
  it->second.last_seen = Now();
  return absl::OkStatus();
}

absl::Status ServerCore::CheckShardZeroRequest(const std::string& token, uint32_t shard,
                                               int worker, const char* refusal) {
  RETURN_IF_ERROR(CheckToken(token));
  RETURN_IF_ERROR(CheckShard(shard));
  if (options_.shard != 0) {
    return Refuse(absl::StatusCode::kInvalidArgument, pb::WRONG_SHARD, refusal);
  }
  return CheckWorker(worker);
}

int ServerCore::LiveCount() const {
  int n = 0;
  for (const auto& [id, w] : workers_) n += w.live ? 1 : 0;
  return n;
}

bool ServerCore::QuorumReady() const {
  return static_cast<int>(workers_.size()) >= options_.world_size;
}

void ServerCore::Changed() {
  ++changes_;
  cv_.notify_all();
}

uint64_t ServerCore::change_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return changes_;
}

uint64_t ServerCore::WaitForChange(uint64_t seen, double seconds) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, std::chrono::duration<double>(std::max(0.0, seconds)),
               [&] { return changes_ != seen; });
  return changes_;
}

absl::Status ServerCore::Register(const pb::RegisterRequest& request,
                                  pb::RegisterResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckToken(request.token()); !s.ok()) return Reject(s);
  if (absl::Status s = CheckShard(request.shard()); !s.ok()) return Reject(s);
  if (static_cast<int64_t>(request.num_shards()) != options_.num_shards) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::WRONG_SHARD,
                         absl::StrCat("the worker knows ", request.num_shards(),
                                      " servers; this run has ", options_.num_shards)));
  }
  if (request.codec_spec() != options_.codec_spec) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         absl::StrCat("the worker's codec '", request.codec_spec(),
                                      "' differs from the server's '", options_.codec_spec, "'")));
  }
  // In progress: every worker has registered once, so rounds and collectives may have run.
  const bool join = request.joining() && QuorumReady();
  int id = request.worker_id();
  if (id == -1) {
    id = 0;
    while (workers_.count(id) != 0) ++id;
    if (join) {  // a full job: replace the lowest worker that is gone
      id = 0;
      for (const auto& [known, w] : workers_) {
        if (known == id && (w.live || w.joining)) ++id;
      }
    }
  }
  if (id < 0 || id >= options_.world_size) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         absl::StrCat("worker id ", request.worker_id(), " is outside [0, ",
                                      options_.world_size, ") (or every id is taken)")));
  }
  if (join) {
    auto found = workers_.find(id);
    if (found != workers_.end() && found->second.live) {
      return Reject(Refuse(
          absl::StatusCode::kFailedPrecondition, pb::WORKER_LIVE,
          absl::StrCat("worker ", id, " is still live (last heard ", Now() - found->second.last_seen,
                       " s ago); a new process for it may join once the old one is dropped (",
                       options_.heartbeat_timeout_seconds, " s of silence)")));
    }
    Worker& w = workers_[id];
    if (!w.joining) {
      QTRAIN_LOG(INFO) << "worker " << id << " registered to join the running job (version "
                       << version_ << "); rounds wait for it once it has its state, and it is in the "
                          "quorum from its first accepted push";
    }
    w.joining = true;
    w.last_seen = Now();
  } else {
    Worker& w = workers_[id];
    const bool rejoin = !w.live && w.last_seen != 0;
    w.live = true;
    w.joining = false;
    w.last_seen = Now();
    if (rejoin) QTRAIN_LOG(INFO) << "worker " << id << " rejoined";
  }
  response->set_in_progress(join);
  response->set_worker_id(id);
  response->set_world_size(options_.world_size);
  response->set_shard(static_cast<uint32_t>(options_.shard));
  response->set_num_shards(static_cast<uint32_t>(options_.num_shards));
  response->set_version(version_);
  response->set_registered(static_cast<int32_t>(workers_.size()));
  response->set_live(LiveCount());
  response->set_mode(options_.mode == PsMode::kSync ? pb::PS_MODE_SYNC : pb::PS_MODE_ASYNC);
  response->set_heartbeat_timeout_seconds(options_.heartbeat_timeout_seconds);
  response->set_max_message_bytes(options_.max_message_bytes);
  Changed();
  return absl::OkStatus();
}

absl::Status ServerCore::Push(const pb::PushRequest& request, pb::PushResponse* response) {
  std::unique_lock<std::mutex> lock(mu_);
  if (absl::Status s = CheckToken(request.token()); !s.ok()) return Reject(s);
  if (absl::Status s = CheckShard(request.shard()); !s.ok()) return Reject(s);
  const uint32_t bucket_id = request.bucket();
  if (static_cast<int64_t>(bucket_id % static_cast<uint32_t>(options_.num_shards)) != options_.shard) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::WRONG_SHARD,
                         absl::StrCat("bucket ", bucket_id, " belongs to shard ",
                                      bucket_id % options_.num_shards, ", not ", options_.shard)));
  }
  if (request.step() < 0) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         absl::StrCat("negative step ", request.step())));
  }
  if (absl::Status s = CheckWorker(request.worker_id()); !s.ok()) return Reject(s);
  // The tensor: envelope, codec, size bounds, element count; DecodeAdd checks the payload.
  const pb::EncodedTensor& g = request.gradient();
  const uint64_t n = g.num_elements();
  if (n == 0) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_TENSOR,
                         "gradient has no elements"));
  }
  const uint64_t bound = 8 * n + 4096;
  const uint64_t bytes = g.payload().size() + 4 * uint64_t(g.scales_size()) +
                         4 * uint64_t(g.params_size()) + 8 * uint64_t(g.shape_size());
  if (bytes > bound || bytes > options_.max_message_bytes) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_TENSOR,
                         absl::StrCat("gradient of ", bytes, " bytes is oversized for ", n,
                                      " elements (limit ", std::min(bound, options_.max_message_bytes),
                                      ")")));
  }
  if (g.codec() != static_cast<pb::CodecId>(codec_->codec().id())) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_TENSOR,
                         absl::StrCat("gradient codec id ", static_cast<int>(g.codec()),
                                      " is not the server's ", codec_->codec().Spec())));
  }
  auto found = buckets_.find(bucket_id);
  if (found != buckets_.end() && found->second.elements != 0 &&
      static_cast<uint64_t>(found->second.elements) != n) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_TENSOR,
                         absl::StrCat("bucket ", bucket_id, " has ", found->second.elements,
                                      " elements, the push has ", n)));
  }
  if (n > options_.max_message_bytes / 4 * 2) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_TENSOR,
                         absl::StrCat("bucket of ", n, " elements exceeds the server's limit")));
  }
  // The round.
  Bucket scratch;
  Bucket& b = found != buckets_.end() ? found->second : scratch;
  const int64_t step = request.step();
  const int worker = request.worker_id();
  if (options_.mode == PsMode::kSync) {
    if (b.open_step >= 0 && step < b.open_step) {
      return Reject(Refuse(absl::StatusCode::kFailedPrecondition, pb::STALE_STEP,
                           absl::StrCat("bucket ", bucket_id, " step ", step,
                                        " is closed (open step ", b.open_step, "); pull it")));
    }
    if (b.open_step >= 0 && step > b.open_step) {
      return Reject(Refuse(absl::StatusCode::kFailedPrecondition, pb::FUTURE_STEP,
                           absl::StrCat("bucket ", bucket_id, " step ", step,
                                        " is not open yet (open step ", b.open_step, ")")));
    }
    if (b.open_step == step && (b.pushed.count(worker) != 0 || b.decoding.count(worker) != 0)) {
      response->set_duplicate(true);
      response->set_version(version_);
      response->set_open_step(b.open_step);
      return absl::OkStatus();
    }
  } else {
    if (b.open_step >= 0 && step > b.open_step) {
      return Reject(Refuse(absl::StatusCode::kFailedPrecondition, pb::FUTURE_STEP,
                           absl::StrCat("bucket ", bucket_id, " base round ", step,
                                        " is ahead of the open round ", b.open_step)));
    }
    if (b.open_step >= 0 && step + options_.staleness < b.open_step) {
      return Reject(Refuse(absl::StatusCode::kFailedPrecondition, pb::STALE_STEP,
                           absl::StrCat("bucket ", bucket_id, " base round ", step, " is ",
                                        b.open_step - step, " rounds old (staleness bound ",
                                        options_.staleness, ")")));
    }
  }
  // A later push of an open synchronous round is checked (CRC) and decoded OUTSIDE the server's
  // lock, under the bucket's own, so that other buckets' pushes, pulls and heartbeats go on
  // meanwhile (a 25M-parameter model's pushes take tens of ms each to decode). The worker is
  // marked as decoding so that a retry is a duplicate and the round cannot close under the
  // decoder (MaybeCloseSync waits for `decoding` to empty).
  if (options_.mode == PsMode::kSync && found != buckets_.end() && !b.pushed.empty() &&
      static_cast<uint64_t>(b.sum.size()) == n) {
    b.decoding.insert(worker);
    const std::shared_ptr<std::mutex> sum_mu = b.sum_mu;
    float* const sum = b.sum.data();
    lock.unlock();
    absl::Status decoded;
    {
      absl::StatusOr<compression::EncodedTensor> tensor = compression::FromProto(g);
      std::lock_guard<std::mutex> sum_lock(*sum_mu);
      decoded = tensor.ok() ? codec_->codec().DecodeAdd(*tensor, std::span<float>(sum, n))
                            : tensor.status();
    }
    lock.lock();
    Bucket& bucket = buckets_[bucket_id];  // std::map nodes stay put; the round is still open
    bucket.decoding.erase(worker);
    if (!decoded.ok()) {
      // DecodeAdd leaves the sum unchanged on error; the round may close without this worker.
      MaybeCloseSync(bucket_id, bucket, /*deadline_only=*/false);
      Changed();
      return Reject(absl::Status(decoded.code(), absl::StrCat(pb::PsErrorReason_Name(pb::BAD_TENSOR),
                                                              ": ", decoded.message())));
    }
    bucket.pushed.insert(worker);
    MarkJoined(worker, bucket_id, step);
    MaybeCloseSync(bucket_id, bucket, /*deadline_only=*/false);
    response->set_version(version_);
    response->set_open_step(bucket.open_step);
    Changed();
    return absl::OkStatus();
  }
  absl::StatusOr<compression::EncodedTensor> tensor = compression::FromProto(g);
  if (!tensor.ok()) {
    return Reject(absl::Status(tensor.status().code(),
                               absl::StrCat(pb::PsErrorReason_Name(pb::BAD_TENSOR), ": ",
                                            tensor.status().message())));
  }
  // The first push of a round, or any asynchronous push: decoded under the server's lock, into
  // the bucket's sum (zero between rounds) or, for a bucket not seen yet (or just restored), into
  // a fresh zero sum. DecodeAdd validates everything first and leaves the sum unchanged on error.
  std::vector<float> fresh;
  std::span<float> sum;
  const bool new_round = b.pushed.empty();
  const bool fresh_sum = static_cast<uint64_t>(b.sum.size()) != n;
  if (fresh_sum) {
    fresh.assign(n, 0.0f);
    sum = fresh;
  } else {
    sum = b.sum;
  }
  {
    std::lock_guard<std::mutex> sum_lock(*b.sum_mu);
    if (absl::Status s = codec_->codec().DecodeAdd(*tensor, sum); !s.ok()) {
      return Reject(absl::Status(s.code(), absl::StrCat(pb::PsErrorReason_Name(pb::BAD_TENSOR),
                                                        ": ", s.message())));
    }
  }
  // Accepted: from here on state changes.
  Bucket& bucket = buckets_[bucket_id];  // (re)lookup: may create it
  if (found == buckets_.end()) bucket = std::move(scratch);
  bucket.elements = static_cast<int64_t>(n);
  if (bucket.open_step < 0) bucket.open_step = step;  // a bucket's first round
  if (fresh_sum) bucket.sum = std::move(fresh);
  if (new_round) bucket.opened_at = Now();
  bucket.pushed.insert(worker);
  MarkJoined(worker, bucket_id, step);
  if (options_.mode == PsMode::kAsync) {
    RETURN_IF_ERROR(CloseRound(bucket_id, bucket));
  } else {
    MaybeCloseSync(bucket_id, bucket, /*deadline_only=*/false);
  }
  response->set_version(version_);
  response->set_open_step(bucket.open_step);
  Changed();
  return absl::OkStatus();
}

bool ServerCore::HandedOver(int worker) const {
  auto it = handovers_.find(worker);
  return it != handovers_.end() && it->second.pieces > 0 &&
         it->second.received >= it->second.pieces;
}

void ServerCore::MarkJoined(int worker, uint32_t bucket_id, int64_t step) {
  Worker& w = workers_[worker];
  if (!w.joining) return;
  w.joining = false;
  w.live = true;
  handovers_.erase(worker);
  QTRAIN_LOG(INFO) << "worker " << worker << " joined the quorum at bucket " << bucket_id
                   << " step " << step;
}

absl::Status ServerCore::CloseRound(uint32_t bucket_id, Bucket& b) {
  const int count = static_cast<int>(b.pushed.size());
  const float inv = 1.0f / static_cast<float>(count);
  if (count > 1) {
    for (float& v : b.sum) v = v * inv;
  }
  const std::string key = BucketKey(bucket_id);
  compression::EncodedTensor encoded;
  absl::StatusOr<float> scale = codec_->Prepare(key, b.sum);
  absl::Status s = scale.ok() ? codec_->Encode(key, b.sum, *scale, rng_, &encoded) : scale.status();
  if (!s.ok()) {
    // Only a non-finite mean gets here (the pushes decoded fine): drop the round's sum so the
    // next round starts clean, and report it.
    QTRAIN_LOG(ERROR) << "bucket " << bucket_id << " step " << b.open_step
                      << ": cannot encode the mean: " << s.message();
  }
  Round round;
  round.step = b.open_step;
  round.contributors = count;
  if (s.ok()) {
    round.encoded = compression::Serialize(encoded, compression::Checksum::kCrc32);
  }
  AppendJournalLocked(bucket_id, b, round);
  b.history.push_back(std::move(round));
  while (static_cast<int>(b.history.size()) > options_.history) b.history.pop_front();
  ++b.open_step;
  b.pushed.clear();
  // Zero, not freed: the next round reuses it (a fresh 4 MB vector per round costs page faults).
  std::fill(b.sum.begin(), b.sum.end(), 0.0f);
  b.opened_at = -1;
  ++version_;
  if (!options_.checkpoint_dir.empty() &&
      version_ % static_cast<uint64_t>(options_.checkpoint_every) == 0) {
    if (absl::Status w = WriteCheckpointLocked(); !w.ok()) {
      QTRAIN_LOG(ERROR) << "checkpoint failed (training continues): " << w.message();
    }
  }
  return absl::OkStatus();
}

void ServerCore::MaybeCloseSync(uint32_t bucket_id, Bucket& b, bool deadline_only) {
  // Pushes being decoded outside the lock: the last of them calls this again.
  if (b.pushed.empty() || !b.decoding.empty()) return;
  const bool deadline =
      b.opened_at >= 0 && Now() - b.opened_at >= options_.step_deadline_seconds;
  bool all = false;
  if (!deadline_only && QuorumReady()) {
    all = true;
    for (const auto& [id, w] : workers_) {
      // A joining worker that has its state waits in the quorum: without it a joiner a step
      // behind the others would find every round closed (STALE_STEP) and never catch up.
      if ((w.live || (w.joining && HandedOver(id))) && b.pushed.count(id) == 0) {
        all = false;
        break;
      }
    }
  }
  if (deadline || all) {
    if (!all) {
      QTRAIN_LOG(WARNING) << "bucket " << bucket_id << " step " << b.open_step
                          << " closed by the deadline with " << b.pushed.size() << " of "
                          << LiveCount() << " live workers";
    }
    (void)CloseRound(bucket_id, b);
  }
}

absl::Status ServerCore::Pull(const pb::PullRequest& request, pb::PullResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckToken(request.token()); !s.ok()) return Reject(s);
  if (absl::Status s = CheckShard(request.shard()); !s.ok()) return Reject(s);
  if (request.step() < 0) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         absl::StrCat("negative step ", request.step())));
  }
  if (absl::Status s = CheckWorker(request.worker_id()); !s.ok()) return Reject(s);
  for (const auto& [joiner, h] : handovers_) {
    if (h.donor == request.worker_id() && (h.pieces == 0 || h.received < h.pieces)) {
      response->add_handover_to(joiner);
    }
  }
  auto it = buckets_.find(request.bucket());
  response->set_version(version_);
  if (it == buckets_.end()) {
    if (static_cast<int64_t>(request.bucket() % options_.num_shards) != options_.shard) {
      return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::WRONG_SHARD,
                           absl::StrCat("bucket ", request.bucket(), " is not owned by shard ",
                                        options_.shard)));
    }
    response->set_ready(false);
    response->set_need_push(true);
    response->set_open_step(-1);
    return absl::OkStatus();
  }
  const Bucket& b = it->second;
  const int64_t step = request.step();
  response->set_open_step(b.open_step);
  auto find_round = [&b](int64_t s) -> const Round* {
    for (const Round& r : b.history) {
      if (r.step == s) return &r;
    }
    return nullptr;
  };
  if (b.open_step < 0 || step >= b.open_step) {
    response->set_ready(false);
    if (options_.mode == PsMode::kSync) {
      response->set_need_push(b.open_step < 0 || step > b.open_step ||
                               b.pushed.count(request.worker_id()) == 0);
    }
    return absl::OkStatus();
  }
  const int64_t last = options_.mode == PsMode::kSync ? step + 1 : b.open_step;
  for (int64_t s = step; s < last; ++s) {
    const Round* r = find_round(s);
    if (r == nullptr) {
      return Reject(Refuse(absl::StatusCode::kFailedPrecondition, pb::HISTORY_LOST,
                           absl::StrCat("bucket ", request.bucket(), " round ", s,
                                        " is no longer kept (rounds ",
                                        b.history.empty() ? -1 : b.history.front().step, "..",
                                        b.open_step - 1, " are)")));
    }
    if (r->encoded.empty()) {
      return Reject(absl::InternalError(absl::StrCat(
          "bucket ", request.bucket(), " round ", s, " has no result (its mean was not finite)")));
    }
    if (!response->add_updates()->ParseFromString(r->encoded)) {
      return Reject(absl::InternalError("a kept round result does not parse"));
    }
    response->set_contributors(r->contributors);
  }
  response->set_ready(true);
  return absl::OkStatus();
}

absl::Status ServerCore::Heartbeat(const pb::HeartbeatRequest& request,
                                   pb::HeartbeatResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckToken(request.token()); !s.ok()) return Reject(s);
  if (absl::Status s = CheckShard(request.shard()); !s.ok()) return Reject(s);
  if (absl::Status s = CheckWorker(request.worker_id()); !s.ok()) return Reject(s);
  response->set_version(version_);
  response->set_live(LiveCount());
  return absl::OkStatus();
}

absl::Status ServerCore::Leave(const pb::LeaveRequest& request, pb::LeaveResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckToken(request.token()); !s.ok()) return Reject(s);
  if (absl::Status s = CheckShard(request.shard()); !s.ok()) return Reject(s);
  if (absl::Status s = CheckWorker(request.worker_id()); !s.ok()) return Reject(s);
  workers_[request.worker_id()].live = false;
  workers_[request.worker_id()].joining = false;
  QTRAIN_LOG(INFO) << "worker " << request.worker_id() << " left";
  ReviewHandoversLocked();
  // The rounds and collectives waiting for it may close now.
  for (auto& [id, b] : buckets_) {
    if (options_.mode == PsMode::kSync) MaybeCloseSync(id, b, false);
  }
  for (auto& [seq, c] : collectives_) MaybeCloseCollective(seq, c, false);
  Changed();
  return absl::OkStatus();
}

void ServerCore::Tick() {
  std::lock_guard<std::mutex> lock(mu_);
  const double now = Now();
  bool changed = false;
  for (auto& [id, w] : workers_) {
    if ((w.live || w.joining) && now - w.last_seen > options_.heartbeat_timeout_seconds) {
      QTRAIN_LOG(WARNING) << "worker " << id << (w.live ? " dropped from the quorum" : " (joining) dropped")
                          << ": silent for " << now - w.last_seen << " s";
      w.live = false;
      w.joining = false;
      changed = true;
    }
  }
  changed = ReviewHandoversLocked() || changed;
  const uint64_t before = version_;
  if (options_.mode == PsMode::kSync) {
    for (auto& [id, b] : buckets_) MaybeCloseSync(id, b, /*deadline_only=*/!changed);
  }
  for (auto& [seq, c] : collectives_) {
    const bool was_closed = c.closed;
    MaybeCloseCollective(seq, c, now - c.opened_at >= options_.step_deadline_seconds);
    changed = changed || (c.closed && !was_closed);
  }
  if (changed || version_ != before) Changed();
}

void ServerCore::MaybeCloseCollective(uint64_t seq, CollectiveState& c, bool deadline_passed) {
  if (c.closed || c.contributions.empty()) return;
  bool all = QuorumReady();
  for (const auto& [id, w] : workers_) {
    if (w.live && c.contributions.count(id) == 0) all = false;
  }
  if (!all && !deadline_passed) return;
  c.closed = true;
  const int contributors = static_cast<int>(c.contributions.size());
  c.result.set_ready(true);
  c.result.set_contributors(contributors);
  switch (c.kind) {
    case pb::COLLECTIVE_SUM: {
      // Worker id order (std::map): every worker gets the same bits. Missing workers' shares
      // are extrapolated so that sum / world_size stays a mean of the contributors.
      std::vector<double> sum(c.size, 0.0);
      for (const auto& [id, r] : c.contributions) {
        for (uint64_t i = 0; i < c.size; ++i) sum[i] += r.values(static_cast<int>(i));
      }
      if (contributors < options_.world_size) {
        const double scale = static_cast<double>(options_.world_size) / contributors;
        for (double& v : sum) v *= scale;
      }
      c.result.mutable_values()->Assign(sum.begin(), sum.end());
      break;
    }
    case pb::COLLECTIVE_GATHER_U64: {
      // A missing rank's slot holds the lowest contributing rank's value (so a comparison across
      // ranks covers exactly the contributors).
      const uint64_t fill = c.contributions.begin()->second.value_u64();
      std::vector<uint64_t> all(static_cast<size_t>(options_.world_size), fill);
      for (const auto& [id, r] : c.contributions) all[static_cast<size_t>(id)] = r.value_u64();
      c.result.mutable_gathered()->Assign(all.begin(), all.end());
      break;
    }
    case pb::COLLECTIVE_BROADCAST: {
      auto root = c.contributions.find(c.root);
      if (root == c.contributions.end()) {
        c.error = absl::UnavailableError(absl::StrCat("collective ", seq, ": broadcast root ",
                                                      c.root, " never contributed"));
      } else {
        c.result.set_data(root->second.data());
      }
      break;
    }
    default:
      break;
  }
  for (const auto& [id, r] : c.contributions) c.contributors.insert(id);
  c.contributions.clear();
  // Keep only the newest closed results.
  int closed = 0;
  for (auto it = collectives_.rbegin(); it != collectives_.rend(); ++it) closed += it->second.closed;
  while (closed > options_.collective_history) {
    auto oldest = collectives_.begin();
    if (!oldest->second.closed) break;
    collectives_.erase(oldest);
    --closed;
  }
}

absl::Status ServerCore::Collective(const pb::CollectiveRequest& request,
                                    pb::CollectiveResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckShardZeroRequest(request.token(), request.shard(),
                                              request.worker_id(), "collectives are served by shard 0");
      !s.ok()) {
    return Reject(s);
  }
  const pb::CollectiveKind kind = request.kind();
  if (kind != pb::COLLECTIVE_SUM && kind != pb::COLLECTIVE_GATHER_U64 &&
      kind != pb::COLLECTIVE_BROADCAST && kind != pb::COLLECTIVE_BARRIER) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         absl::StrCat("unknown collective kind ", static_cast<int>(kind))));
  }
  if (kind == pb::COLLECTIVE_SUM && static_cast<uint64_t>(request.values_size()) != request.size()) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         "sum: values and size disagree"));
  }
  if (kind == pb::COLLECTIVE_BROADCAST) {
    if (request.root() < 0 || request.root() >= options_.world_size) {
      return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                           absl::StrCat("broadcast root ", request.root(), " is not a rank")));
    }
    if (request.worker_id() == request.root() && request.data().size() != 4 * request.size()) {
      return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                           "broadcast: data and size disagree"));
    }
  }
  if (request.size() > options_.max_message_bytes) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST, "collective too large"));
  }
  auto it = collectives_.find(request.seq());
  if (it == collectives_.end()) {
    if (!collectives_.empty() && request.seq() < collectives_.begin()->first &&
        collectives_.begin()->second.closed) {
      return Reject(Refuse(absl::StatusCode::kFailedPrecondition, pb::HISTORY_LOST,
                           absl::StrCat("collective ", request.seq(), " is no longer kept")));
    }
    CollectiveState c;
    c.kind = kind;
    c.root = request.root();
    c.size = request.size();
    c.opened_at = Now();
    it = collectives_.emplace(request.seq(), std::move(c)).first;
  }
  CollectiveState& c = it->second;
  if (c.kind != kind || c.size != request.size() || c.root != request.root()) {
    return Reject(absl::FailedPreconditionError(absl::StrCat(
        "collective ", request.seq(), " is a ", pb::CollectiveKind_Name(c.kind), " of ", c.size,
        " elements; this worker called ", pb::CollectiveKind_Name(kind), " of ", request.size(),
        " (workers call collectives in different orders)")));
  }
  if (!c.closed) {
    if (c.contributions.count(request.worker_id()) == 0) {
      c.contributions.emplace(request.worker_id(), request);
      MaybeCloseCollective(request.seq(), c, Now() - c.opened_at >= options_.step_deadline_seconds);
      Changed();
    }
  }
  if (!c.closed) {
    response->set_ready(false);
    return absl::OkStatus();
  }
  if (!c.error.ok()) return c.error;
  *response = c.result;
  if (c.kind == pb::COLLECTIVE_GATHER_U64 && c.contributors.count(request.worker_id()) == 0) {
    // A late worker (dropped while the gather closed) sees its own value in its own slot, so its
    // comparison with the others (the trainer's weight-hash check) still means something.
    response->set_gathered(request.worker_id(), request.value_u64());
  }
  return absl::OkStatus();
}

int ServerCore::PickDonorLocked(int joiner) const {
  for (const auto& [id, w] : workers_) {
    if (w.live && id != joiner) return id;
  }
  return -1;
}

bool ServerCore::ReviewHandoversLocked() {
  bool changed = false;
  for (auto it = handovers_.begin(); it != handovers_.end();) {
    auto joiner = workers_.find(it->first);
    if (joiner == workers_.end() || !joiner->second.joining) {
      it = handovers_.erase(it);  // the joiner is gone (or live: it needs nothing more)
      changed = true;
      continue;
    }
    HandoverState& h = it->second;
    const bool complete = h.pieces > 0 && h.received == h.pieces;
    auto donor = workers_.find(h.donor);
    if (!complete && (donor == workers_.end() || !donor->second.live)) {
      const int next = PickDonorLocked(it->first);
      if (next != h.donor) {
        QTRAIN_LOG(WARNING) << "joining worker " << it->first << ": donor " << h.donor
                            << " is gone; " << (next < 0 ? "no live worker is left" : "")
                            << (next < 0 ? "" : absl::StrCat("worker ", next, " hands over"));
        h = HandoverState();
        h.donor = next;
        changed = true;
      }
    }
    ++it;
  }
  return changed;
}

absl::Status ServerCore::Join(const pb::JoinRequest& request, pb::JoinResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckShardZeroRequest(request.token(), request.shard(),
                                              request.worker_id(), "the join handover is served by shard 0");
      !s.ok()) {
    return Reject(s);
  }
  const int id = request.worker_id();
  if (!workers_[id].joining) {
    return Reject(Refuse(absl::StatusCode::kFailedPrecondition, pb::BAD_REQUEST,
                         absl::StrCat("worker ", id, " is in the quorum, not joining; only a "
                                      "worker that registered into a running job asks for its "
                                      "state")));
  }
  auto [it, created] = handovers_.try_emplace(id);
  HandoverState& h = it->second;
  if (h.donor < 0) h.donor = PickDonorLocked(id);
  if (h.donor < 0) {
    handovers_.erase(it);
    return Reject(Refuse(absl::StatusCode::kFailedPrecondition, pb::NO_DONOR,
                         absl::StrCat("no live worker can hand over its state to worker ", id,
                                      " (the run has ended, or every other worker is gone)")));
  }
  if (created) {
    QTRAIN_LOG(INFO) << "joining worker " << id << " asks for the state; worker " << h.donor
                     << " hands it over at its next step boundary";
    Changed();
  }
  response->set_donor(h.donor);
  if (h.pieces == 0 || h.received < h.pieces) {
    response->set_ready(false);
    return absl::OkStatus();
  }
  if (request.piece() >= h.pieces) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         absl::StrCat("piece ", request.piece(), " of ", h.pieces)));
  }
  response->set_ready(true);
  response->set_pieces(h.pieces);
  response->set_data(h.data[request.piece()]);
  return absl::OkStatus();
}

absl::Status ServerCore::Handover(const pb::HandoverRequest& request,
                                  pb::HandoverResponse* /*response*/) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckShardZeroRequest(request.token(), request.shard(),
                                              request.worker_id(), "the join handover is served by shard 0");
      !s.ok()) {
    return Reject(s);
  }
  if (request.pieces() < 1 || request.pieces() > kMaxHandoverPieces ||
      request.piece() >= request.pieces()) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         absl::StrCat("handover piece ", request.piece(), " of ", request.pieces(),
                                      " (at most ", kMaxHandoverPieces, " pieces)")));
  }
  if (request.data().size() > options_.max_message_bytes) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         absl::StrCat("handover piece of ", request.data().size(),
                                      " bytes exceeds the limit of ", options_.max_message_bytes)));
  }
  auto it = handovers_.find(request.joiner());
  if (it == handovers_.end() || it->second.donor != request.worker_id()) {
    return Reject(Refuse(
        absl::StatusCode::kFailedPrecondition, pb::BAD_REQUEST,
        absl::StrCat("worker ", request.joiner(), " waits for no handover from worker ",
                     request.worker_id(), " (it is live, gone, or another worker hands over)")));
  }
  HandoverState& h = it->second;
  if (h.pieces != 0 && h.pieces != request.pieces()) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         absl::StrCat("handover of ", request.pieces(), " pieces; this upload has ",
                                      h.pieces)));
  }
  const uint64_t bytes = h.bytes + request.data().size() -
                         (h.pieces != 0 && h.have[request.piece()] ? h.data[request.piece()].size() : 0);
  if (bytes > kMaxHandoverBytes) {
    return Reject(Refuse(absl::StatusCode::kInvalidArgument, pb::BAD_REQUEST,
                         "the handed-over state exceeds 16 GiB"));
  }
  // Accepted.
  if (h.pieces == 0) {
    h.pieces = request.pieces();
    h.data.assign(h.pieces, std::string());
    h.have.assign(h.pieces, false);
  }
  if (!h.have[request.piece()]) ++h.received;
  h.have[request.piece()] = true;
  h.data[request.piece()] = request.data();
  h.bytes = bytes;
  if (h.received == h.pieces) {
    QTRAIN_LOG(INFO) << "worker " << request.worker_id() << " handed its state over to joining worker "
                     << request.joiner() << " (" << h.bytes << " bytes)";
  }
  Changed();
  return absl::OkStatus();
}

absl::Status ServerCore::GetStatus(const pb::StatusRequest& request,
                                   pb::StatusResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckToken(request.token()); !s.ok()) return Reject(s);
  response->set_shard(static_cast<uint32_t>(options_.shard));
  response->set_num_shards(static_cast<uint32_t>(options_.num_shards));
  response->set_mode(options_.mode == PsMode::kSync ? pb::PS_MODE_SYNC : pb::PS_MODE_ASYNC);
  response->set_codec_spec(options_.codec_spec);
  response->set_version(version_);
  response->set_world_size(options_.world_size);
  response->set_registered(static_cast<int32_t>(workers_.size()));
  response->set_live(LiveCount());
  for (const auto& [id, w] : workers_) {
    if (w.live) response->add_live_workers(id);
  }
  for (const auto& [id, b] : buckets_) {
    pb::BucketStatus* s = response->add_buckets();
    s->set_bucket(id);
    s->set_elements(b.elements);
    s->set_open_step(b.open_step);
    s->set_pushed(static_cast<int32_t>(b.pushed.size()));
  }
  response->set_state_hash(StateHashLocked());
  response->set_rejected_requests(rejected_);
  response->set_checkpoints_written(checkpoints_);
  response->set_restored(restored_);
  return absl::OkStatus();
}

uint64_t ServerCore::StateHashLocked() const {
  uint64_t h = FnvValue(kFnvOffset, version_);
  for (const auto& [id, b] : buckets_) {
    h = FnvValue(h, id);
    h = FnvValue(h, b.elements);
    h = FnvValue(h, b.open_step);
    {
      std::lock_guard<std::mutex> sum_lock(*b.sum_mu);  // a push may be adding outside mu_
      h = Fnv(h, b.sum.data(), 4 * b.sum.size());
    }
    for (int w : b.pushed) h = FnvValue(h, w);
    for (const Round& r : b.history) {
      h = FnvValue(h, r.step);
      h = Fnv(h, r.encoded.data(), r.encoded.size());
    }
    std::span<const float> residual = codec_->Residual(BucketKey(id));
    h = Fnv(h, residual.data(), 4 * residual.size());
  }
  for (const auto& [id, w] : workers_) {
    h = FnvValue(h, id);
    h = FnvValue(h, w.live);
    h = FnvValue(h, w.joining);
  }
  for (const auto& [id, ho] : handovers_) {
    h = FnvValue(h, id);
    h = FnvValue(h, ho.donor);
    h = FnvValue(h, ho.received);
  }
  return h;
}

absl::Status ServerCore::WriteCheckpoint() {
  std::lock_guard<std::mutex> lock(mu_);
  return WriteCheckpointLocked();
}

absl::Status ServerCore::WriteCheckpointLocked() {
  if (options_.checkpoint_dir.empty()) return absl::OkStatus();
  std::error_code ec;
  std::filesystem::create_directories(options_.checkpoint_dir, ec);
  if (ec) {
    return absl::UnavailableError(absl::StrCat("cannot create --checkpoint_dir ",
                                               options_.checkpoint_dir, ": ", ec.message()));
  }
  pb::PsCheckpoint ckpt;
  ckpt.set_shard(static_cast<uint32_t>(options_.shard));
  ckpt.set_num_shards(static_cast<uint32_t>(options_.num_shards));
  ckpt.set_codec_spec(options_.codec_spec);
  ckpt.set_mode(options_.mode == PsMode::kSync ? pb::PS_MODE_SYNC : pb::PS_MODE_ASYNC);
  ckpt.set_version(version_);
  ckpt.set_world_size(options_.world_size);
  for (const auto& [id, b] : buckets_) {
    pb::PsCheckpoint::Bucket* out = ckpt.add_buckets();
    out->set_bucket(id);
    out->set_elements(b.elements);
    out->set_open_step(b.open_step);
    std::span<const float> residual = codec_->Residual(BucketKey(id));
    out->mutable_residual()->Assign(residual.begin(), residual.end());
    const size_t keep = std::min<size_t>(b.history.size(), kCheckpointHistory);
    for (size_t i = b.history.size() - keep; i < b.history.size(); ++i) {
      pb::PsRound* r = out->add_history();
      r->set_bucket(id);
      r->set_step(b.history[i].step);
      r->set_contributors(b.history[i].contributors);
      r->set_encoded(b.history[i].encoded);
      r->set_elements(b.elements);
    }
  }
  for (const auto& [id, w] : workers_) ckpt.add_workers(id);
  RETURN_IF_ERROR(WriteFramedFile(ServerCheckpointPath(options_.checkpoint_dir, options_.shard),
                                  kCheckpointFormat, ckpt.SerializeAsString()));
  ++checkpoints_;
  // Every round so far is in the checkpoint now: the journal starts over.
  if (journal_fd_ >= 0 && ::ftruncate(journal_fd_, 0) != 0) {
    QTRAIN_LOG(WARNING) << "cannot truncate the round journal: " << std::strerror(errno);
  }
  return absl::OkStatus();
}

absl::Status ServerCore::Restore() {
  const std::string path = ServerCheckpointPath(options_.checkpoint_dir, options_.shard);
  if (!std::filesystem::exists(path)) {
    // Killed before its first checkpoint: the journal alone holds the closed rounds.
    const uint64_t before = version_;
    RETURN_IF_ERROR(ReplayJournalLocked());
    restored_ = version_ != before;
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(FramedBody body, ReadFramedFile(path, kCheckpointFormat, kMaxCheckpointBytes));
  pb::PsCheckpoint ckpt;
  if (!ckpt.ParseFromString(body.body)) {
    return absl::DataLossError(absl::StrCat("server checkpoint ", path, " does not parse"));
  }
  const PsMode mode = ckpt.mode() == pb::PS_MODE_ASYNC ? PsMode::kAsync : PsMode::kSync;
  if (static_cast<int>(ckpt.shard()) != options_.shard ||
      static_cast<int>(ckpt.num_shards()) != options_.num_shards ||
      ckpt.codec_spec() != options_.codec_spec || mode != options_.mode ||
      ckpt.world_size() != options_.world_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        "server checkpoint ", path, " is for shard ", ckpt.shard(), " of ", ckpt.num_shards(),
        ", codec '", ckpt.codec_spec(), "', ", ckpt.world_size(), " workers, mode ",
        pb::PsMode_Name(ckpt.mode()), "; this server is shard ", options_.shard, " of ",
        options_.num_shards, ", codec '", options_.codec_spec, "', ", options_.world_size,
        " workers (use another --checkpoint_dir or the same flags)"));
  }
  for (const pb::PsCheckpoint::Bucket& in : ckpt.buckets()) {
    if (in.elements() < 0 || static_cast<uint64_t>(in.residual_size()) > uint64_t(in.elements()) ||
        in.bucket() % ckpt.num_shards() != ckpt.shard()) {
      return absl::DataLossError(absl::StrCat("server checkpoint ", path, ": bucket ",
                                              in.bucket(), " is inconsistent"));
    }
    Bucket& b = buckets_[in.bucket()];
    b.elements = in.elements();
    b.open_step = in.open_step();
    for (const pb::PsRound& r : in.history()) {
      if (r.step() < 0 || (in.open_step() >= 0 && r.step() >= in.open_step())) {
        return absl::DataLossError(absl::StrCat("server checkpoint ", path, ": bucket ",
                                                in.bucket(), " keeps round ", r.step(),
                                                " but its open round is ", in.open_step()));
      }
      b.history.push_back(Round{r.step(), r.encoded(), r.contributors()});
    }
    if (in.residual_size() > 0) {
      std::vector<float> residual(in.residual().begin(), in.residual().end());
      RETURN_IF_ERROR(codec_->SetResidual(BucketKey(in.bucket()), residual));
    }
  }
  const double now = Now();
  for (int id : ckpt.workers()) {
    if (id < 0 || id >= options_.world_size) {
      return absl::DataLossError(absl::StrCat("server checkpoint ", path, ": worker id ", id));
    }
    workers_[id] = Worker{.live = true, .joining = false, .last_seen = now};
  }
  version_ = ckpt.version();
  restored_ = true;
  RETURN_IF_ERROR(ReplayJournalLocked());
  QTRAIN_LOG(INFO) << "restored " << path << ": version " << version_ << ", "
                   << buckets_.size() << " buckets, " << workers_.size() << " workers";
  return absl::OkStatus();
}

}  // namespace qtrain::server
