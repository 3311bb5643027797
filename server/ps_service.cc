#include "server/ps_service.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/security/server_credentials.h"
#include "proto/ps.grpc.pb.h"

namespace qtrain::server {
namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::StatusOr<std::string> ReadPem(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": cannot read '", path, "' (missing or unreadable PEM file)"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  std::string text = ss.str();
  if (text.find("-----BEGIN") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": '", path, "' is not a PEM file"));
  }
  return text;
}

// Seconds left before the client's deadline (capped).
double SecondsLeft(grpc::ServerContext* context, double cap) {
  const auto left = context->deadline() - std::chrono::system_clock::now();
  const double s = std::chrono::duration<double>(left).count() - 0.1;
  return std::clamp(s, 0.0, cap);
}

class Service final : public pb::ParameterServer::Service {
 public:
  explicit Service(ServerCore* core) : core_(core) {}

  grpc::Status Register(grpc::ServerContext*, const pb::RegisterRequest* request,
                        pb::RegisterResponse* response) override {
    return ToGrpc(core_->Register(*request, response));
  }
  grpc::Status Push(grpc::ServerContext*, const pb::PushRequest* request,
                    pb::PushResponse* response) override {
    return ToGrpc(core_->Push(*request, response));
  }
  grpc::Status Pull(grpc::ServerContext* context, const pb::PullRequest* request,
                    pb::PullResponse* response) override {
    const double wait = SecondsLeft(context, std::min(2.0, request->wait_ms() / 1000.0));
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const uint64_t seen = core_->change_count();
      response->Clear();
      absl::Status s = core_->Pull(*request, response);
      if (!s.ok() || response->ready() || response->need_push()) return ToGrpc(s);
      const double spent =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (spent >= wait || context->IsCancelled()) return grpc::Status::OK;
      core_->WaitForChange(seen, wait - spent);
    }
  }
  grpc::Status Heartbeat(grpc::ServerContext*, const pb::HeartbeatRequest* request,
                         pb::HeartbeatResponse* response) override {
    return ToGrpc(core_->Heartbeat(*request, response));
  }
  grpc::Status Leave(grpc::ServerContext*, const pb::LeaveRequest* request,
                     pb::LeaveResponse* response) override {
    return ToGrpc(core_->Leave(*request, response));
  }
  grpc::Status Status(grpc::ServerContext*, const pb::StatusRequest* request,
                      pb::StatusResponse* response) override {
    return ToGrpc(core_->GetStatus(*request, response));
  }
  grpc::Status Collective(grpc::ServerContext* context, const pb::CollectiveRequest* request,
                          pb::CollectiveResponse* response) override {
    const double wait = SecondsLeft(context, std::min(2.0, request->wait_ms() / 1000.0));
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const uint64_t seen = core_->change_count();
      response->Clear();
      absl::Status s = core_->Collective(*request, response);
      if (!s.ok() || response->ready()) return ToGrpc(s);
      const double spent =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (spent >= wait || context->IsCancelled()) return grpc::Status::OK;
      core_->WaitForChange(seen, wait - spent);
    }
  }
  grpc::Status Join(grpc::ServerContext* context, const pb::JoinRequest* request,
                    pb::JoinResponse* response) override {
    const double wait = SecondsLeft(context, std::min(2.0, request->wait_ms() / 1000.0));
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const uint64_t seen = core_->change_count();
      response->Clear();
      absl::Status s = core_->Join(*request, response);
      if (!s.ok() || response->ready()) return ToGrpc(s);
      const double spent =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (spent >= wait || context->IsCancelled()) return grpc::Status::OK;
      core_->WaitForChange(seen, wait - spent);
    }
  }
  grpc::Status Handover(grpc::ServerContext*, const pb::HandoverRequest* request,
                        pb::HandoverResponse* response) override {
    return ToGrpc(core_->Handover(*request, response));
  }

 private:
  ServerCore* const core_;
};

}  // namespace

struct PsServer::Impl {
  ServerCore* core = nullptr;
  std::unique_ptr<Service> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  std::atomic<bool> stop{false};
  std::thread ticker;
};

PsServer::PsServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

PsServer::~PsServer() { Shutdown(1.0); }

int PsServer::port() const { return impl_->port; }

absl::StatusOr<std::unique_ptr<PsServer>> PsServer::Start(ServerCore* core,
                                                          const ServiceOptions& options) {
  std::shared_ptr<grpc::ServerCredentials> credentials;
  const bool tls = !options.tls_cert.empty() || !options.tls_key.empty();
  if (tls) {
    if (options.tls_cert.empty() || options.tls_key.empty()) {
      return absl::InvalidArgumentError("TLS needs both --tls_cert and --tls_key");
    }
    grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
    absl::StatusOr<std::string> cert = ReadPem("--tls_cert", options.tls_cert);
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadPem("--tls_key", options.tls_key);
    if (!key.ok()) return key.status();
    pair.cert_chain = *cert;
    pair.private_key = *key;
    ssl.pem_key_cert_pairs.push_back(pair);
    if (!options.tls_ca.empty()) {
      absl::StatusOr<std::string> ca = ReadPem("--tls_ca", options.tls_ca);
      if (!ca.ok()) return ca.status();
      ssl.pem_root_certs = *ca;
      ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    }
    credentials = grpc::SslServerCredentials(ssl);
  } else {
    if (!options.tls_ca.empty()) {
      return absl::InvalidArgumentError("--tls_ca needs --tls_cert and --tls_key");
    }
    credentials = grpc::InsecureServerCredentials();
  }
  auto impl = std::make_unique<Impl>();
  impl->core = core;
  impl->service = std::make_unique<Service>(core);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &impl->port);
  builder.RegisterService(impl->service.get());
  // Explicit limits: gRPC's default receive limit is 4 MiB. A push or a broadcast of the model
  // fits in max_message_bytes (plus framing).
  const uint64_t limit =
      std::min<uint64_t>(core->options().max_message_bytes + (1 << 20), INT32_MAX);
  builder.SetMaxReceiveMessageSize(static_cast<int>(limit));
  builder.SetMaxSendMessageSize(static_cast<int>(limit));
  grpc::ResourceQuota quota("qserver");
  quota.SetMaxThreads(std::max(4, options.max_threads));
  builder.SetResourceQuota(quota);
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on '", options.listen,
                                               "' (address in use, or not a host:port)"));
  }
  Impl* raw = impl.get();
  impl->ticker = std::thread([raw] {
    while (!raw->stop.load()) {
      raw->core->Tick();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  return std::unique_ptr<PsServer>(new PsServer(std::move(impl)));
}

void PsServer::Shutdown(double seconds) {
  if (impl_ == nullptr) return;
  if (impl_->server != nullptr) {
    impl_->server->Shutdown(std::chrono::system_clock::now() +
                            std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
    impl_->server.reset();
  }
  impl_->stop.store(true);
  if (impl_->ticker.joinable()) impl_->ticker.join();
}

}  // namespace qtrain::server
