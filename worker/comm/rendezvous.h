// Process start-up without MPI: the launcher variables a rank is started with, and a small TCP
// rendezvous through rank 0 that carries the few bytes ranks must agree on before a real
// communicator exists (the NCCL unique id, 128 bytes) plus a barrier and an all-gather of small
// byte strings for start-up checks. Plain POSIX sockets; no CUDA, no MPI.
//
// Launcher variables (torchrun's names; deploy/launch-local.sh sets them):
//   MASTER_ADDR   host name or address of rank 0 (where it listens)
//   MASTER_PORT   TCP port of rank 0's listener (1..65535)
//   RANK          this process's rank, 0 <= RANK < WORLD_SIZE   (or OMPI_COMM_WORLD_RANK)
//   WORLD_SIZE    number of ranks, >= 1                          (or OMPI_COMM_WORLD_SIZE)
//   LOCAL_RANK    rank among the ranks on this machine, >= 0     (or OMPI_COMM_WORLD_LOCAL_RANK)
// Open MPI's variables are read only when torchrun's is absent, so a torchrun-style launch under
// mpirun still wins.
//
// Protocol (star through rank 0, one TCP connection per non-root rank). Every frame is a 32-byte
// little-endian header and a body:
//   u32 magic 'QTRV' (0x56525451), u16 version (1), u16 type, u32 world_size, u32 sender rank,
//   u64 sequence number, u64 body length (<= kMaxRendezvousBytes)
// Types: 1 HELLO (rank -> 0; empty body), 2 WELCOME (0 -> rank; empty), 3 REJECT (0 -> rank; body
// = u32 absl status code + rank 0's error message), 4 DATA (either way; body = bytes). After HELLO/WELCOME the ranks exchange DATA
// frames in lock step: Broadcast = one DATA from rank 0 to each rank; AllGather = one DATA from
// each rank to rank 0, then rank 0 sends each rank one DATA holding all pieces (u64 length +
// bytes, in rank order); Barrier = AllGather of nothing. Every frame's header is validated
// (magic, version, type, world size, sender, sequence number, length): a mismatch is
// INVALID_ARGUMENT naming the field, which also catches two jobs sharing one port (the second
// job's rank 0 cannot bind it; its other ranks reach the first job's rank 0, which rejects their
// world size or duplicate rank, and both sides say so).
//
// Timeouts: every wait ends after RendezvousOptions::timeout_seconds, with DEADLINE_EXCEEDED
// saying who was waited for: "rendezvous: rank 0 at 10.0.0.1:29500 did not answer within 60 s",
// "rendezvous: rank 2 of 4 never connected to 0.0.0.0:29500 within 60 s". A connection that
// closes early is UNAVAILABLE naming the peer.
//
// Thread-safety: one thread at a time per Rendezvous object; distinct objects (e.g. one per
// thread in a test) are independent. Cost: a few round trips of small messages; start-up only.
#ifndef QTRAIN_WORKER_COMM_RENDEZVOUS_H_
#define QTRAIN_WORKER_COMM_RENDEZVOUS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain::comm {

// Where rank 0 listens and who this process is.
struct LaunchEnv {
  std::string addr;    // MASTER_ADDR
  int port = 0;        // MASTER_PORT
  int rank = 0;        // RANK
  int world_size = 1;  // WORLD_SIZE
  int local_rank = 0;  // LOCAL_RANK

  // "rank 1 of 4 (local 1), rank 0 at 127.0.0.1:29500"
  std::string Describe() const;
};

// Reads the variables listed in the file comment from the process environment. INVALID_ARGUMENT
// naming the variable when one is missing, not an integer, or out of range.
absl::StatusOr<LaunchEnv> LaunchEnvFromEnvironment();
// The same with an injected lookup (returns nullptr for an unset variable): for tests.
absl::StatusOr<LaunchEnv> LaunchEnvFromLookup(
    const std::function<const char*(const char* name)>& getenv);

// Largest body a frame may announce (1 MiB): bounds what a bad peer can make us allocate.
inline constexpr uint64_t kMaxRendezvousBytes = uint64_t{1} << 20;

struct RendezvousOptions {
  // Longest any one step (connecting and saying hello, then each exchange) waits, in seconds
  // (> 0). Default 60: enough for ranks started a little apart by a launcher.
  double timeout_seconds = 60.0;
  // Rank 0's listener address. Default "" = all interfaces (as torchrun); "127.0.0.1" keeps a
  // local job off the network.
  std::string bind_addr;
};

class Rendezvous {
 public:
  // Rank 0 listens on env.port and waits until all other ranks said HELLO; the others connect to
  // env.addr:env.port (retrying while it is not up yet) and wait for WELCOME. A world of one
  // opens no socket. Errors: INVALID_ARGUMENT for bad options or a rejected peer,
  // DEADLINE_EXCEEDED on timeout (who was waited for), UNAVAILABLE for socket failures (e.g. the
  // port in use).
  static absl::StatusOr<std::unique_ptr<Rendezvous>> Connect(const LaunchEnv& env,
                                                            const RendezvousOptions& options = {});
  ~Rendezvous();
  Rendezvous(const Rendezvous&) = delete;
  Rendezvous& operator=(const Rendezvous&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }

  // Rank 0's `data` (its argument elsewhere is ignored) on every rank. At most
  // kMaxRendezvousBytes.
  absl::StatusOr<std::string> Broadcast(std::string_view data);
  // Every rank's `data`, indexed by rank. The total is at most kMaxRendezvousBytes.
  absl::StatusOr<std::vector<std::string>> AllGather(std::string_view data);
  absl::Status Barrier();

 private:
  struct Impl;
  explicit Rendezvous(std::unique_ptr<Impl> impl, int rank, int world_size);
  std::unique_ptr<Impl> impl_;
  int rank_;
  int world_size_;
};

}  // namespace qtrain::comm

#endif  // QTRAIN_WORKER_COMM_RENDEZVOUS_H_
