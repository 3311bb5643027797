#!/usr/bin/env bash
# The parameter-server bandwidth benchmark: one `qserver` on its own namespaced host and W
# synthetic workers (build/bin/ps_load_bench, one process per host) on W more hosts of
# deploy/netns-cluster.sh, every link limited by `tc tbf`, so the server's link is the bottleneck:
# per step each worker pushes its compressed gradient up to the server and pulls the server's
# compressed update back, i.e. the server receives W payloads and sends W. For each rate it prints
# the measured steps/s beside the link-rate bound of the same run,
#   bound = rate / (8 x max(bytes the server receives per step, bytes it sends per step)),
# with the bytes counted by the workers (serialized EncodedTensor of every push and update), and
# the fraction. It also reads the server link's own counters (the bytes its tbf token buckets
# charged, every segment's TCP/IP headers and the HTTP/2 framing included: about 5% over the
# payload, so ~95% of the bound is the most a run can show) and the CPU seconds per step of
# qserver and of the workers, and from them the cores that running at the bound would need, to
# say which resource limits the run. Run as root.
#
#   bash deploy/ps-bandwidth-bench.sh [--rates "1gbit 200mbit"] [--workers 8] [--params 25000000]
#        [--codec onebit] [--bucket_elements 1048576] [--inflight 4] [--steps 20] [--warmup 3]
#        [--repeat 2] [--out DIR] [--server_flags "..."]
#
# Defaults: the issue's target (8 workers, 25M parameters, onebit) at 1 Gbit/s and at 200 Mbit/s,
# each run twice. --bucket_elements, --inflight, --steps and --warmup go to ps_load_bench (see
# server/bench/ps_load_bench.cc). Results go to DIR (default build/ps-bandwidth-bench): per run the
# server's and every worker's log, and summary.txt (the table, also printed). The machine's load
# average at the start of each run is in the table: other processes share the CPUs.
# Environment: QSERVER, PS_LOAD_BENCH (default build/bin/...); QTRAIN_NETNS_CLUSTER (default 45:
# namespaces qtrain45-h*, 10.77.45.0/24, so a cluster of yours or of the tests is left alone).
set -Eeuo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

rates="1gbit 200mbit"
workers=8
params=25000000
codec=onebit
bucket_elements=1048576
inflight=4
steps=20
warmup=3
repeat=2
out=$root/build/ps-bandwidth-bench
server_flags=""
die() { echo "ps-bandwidth-bench.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) rates=${2:-}; shift 2 ;;
    --workers) workers=${2:-}; shift 2 ;;
    --params) params=${2:-}; shift 2 ;;
    --codec) codec=${2:-}; shift 2 ;;
    --bucket_elements) bucket_elements=${2:-}; shift 2 ;;
    --inflight) inflight=${2:-}; shift 2 ;;
    --steps) steps=${2:-}; shift 2 ;;
    --warmup) warmup=${2:-}; shift 2 ;;
    --repeat) repeat=${2:-}; shift 2 ;;
    --out) out=${2:-}; shift 2 ;;
    --server_flags) server_flags=${2:-}; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
for v in workers params bucket_elements inflight steps repeat; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--$v must be a positive integer, got '${!v}'"
done
[[ "$warmup" =~ ^[0-9]+$ ]] && [ "$warmup" -lt "$steps" ] || die "--warmup must be in [0, --steps)"
[ -n "$rates" ] || die "--rates is empty"
[ "$(id -u)" -eq 0 ] || die "must run as root (it creates network namespaces)"
qserver=${QSERVER:-$root/build/bin/qserver}
bench=${PS_LOAD_BENCH:-$root/build/bin/ps_load_bench}
[ -x "$qserver" ] || die "no qserver at $qserver (ninja -C build qserver, or set QSERVER)"
[ -x "$bench" ] || die "no ps_load_bench at $bench (ninja -C build ps_load_bench, or set PS_LOAD_BENCH)"

# Mbit/s of a tc rate (1gbit, 200mbit, 500kbit).
mbit_of() {
  local r=${1,,}
  case "$r" in
    *gbit) echo $(( ${r%gbit} * 1000 )) ;;
    *mbit) echo "${r%mbit}" ;;
    *kbit) awk -v k="${r%kbit}" 'BEGIN { print k / 1000 }' ;;
    *) die "--rates: '$1' is not NNgbit, NNmbit or NNkbit" ;;
  esac
}
for r in $rates; do
  [[ "${r,,}" =~ ^[1-9][0-9]*(gbit|mbit|kbit)$ ]] || die "--rates: '$r' is not NNgbit, NNmbit or NNkbit"
done

export QTRAIN_NETNS_CLUSTER=${QTRAIN_NETNS_CLUSTER:-45}
cluster=$QTRAIN_NETNS_CLUSTER
ns=qtrain$cluster-h
[ "$cluster" -eq 0 ] && ns=qtrain-h
veth=qt${cluster}v
[ "$cluster" -eq 0 ] && veth=qtv
server_addr=10.77.$cluster.11
hosts=$((workers + 1))
token=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bash "$here/netns-cluster.sh" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

# CPU seconds (user + system) of a process so far.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Bytes the server link's token buckets have let through: "in" is the tbf on the bridge port of
# host 1 (what the server receives), "out" the tbf on eth0 inside host 1 (what it sends). tbf
# charges every TCP segment with its headers, so these are the bytes the rate applies to.
tbf_sent() {
  local -a tc_cmd=(tc)
  [ "$1" = out ] && tc_cmd=(ip netns exec "${ns}1" tc)
  local dev=$veth"1"
  [ "$1" = out ] && dev=eth0
  "${tc_cmd[@]}" -s qdisc show dev "$dev" | awk '$1 == "qdisc" && $2 == "tbf" { t = 1 } t && $1 == "Sent" { print $2; exit }'
}

summary=$out/summary.txt
{
  echo "ps-bandwidth-bench: 1 qserver + $workers ps_load_bench workers on $hosts namespaced hosts;"
  echo "$params parameters, codec $codec, buckets of $bucket_elements, $inflight lanes per worker,"
  echo "$steps steps ($warmup untimed); $(nproc) CPUs."
  echo
  echo "| link | run | load | steps/s | bound | of bound | server in / out (Mbit/s) | tbf in / out per step (MB) | qserver CPU s/step | workers CPU s/step | cores at bound |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
} >"$summary"
cat "$summary"

status=0
for rate in $rates; do
  mbit=$(mbit_of "$rate")
  bash "$here/netns-cluster.sh" up --hosts "$hosts" --rate "$rate" >/dev/null
  for run in $(seq 1 "$repeat"); do
    dir=$out/$rate-run$run
    rm -rf "$dir"
    mkdir -p "$dir"
    load=$(cut -d' ' -f1 /proc/loadavg)
    # shellcheck disable=SC2086
    ip netns exec "${ns}1" "$qserver" --workers="$workers" --codec="$codec" --token="$token" \
      --listen="$server_addr:7070" --port_file="$dir/server.port" --step_deadline=120 \
      --heartbeat_timeout=60 $server_flags >"$dir/server.log" 2>&1 &
    spid=$!
    pids=("$spid")
    for _ in $(seq 200); do
      [ -s "$dir/server.port" ] && break
      kill -0 "$spid" 2>/dev/null || break
      sleep 0.05
    done
    [ -s "$dir/server.port" ] || { tail -n 20 "$dir/server.log" >&2; die "qserver did not start"; }
    in0=$(tbf_sent in)
    out0=$(tbf_sent out)
    cpu0=$(cpu_of "$spid")
    wpids=()
    for w in $(seq 0 $((workers - 1))); do
      ip netns exec "${ns}$((w + 2))" "$bench" --ps="$server_addr:7070" --token="$token" \
        --workers="$workers" --first_worker="$w" --params="$params" --codec="$codec" \
        --bucket_elements="$bucket_elements" --inflight="$inflight" --steps="$steps" \
        --warmup_steps="$warmup" --link_mbit="$mbit" >"$dir/worker$w.log" 2>&1 &
      wpids+=($!)
      pids+=($!)
    done
    rc=0
    for i in "${!wpids[@]}"; do
      set +e
      wait "${wpids[$i]}"
      r=$?
      set -e
      if [ $r -ne 0 ] && [ $rc -eq 0 ]; then
        rc=$r
        echo "ps-bandwidth-bench.sh: worker $i exited with $r:" >&2
        tail -n 5 "$dir/worker$i.log" >&2
      fi
    done
    cpu1=$(cpu_of "$spid")
    in1=$(tbf_sent in)
    out1=$(tbf_sent out)
    kill -TERM "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    pids=()
    if [ $rc -ne 0 ]; then
      status=1
      echo "| $rate | $run | $load | failed (exit $rc, see $dir) | | | | | | | |" | tee -a "$summary"
      continue
    fi
    result=$(grep '^RESULT ' "$dir/worker0.log" || true)
    [ -n "$result" ] || { status=1; echo "no RESULT line in $dir/worker0.log" >&2; continue; }
    get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$result"; }
    # CPU per step: qserver's over the whole run (it idles while the workers start), the
    # workers' in their timed windows (from ps_load_bench); "cores at bound" is the CPU that
    # running at the link-rate bound would take, to compare with the CPUs the machine has free.
    awk -v rate="$rate" -v run="$run" -v load="$load" -v sps="$(get steps_per_s)" \
        -v bound="$(get bound_steps_per_s)" -v frac="$(get fraction)" \
        -v inm="$(get in_mbit_s)" -v outm="$(get out_mbit_s)" -v steps="$steps" \
        -v win=$((in1 - in0)) -v wout=$((out1 - out0)) -v wcpu="$(get workers_cpu_s_per_step)" \
        -v scpu="$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { print b - a }')" 'BEGIN {
      printf "| %s | %d | %s | %.3f | %.3f | %.1f%% | %.0f / %.0f | %.2f / %.2f | %.3f | %.3f | %.2f |\n",
        rate, run, load, sps, bound, 100 * frac, inm, outm, win / steps / 1e6, wout / steps / 1e6,
        scpu / steps, wcpu, (scpu / steps + wcpu) * bound }' | tee -a "$summary"
  done
  bash "$here/netns-cluster.sh" down >/dev/null
done
exit $status
