// Test helper: W ranks as threads of one process over an in-memory exchange (the gloo habit), so
// that collective code runs multi-rank in a unit test without MPI. Implements the exact
// collectives (AllReduceSum in rank order, Broadcast, AllGatherU64, Barrier); AllReduceMean is
// the plain float mean in rank order. Every rank must call the same collectives in the same order
// (as with MPI); a rank that does not arrive within the timeout makes the others fail with
// DEADLINE_EXCEEDED. Thread-safety: one ThreadCommunicator per rank thread; the World is shared.
#ifndef QTRAIN_TESTS_UNIT_WORKER_COMM_THREAD_COMMUNICATOR_H_
#define QTRAIN_TESTS_UNIT_WORKER_COMM_THREAD_COMMUNICATOR_H_

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "worker/comm/communicator.h"

namespace qtrain::testing {

// The shared state of one world: a generation-counted rendezvous where every rank deposits bytes
// and, once all have, every rank reads all deposits.
class ThreadWorld {
 public:
  explicit ThreadWorld(int size, std::chrono::seconds timeout = std::chrono::seconds(60))
      : size_(size), timeout_(timeout), deposits_(size) {}
  int size() const { return size_; }

  // Deposits `mine` as rank `rank`, waits for every rank's, and returns them all (by rank).
  absl::StatusOr<std::vector<std::string>> Exchange(int rank, std::string mine, const char* what) {
    std::unique_lock<std::mutex> lock(mu_);
    // Wait until the previous exchange has been read by everyone.
    if (!cv_.wait_for(lock, timeout_, [&] { return readers_ == 0; })) {
      return absl::DeadlineExceededError(absl::StrCat(what, ": rank ", rank, " timed out"));
    }
    const uint64_t generation = generation_;
    deposits_[rank] = std::move(mine);
    if (++arrived_ == size_) {
      arrived_ = 0;
      readers_ = size_;
      ++generation_;
      cv_.notify_all();
    } else if (!cv_.wait_for(lock, timeout_, [&] { return generation_ != generation; })) {
      return absl::DeadlineExceededError(
          absl::StrCat(what, ": rank ", rank, " waited for its peers in vain"));
    }
    std::vector<std::string> all = deposits_;
    if (--readers_ == 0) cv_.notify_all();
    return all;
  }

 private:
  const int size_;
  const std::chrono::seconds timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> deposits_;
  int arrived_ = 0;
  int readers_ = 0;
  uint64_t generation_ = 0;
};

class ThreadCommunicator final : public comm::Communicator {
 public:
  ThreadCommunicator(ThreadWorld* world, int rank) : world_(world), rank_(rank) {}

  int rank() const override { return rank_; }
  int world_size() const override { return world_->size(); }
  std::string Describe() const override {
    return absl::StrCat("threads: ", world_size(), " ranks");
  }
  void SetStep(int64_t) override {}

  absl::Status AllReduceMean(std::string_view, std::span<float> data, comm::StepStats*) override {
    auto all = world_->Exchange(rank_, Bytes(data), "AllReduceMean");
    if (!all.ok()) return all.status();
    for (size_t i = 0; i < data.size(); ++i) {
      float sum = 0.0f;
      for (const std::string& d : *all) sum += reinterpret_cast<const float*>(d.data())[i];
      data[i] = sum / static_cast<float>(world_size());
    }
    return absl::OkStatus();
  }
  absl::Status Broadcast(std::span<float> data, int root) override {
    auto all = world_->Exchange(rank_, Bytes(data), "Broadcast");
    if (!all.ok()) return all.status();
    std::memcpy(data.data(), (*all)[root].data(), data.size_bytes());
    return absl::OkStatus();
  }
  absl::Status AllReduceSum(std::span<double> values) override {
    auto all = world_->Exchange(rank_, Bytes(values), "AllReduceSum");
    if (!all.ok()) return all.status();
    for (size_t i = 0; i < values.size(); ++i) {
      double sum = 0.0;
      for (const std::string& d : *all) {
        if (d.size() != values.size_bytes()) {
          return absl::FailedPreconditionError("AllReduceSum: ranks passed different sizes");
        }
        sum += reinterpret_cast<const double*>(d.data())[i];
      }
      values[i] = sum;
    }
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<uint64_t>> AllGatherU64(uint64_t value) override {
    auto all = world_->Exchange(rank_, std::string(reinterpret_cast<const char*>(&value), 8),
                                "AllGatherU64");
    if (!all.ok()) return all.status();
    std::vector<uint64_t> out;
    for (const std::string& d : *all) out.push_back(*reinterpret_cast<const uint64_t*>(d.data()));
    return out;
  }
  absl::Status Barrier() override { return world_->Exchange(rank_, "", "Barrier").status(); }
  std::vector<std::string> ResidualKeys() const override { return {}; }
  std::span<const float> Residual(std::string_view) const override { return {}; }
  absl::Status SetResidual(std::string_view, std::span<const float>) override {
    return absl::FailedPreconditionError("no error feedback");
  }

 private:
  template <class T>
  static std::string Bytes(std::span<T> data) {
    return std::string(reinterpret_cast<const char*>(data.data()), data.size_bytes());
  }
  ThreadWorld* world_;
  int rank_;
};

}  // namespace qtrain::testing

#endif  // QTRAIN_TESTS_UNIT_WORKER_COMM_THREAD_COMMUNICATOR_H_
