// A fixed-size pool of worker threads for data-parallel loops in the CPU kernels.
//
//   ThreadPool pool(4);                        // the caller plus 3 workers
//   pool.ParallelFor(n, /*grain=*/1024, [&](int64_t begin, int64_t end) { ... });
//
// ParallelFor splits [0, n) into at most num_threads() contiguous chunks of at least `grain`
// items (the last chunk may be shorter when n < grain). The split depends only on
// (n, grain, num_threads()), never on timing, so a reduction that keeps one partial per chunk and
// combines them in chunk order gives the same bits on every run with the same thread count.
//
// Blocking, and it cannot hang: the calling thread runs chunks too and takes every chunk no worker
// has claimed yet, so it only ever waits for chunks that are already running. A ParallelFor issued
// from inside a chunk of the same pool (nesting), or while another thread is using the pool, runs
// its chunks inline on the calling thread instead of waiting.
//
// Thread-safe. Not a singleton: owners (the trainer, tests) create one and pass it down in a
// CpuContext. Costs one condition-variable wake-up (~10-50 us) per parallel call, so callers pick
// `grain` so that small loops run inline. The destructor joins every worker.
#ifndef QTRAIN_WORKER_KERNELS_CPU_THREAD_POOL_H_
#define QTRAIN_WORKER_KERNELS_CPU_THREAD_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"

namespace qtrain::kernels {

class ThreadPool {
 public:
  // fn(chunk, begin, end): chunk is the index of [begin, end) in [0, NumChunks(n, grain)).
  using ChunkFn = absl::FunctionRef<void(int64_t chunk, int64_t begin, int64_t end)>;
  using RangeFn = absl::FunctionRef<void(int64_t begin, int64_t end)>;

  // num_threads counts the calling thread: ThreadPool(1) starts no thread and runs everything
  // inline. Values below 1 are treated as 1.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // How many chunks ParallelFor(n, grain) uses: min(num_threads, ceil(n / grain)); 0 when n <= 0.
  int64_t NumChunks(int64_t n, int64_t grain) const;

  // Runs fn over [0, n) in NumChunks(n, grain) contiguous chunks and returns when all are done.
  void ParallelFor(int64_t n, int64_t grain, RangeFn fn);
  void ParallelForChunks(int64_t n, int64_t grain, ChunkFn fn);

 private:
  struct Job;

  void WorkerLoop();
  // Claims and runs chunks of `job` until none is left.
  void RunChunks(Job& job);

  const int num_threads_;
  std::vector<std::thread> workers_;

  std::mutex submit_mu_;  // held by the one thread whose job is in flight

  std::mutex mu_;
  std::condition_variable work_cv_;  // workers wait here for a new job or stop_
  std::condition_variable done_cv_;  // the submitter waits here for claimed chunks to finish
  Job* job_ = nullptr;               // guarded by mu_
  uint64_t generation_ = 0;          // guarded by mu_; bumped per job
  int job_refs_ = 0;                 // guarded by mu_; workers holding job_
  bool stop_ = false;                // guarded by mu_
};

// Splits [0, n) exactly as ThreadPool::NumChunks does; 1 chunk when pool is nullptr.
int64_t NumChunks(const ThreadPool* pool, int64_t n, int64_t grain);

// As ThreadPool::ParallelFor / ParallelForChunks; runs inline when pool is nullptr.
void ParallelFor(ThreadPool* pool, int64_t n, int64_t grain, ThreadPool::RangeFn fn);
void ParallelForChunks(ThreadPool* pool, int64_t n, int64_t grain, ThreadPool::ChunkFn fn);

}  // namespace qtrain::kernels

#endif  // QTRAIN_WORKER_KERNELS_CPU_THREAD_POOL_H_
