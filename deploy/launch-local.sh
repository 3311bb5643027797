#!/usr/bin/env bash
# Starts N ranks of a command on this machine the way torchrun does, without MPI: each rank gets
# MASTER_ADDR=127.0.0.1, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK (= RANK), which
# worker/comm/rendezvous.h reads to bootstrap NCCL, and NCCL_NVLS_ENABLE=0 (NVLink SHARP
# multicast stays off: it needs fabric-manager support that shared GPU hosts often lack).
#
#   bash deploy/launch-local.sh -n N [--port P] [--grace S] -- COMMAND [ARGS...]
#
#   -n N        number of ranks (>= 1)
#   --port P    MASTER_PORT (default: a port that is free now)
#   --grace S   seconds the other ranks get between SIGTERM and SIGKILL after a failure (default 5)
#
# Each rank's stdout and stderr go to this script's stdout, every line prefixed "[rank r] ".
# When a rank exits non-zero (or is killed), the others are stopped and the script exits with that
# first failure's code (128+signal for a signal); 0 when every rank succeeds; 2 for a usage error.
# Ctrl-C stops every rank. Each rank runs in its own process group, so the ranks' own children are
# stopped with it.
#
# Example (2 GPUs): bash deploy/launch-local.sh -n 2 -- build/bin/allreduce_bench --codecs=onebit
set -uo pipefail

usage() {
  [ $# -gt 0 ] && echo "launch-local.sh: $*" >&2
  echo "usage: launch-local.sh -n N [--port P] [--grace S] -- COMMAND [ARGS...]" >&2
  exit 2
}

n=""
port=""
grace=5
while [ $# -gt 0 ]; do
  case "$1" in
    -n) [ $# -ge 2 ] || usage "-n needs a value"; n=$2; shift 2 ;;
    -n*) n=${1#-n}; shift ;;
    --n=*) n=${1#--n=}; shift ;;
    --port) [ $# -ge 2 ] || usage "--port needs a value"; port=$2; shift 2 ;;
    --port=*) port=${1#--port=}; shift ;;
    --grace) [ $# -ge 2 ] || usage "--grace needs a value"; grace=$2; shift 2 ;;
    --grace=*) grace=${1#--grace=}; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) usage "unknown argument '$1' (the command goes after --)" ;;
  esac
done
[ -n "$n" ] || usage "-n is required"
[[ $n =~ ^[1-9][0-9]*$ ]] || usage "-n must be a positive integer; got '$n'"
[[ $grace =~ ^[0-9]+$ ]] || usage "--grace must be a whole number of seconds; got '$grace'"
[ $# -gt 0 ] || usage "no command after --"
if [ -n "$port" ]; then
  if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    usage "--port must be in 1..65535; got '$port'"
  fi
else
  # A port that is free now: python3 if present, else a random high one (the rendezvous says
  # clearly when it is taken after all).
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null) ||
    port=$((20000 + RANDOM % 40000))
fi

export MASTER_ADDR=127.0.0.1 MASTER_PORT=$port WORLD_SIZE=$n NCCL_NVLS_ENABLE=0

tmp=$(mktemp -d)
pids=()  # the process-group leader of each rank (its pid)
stop_all() {  # stop_all SIGNAL: signals every rank still running
  local sig=$1 r
  for r in "${!pids[@]}"; do
    [ -f "$tmp/rc.$r" ] && continue
    kill "-$sig" -- "-${pids[$r]}" 2>/dev/null || kill "-$sig" "${pids[$r]}" 2>/dev/null
  done
}
cleanup() { stop_all KILL; rm -rf "$tmp"; }
trap cleanup EXIT
trap 'echo "launch-local.sh: interrupted; stopping all ranks" >&2; stop_all TERM; sleep 1; exit 130' INT TERM

have_setsid=0
command -v setsid >/dev/null 2>&1 && have_setsid=1
for ((r = 0; r < n; r++)); do
  (
    # A background child of this subshell is not a group leader, so setsid execs in place and
    # the rank's pid is its process group id.
    if [ $have_setsid -eq 1 ]; then
      RANK=$r LOCAL_RANK=$r setsid "$@" </dev/null &
    else
      RANK=$r LOCAL_RANK=$r "$@" </dev/null &
    fi
    echo $! >"$tmp/pid.$r"
    wait $!
    echo $? >"$tmp/rc.$r.part"
    mv "$tmp/rc.$r.part" "$tmp/rc.$r"
  ) 2>&1 | sed -u "s/^/[rank $r] /" &
  while [ ! -s "$tmp/pid.$r" ]; do sleep 0.01; done
  pids[r]=$(cat "$tmp/pid.$r")
done

first_rank=""
first_rc=0
stopped_at=""
while true; do
  done_count=0
  for ((r = 0; r < n; r++)); do
    [ -f "$tmp/rc.$r" ] || continue
    done_count=$((done_count + 1))
    rc=$(cat "$tmp/rc.$r")
    if [ "$rc" -ne 0 ] && [ -z "$first_rank" ]; then
      first_rank=$r
      first_rc=$rc
      echo "launch-local.sh: rank $r exited with code $rc; stopping the other ranks" >&2
      stop_all TERM
      stopped_at=0
    fi
  done
  [ "$done_count" -eq "$n" ] && break
  if [ -n "$stopped_at" ]; then
    stopped_at=$((stopped_at + 1))  # tenths of a second since the failure
    if [ "$stopped_at" -ge $((10 * grace)) ]; then
      stop_all KILL
      stopped_at=""
    fi
  fi
  sleep 0.1
done
wait  # the output prefixers
exit "$first_rc"
