// Training metrics: a JSON-lines file (one object per logged step and per epoch) and the
// progress line on the terminal.
//
// JSON-lines records (every key always present for its type):
//   {"type":"step","epoch":E,"step":S,"loss":L,"accuracy":A,"lr":R,"images_per_second":I,
//    "seconds_compute":C,"seconds_encode":X,"seconds_communicate":M,"seconds_decode":D,
//    "bytes_sent":B,"bytes_received":B}
//   {"type":"epoch","epoch":E,"step":S,"train_loss":L,"train_accuracy":A,"test_loss":L,
//    "test_accuracy":A,"seconds":T,"images_per_second":I}
//
// Thread-safety: not thread-safe; the trainer thread owns it.
#ifndef QTRAIN_WORKER_TRAIN_METRICS_H_
#define QTRAIN_WORKER_TRAIN_METRICS_H_

#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain::train {

struct StepMetrics {
  int64_t epoch = 0;
  int64_t step = 0;
  double loss = 0;
  double accuracy = 0;
  double lr = 0;
  double images_per_second = 0;
  double seconds_compute = 0;
  double seconds_encode = 0;
  double seconds_communicate = 0;
  double seconds_decode = 0;
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
};

struct EpochMetrics {
  int64_t epoch = 0;
  int64_t step = 0;
  double train_loss = 0;
  double train_accuracy = 0;
  double test_loss = 0;
  double test_accuracy = 0;
  double seconds = 0;
  double images_per_second = 0;
};

class MetricsLog {
 public:
  // Opens `path` for appending ("" gives a log that writes nothing).
  static absl::StatusOr<MetricsLog> Open(const std::string& path);
  MetricsLog(MetricsLog&& other) noexcept : file_(other.file_) { other.file_ = nullptr; }
  MetricsLog& operator=(MetricsLog&&) = delete;
  ~MetricsLog();

  absl::Status Write(const StepMetrics& m);
  absl::Status Write(const EpochMetrics& m);

 private:
  explicit MetricsLog(std::FILE* file) : file_(file) {}
  absl::Status WriteLine(const std::string& line);
  std::FILE* file_;
};

// "1h02m", "3m12s", "45s".
std::string FormatDuration(double seconds);

// The one-line progress display: rewritten in place on a terminal, printed as lines otherwise.
class ProgressLine {
 public:
  explicit ProgressLine(bool enabled);
  void Update(const std::string& text);  // replaces the current line
  void Finish();                          // ends the in-place line with a newline

 private:
  bool enabled_;
  bool tty_;
  bool open_ = false;
};

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_METRICS_H_
