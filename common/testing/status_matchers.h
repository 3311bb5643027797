// GoogleTest matchers for absl::Status and absl::StatusOr (the installed Abseil has none).
//
//   EXPECT_THAT(DoThing(), IsOk());
//   EXPECT_THAT(Decode(bad), StatusIs(absl::StatusCode::kInvalidArgument));
//   EXPECT_THAT(Decode(bad), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("length")));
//   ASSERT_OK_AND_ASSIGN(auto v, MakeValue());
#ifndef QTRAIN_COMMON_TESTING_STATUS_MATCHERS_H_
#define QTRAIN_COMMON_TESTING_STATUS_MATCHERS_H_

#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"

namespace qtrain::testing {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

MATCHER(IsOk, "is OK") {
  const absl::Status& s = ::qtrain::testing::GetStatus(arg);
  if (!s.ok()) *result_listener << "status is " << s.ToString();
  return s.ok();
}

MATCHER_P(StatusIs, code, "has status code " + absl::StatusCodeToString(code)) {
  const absl::Status& s = ::qtrain::testing::GetStatus(arg);
  *result_listener << "status is " << s.ToString();
  return s.code() == code;
}

MATCHER_P2(StatusIs, code, message_matcher,
           "has status code " + absl::StatusCodeToString(code) + " and a matching message") {
  const absl::Status& s = ::qtrain::testing::GetStatus(arg);
  *result_listener << "status is " << s.ToString();
  return s.code() == code &&
         ::testing::Matches(message_matcher)(std::string(s.message()));
}

}  // namespace qtrain::testing

#define QTRAIN_TESTING_CONCAT_INNER_(a, b) a##b
#define QTRAIN_TESTING_CONCAT_(a, b) QTRAIN_TESTING_CONCAT_INNER_(a, b)
#define ASSERT_OK_AND_ASSIGN(lhs, expr)                                              \
  auto QTRAIN_TESTING_CONCAT_(statusor_, __LINE__) = (expr);                         \
  ASSERT_TRUE(QTRAIN_TESTING_CONCAT_(statusor_, __LINE__).ok())                      \
      << QTRAIN_TESTING_CONCAT_(statusor_, __LINE__).status().ToString();            \
  lhs = std::move(QTRAIN_TESTING_CONCAT_(statusor_, __LINE__)).value()

#endif  // QTRAIN_COMMON_TESTING_STATUS_MATCHERS_H_
