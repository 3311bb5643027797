#!/usr/bin/env bash
# The docker-compose parameter-server cluster (2 qserver shards, 4 workers) without Docker: every
# process on its own namespaced host of deploy/netns-cluster.sh, with its own address, talking gRPC
# over that host's (optionally tc-limited) link. Shard s (0-based) runs on host s+1 and listens on
# its address, port 7070; worker w runs on host S+w+1. Run as root, after `up`:
#
#   bash deploy/netns-cluster.sh up --hosts 6 --rate 1gbit
#   bash deploy/netns-ps.sh [--servers S] [--workers W] [--codec C] [--out DIR] -- [qtrain flags]
#   bash deploy/netns-cluster.sh down
#
#   --servers S   qserver shards (default 2)          --workers W   qtrain workers (default 4)
#   --codec C     codec of servers and workers (default onebit)
#   --out DIR     logs, port files and the servers' checkpoints (default build/netns-ps)
#   --server_flags "F..."   more qserver flags (e.g. "--mode=async --staleness=2")
#
# Environment: QTRAIN and QSERVER (default build/bin/qtrain, build/bin/qserver), PS_TOKEN (default:
# a random one), QTRAIN_NETNS_CLUSTER (as for netns-cluster.sh). The cluster needs at least S + W
# hosts. Prints worker 0's output (the progress, the weights-hash check and the summary); the
# other logs are DIR/server<s>.log and DIR/worker<w>.log. Exits 0 when every worker succeeded, else
# with the first failing worker's code; the servers get SIGTERM (final checkpoint) either way, and
# a server that exits early fails the run. In the qtrain flags, %w stands for the worker's id
# (--metrics=DIR/w%w.jsonl gives each worker its own file).
set -Eeuo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
servers=2
workers=4
codec=onebit
out=$root/build/netns-ps
server_flags=""
die() { echo "netns-ps.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --servers) servers=${2:-}; shift 2 ;;
    --servers=*) servers=${1#*=}; shift ;;
    --workers) workers=${2:-}; shift 2 ;;
    --workers=*) workers=${1#*=}; shift ;;
    --codec) codec=${2:-}; shift 2 ;;
    --codec=*) codec=${1#*=}; shift ;;
    --out) out=${2:-}; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    --server_flags) server_flags=${2:-}; shift 2 ;;
    --server_flags=*) server_flags=${1#*=}; shift ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (qtrain flags go after --)" ;;
  esac
done
[[ "$servers" =~ ^[1-9][0-9]*$ ]] || die "--servers must be a positive integer, got '$servers'"
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$workers'"
qtrain=${QTRAIN:-$root/build/bin/qtrain}
qserver=${QSERVER:-$root/build/bin/qserver}
[ -x "$qtrain" ] || die "no qtrain at $qtrain (bash deploy/build.sh, or set QTRAIN)"
[ -x "$qserver" ] || die "no qserver at $qserver (bash deploy/build.sh, or set QSERVER)"

cluster=${QTRAIN_NETNS_CLUSTER:-0}
if [ "$cluster" -eq 0 ]; then
  ns_prefix=qtrain-h state=/run/qtrain-netns
else
  ns_prefix=qtrain$cluster-h state=/run/qtrain-netns-$cluster
fi
state=${QTRAIN_NETNS_STATE:-$state}
[ -f "$state/config" ] || die "the cluster is down; run 'netns-cluster.sh up --hosts $((servers + workers))' first"
# shellcheck disable=SC1091
. "$state/config"
[ "$hosts" -ge $((servers + workers)) ] ||
  die "$servers servers + $workers workers need $((servers + workers)) hosts; the cluster has $hosts"
addr() { echo "10.77.$cluster.$((10 + $1))"; }

token=${PS_TOKEN:-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}
mkdir -p "$out"
rm -f "$out"/server*.port "$out"/server*.log "$out"/worker*.log
pids=()
server_pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

endpoints=()
for s in $(seq 0 $((servers - 1))); do
  h=$((s + 1))
  # shellcheck disable=SC2086
  ip netns exec "$ns_prefix$h" "$qserver" --shard="$s" --num_shards="$servers" \
    --workers="$workers" --codec="$codec" --token="$token" --listen="$(addr $h):7070" \
    --port_file="$out/server$s.port" --checkpoint_dir="$out/ckpt" $server_flags \
    >"$out/server$s.log" 2>&1 &
  pids+=($!)
  server_pids+=($!)
  endpoints+=("$(addr $h):7070")
done
for s in $(seq 0 $((servers - 1))); do
  for _ in $(seq 200); do
    [ -s "$out/server$s.port" ] && break
    kill -0 "${server_pids[$s]}" 2>/dev/null || break
    sleep 0.05
  done
  if [ ! -s "$out/server$s.port" ]; then
    echo "netns-ps.sh: qserver shard $s did not start; its log:" >&2
    tail -n 20 "$out/server$s.log" >&2
    exit 1
  fi
done
ps_list=$(IFS=,; echo "${endpoints[*]}")
echo "netns-ps: $servers qserver shard(s) on ${ns_prefix}1..$servers ($ps_list), $workers workers on ${ns_prefix}$((servers + 1))..$((servers + workers)), codec $codec"

worker_pids=()
for w in $(seq 0 $((workers - 1))); do
  h=$((servers + w + 1))
  args=("${@//%w/$w}")  # %w in a qtrain flag: this worker's id (e.g. --metrics=m%w.jsonl)
  ip netns exec "$ns_prefix$h" "$qtrain" --ps="$ps_list" --ps_token="$token" --worker_id="$w" \
    --codec="$codec" "${args[@]}" >"$out/worker$w.log" 2>&1 &
  pids+=($!)
  worker_pids+=($!)
done
tail -n +1 -f "$out/worker0.log" --pid="${worker_pids[0]}" &
tailer=$!
rc=0
for w in $(seq 0 $((workers - 1))); do
  set +e
  wait "${worker_pids[$w]}"
  r=$?
  set -e
  if [ $r -ne 0 ] && [ $rc -eq 0 ]; then
    rc=$r
    echo "netns-ps.sh: worker $w exited with $r; the last lines of $out/worker$w.log:" >&2
    tail -n 10 "$out/worker$w.log" >&2
  fi
done
wait "$tailer" 2>/dev/null || true
for s in $(seq 0 $((servers - 1))); do
  if ! kill -0 "${server_pids[$s]}" 2>/dev/null; then
    echo "netns-ps.sh: qserver shard $s exited before the end; see $out/server$s.log" >&2
    [ $rc -eq 0 ] && rc=1
  fi
done
exit $rc
