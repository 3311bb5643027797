#include "worker/comm/ps_rpc.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace qtrain::comm {
namespace {

absl::StatusOr<std::string> ReadFile(const char* what, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(what, ": cannot read '", path, "'"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> NewPsChannel(const std::string& target,
                                                            const PsChannelOptions& options) {
  grpc::ChannelArguments args;
  const int limit =
      static_cast<int>(std::min<uint64_t>(options.max_message_bytes + (1 << 20), INT32_MAX));
  args.SetMaxReceiveMessageSize(limit);
  args.SetMaxSendMessageSize(limit);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (!options.tls_ca.empty()) {
    grpc::SslCredentialsOptions ssl;
    absl::StatusOr<std::string> ca = ReadFile("--ps_tls_ca", options.tls_ca);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    if (!options.tls_cert.empty()) {
      absl::StatusOr<std::string> cert = ReadFile("--ps_tls_cert", options.tls_cert);
      if (!cert.ok()) return cert.status();
      absl::StatusOr<std::string> key = ReadFile("--ps_tls_key", options.tls_key);
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *cert;
      ssl.pem_private_key = *key;
    }
    credentials = grpc::SslCredentials(ssl);
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  return grpc::CreateCustomChannel(target, credentials, args);
}

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

pb::PsErrorReason ReasonOf(const absl::Status& s) {
  const std::string m(s.message());
  const size_t colon = m.find(':');
  pb::PsErrorReason reason = pb::PS_REASON_UNSPECIFIED;
  if (colon != std::string::npos) {
    pb::PsErrorReason_Parse(m.substr(0, colon), &reason);
  }
  return reason;
}

bool IsTransient(const absl::Status& s) {
  // gRPC's own "message larger than max" is RESOURCE_EXHAUSTED too, but retrying cannot help.
  if (s.code() == absl::StatusCode::kResourceExhausted &&
      absl::StrContains(s.message(), "larger than max")) {
    return false;
  }
  return s.code() == absl::StatusCode::kUnavailable ||
         s.code() == absl::StatusCode::kDeadlineExceeded ||
         s.code() == absl::StatusCode::kResourceExhausted;
}

}  // namespace qtrain::comm
