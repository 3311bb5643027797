// A client that sends a running qserver each malformed request of issue 6 and checks the status
// code of each, then that the server's Status shows the same version and state hash as before.
// The server must run with --workers=1 --codec=onebit --token=<token> --max_message_mb=1.
//   ps_malformed_client <host:port> <token>
// Prints one line per check and exits 0 when all pass.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "compression/builtin_codecs.h"
#include "compression/codec_registry.h"
#include "compression/wire.h"
#include "grpcpp/grpcpp.h"
#include "proto/ps.grpc.pb.h"

namespace {

using qtrain::pb::ParameterServer;
namespace pb = qtrain::pb;

int failures = 0;

void Expect(const char* what, const grpc::Status& status, grpc::StatusCode want) {
  const bool ok = status.error_code() == want;
  std::printf("%s %-28s got %d (%s), want %d\n", ok ? "ok  " : "FAIL", what,
              static_cast<int>(status.error_code()), status.error_message().c_str(),
              static_cast<int>(want));
  if (!ok) ++failures;
}

std::unique_ptr<grpc::ClientContext> Context() {
  auto c = std::make_unique<grpc::ClientContext>();
  c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return c;
}

pb::EncodedTensor Encode(const std::string& spec, const std::vector<float>& values) {
  qtrain::compression::CodecRegistry registry;
  (void)qtrain::compression::RegisterBuiltinCodecs(&registry);
  auto codec = registry.Create(*registry.ParseSpec(spec), {});
  qtrain::compression::Rng rng(1);
  qtrain::compression::EncodedTensor t;
  (void)(*codec)->Encode(values, {}, rng, &t);
  return qtrain::compression::ToProto(t, qtrain::compression::Checksum::kCrc32);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: ps_malformed_client <host:port> <token>\n");
    return 2;
  }
  const std::string token = argv[2];
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(64 << 20);
  auto stub = ParameterServer::NewStub(
      grpc::CreateCustomChannel(argv[1], grpc::InsecureChannelCredentials(), args));

  std::vector<float> values(256);
  for (size_t i = 0; i < values.size(); ++i) values[i] = (i % 3 == 0 ? -1.0f : 0.5f) * (i + 1);

  pb::RegisterRequest reg;
  reg.set_token(token);
  reg.set_worker_id(0);
  reg.set_num_shards(1);
  reg.set_codec_spec("onebit");
  pb::RegisterResponse reg_response;
  Expect("register", stub->Register(Context().get(), reg, &reg_response), grpc::StatusCode::OK);

  pb::PushRequest good;
  good.set_token(token);
  good.set_worker_id(0);
  good.set_step(0);
  good.set_bucket(0);
  *good.mutable_gradient() = Encode("onebit", values);
  pb::PushResponse push_response;
  Expect("valid push (closes step 0)", stub->Push(Context().get(), good, &push_response),
         grpc::StatusCode::OK);

  pb::StatusRequest status_request;
  status_request.set_token(token);
  pb::StatusResponse before;
  Expect("status", stub->Status(Context().get(), status_request, &before), grpc::StatusCode::OK);

  good.set_step(1);  // the open round: every variation below is of a push that would be valid
  auto push = [&](const char* what, const pb::PushRequest& r, grpc::StatusCode want) {
    pb::PushResponse response;
    Expect(what, stub->Push(Context().get(), r, &response), want);
  };
  {
    pb::PushRequest r = good;
    r.set_token("wrong");
    push("bad token", r, grpc::StatusCode::UNAUTHENTICATED);
    r.clear_token();
    push("missing token", r, grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    pb::PushRequest r = good;
    r.set_worker_id(5);
    push("unknown worker", r, grpc::StatusCode::FAILED_PRECONDITION);
  }
  {
    pb::PushRequest r = good;
    r.set_shard(3);
    push("wrong shard", r, grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    pb::PushRequest r = good;
    *r.mutable_gradient() = Encode("onebit", std::vector<float>(100, 1.0f));
    push("wrong element count", r, grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    pb::PushRequest r = good;
    r.mutable_gradient()->set_codec(static_cast<pb::CodecId>(42));
    push("unknown codec", r, grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    pb::PushRequest r = good;
    *r.mutable_gradient() = Encode("fp16", values);
    push("codec other than the server's", r, grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    pb::PushRequest r = good;
    r.mutable_gradient()->mutable_payload()->resize(r.gradient().payload().size() / 2);
    r.mutable_gradient()->set_has_checksum(false);
    push("truncated payload", r, grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    pb::PushRequest r = good;
    r.mutable_gradient()->set_checksum(r.gradient().checksum() + 1);
    push("bad payload checksum", r, grpc::StatusCode::DATA_LOSS);
  }
  {
    pb::PushRequest r = good;
    r.set_step(0);
    push("stale step", r, grpc::StatusCode::FAILED_PRECONDITION);
    r.set_step(9);
    push("future step", r, grpc::StatusCode::FAILED_PRECONDITION);
    r.set_step(-1);
    push("negative step", r, grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    pb::PushRequest r = good;
    r.mutable_gradient()->set_payload(std::string(64 << 10, '\x55'));
    r.mutable_gradient()->set_has_checksum(false);
    push("oversized for its elements", r, grpc::StatusCode::INVALID_ARGUMENT);
    r.mutable_gradient()->set_payload(std::string(3 << 20, '\x55'));
    push("over the message limit", r, grpc::StatusCode::RESOURCE_EXHAUSTED);
  }
  {
    pb::PullRequest r;
    r.set_token("wrong");
    pb::PullResponse response;
    Expect("pull with a bad token", stub->Pull(Context().get(), r, &response),
           grpc::StatusCode::UNAUTHENTICATED);
    r.set_token(token);
    r.set_worker_id(0);
    r.set_bucket(0);
    r.set_step(-5);
    Expect("pull of a negative step", stub->Pull(Context().get(), r, &response),
           grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    pb::CollectiveRequest r;
    r.set_token(token);
    r.set_worker_id(0);
    r.set_kind(static_cast<pb::CollectiveKind>(77));
    pb::CollectiveResponse response;
    Expect("unknown collective kind", stub->Collective(Context().get(), r, &response),
           grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    pb::StatusRequest r;
    r.set_token("wrong");
    pb::StatusResponse response;
    Expect("status with a bad token", stub->Status(Context().get(), r, &response),
           grpc::StatusCode::UNAUTHENTICATED);
  }
  pb::StatusResponse after;
  Expect("status", stub->Status(Context().get(), status_request, &after), grpc::StatusCode::OK);
  const bool unchanged =
      after.version() == before.version() && after.state_hash() == before.state_hash();
  std::printf("%s model unchanged: version %llu -> %llu, state hash %016llx -> %016llx, %llu "
              "requests rejected\n",
              unchanged ? "ok  " : "FAIL", static_cast<unsigned long long>(before.version()),
              static_cast<unsigned long long>(after.version()),
              static_cast<unsigned long long>(before.state_hash()),
              static_cast<unsigned long long>(after.state_hash()),
              static_cast<unsigned long long>(after.rejected_requests()));
  if (!unchanged) ++failures;
  // The valid push still goes through.
  Expect("valid push (closes step 1)", stub->Push(Context().get(), good, &push_response),
         grpc::StatusCode::OK);
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
