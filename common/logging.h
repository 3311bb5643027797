// Minimal leveled logging to stderr and a CHECK for programmer errors (Abseil 20220623 has no
// absl/log). Errors caused by input, files, flags or peers are absl::Status, never CHECK.
//
//   QTRAIN_LOG(INFO) << "step " << step;
//   QTRAIN_CHECK(n > 0) << "n=" << n;   // aborts with file:line and the message
//
// Thread-safe: each message is formatted into its own buffer and written with one call.
#ifndef QTRAIN_COMMON_LOGGING_H_
#define QTRAIN_COMMON_LOGGING_H_

#include <sstream>

namespace qtrain {

enum class LogSeverity { kInfo = 0, kWarning = 1, kError = 2, kFatal = 3 };

// Messages below this severity are dropped. Default kInfo; set once at start-up (main.cc).
void SetMinLogSeverity(LogSeverity severity);
LogSeverity MinLogSeverity();

namespace logging_internal {

class LogMessage {
 public:
  LogMessage(const char* file, int line, LogSeverity severity);
  ~LogMessage();  // writes the line; aborts if severity is kFatal
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  const char* file_;
  int line_;
  LogSeverity severity_;
  std::ostringstream stream_;
};

// Swallows the stream expression when a CHECK passes.
struct Voidify {
  void operator&(std::ostream&) {}
};

}  // namespace logging_internal
}  // namespace qtrain

#define QTRAIN_LOG_SEVERITY_INFO ::qtrain::LogSeverity::kInfo
#define QTRAIN_LOG_SEVERITY_WARNING ::qtrain::LogSeverity::kWarning
#define QTRAIN_LOG_SEVERITY_ERROR ::qtrain::LogSeverity::kError
#define QTRAIN_LOG_SEVERITY_FATAL ::qtrain::LogSeverity::kFatal

#define QTRAIN_LOG(severity)                                                           \
  ::qtrain::logging_internal::LogMessage(__FILE__, __LINE__, QTRAIN_LOG_SEVERITY_##severity) \
      .stream()

#define QTRAIN_CHECK(condition)                                         \
  (condition) ? (void)0                                                 \
              : ::qtrain::logging_internal::Voidify() &                 \
                    QTRAIN_LOG(FATAL) << "Check failed: " #condition " "

#endif  // QTRAIN_COMMON_LOGGING_H_
