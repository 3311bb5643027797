// The gRPC plumbing of the parameter-server client, shared by the PS communicator
// (ps_communicator.cc) and the PS load generator (server/bench/ps_load_bench.cc), so that the
// benchmark talks to `qserver` through exactly the channel settings and status mapping that
// training uses. Together with ps_communicator.cc this is the only worker code that sees gRPC.
//
// Thread-safety: pure functions; a channel (and its stubs) may be shared by threads.
#ifndef QTRAIN_WORKER_COMM_PS_RPC_H_
#define QTRAIN_WORKER_COMM_PS_RPC_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "proto/ps.grpc.pb.h"

namespace qtrain::comm {

struct PsChannelOptions {
  // gRPC send / receive limit; the channel allows 1 MiB more for framing.
  uint64_t max_message_bytes = uint64_t{64} << 20;
  // TLS: with tls_ca the channel is TLS and trusts that CA; tls_cert/tls_key add a client
  // certificate. All empty: plaintext.
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
};

// A channel to one server (host:port) with explicit message limits and a reconnect backoff of
// 100 ms growing to 2 s (gRPC's default grows to 120 s), so a restarted server is found quickly.
// INVALID_ARGUMENT when a TLS file cannot be read (naming its flag and path).
absl::StatusOr<std::shared_ptr<grpc::Channel>> NewPsChannel(const std::string& target,
                                                            const PsChannelOptions& options);

absl::Status FromGrpc(const grpc::Status& s);

// The PsErrorReason a refusal's message starts with ("NAME: ..."); PS_REASON_UNSPECIFIED if none.
pb::PsErrorReason ReasonOf(const absl::Status& s);

// UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (but not gRPC's "message larger than
// max", which no retry can cure): worth retrying with backoff.
bool IsTransient(const absl::Status& s);

// One RPC with a deadline `seconds` from now: fn(grpc::ClientContext*) returns a grpc::Status.
template <typename Fn>
absl::Status CallWithDeadline(double seconds, Fn fn) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6)));
  return FromGrpc(fn(&context));
}

}  // namespace qtrain::comm

#endif  // QTRAIN_WORKER_COMM_PS_RPC_H_
