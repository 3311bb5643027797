// The TCP rendezvous on 127.0.0.1, ranks as threads of this process, and the launcher-variable
// parsing. Every rendezvous here has a short timeout, so a bug fails the test instead of hanging.
#include "worker/comm/rendezvous.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/testing/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::comm {
namespace {

using ::qtrain::testing::IsOk;
using ::qtrain::testing::StatusIs;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A port that was free a moment ago (bind port 0, read it, close). Another process could take
// it in between; the tests that need it tolerate nothing of the kind, which is fine on a test
// machine.
int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  socklen_t length = sizeof(a);
  EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &length), 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

LaunchEnv Env(int port, int rank, int world) {
  LaunchEnv env;
  env.addr = "127.0.0.1";
  env.port = port;
  env.rank = rank;
  env.world_size = world;
  env.local_rank = rank;
  return env;
}

RendezvousOptions Options(double timeout_seconds) {
  RendezvousOptions options;
  options.timeout_seconds = timeout_seconds;
  options.bind_addr = "127.0.0.1";
  return options;
}

// A raw client socket connected to 127.0.0.1:port (retrying until rank 0 listens), or -1.
int RawConnect(int port) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) return fd;
    ::close(fd);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

// ---- Launcher variables -----------------------------------------------------------------------

absl::StatusOr<LaunchEnv> FromMap(const std::map<std::string, std::string>& vars) {
  return LaunchEnvFromLookup([&](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

const std::map<std::string, std::string> kTorchrunVars = {
    {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29500"}, {"RANK", "3"},
    {"WORLD_SIZE", "4"},         {"LOCAL_RANK", "1"}};

TEST(LaunchEnvTest, ReadsTorchrunVariables) {
  ASSERT_OK_AND_ASSIGN(LaunchEnv env, FromMap(kTorchrunVars));
  EXPECT_EQ(env.addr, "10.0.0.1");
  EXPECT_EQ(env.port, 29500);
  EXPECT_EQ(env.rank, 3);
  EXPECT_EQ(env.world_size, 4);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_THAT(env.Describe(), HasSubstr("rank 3 of 4"));
}

TEST(LaunchEnvTest, FallsBackToOpenMpiVariablesOnlyWhenTorchrunsAreAbsent) {
  std::map<std::string, std::string> vars = {{"MASTER_ADDR", "h"},
                                             {"MASTER_PORT", "1234"},
                                             {"OMPI_COMM_WORLD_RANK", "2"},
                                             {"OMPI_COMM_WORLD_SIZE", "8"},
                                             {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}};
  ASSERT_OK_AND_ASSIGN(LaunchEnv env, FromMap(vars));
  EXPECT_EQ(env.rank, 2);
  EXPECT_EQ(env.world_size, 8);
  EXPECT_EQ(env.local_rank, 0);
  vars["RANK"] = "5";  // torchrun's name wins
  ASSERT_OK_AND_ASSIGN(env, FromMap(vars));
  EXPECT_EQ(env.rank, 5);
}

TEST(LaunchEnvTest, NamesTheMissingVariable) {
  for (const char* name : {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}) {
    std::map<std::string, std::string> vars = kTorchrunVars;
    vars.erase(name);
    EXPECT_THAT(FromMap(vars), StatusIs(absl::StatusCode::kInvalidArgument,
                                        AllOf(HasSubstr(name), HasSubstr("not set"))))
        << name;
  }
}

TEST(LaunchEnvTest, NamesTheBadVariable) {
  struct Case {
    const char* name;
    const char* value;
  };
  for (const Case& c : {Case{"MASTER_PORT", "0"}, Case{"MASTER_PORT", "70000"},
                        Case{"MASTER_PORT", "29500x"}, Case{"WORLD_SIZE", "0"},
                        Case{"RANK", "-1"}, Case{"RANK", "4"}, Case{"LOCAL_RANK", "one"},
                        Case{"MASTER_ADDR", ""}}) {
    std::map<std::string, std::string> vars = kTorchrunVars;
    vars[c.name] = c.value;
    EXPECT_THAT(FromMap(vars), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.name)))
        << c.name << "=" << c.value;
  }
}

// ---- Rendezvous -------------------------------------------------------------------------------

TEST(RendezvousTest, WorldOfOneNeedsNoSocket) {
  ASSERT_OK_AND_ASSIGN(auto rv, Rendezvous::Connect(Env(0, 0, 1), Options(1.0)));
  ASSERT_OK_AND_ASSIGN(std::string id, rv->Broadcast("id"));
  EXPECT_EQ(id, "id");
  ASSERT_OK_AND_ASSIGN(std::vector<std::string> all, rv->AllGather("x"));
  EXPECT_THAT(all, ElementsAre("x"));
  EXPECT_THAT(rv->Barrier(), IsOk());
}

TEST(RendezvousTest, FourRanksBroadcastAllGatherAndBarrier) {
  constexpr int kWorld = 4;
  const int port = FreePort();
  // A 128-byte id with every byte value class, zeros included (it is opaque binary).
  std::string id(128, '\0');
  for (int i = 0; i < 128; ++i) id[i] = static_cast<char>((i * 37) & 0xFF);
  std::vector<absl::Status> status(kWorld);
  std::vector<std::string> got_id(kWorld);
  std::vector<std::vector<std::string>> gathered(kWorld);
  std::vector<std::thread> threads;
  for (int r = 0; r < kWorld; ++r) {
    threads.emplace_back([&, r] {
      auto rv = Rendezvous::Connect(Env(port, r, kWorld), Options(10.0));
      if (!rv.ok()) {
        status[r] = rv.status();
        return;
      }
      auto b = (*rv)->Broadcast(r == 0 ? id : std::string("ignored"));
      if (!b.ok()) {
        status[r] = b.status();
        return;
      }
      got_id[r] = *b;
      auto g = (*rv)->AllGather(std::string(static_cast<size_t>(r), static_cast<char>('a' + r)));
      if (!g.ok()) {
        status[r] = g.status();
        return;
      }
      gathered[r] = *g;
      status[r] = (*rv)->Barrier();
      // A second round: sequence numbers advance in lock step.
      if (status[r].ok()) status[r] = (*rv)->AllGather("again").status();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_THAT(status[r], IsOk()) << "rank " << r;
    EXPECT_EQ(got_id[r], id) << "rank " << r;
    EXPECT_THAT(gathered[r], ElementsAre("", "b", "cc", "ddd")) << "rank " << r;
  }
}

TEST(RendezvousTest, RanksMayStartBeforeRankZero) {
  const int port = FreePort();
  absl::Status peer_status;
  std::thread peer([&] {
    auto rv = Rendezvous::Connect(Env(port, 1, 2), Options(10.0));
    peer_status = rv.ok() ? (*rv)->Barrier() : rv.status();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // rank 1 retries meanwhile
  auto root = Rendezvous::Connect(Env(port, 0, 2), Options(10.0));
  ASSERT_THAT(root, IsOk());
  EXPECT_THAT((*root)->Barrier(), IsOk());
  peer.join();
  EXPECT_THAT(peer_status, IsOk());
}

TEST(RendezvousTest, MissingPeerTimesOutNamingIt) {
  const int port = FreePort();
  absl::Status peer_status;
  std::thread peer([&] {
    peer_status = Rendezvous::Connect(Env(port, 1, 3), Options(5.0)).status();
  });
  // Rank 2 never starts.
  absl::Status root_status = Rendezvous::Connect(Env(port, 0, 3), Options(1.0)).status();
  peer.join();
  EXPECT_THAT(root_status,
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       AllOf(HasSubstr("rank 2 of 3 never connected"), HasSubstr("1 s"))));
  // Rank 1 hears why from rank 0 instead of waiting out its own timeout.
  EXPECT_THAT(peer_status, StatusIs(absl::StatusCode::kDeadlineExceeded,
                                    AllOf(HasSubstr("rejected rank 1"),
                                          HasSubstr("rank 2 of 3 never connected"))));
}

TEST(RendezvousTest, AbsentRankZeroTimesOutNamingIt) {
  const int port = FreePort();
  absl::Status status = Rendezvous::Connect(Env(port, 1, 2), Options(0.5)).status();
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kDeadlineExceeded,
                               AllOf(HasSubstr("rank 0 at 127.0.0.1:" + std::to_string(port)),
                                     HasSubstr("did not answer within 0.5 s"))));
}

TEST(RendezvousTest, MismatchedWorldSizeIsRejectedOnBothSides) {
  const int port = FreePort();
  absl::Status peer_status;
  std::thread peer([&] {
    peer_status = Rendezvous::Connect(Env(port, 1, 3), Options(5.0)).status();
  });
  absl::Status root_status = Rendezvous::Connect(Env(port, 0, 2), Options(5.0)).status();
  peer.join();
  EXPECT_THAT(root_status, StatusIs(absl::StatusCode::kInvalidArgument,
                                    HasSubstr("world size 3 but this job has 2")));
  EXPECT_THAT(peer_status, StatusIs(absl::StatusCode::kInvalidArgument,
                                    AllOf(HasSubstr("rejected rank 1"),
                                          HasSubstr("world size 3 but this job has 2"))));
}

TEST(RendezvousTest, DuplicateRankIsRejected) {
  const int port = FreePort();
  std::vector<absl::Status> peer_status(2);
  std::vector<std::thread> peers;
  for (int i = 0; i < 2; ++i) {
    peers.emplace_back([&, i] {
      peer_status[i] = Rendezvous::Connect(Env(port, 1, 3), Options(5.0)).status();
    });
  }
  absl::Status root_status = Rendezvous::Connect(Env(port, 0, 3), Options(5.0)).status();
  for (auto& t : peers) t.join();
  EXPECT_THAT(root_status, StatusIs(absl::StatusCode::kInvalidArgument,
                                    HasSubstr("claims rank 1, which already joined")));
  for (const absl::Status& s : peer_status) EXPECT_FALSE(s.ok());
}

TEST(RendezvousTest, GarbageBytesOnThePortAreRejected) {
  const int port = FreePort();
  std::thread garbage([&] {
    const int fd = RawConnect(port);
    ASSERT_GE(fd, 0);
    const char text[] = "GET / HTTP/1.1\r\nHost: example\r\n\r\n";  // 34 bytes, > one header
    ASSERT_EQ(::send(fd, text, sizeof(text) - 1, MSG_NOSIGNAL),
              static_cast<ssize_t>(sizeof(text) - 1));
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    ::close(fd);
  });
  absl::Status root_status = Rendezvous::Connect(Env(port, 0, 2), Options(5.0)).status();
  garbage.join();
  EXPECT_THAT(root_status,
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("magic"), HasSubstr("a connection from 127.0.0.1"))));
}

TEST(RendezvousTest, AConnectionThatHangsUpEarlyIsIgnored) {
  const int port = FreePort();
  absl::Status root_status;
  std::thread root([&] {
    auto rv = Rendezvous::Connect(Env(port, 0, 2), Options(5.0));
    root_status = rv.ok() ? (*rv)->Barrier() : rv.status();
  });
  // A port probe: connects once rank 0 listens, sends a few bytes, leaves.
  const int fd = RawConnect(port);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::send(fd, "QT", 2, MSG_NOSIGNAL), 2);
  ::close(fd);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  auto peer = Rendezvous::Connect(Env(port, 1, 2), Options(5.0));
  absl::Status peer_status = peer.ok() ? (*peer)->Barrier() : peer.status();
  root.join();
  EXPECT_THAT(root_status, IsOk());
  EXPECT_THAT(peer_status, IsOk());
}

TEST(RendezvousTest, PortInUseIsReported) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  socklen_t length = sizeof(a);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &length), 0);
  const int port = ntohs(a.sin_port);
  absl::Status status = Rendezvous::Connect(Env(port, 0, 2), Options(1.0)).status();
  ::close(fd);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kUnavailable,
                               AllOf(HasSubstr("cannot listen"), HasSubstr("MASTER_PORT"))));
}

TEST(RendezvousTest, PeerThatLeavesMidExchangeIsReported) {
  const int port = FreePort();
  std::thread peer([&] {
    auto rv = Rendezvous::Connect(Env(port, 1, 2), Options(5.0));
    ASSERT_THAT(rv, IsOk());
    // Leaves without joining the all-gather (its socket closes).
  });
  auto root = Rendezvous::Connect(Env(port, 0, 2), Options(5.0));
  ASSERT_THAT(root, IsOk());
  peer.join();
  EXPECT_THAT((*root)->AllGather("x"),
              StatusIs(absl::StatusCode::kUnavailable,
                       AllOf(HasSubstr("rank 1 of 2"), HasSubstr("closed the connection"))));
}

TEST(RendezvousTest, SilentPeerTimesOutInAnExchange) {
  const int port = FreePort();
  std::atomic<bool> done{false};
  std::thread peer([&] {
    auto rv = Rendezvous::Connect(Env(port, 1, 2), Options(5.0));
    ASSERT_THAT(rv, IsOk());
    while (!done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  });
  auto root = Rendezvous::Connect(Env(port, 0, 2), Options(0.5));
  ASSERT_THAT(root, IsOk());
  EXPECT_THAT((*root)->Barrier(),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       AllOf(HasSubstr("rank 1 of 2"), HasSubstr("did not answer within 0.5 s"))));
  done = true;
  peer.join();
}

TEST(RendezvousTest, RejectsBadOptions) {
  RendezvousOptions options;
  options.timeout_seconds = 0;
  EXPECT_THAT(Rendezvous::Connect(Env(1234, 0, 2), options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("timeout")));
  EXPECT_THAT(Rendezvous::Connect(Env(1234, 2, 2), Options(1.0)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("rank 2")));
  EXPECT_THAT(Rendezvous::Connect(Env(0, 1, 2), Options(1.0)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("port 0")));
}

}  // namespace
}  // namespace qtrain::comm
