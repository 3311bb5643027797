// The gRPC shell of the parameter server: a ParameterServer service (proto/ps.proto) whose
// handlers validate nothing themselves and call ServerCore (server/ps_core.h), a ticker thread
// that applies deadlines and heartbeat timeouts, and the listening server with explicit message
// size limits and optional TLS. This file pair and server/main.cc are the only server files that
// see gRPC.
//
// Pull and Collective are long polls: when the result is not ready the handler waits for a state
// change up to min(request wait_ms, 2000 ms, the client's deadline) and then answers ready=false
// (the client asks again), so no handler thread is held for long.
//
// Thread-safety: Start/Wait/Shutdown from one thread; handlers run on gRPC's threads.
#ifndef QTRAIN_SERVER_PS_SERVICE_H_
#define QTRAIN_SERVER_PS_SERVICE_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/ps_core.h"

namespace qtrain::server {

struct ServiceOptions {
  // host:port to listen on; port 0 picks a free one (see PsServer::port()). Default loopback only.
  std::string listen = "127.0.0.1:0";
  // PEM files. With cert and key the server speaks TLS; with ca too it requires client
  // certificates signed by it. All empty: plaintext.
  std::string tls_cert;
  std::string tls_key;
  std::string tls_ca;
  // Handler threads of the gRPC server (long polls hold one each).
  int max_threads = 64;
};

class PsServer {
 public:
  // Builds and starts the server. UNAVAILABLE if it cannot listen; INVALID_ARGUMENT if a TLS
  // file cannot be read (naming the flag and path).
  static absl::StatusOr<std::unique_ptr<PsServer>> Start(ServerCore* core,
                                                         const ServiceOptions& options);
  ~PsServer();
  int port() const;
  // Stops accepting calls, waits up to `seconds` for handlers, stops the ticker.
  void Shutdown(double seconds);

 private:
  struct Impl;
  explicit PsServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qtrain::server

#endif  // QTRAIN_SERVER_PS_SERVICE_H_
