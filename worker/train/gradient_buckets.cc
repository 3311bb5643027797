#include "worker/train/gradient_buckets.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/timer.h"

namespace qtrain::train {

absl::StatusOr<std::vector<GradientBucket>> PlanGradientBuckets(
    std::span<nn::Parameter* const> params, int64_t bucket_bytes) {
  if (bucket_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gradient bucket size must be > 0 bytes, got ", bucket_bytes));
  }
  std::vector<GradientBucket> buckets;
  GradientBucket current;
  auto close = [&] {
    if (current.params.empty()) return;
    current.key = absl::StrCat("b", buckets.size());
    buckets.push_back(std::move(current));
    current = GradientBucket();
  };
  for (size_t i = params.size(); i-- > 0;) {
    const int64_t n = params[i]->value.size();
    if (!current.params.empty() && (current.elements + n) * 4 > bucket_bytes) close();
    current.params.push_back(i);
    current.offsets.push_back(current.elements);
    current.elements += n;
  }
  close();
  return buckets;
}

absl::StatusOr<std::unique_ptr<GradientBucketer>> GradientBucketer::Create(
    std::vector<nn::Parameter*> params, comm::Communicator* comm, const BucketOptions& options) {
  if (comm == nullptr) return absl::InvalidArgumentError("GradientBucketer: null communicator");
  if (!(options.wait_timeout_seconds > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GradientBucketer: wait timeout must be > 0 s, got ", options.wait_timeout_seconds));
  }
  for (const nn::Parameter* p : params) {
    if (p->grad.size() != p->value.size()) {
      return absl::InvalidArgumentError(absl::StrCat("parameter '", p->name, "' has ",
                                                     p->value.size(), " values but ",
                                                     p->grad.size(), " gradients"));
    }
  }
  ASSIGN_OR_RETURN(std::vector<GradientBucket> buckets,
                   PlanGradientBuckets(params, options.bucket_bytes));
  return std::unique_ptr<GradientBucketer>(
      new GradientBucketer(std::move(params), comm, options, std::move(buckets)));
}

GradientBucketer::GradientBucketer(std::vector<nn::Parameter*> params, comm::Communicator* comm,
                                   const BucketOptions& options,
                                   std::vector<GradientBucket> buckets)
    : params_(std::move(params)), comm_(comm), options_(options), buckets_(std::move(buckets)) {
  buffers_.resize(buckets_.size());
  for (size_t b = 0; b < buckets_.size(); ++b) {
    buffers_[b].resize(static_cast<size_t>(buckets_[b].elements));
    for (size_t i : buckets_[b].params) bucket_of_.emplace(params_[i], b);
  }
  delivered_.assign(params_.size(), 0);
  missing_.assign(buckets_.size(), 0);
  done_ = buckets_.size();  // no step in flight
  thread_ = std::thread([this] { ThreadMain(); });
}

GradientBucketer::~GradientBucketer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  thread_.join();
}

void GradientBucketer::BeginStep(int64_t step) {
  std::fill(delivered_.begin(), delivered_.end(), 0);
  for (size_t b = 0; b < buckets_.size(); ++b) {
    missing_[b] = static_cast<int64_t>(buckets_[b].params.size());
  }
  next_launch_ = 0;
  std::lock_guard<std::mutex> lock(mu_);
  queue_.clear();
  done_ = 0;
  in_flight_ = -1;
  step_ = step;
  error_ = absl::OkStatus();
  stats_ = comm::StepStats();
}

void GradientBucketer::OnGradsReady(std::span<nn::Parameter* const> ready) {
  bool any = false;
  for (const nn::Parameter* p : ready) {
    auto it = bucket_of_.find(p);
    if (it == bucket_of_.end()) continue;
    // The parameter's index: found through its bucket (a bucket holds few parameters).
    const GradientBucket& bucket = buckets_[it->second];
    for (size_t i : bucket.params) {
      if (params_[i] == p && !delivered_[i]) {
        delivered_[i] = 1;
        --missing_[it->second];
        any = true;
      }
    }
  }
  if (!any) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    LaunchReady();
  }
  cv_.notify_all();
}

void GradientBucketer::LaunchReady() {
  while (next_launch_ < buckets_.size() && missing_[next_launch_] == 0) {
    queue_.push_back(next_launch_++);
  }
}

absl::Status GradientBucketer::FinishStep(comm::StepStats* stats, double* wait_seconds) {
  Timer timer;
  std::unique_lock<std::mutex> lock(mu_);
  std::fill(missing_.begin(), missing_.end(), 0);  // flush: everything is final now
  LaunchReady();
  cv_.notify_all();
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(options_.wait_timeout_seconds));
  const bool finished =
      cv_.wait_until(lock, deadline, [this] { return done_ == buckets_.size(); });
  if (wait_seconds != nullptr) *wait_seconds += timer.Seconds();
  if (!finished) {
    const std::string what =
        in_flight_ >= 0 ? absl::StrCat("bucket '", buckets_[in_flight_].key, "'")
                        : std::string("the queue");
    return absl::DeadlineExceededError(absl::StrCat(
        "gradient averaging of step ", step_, " did not finish within ",
        options_.wait_timeout_seconds, " s (", done_, " of ", buckets_.size(),
        " buckets done; the communication thread is stuck in ", what, ")"));
  }
  if (stats != nullptr) *stats += stats_;
  return error_;
}

void GradientBucketer::ThreadMain() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    const size_t b = queue_.front();
    queue_.pop_front();
    const int64_t step = step_;
    const bool skip = !error_.ok();  // an earlier bucket of this step failed
    in_flight_ = static_cast<int64_t>(b);
    lock.unlock();

    absl::Status status;
    comm::StepStats stats;
    if (!skip) {
      const GradientBucket& bucket = buckets_[b];
      std::vector<float>& buffer = buffers_[b];
      for (size_t j = 0; j < bucket.params.size(); ++j) {
        const nn::Tensor& grad = params_[bucket.params[j]]->grad;
        std::copy(grad.data(), grad.data() + grad.size(), buffer.data() + bucket.offsets[j]);
      }
      comm_->SetStep(step);
      status = comm_->AllReduceMean(bucket.key, buffer, &stats);
      if (status.ok()) {
        for (size_t j = 0; j < bucket.params.size(); ++j) {
          nn::Tensor& grad = params_[bucket.params[j]]->grad;
          std::copy(buffer.data() + bucket.offsets[j],
                    buffer.data() + bucket.offsets[j] + grad.size(), grad.data());
        }
      } else {
        status = absl::Status(status.code(),
                              absl::StrCat("averaging gradient bucket '", bucket.key, "' (",
                                           bucket.elements, " floats): ", status.message()));
      }
    }

    lock.lock();
    in_flight_ = -1;
    stats_ += stats;
    if (!status.ok() && error_.ok()) error_ = status;
    ++done_;
    if (done_ == buckets_.size()) cv_.notify_all();
  }
}

}  // namespace qtrain::train
