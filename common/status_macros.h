// Status propagation macros. The installed Abseil (20220623) ships none, so the project keeps its own.
//
//   RETURN_IF_ERROR(DoThing());                  // returns the non-OK status to the caller
//   ASSIGN_OR_RETURN(auto value, MakeValue());   // declares `value`, or returns the error
//
// Both evaluate their argument exactly once. Thread-safe as the expressions they wrap.
#ifndef QTRAIN_COMMON_STATUS_MACROS_H_
#define QTRAIN_COMMON_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define QTRAIN_STATUS_CONCAT_INNER_(a, b) a##b
#define QTRAIN_STATUS_CONCAT_(a, b) QTRAIN_STATUS_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                                        \
  do {                                                               \
    ::absl::Status qtrain_status_ = (expr);                          \
    if (!qtrain_status_.ok()) return qtrain_status_;                 \
  } while (false)

#define QTRAIN_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return std::move(tmp).status();      \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  QTRAIN_ASSIGN_OR_RETURN_IMPL_(QTRAIN_STATUS_CONCAT_(qtrain_statusor_, __LINE__), lhs, expr)

#endif  // QTRAIN_COMMON_STATUS_MACROS_H_
