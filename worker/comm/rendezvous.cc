#include "worker/comm/rendezvous.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace qtrain::comm {

namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kMagic = 0x56525451u;  // "QTRV" little-endian
constexpr uint16_t kVersion = 1;
constexpr size_t kHeaderBytes = 32;

enum FrameType : uint16_t { kHello = 1, kWelcome = 2, kReject = 3, kData = 4 };

const char* TypeName(uint16_t type) {
  switch (type) {
    case kHello:
      return "HELLO";
    case kWelcome:
      return "WELCOME";
    case kReject:
      return "REJECT";
    case kData:
      return "DATA";
  }
  return "unknown";
}

struct Header {
  uint32_t magic = kMagic;
  uint16_t version = kVersion;
  uint16_t type = 0;
  uint32_t world_size = 0;
  uint32_t sender = 0;
  uint64_t seq = 0;
  uint64_t length = 0;
};

void PutLe(uint64_t v, int bytes, uint8_t* out) {
  for (int i = 0; i < bytes; ++i) out[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint64_t GetLe(const uint8_t* in, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(in[i]) << (8 * i);
  return v;
}

void EncodeHeader(const Header& h, uint8_t* out) {
  PutLe(h.magic, 4, out);
  PutLe(h.version, 2, out + 4);
  PutLe(h.type, 2, out + 6);
  PutLe(h.world_size, 4, out + 8);
  PutLe(h.sender, 4, out + 12);
  PutLe(h.seq, 8, out + 16);
  PutLe(h.length, 8, out + 24);
}

Header DecodeHeader(const uint8_t* in) {
  Header h;
  h.magic = static_cast<uint32_t>(GetLe(in, 4));
  h.version = static_cast<uint16_t>(GetLe(in + 4, 2));
  h.type = static_cast<uint16_t>(GetLe(in + 6, 2));
  h.world_size = static_cast<uint32_t>(GetLe(in + 8, 4));
  h.sender = static_cast<uint32_t>(GetLe(in + 12, 4));
  h.seq = GetLe(in + 16, 8);
  h.length = GetLe(in + 24, 8);
  return h;
}

// A REJECT body: the status code (u32 little-endian) and rank 0's message.
std::string RejectBody(const absl::Status& why) {
  uint8_t code[4];
  PutLe(static_cast<uint32_t>(why.code()), 4, code);
  return std::string(reinterpret_cast<const char*>(code), 4) + std::string(why.message());
}

std::string Errno(int e) { return absl::StrCat(std::strerror(e), " (errno ", e, ")"); }

std::string FormatSeconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", s);
  return buf;
}

// Milliseconds left until `deadline` for poll(), at least 0, at most 1 s (so loops re-check).
int PollMs(Clock::time_point deadline) {
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(left, 0, 1000));
}

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      Close();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { Close(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

absl::Status SetNonBlocking(int fd) {
  const int flags = fcntl(fd, F_GETFL, 0);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return absl::UnavailableError(absl::StrCat("rendezvous: fcntl(O_NONBLOCK): ", Errno(errno)));
  }
  return absl::OkStatus();
}

void SetNoDelay(int fd) {
  int one = 1;
  (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Writes all of `data` to the non-blocking socket before `deadline`.
absl::Status SendAll(int fd, const uint8_t* data, size_t size, Clock::time_point deadline,
                     const std::string& peer, double timeout_seconds) {
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::send(fd, data + done, size - done, MSG_NOSIGNAL);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      return absl::UnavailableError(
          absl::StrCat("rendezvous: sending to ", peer, " failed: ", Errno(errno)));
    }
    if (Clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("rendezvous: ", peer, " did not take ",
                                                      size, " bytes within ",
                                                      FormatSeconds(timeout_seconds), " s"));
    }
    pollfd p{fd, POLLOUT, 0};
    (void)::poll(&p, 1, PollMs(deadline));
  }
  return absl::OkStatus();
}

// Reads exactly `size` bytes from the non-blocking socket before `deadline`.
absl::Status RecvAll(int fd, uint8_t* data, size_t size, Clock::time_point deadline,
                     const std::string& peer, double timeout_seconds) {
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::recv(fd, data + done, size - done, 0);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n == 0) {
      return absl::UnavailableError(absl::StrCat("rendezvous: ", peer,
                                                 " closed the connection (it failed or exited; "
                                                 "its own error says why)"));
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return absl::UnavailableError(
          absl::StrCat("rendezvous: receiving from ", peer, " failed: ", Errno(errno)));
    }
    if (Clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("rendezvous: ", peer,
                                                      " did not answer within ",
                                                      FormatSeconds(timeout_seconds), " s"));
    }
    pollfd p{fd, POLLIN, 0};
    (void)::poll(&p, 1, PollMs(deadline));
  }
  return absl::OkStatus();
}

// Checks a received header against what this rank expects. `expected_sender` < 0: any rank.
absl::Status ValidateHeader(const Header& h, uint32_t world_size, int expected_sender,
                            std::string_view from) {
  const std::string where = absl::StrCat("rendezvous: bad frame from ", std::string(from), ": ");
  if (h.magic != kMagic) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, "magic 0x", absl::Hex(h.magic), " is not 0x", absl::Hex(kMagic),
        " (something other than a qtrain rank is talking on this port)"));
  }
  if (h.version != kVersion) {
    return absl::InvalidArgumentError(absl::StrCat(where, "protocol version ", h.version,
                                                   " (this build speaks ", kVersion, ")"));
  }
  if (h.type < kHello || h.type > kData) {
    return absl::InvalidArgumentError(absl::StrCat(where, "unknown frame type ", h.type));
  }
  if (h.world_size != world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "world size ", h.world_size, " but this job has ", world_size,
                     " ranks (two jobs on one port, or ranks started with different WORLD_SIZE)"));
  }
  if (h.sender >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "sender rank ", h.sender, " is not below the world size ", world_size));
  }
  if (expected_sender >= 0 && h.sender != static_cast<uint32_t>(expected_sender)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, "sender rank ", h.sender, " but rank ", expected_sender, " was expected"));
  }
  if (h.length > kMaxRendezvousBytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, "body of ", h.length,
                                                   " bytes is over the limit of ",
                                                   kMaxRendezvousBytes));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> ParseIntVar(const char* name, const char* value, int min_value,
                                int max_value) {
  int v = 0;
  if (!absl::SimpleAtoi(value, &v) || v < min_value || v > max_value) {
    return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "='", value,
                                                   "' is not an integer in [", min_value, ", ",
                                                   max_value, "]"));
  }
  return v;
}

}  // namespace

std::string LaunchEnv::Describe() const {
  return absl::StrCat("rank ", rank, " of ", world_size, " (local ", local_rank, "), rank 0 at ",
                      addr, ":", port);
}

absl::StatusOr<LaunchEnv> LaunchEnvFromLookup(
    const std::function<const char*(const char* name)>& getenv) {
  // The first variable of `names` that is set, or a missing-variable error naming all of them.
  auto lookup = [&](std::initializer_list<const char*> names,
                    const char** found_name) -> absl::StatusOr<const char*> {
    for (const char* name : names) {
      const char* value = getenv(name);
      if (value != nullptr) {
        *found_name = name;
        return value;
      }
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "environment variable ", absl::StrJoin(names, " (or "), names.size() > 1 ? ")" : "",
        " is not set; start ranks with deploy/launch-local.sh, torchrun, or set MASTER_ADDR, "
        "MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK"));
  };
  LaunchEnv env;
  const char* name = nullptr;
  ASSIGN_OR_RETURN(const char* addr, lookup({"MASTER_ADDR"}, &name));
  if (addr[0] == '\0') {
    return absl::InvalidArgumentError("environment variable MASTER_ADDR is empty");
  }
  env.addr = addr;
  ASSIGN_OR_RETURN(const char* port, lookup({"MASTER_PORT"}, &name));
  ASSIGN_OR_RETURN(env.port, ParseIntVar(name, port, 1, 65535));
  ASSIGN_OR_RETURN(const char* world, lookup({"WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"}, &name));
  ASSIGN_OR_RETURN(env.world_size, ParseIntVar(name, world, 1, 1 << 20));
  ASSIGN_OR_RETURN(const char* rank, lookup({"RANK", "OMPI_COMM_WORLD_RANK"}, &name));
  ASSIGN_OR_RETURN(env.rank, ParseIntVar(name, rank, 0, 1 << 20));
  if (env.rank >= env.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "=", env.rank,
                                                   " is not below the world size ",
                                                   env.world_size));
  }
  ASSIGN_OR_RETURN(const char* local,
                   lookup({"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"}, &name));
  ASSIGN_OR_RETURN(env.local_rank, ParseIntVar(name, local, 0, 1 << 20));
  return env;
}

absl::StatusOr<LaunchEnv> LaunchEnvFromEnvironment() {
  return LaunchEnvFromLookup([](const char* name) { return std::getenv(name); });
}

// ---- Rendezvous -------------------------------------------------------------------------------

struct Rendezvous::Impl {
  RendezvousOptions options;
  LaunchEnv env;
  std::string root_where;  // "rank 0 at host:port"
  qtrain::comm::Fd listener;  // rank 0 only, closed after the hello phase
  std::vector<qtrain::comm::Fd> peers;  // rank 0: peers[r] for r >= 1; others: peers[0] = rank 0
  uint64_t seq = 0;        // exchanges done

  Clock::time_point Deadline() const {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(options.timeout_seconds));
  }
  std::string PeerName(int r) const {
    return r == 0 ? root_where : absl::StrCat("rank ", r, " of ", env.world_size);
  }
  int FdOf(int r) const { return env.rank == 0 ? peers[r].get() : peers[0].get(); }

  absl::Status SendFrame(int r, uint16_t type, uint64_t seq_no, std::string_view body,
                         Clock::time_point deadline) {
    uint8_t header[kHeaderBytes];
    Header h;
    h.type = type;
    h.world_size = static_cast<uint32_t>(env.world_size);
    h.sender = static_cast<uint32_t>(env.rank);
    h.seq = seq_no;
    h.length = body.size();
    EncodeHeader(h, header);
    RETURN_IF_ERROR(
        SendAll(FdOf(r), header, kHeaderBytes, deadline, PeerName(r), options.timeout_seconds));
    return SendAll(FdOf(r), reinterpret_cast<const uint8_t*>(body.data()), body.size(), deadline,
                   PeerName(r), options.timeout_seconds);
  }

  // Reads one frame from rank r; a REJECT becomes an error carrying rank 0's reason.
  absl::StatusOr<std::string> RecvFrame(int r, uint16_t type, uint64_t seq_no,
                                        Clock::time_point deadline) {
    uint8_t raw[kHeaderBytes];
    RETURN_IF_ERROR(
        RecvAll(FdOf(r), raw, kHeaderBytes, deadline, PeerName(r), options.timeout_seconds));
    const Header h = DecodeHeader(raw);
    // A REJECT is read whatever world size it names: rank 0 of another job says why.
    const bool reject = h.magic == kMagic && h.version == kVersion && h.type == kReject &&
                        h.length <= kMaxRendezvousBytes;
    if (!reject) {
      RETURN_IF_ERROR(
          ValidateHeader(h, static_cast<uint32_t>(env.world_size), r, PeerName(r)));
    }
    std::string body(static_cast<size_t>(h.length), '\0');
    RETURN_IF_ERROR(RecvAll(FdOf(r), reinterpret_cast<uint8_t*>(body.data()), body.size(), deadline,
                            PeerName(r), options.timeout_seconds));
    if (h.type == kReject) {
      absl::StatusCode code = absl::StatusCode::kUnknown;
      if (body.size() >= 4) {
        const uint64_t raw_code = GetLe(reinterpret_cast<const uint8_t*>(body.data()), 4);
        if (raw_code > 0 && raw_code <= static_cast<uint64_t>(absl::StatusCode::kUnauthenticated)) {
          code = static_cast<absl::StatusCode>(raw_code);
        }
        body.erase(0, 4);
      }
      return absl::Status(code, absl::StrCat("rendezvous: ", PeerName(r), " rejected rank ",
                                             env.rank, ": ", body));
    }
    if (h.type != type || h.seq != seq_no) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rendezvous: bad frame from ", PeerName(r), ": got ", TypeName(h.type), " #", h.seq,
          " while waiting for ", TypeName(type), " #", seq_no,
          " (ranks called rendezvous steps in different orders)"));
    }
    return body;
  }

  // Rank 0 failed: tell every connected peer why (best effort), so their errors say so too.
  void RejectAll(const absl::Status& why) {
    const Clock::time_point deadline = Clock::now() + std::chrono::milliseconds(200);
    for (int r = 1; r < static_cast<int>(peers.size()); ++r) {
      if (peers[r].valid()) {
        (void)SendFrame(r, kReject, seq, RejectBody(why), deadline);
      }
    }
  }

  absl::Status ListenAndAccept();
  absl::Status ConnectToRoot();
};

absl::Status Rendezvous::Impl::ListenAndAccept() {
  const int world = env.world_size;
  const std::string bind_name =
      absl::StrCat(options.bind_addr.empty() ? "0.0.0.0" : options.bind_addr, ":", env.port);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(env.port));
  if (options.bind_addr.empty()) {
    address.sin_addr.s_addr = htonl(INADDR_ANY);
  } else if (inet_pton(AF_INET, options.bind_addr.c_str(), &address.sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous: bind address '",
                                                   options.bind_addr,
                                                   "' is not an IPv4 address"));
  }
  listener = qtrain::comm::Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listener.valid()) {
    return absl::UnavailableError(absl::StrCat("rendezvous: socket(): ", Errno(errno)));
  }
  int one = 1;
  (void)setsockopt(listener.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    const int e = errno;
    return absl::UnavailableError(absl::StrCat(
        "rendezvous: rank 0 cannot listen on ", bind_name, ": ", Errno(e),
        e == EADDRINUSE ? " (another job or process holds this MASTER_PORT; pick another)" : ""));
  }
  if (::listen(listener.get(), std::max(16, world)) != 0) {
    return absl::UnavailableError(
        absl::StrCat("rendezvous: listen on ", bind_name, ": ", Errno(errno)));
  }
  RETURN_IF_ERROR(SetNonBlocking(listener.get()));

  // Accepted connections that have not completed their HELLO header yet.
  struct Pending {
    qtrain::comm::Fd fd;
    uint8_t buf[kHeaderBytes];
    size_t have = 0;
    std::string from;
  };
  std::vector<Pending> pending;
  peers.clear();
  peers.resize(world);
  int joined = 1;
  const Clock::time_point deadline = Deadline();
  while (joined < world) {
    if (Clock::now() >= deadline) {
      std::vector<int> missing;
      for (int r = 1; r < world; ++r) {
        if (!peers[r].valid()) missing.push_back(r);
      }
      absl::Status status = absl::DeadlineExceededError(absl::StrCat(
          "rendezvous: ", missing.size() == 1 ? "rank " : "ranks ", absl::StrJoin(missing, ", "),
          " of ", world, " never connected to ", bind_name, " within ",
          FormatSeconds(options.timeout_seconds), " s (not started, crashed, or given another "
          "MASTER_ADDR/MASTER_PORT)"));
      RejectAll(status);
      return status;
    }
    std::vector<pollfd> fds;
    fds.push_back({listener.get(), POLLIN, 0});
    for (const Pending& p : pending) fds.push_back({p.fd.get(), POLLIN, 0});
    (void)::poll(fds.data(), fds.size(), PollMs(deadline));
    // New connections.
    while (true) {
      sockaddr_storage peer_address{};
      socklen_t length = sizeof(peer_address);
      const int fd = ::accept4(listener.get(), reinterpret_cast<sockaddr*>(&peer_address),
                               &length, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) break;
      SetNoDelay(fd);
      char host[NI_MAXHOST] = "?";
      char service[NI_MAXSERV] = "?";
      (void)getnameinfo(reinterpret_cast<sockaddr*>(&peer_address), length, host, sizeof(host),
                        service, sizeof(service), NI_NUMERICHOST | NI_NUMERICSERV);
      Pending p;
      p.fd = qtrain::comm::Fd(fd);
      p.from = absl::StrCat("a connection from ", host, ":", service);
      pending.push_back(std::move(p));
    }
    // Progress on HELLO headers.
    for (size_t i = 0; i < pending.size();) {
      Pending& p = pending[i];
      const ssize_t n = ::recv(p.fd.get(), p.buf + p.have, kHeaderBytes - p.have, 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        pending.erase(pending.begin() + static_cast<ptrdiff_t>(i));  // went away before HELLO
        continue;
      }
      if (n > 0) p.have += static_cast<size_t>(n);
      if (p.have < kHeaderBytes) {
        ++i;
        continue;
      }
      const Header h = DecodeHeader(p.buf);
      absl::Status status = ValidateHeader(h, static_cast<uint32_t>(world), -1, p.from);
      if (status.ok() && (h.type != kHello || h.length != 0 || h.seq != 0)) {
        status = absl::InvalidArgumentError(absl::StrCat(
            "rendezvous: bad frame from ", p.from, ": ", TypeName(h.type), " #", h.seq,
            " with ", h.length, " body bytes where an empty HELLO #0 was expected"));
      }
      if (status.ok() && h.sender == 0) {
        status = absl::InvalidArgumentError(absl::StrCat(
            "rendezvous: ", p.from, " claims rank 0, which is this process (two jobs on one "
            "port, or two ranks started with RANK=0)"));
      }
      if (status.ok() && peers[h.sender].valid()) {
        status = absl::InvalidArgumentError(absl::StrCat(
            "rendezvous: ", p.from, " claims rank ", h.sender,
            ", which already joined (duplicate RANK, or two jobs on one port)"));
      }
      if (!status.ok()) {
        // Tell the offender and every joined rank why, then fail.
        const std::string body = RejectBody(status);
        Header reject;
        reject.type = kReject;
        reject.world_size = static_cast<uint32_t>(world);
        reject.length = body.size();
        uint8_t raw[kHeaderBytes];
        EncodeHeader(reject, raw);
        const Clock::time_point soon = Clock::now() + std::chrono::milliseconds(200);
        if (SendAll(p.fd.get(), raw, kHeaderBytes, soon, p.from, 0.2).ok()) {
          (void)SendAll(p.fd.get(), reinterpret_cast<const uint8_t*>(body.data()), body.size(),
                        soon, p.from, 0.2);
        }
        RejectAll(status);
        return status;
      }
      peers[h.sender] = std::move(p.fd);
      ++joined;
      pending.erase(pending.begin() + static_cast<ptrdiff_t>(i));
    }
  }
  listener.Close();
  for (int r = 1; r < world; ++r) RETURN_IF_ERROR(SendFrame(r, kWelcome, 0, "", deadline));
  return absl::OkStatus();
}

absl::Status Rendezvous::Impl::ConnectToRoot() {
  const Clock::time_point deadline = Deadline();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  const std::string port = absl::StrCat(env.port);
  std::string last_error = "no attempt";
  peers.clear();
  peers.resize(1);
  while (!peers[0].valid()) {
    if (Clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "rendezvous: ", root_where, " did not answer within ",
          FormatSeconds(options.timeout_seconds), " s (rank ", env.rank, " of ", env.world_size,
          " could not connect: ", last_error, ")"));
    }
    addrinfo* addresses = nullptr;
    const int rc = getaddrinfo(env.addr.c_str(), port.c_str(), &hints, &addresses);
    if (rc != 0) {
      last_error = absl::StrCat("cannot resolve '", env.addr, "': ", gai_strerror(rc));
    } else {
      for (addrinfo* a = addresses; a != nullptr && !peers[0].valid(); a = a->ai_next) {
        qtrain::comm::Fd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                                     a->ai_protocol));
        if (!fd.valid()) {
          last_error = absl::StrCat("socket(): ", Errno(errno));
          continue;
        }
        if (::connect(fd.get(), a->ai_addr, a->ai_addrlen) != 0) {
          if (errno != EINPROGRESS) {
            last_error = Errno(errno);
            continue;
          }
          pollfd p{fd.get(), POLLOUT, 0};
          const int ready = ::poll(&p, 1, PollMs(deadline));
          int error = 0;
          socklen_t length = sizeof(error);
          if (ready <= 0) {
            last_error = "connect timed out";
            continue;
          }
          if (getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &error, &length) != 0 || error != 0) {
            last_error = Errno(error != 0 ? error : errno);
            continue;
          }
        }
        SetNoDelay(fd.get());
        peers[0] = std::move(fd);
      }
      freeaddrinfo(addresses);
    }
    if (!peers[0].valid()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  RETURN_IF_ERROR(SendFrame(0, kHello, 0, "", deadline));
  return RecvFrame(0, kWelcome, 0, deadline).status();
}

Rendezvous::Rendezvous(std::unique_ptr<Impl> impl, int rank, int world_size)
    : impl_(std::move(impl)), rank_(rank), world_size_(world_size) {}

Rendezvous::~Rendezvous() = default;

absl::StatusOr<std::unique_ptr<Rendezvous>> Rendezvous::Connect(const LaunchEnv& env,
                                                                const RendezvousOptions& options) {
  if (!(options.timeout_seconds > 0.0) || !std::isfinite(options.timeout_seconds)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rendezvous timeout must be a finite number of seconds > 0; got ",
        options.timeout_seconds));
  }
  if (env.world_size < 1 || env.rank < 0 || env.rank >= env.world_size) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous: rank ", env.rank,
                                                   " is not in a world of ", env.world_size));
  }
  if (env.world_size > 1 && (env.port < 1 || env.port > 65535)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rendezvous: port ", env.port, " is not in [1, 65535]"));
  }
  if (env.world_size > 1 && env.rank > 0 && env.addr.empty()) {
    return absl::InvalidArgumentError("rendezvous: rank 0's address is empty");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->env = env;
  impl->root_where = absl::StrCat("rank 0 at ", env.addr, ":", env.port);
  if (env.world_size > 1) {
    RETURN_IF_ERROR(env.rank == 0 ? impl->ListenAndAccept() : impl->ConnectToRoot());
  }
  return std::unique_ptr<Rendezvous>(new Rendezvous(std::move(impl), env.rank, env.world_size));
}

absl::StatusOr<std::string> Rendezvous::Broadcast(std::string_view data) {
  Impl& m = *impl_;
  if (data.size() > kMaxRendezvousBytes && rank_ == 0) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous broadcast of ", data.size(),
                                                   " bytes is over ", kMaxRendezvousBytes));
  }
  const uint64_t seq = ++m.seq;
  const Clock::time_point deadline = m.Deadline();
  if (rank_ == 0) {
    for (int r = 1; r < world_size_; ++r) RETURN_IF_ERROR(m.SendFrame(r, kData, seq, data, deadline));
    return std::string(data);
  }
  return m.RecvFrame(0, kData, seq, deadline);
}

absl::StatusOr<std::vector<std::string>> Rendezvous::AllGather(std::string_view data) {
  Impl& m = *impl_;
  if (data.size() > kMaxRendezvousBytes) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous all-gather of ", data.size(),
                                                   " bytes is over ", kMaxRendezvousBytes));
  }
  const uint64_t seq = ++m.seq;
  const Clock::time_point deadline = m.Deadline();
  std::vector<std::string> pieces(world_size_);
  if (rank_ == 0) {
    pieces[0] = std::string(data);
    uint64_t total = 8 * static_cast<uint64_t>(world_size_) + data.size();
    for (int r = 1; r < world_size_; ++r) {
      ASSIGN_OR_RETURN(pieces[r], m.RecvFrame(r, kData, seq, deadline));
      total += pieces[r].size();
    }
    if (total > kMaxRendezvousBytes) {
      absl::Status status = absl::InvalidArgumentError(absl::StrCat(
          "rendezvous all-gather: ", total, " bytes in all is over ", kMaxRendezvousBytes));
      m.RejectAll(status);
      return status;
    }
    std::string all;
    all.reserve(static_cast<size_t>(total));
    for (const std::string& piece : pieces) {
      uint8_t length[8];
      PutLe(piece.size(), 8, length);
      all.append(reinterpret_cast<const char*>(length), 8);
      all += piece;
    }
    for (int r = 1; r < world_size_; ++r) RETURN_IF_ERROR(m.SendFrame(r, kData, seq, all, deadline));
    return pieces;
  }
  RETURN_IF_ERROR(m.SendFrame(0, kData, seq, data, deadline));
  ASSIGN_OR_RETURN(std::string all, m.RecvFrame(0, kData, seq, deadline));
  size_t at = 0;
  for (int r = 0; r < world_size_; ++r) {
    if (all.size() - at < 8) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rendezvous all-gather: the answer of ", m.root_where, " ends before rank ", r, "'s part"));
    }
    const uint64_t length = GetLe(reinterpret_cast<const uint8_t*>(all.data() + at), 8);
    at += 8;
    if (length > all.size() - at) {
      return absl::InvalidArgumentError(absl::StrCat("rendezvous all-gather: rank ", r,
                                                     "'s part of ", length,
                                                     " bytes overruns the answer of ",
                                                     m.root_where));
    }
    pieces[r] = all.substr(at, static_cast<size_t>(length));
    at += static_cast<size_t>(length);
  }
  if (at != all.size()) {
    return absl::InvalidArgumentError(absl::StrCat("rendezvous all-gather: ", all.size() - at,
                                                   " stray bytes in the answer of ", m.root_where));
  }
  if (pieces[rank_] != data) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rendezvous all-gather: ", m.root_where, " returned another part for rank ", rank_));
  }
  return pieces;
}

absl::Status Rendezvous::Barrier() { return AllGather("").status(); }

}  // namespace qtrain::comm
