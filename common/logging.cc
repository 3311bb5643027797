#include "common/logging.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace qtrain {
namespace {
std::atomic<int> g_min_severity{static_cast<int>(LogSeverity::kInfo)};
constexpr char kSeverityChar[] = {'I', 'W', 'E', 'F'};
}  // namespace

void SetMinLogSeverity(LogSeverity severity) { g_min_severity.store(static_cast<int>(severity)); }
LogSeverity MinLogSeverity() { return static_cast<LogSeverity>(g_min_severity.load()); }

namespace logging_internal {

LogMessage::LogMessage(const char* file, int line, LogSeverity severity)
    : file_(file), line_(line), severity_(severity) {}

LogMessage::~LogMessage() {
  if (static_cast<int>(severity_) >= g_min_severity.load() || severity_ == LogSeverity::kFatal) {
    const char* base = std::strrchr(file_, '/');
    std::string line = std::string(1, kSeverityChar[static_cast<int>(severity_)]) + " " +
                       (base ? base + 1 : file_) + ":" + std::to_string(line_) + "] " +
                       stream_.str() + "\n";
    std::fwrite(line.data(), 1, line.size(), stderr);
  }
  if (severity_ == LogSeverity::kFatal) {
    std::fflush(stderr);
    std::abort();
  }
}

}  // namespace logging_internal
}  // namespace qtrain
