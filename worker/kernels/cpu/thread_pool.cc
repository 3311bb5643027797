#include "worker/kernels/cpu/thread_pool.h"

#include <algorithm>
#include <atomic>

namespace qtrain::kernels {
namespace {

// The pool whose chunk this thread is running, to detect nested ParallelFor calls.
thread_local const ThreadPool* tls_running_pool = nullptr;

class ScopedRunningPool {
 public:
  explicit ScopedRunningPool(const ThreadPool* pool) : saved_(tls_running_pool) {
    tls_running_pool = pool;
  }
  ~ScopedRunningPool() { tls_running_pool = saved_; }

 private:
  const ThreadPool* saved_;
};

int64_t ChunkBegin(int64_t chunk, int64_t n, int64_t num_chunks) {
  // n * chunk stays far below 2^63 for any realistic n (num_chunks <= thread count).
  return n * chunk / num_chunks;
}

}  // namespace

struct ThreadPool::Job {
  ChunkFn* fn;
  int64_t n;
  int64_t num_chunks;
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> chunks_done{0};
};

ThreadPool::ThreadPool(int num_threads) : num_threads_(std::max(1, num_threads)) {
  workers_.reserve(num_threads_ - 1);
  for (int i = 1; i < num_threads_; ++i) {
    workers_.emplace_back([this] { WorkerLoop(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

int64_t ThreadPool::NumChunks(int64_t n, int64_t grain) const {
  if (n <= 0) return 0;
  grain = std::max<int64_t>(grain, 1);
  const int64_t by_grain = (n + grain - 1) / grain;
  return std::min<int64_t>(num_threads_, by_grain);
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain, RangeFn fn) {
  ParallelForChunks(n, grain, [&fn](int64_t, int64_t begin, int64_t end) { fn(begin, end); });
}

void ThreadPool::ParallelForChunks(int64_t n, int64_t grain, ChunkFn fn) {
  const int64_t num_chunks = NumChunks(n, grain);
  if (num_chunks == 0) return;
  auto run_inline = [&] {
    for (int64_t c = 0; c < num_chunks; ++c) {
      fn(c, ChunkBegin(c, n, num_chunks), ChunkBegin(c + 1, n, num_chunks));
    }
  };
  if (num_chunks == 1 || tls_running_pool == this) {
    run_inline();
    return;
  }
  // Another thread owns the pool: do the work here rather than queue behind it.
  std::unique_lock<std::mutex> submit(submit_mu_, std::try_to_lock);
  if (!submit.owns_lock()) {
    run_inline();
    return;
  }

  Job job;
  job.fn = &fn;
  job.n = n;
  job.num_chunks = num_chunks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &job;
    ++generation_;
  }
  work_cv_.notify_all();

  RunChunks(job);

  // Every chunk is claimed; wait for the ones workers are still running, and for every worker to
  // let go of `job` (it lives on this stack frame). No timeout: the wait is bounded by the running
  // time of chunks already started, since no unclaimed chunk remains.
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] {
    return job.chunks_done.load(std::memory_order_acquire) == num_chunks && job_refs_ == 0;
  });
  job_ = nullptr;
}

void ThreadPool::RunChunks(Job& job) {
  ScopedRunningPool running(this);
  for (;;) {
    const int64_t c = job.next_chunk.fetch_add(1, std::memory_order_relaxed);
    if (c >= job.num_chunks) return;
    (*job.fn)(c, ChunkBegin(c, job.n, job.num_chunks), ChunkBegin(c + 1, job.n, job.num_chunks));
    job.chunks_done.fetch_add(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen_generation = 0;
  for (;;) {
    Job* job = nullptr;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Idle workers sleep until there is work or the pool is destroyed.
      work_cv_.wait(lock, [&] { return stop_ || generation_ != seen_generation; });
      if (stop_) return;
      seen_generation = generation_;
      if (job_ == nullptr) continue;  // that job finished before this worker woke
      job = job_;
      ++job_refs_;
    }
    RunChunks(*job);
    {
      std::lock_guard<std::mutex> lock(mu_);
      --job_refs_;
    }
    done_cv_.notify_all();
  }
}

int64_t NumChunks(const ThreadPool* pool, int64_t n, int64_t grain) {
  if (n <= 0) return 0;
  return pool == nullptr ? 1 : pool->NumChunks(n, grain);
}

void ParallelFor(ThreadPool* pool, int64_t n, int64_t grain, ThreadPool::RangeFn fn) {
  if (n <= 0) return;
  if (pool == nullptr) {
    fn(0, n);
    return;
  }
  pool->ParallelFor(n, grain, fn);
}

void ParallelForChunks(ThreadPool* pool, int64_t n, int64_t grain, ThreadPool::ChunkFn fn) {
  if (n <= 0) return;
  if (pool == nullptr) {
    fn(0, 0, n);
    return;
  }
  pool->ParallelForChunks(n, grain, fn);
}

}  // namespace qtrain::kernels
