// qserver: the parameter server of qtrain's parameter-server mode (server/ps_core.h has the
// design). Flags are parsed here and only here. `qserver --help` lists them.
//
//   qserver --shard=0 --num_shards=2 --workers=4 --codec=onebit --listen=127.0.0.1:7070
//           --token=secret --checkpoint_dir=/tmp/ps
//
// SIGTERM / SIGINT: stop serving, write a final checkpoint, exit 0.
#include <pthread.h>
#include <signal.h>

#include <csignal>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/malloc_tuning.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "server/ps_core.h"
#include "server/ps_service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:0",
          "host:port to listen on (port 0: any free port, printed and written to --port_file). "
          "Loopback by default; use 0.0.0.0:PORT to serve other hosts.");
ABSL_FLAG(std::string, port_file, "", "Write the bound port to this file once listening.");
ABSL_FLAG(int, shard, 0, "This server's shard in [0, --num_shards): it owns buckets i with i mod "
                         "num_shards == shard.");
ABSL_FLAG(int, num_shards, 1, "Number of qserver processes of the run.");
ABSL_FLAG(int, workers, 1, "Workers of the run (ranks 0..N-1); rounds wait for all live ones.");
ABSL_FLAG(std::string, codec, "onebit",
          "Codec of pushes and of the compressed downlink (workers must use the same --codec).");
ABSL_FLAG(std::string, downlink_error_feedback, "auto",
          "Server-side error feedback of the downlink: auto (the codec's default), on or off.");
ABSL_FLAG(std::string, mode, "sync", "sync (a step closes when every live worker pushed) or "
                                     "async (each push applied on arrival).");
ABSL_FLAG(double, step_deadline, 30, "Seconds after a round's first push when it closes anyway.");
ABSL_FLAG(double, heartbeat_timeout, 10,
          "Seconds without any request after which a worker leaves the quorum (it may rejoin).");
ABSL_FLAG(int64_t, staleness, 4, "async: pushes more than this many rounds old are refused.");
ABSL_FLAG(std::string, token, "", "Shared secret every request must carry ('' accepts any).");
ABSL_FLAG(double, max_message_mb, 64,
          "Largest request or response in MiB (gRPC's limit is set from it; size it to the model: "
          "an fp32 broadcast of the model state is ~12 bytes per parameter).");
ABSL_FLAG(std::string, checkpoint_dir, "",
          "Write qserver.shard<S>.ckpt here every --checkpoint_every rounds and at exit; restored "
          "at start.");
ABSL_FLAG(int64_t, checkpoint_every, 100, "Closed rounds (bucket steps) between checkpoints.");
ABSL_FLAG(int, history, 256, "Closed rounds kept per bucket for workers that fell behind.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of stochastic downlink codecs.");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain: serve TLS (with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA: require client certificates signed by it.");

namespace qtrain::server {
namespace {

absl::StatusOr<ServerCoreOptions> ReadCoreFlags() {
  ServerCoreOptions o;
  o.shard = absl::GetFlag(FLAGS_shard);
  o.num_shards = absl::GetFlag(FLAGS_num_shards);
  o.world_size = absl::GetFlag(FLAGS_workers);
  o.codec_spec = absl::GetFlag(FLAGS_codec);
  const std::string ef = absl::GetFlag(FLAGS_downlink_error_feedback);
  if (ef == "auto") {
    o.downlink_feedback = comm::FeedbackChoice::kFromSpec;
  } else if (ef == "on") {
    o.downlink_feedback = comm::FeedbackChoice::kOn;
  } else if (ef == "off") {
    o.downlink_feedback = comm::FeedbackChoice::kOff;
  } else {
    return absl::InvalidArgumentError("--downlink_error_feedback must be auto, on or off");
  }
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "sync") {
    o.mode = PsMode::kSync;
  } else if (mode == "async") {
    o.mode = PsMode::kAsync;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--mode must be sync or async, got '", mode, "'"));
  }
  o.step_deadline_seconds = absl::GetFlag(FLAGS_step_deadline);
  o.heartbeat_timeout_seconds = absl::GetFlag(FLAGS_heartbeat_timeout);
  o.staleness = absl::GetFlag(FLAGS_staleness);
  o.token = absl::GetFlag(FLAGS_token);
  const double mb = absl::GetFlag(FLAGS_max_message_mb);
  if (!(mb > 0) || mb > 2047) {
    return absl::InvalidArgumentError(absl::StrCat("--max_message_mb must be in (0, 2047], got ", mb));
  }
  o.max_message_bytes = static_cast<uint64_t>(mb * 1024 * 1024);
  o.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  o.checkpoint_every = absl::GetFlag(FLAGS_checkpoint_every);
  o.history = absl::GetFlag(FLAGS_history);
  o.seed = absl::GetFlag(FLAGS_seed);
  RETURN_IF_ERROR(ValidateServerCoreOptions(o));
  return o;
}

absl::Status Run() {
  ASSIGN_OR_RETURN(ServerCoreOptions core_options, ReadCoreFlags());
  ServiceOptions service;
  service.listen = absl::GetFlag(FLAGS_listen);
  service.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  service.tls_key = absl::GetFlag(FLAGS_tls_key);
  service.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  ASSIGN_OR_RETURN(std::unique_ptr<ServerCore> core, ServerCore::Create(core_options));
  // Block the stop signals in every thread; the main thread waits for them with sigwait.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  ASSIGN_OR_RETURN(std::unique_ptr<PsServer> server, PsServer::Start(core.get(), service));
  std::printf("qserver: shard %d of %d listening on port %d (%s, codec %s, %d workers%s%s)\n",
              core_options.shard, core_options.num_shards, server->port(),
              core_options.mode == PsMode::kSync ? "sync" : "async",
              core_options.codec_spec.c_str(), core_options.world_size,
              core->restored() ? ", restored from checkpoint" : "",
              service.tls_cert.empty() ? "" : ", TLS");
  std::fflush(stdout);
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty()) {
    const std::string tmp = port_file + ".tmp";
    {
      std::ofstream out(tmp);
      out << server->port() << "\n";
      if (!out) return absl::UnavailableError(absl::StrCat("cannot write --port_file ", tmp));
    }
    if (std::rename(tmp.c_str(), port_file.c_str()) != 0) {
      return absl::UnavailableError(absl::StrCat("cannot rename to --port_file ", port_file));
    }
  }
  int signal = 0;
  sigwait(&stop, &signal);
  QTRAIN_LOG(INFO) << "signal " << signal << ": shutting down";
  server->Shutdown(2.0);
  absl::Status written = core->WriteCheckpoint();
  if (!written.ok()) return written;
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain::server

int main(int argc, char** argv) {
  qtrain::KeepLargeAllocationsInHeap();  // common/malloc_tuning.h
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "server/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  usage.normalize_filename = [](absl::string_view file) { return std::string(file); };
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "the parameter server of qtrain's PS mode: owns buckets i with i mod num_shards == shard, "
      "averages the workers' compressed gradients per step and serves the mean, encoded once.\n"
      "  qserver --workers=4 --codec=onebit --listen=127.0.0.1:7070 --token=T\n"
      "  qtrain --ps=127.0.0.1:7070 --ps_token=T --worker_id=0 --codec=onebit ...\n"
      "Every flag is listed below with its default.");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    std::fprintf(stderr, "qserver: unexpected argument '%s' (see --help)\n", positional[1]);
    return 2;
  }
  absl::Status status = qtrain::server::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "qserver: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
