#include "worker/train/metrics.h"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace qtrain::train {
namespace {

// JSON has no NaN/Infinity: write null so the file stays parseable.
std::string Num(double v) { return std::isfinite(v) ? absl::StrFormat("%.6g", v) : "null"; }

}  // namespace

absl::StatusOr<MetricsLog> MetricsLog::Open(const std::string& path) {
  if (path.empty()) return MetricsLog(nullptr);
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics: cannot open ", path, ": ", std::strerror(errno)));
  }
  return MetricsLog(f);
}

MetricsLog::~MetricsLog() {
  if (file_ != nullptr) std::fclose(file_);
}

absl::Status MetricsLog::WriteLine(const std::string& line) {
  if (file_ == nullptr) return absl::OkStatus();
  if (std::fputs(line.c_str(), file_) < 0 || std::fputc('\n', file_) < 0 || std::fflush(file_) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot write metrics: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status MetricsLog::Write(const StepMetrics& m) {
  return WriteLine(absl::StrCat(
      "{\"type\":\"step\",\"epoch\":", m.epoch, ",\"step\":", m.step, ",\"loss\":", Num(m.loss),
      ",\"accuracy\":", Num(m.accuracy), ",\"lr\":", Num(m.lr),
      ",\"images_per_second\":", Num(m.images_per_second),
      ",\"seconds_compute\":", Num(m.seconds_compute), ",\"seconds_encode\":", Num(m.seconds_encode),
      ",\"seconds_communicate\":", Num(m.seconds_communicate),
      ",\"seconds_decode\":", Num(m.seconds_decode), ",\"bytes_sent\":", m.bytes_sent,
      ",\"bytes_received\":", m.bytes_received, "}"));
}

absl::Status MetricsLog::Write(const EpochMetrics& m) {
  return WriteLine(absl::StrCat(
      "{\"type\":\"epoch\",\"epoch\":", m.epoch, ",\"step\":", m.step,
      ",\"train_loss\":", Num(m.train_loss), ",\"train_accuracy\":", Num(m.train_accuracy),
      ",\"test_loss\":", Num(m.test_loss), ",\"test_accuracy\":", Num(m.test_accuracy),
      ",\"seconds\":", Num(m.seconds), ",\"images_per_second\":", Num(m.images_per_second), "}"));
}

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

ProgressLine::ProgressLine(bool enabled) : enabled_(enabled), tty_(::isatty(STDERR_FILENO) == 1) {}

void ProgressLine::Update(const std::string& text) {
  if (!enabled_) return;
  if (tty_) {
    std::fprintf(stderr, "\r\033[K%s", text.c_str());
    open_ = true;
  } else {
    std::fprintf(stderr, "%s\n", text.c_str());
  }
  std::fflush(stderr);
}

void ProgressLine::Finish() {
  if (enabled_ && tty_ && open_) std::fprintf(stderr, "\n");
  open_ = false;
}

}  // namespace qtrain::train
