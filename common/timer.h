// Wall-clock stopwatch for progress lines and metrics (not for performance claims: those are
// benchmarks). Not thread-safe; one per thread of measurement. Costs one steady_clock read per call.
#ifndef QTRAIN_COMMON_TIMER_H_
#define QTRAIN_COMMON_TIMER_H_

#include <chrono>

namespace qtrain {

class Timer {
 public:
  Timer() : start_(std::chrono::steady_clock::now()) {}
  void Reset() { start_ = std::chrono::steady_clock::now(); }
  double Seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

}  // namespace qtrain

#endif  // QTRAIN_COMMON_TIMER_H_
