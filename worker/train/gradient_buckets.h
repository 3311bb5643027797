// Gradient bucketing for data-parallel training: groups parameter gradients into buckets of about
// `bucket_bytes`, hands each bucket to a dedicated communication thread as soon as backward has
// finished all of its gradients, and lets the trainer wait for the averaged result before the
// optimizer step. Communication (and a compressing communicator's encode/decode) thus overlaps
// the rest of backward.
//
// The plan. Buckets are formed once, from the model's parameter list (CollectParameters order)
// walked in REVERSE, i.e. roughly the order in which RunContext::on_grads_ready delivers them
// (the last layer's gradients are final first). A bucket takes whole parameters: it is closed
// when the next parameter would push it over bucket_bytes (a parameter larger than that gets a
// bucket of its own). Bucket i is keyed "b<i>". The plan depends only on the parameter order and
// sizes, so it is the same on every rank, and so are the keys and sizes each rank passes to
// Communicator::AllReduceMean, and their order: bucket i is launched only after buckets 0..i-1,
// whatever order the gradients arrive in.
//
// One step:
//   BeginStep(step)        resets the per-step state (trainer thread, before Backward)
//   OnGradsReady(params)   from on_grads_ready during Backward: marks params final; every bucket
//                          whose gradients are now all final (and whose predecessors have been
//                          launched) is queued for the communication thread
//   FinishStep(...)        after Backward: parameters never reported count as final now (the last
//                          partial bucket is flushed), then waits until every bucket is averaged.
//                          The communication thread copies each bucket's gradients into a flat
//                          buffer, calls AllReduceMean, and copies the mean back into the
//                          parameters' grads, so after FinishStep returns OK every grad holds the
//                          mean across ranks.
// Parameters' grads must not be written between their OnGradsReady and FinishStep (true of
// Backward: a grad is final when reported).
//
// Errors: the first failing AllReduceMean of a step is returned by FinishStep, prefixed with the
// bucket; the step's later buckets are not attempted (the run must stop: after an error the
// ranks' collective sequences can no longer be trusted to line up). FinishStep waits at most
// wait_timeout_seconds, then returns DEADLINE_EXCEEDED naming the bucket in flight.
//
// Thread-safety: BeginStep, OnGradsReady and FinishStep are called from one thread (the trainer's).
// The communicator is driven only by the communication thread between BeginStep and the return of
// FinishStep; outside that window the trainer thread may use it (no step is in flight).
// Cost: one extra copy of every gradient in and out of the bucket buffers (memory: one float per
// parameter element), on the communication thread.
#ifndef QTRAIN_WORKER_TRAIN_GRADIENT_BUCKETS_H_
#define QTRAIN_WORKER_TRAIN_GRADIENT_BUCKETS_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/comm/communicator.h"
#include "worker/nn/layer.h"

namespace qtrain::train {

struct BucketOptions {
  // Target bucket size in bytes of fp32 gradients (> 0). Default 4 MiB.
  int64_t bucket_bytes = int64_t{4} << 20;
  // Longest FinishStep waits for the communication thread, in seconds (> 0). The communicator's
  // own per-call timeout normally fires first; this is the backstop.
  double wait_timeout_seconds = 600.0;
};

// One bucket of the plan: indices into the parameter list, in bucket order (the reverse of the
// list), and the offset of each parameter in the bucket's flat buffer.
struct GradientBucket {
  std::string key;                 // "b<index>"
  std::vector<size_t> params;      // indices into the parameter list
  std::vector<int64_t> offsets;    // element offset of each in the flat buffer
  int64_t elements = 0;
};

// The plan described in the file comment. INVALID_ARGUMENT unless bucket_bytes > 0.
absl::StatusOr<std::vector<GradientBucket>> PlanGradientBuckets(
    std::span<nn::Parameter* const> params, int64_t bucket_bytes);

class GradientBucketer {
 public:
  // Plans the buckets and starts the communication thread. `comm` must outlive the bucketer.
  static absl::StatusOr<std::unique_ptr<GradientBucketer>> Create(
      std::vector<nn::Parameter*> params, comm::Communicator* comm, const BucketOptions& options);
  // Stops and joins the communication thread (waiting for a call in flight: the communicator's
  // timeout bounds it).
  ~GradientBucketer();
  GradientBucketer(const GradientBucketer&) = delete;
  GradientBucketer& operator=(const GradientBucketer&) = delete;

  const std::vector<GradientBucket>& buckets() const { return buckets_; }

  // Precondition: no step in flight (the previous FinishStep returned).
  void BeginStep(int64_t step);
  // Parameters not in the list given to Create, and repeats within a step, are ignored.
  void OnGradsReady(std::span<nn::Parameter* const> ready);
  // See the file comment. Adds the step's communicator statistics to *stats and the time this
  // thread spent blocked here to *wait_seconds (either may be null).
  absl::Status FinishStep(comm::StepStats* stats, double* wait_seconds);

 private:
  GradientBucketer(std::vector<nn::Parameter*> params, comm::Communicator* comm,
                   const BucketOptions& options, std::vector<GradientBucket> buckets);
  void LaunchReady();  // queues every launchable bucket; caller holds mu_
  void ThreadMain();

  const std::vector<nn::Parameter*> params_;
  comm::Communicator* const comm_;
  const BucketOptions options_;
  const std::vector<GradientBucket> buckets_;
  std::unordered_map<const nn::Parameter*, size_t> bucket_of_;  // parameter -> bucket index
  std::vector<std::vector<float>> buffers_;  // one per bucket; touched by the comm thread only

  // Trainer-thread state for the current step.
  std::vector<char> delivered_;         // per parameter index
  std::vector<int64_t> missing_;        // per bucket: parameters not yet delivered
  size_t next_launch_ = 0;              // buckets [0, next_launch_) are queued

  std::mutex mu_;
  std::condition_variable cv_;          // queue_ / done_ / stop_ changed
  std::deque<size_t> queue_;            // buckets for the comm thread, in launch order
  size_t done_ = 0;                     // buckets finished (or skipped) this step
  int64_t in_flight_ = -1;              // bucket the comm thread is working on, or -1
  int64_t step_ = 0;
  absl::Status error_;                  // first error of the step
  comm::StepStats stats_;               // this step's statistics
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_GRADIENT_BUCKETS_H_
