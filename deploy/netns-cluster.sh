#!/usr/bin/env bash
# A multi-host cluster on one machine: K "hosts" as Linux network namespaces qtrain-h1..qtrain-hK,
# each with its own address and a (optionally rate-limited) link into one bridge, and `mpirun`
# across them, so that Open MPI sees K separate hosts talking TCP over real links. Run as root.
#
#   bash deploy/netns-cluster.sh up --hosts K [--rate 1gbit] [--delay 0.1ms]
#   bash deploy/netns-cluster.sh run [--np N] -- [more mpirun options] <program> [its flags]
#   bash deploy/netns-cluster.sh status
#   bash deploy/netns-cluster.sh down
#
# Topology (all names start with "qt" / "qtrain-" so that `down` finds exactly what `up` made):
#
#   root namespace: bridge qtbr0 10.77.0.1/24 (mpirun runs here and reaches the daemons over it)
#     |-- veth qtv1 <-> eth0 in netns qtrain-h1, 10.77.0.11/24
#     |-- veth qtv2 <-> eth0 in netns qtrain-h2, 10.77.0.12/24
#     ...  host i is 10.77.0.(10+i), i = 1..K (K <= 200)
#
# --rate R (tc rate, e.g. 1gbit, 100mbit) puts a token bucket (tbf) on both directions of each
# host's link: on the egress of eth0 inside the namespace (what the host sends) and on the egress
# of its bridge port qtvI (what the host receives), as a switch port of that speed would.
# --delay D (e.g. 0.1ms) adds a netem delay under the tbf on both sides (so a round trip between
# two hosts gets 4 x D); kernels without sch_netem get a warning and no delay. Without
# --rate/--delay the links are unlimited (veth speed, several GB/s).
#
# `run` writes a hostfile of the namespace addresses (one slot each, N ranks spread round-robin)
# and starts
#   mpirun --hostfile <it> --mca plm_rsh_agent deploy/netns-agent.sh --mca btl self,tcp
#          --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 ...
# Open MPI calls the agent like ssh (`agent [options] host command...`); the agent maps the address
# to its namespace and runs the command (the Open MPI daemon) there, in a UTS namespace of its own
# whose hostname is the namespace's name, so every rank really lives on its own "host"
# (`run --np 4 -- hostname` prints qtrain-h1..4). `run` needs `up` first; N defaults to K.
# Environment: MPIRUN (default mpirun). Root needs OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1: `run` sets
# both.
#
# Several clusters can coexist: QTRAIN_NETNS_CLUSTER=C (0..99, default 0) uses namespaces
# qtrainC-hI, veths qtCvI, bridge qtbrC and 10.77.C.0/24 instead (the test suite and
# scaling-bench.sh use their own C, so they never touch a cluster you brought up).
# State lives in /run/qtrain-netns[-C] (override with QTRAIN_NETNS_STATE): the host count and the
# hostfile. `up` first removes whatever an earlier (perhaps crashed) `up` left, so it is
# idempotent; `down` removes everything and is a no-op on a clean machine. Only the 10.77.0.0/24
# addresses of these namespaces and the bridge are used; nothing is routed elsewhere.
set -Eeuo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cluster=${QTRAIN_NETNS_CLUSTER:-0}
[[ "$cluster" =~ ^[0-9]+$ ]] && [ "$cluster" -le 99 ] ||
  { echo "netns-cluster.sh: QTRAIN_NETNS_CLUSTER must be 0..99, got '$cluster'" >&2; exit 1; }
if [ "$cluster" -eq 0 ]; then
  ns_prefix=qtrain-h veth_prefix=qtv state=/run/qtrain-netns
else
  ns_prefix=qtrain$cluster-h veth_prefix=qt${cluster}v state=/run/qtrain-netns-$cluster
fi
state=${QTRAIN_NETNS_STATE:-$state}
bridge=qtbr$cluster
subnet=10.77.$cluster
mask=24

die() { echo "netns-cluster.sh: $*" >&2; exit 1; }
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

host_ip() { echo "$subnet.$((10 + $1))"; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (it creates network namespaces)"
  command -v ip >/dev/null || die "the 'ip' command is missing (Debian package iproute2)"
}

# Removes every namespace, veth and bridge this script can have made for this cluster id (names
# qtrain-hI, qtvI, qtbr0 for id 0). Quiet when there is nothing to remove.
cmd_down() {
  need_root
  local ns link
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${ns_prefix}[0-9]+\$" || true); do
    ip netns del "$ns" 2>/dev/null || true  # deletes its eth0 and so the veth pair
  done
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 |
                grep -E "^${veth_prefix}[0-9]+\$" || true); do
    ip link del "$link" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  rm -rf "$state"
}

# tc on one interface: tbf at the root (rate limit), netem delay under it.
shape() {  # shape <netns or ""> <dev> <rate or ""> <delay or "">
  local ns=$1 dev=$2 rate=$3 delay=$4
  local -a tc_cmd=(tc)
  [ -n "$ns" ] && tc_cmd=(ip netns exec "$ns" tc)
  "${tc_cmd[@]}" qdisc del dev "$dev" root 2>/dev/null || true
  local delay_parent=(root handle 1:)
  if [ -n "$rate" ]; then
    # burst: at least 1/250 s of traffic (a 250 Hz kernel's tick) and 64 KiB (a GSO packet);
    # latency bounds the queue (beyond it tbf drops, and TCP backs off).
    "${tc_cmd[@]}" qdisc add dev "$dev" root handle 1: tbf rate "$rate" burst "$BURST" latency 100ms
    delay_parent=(parent 1:1 handle 10:)
  fi
  if [ -n "$delay" ] && [ "$NETEM" = yes ]; then
    "${tc_cmd[@]}" qdisc add dev "$dev" "${delay_parent[@]}" netem delay "$delay" limit 100000
  fi
}

# Whether this kernel has sch_netem (some VM and container kernels lack it): probed on the
# bridge, which has no traffic yet. Without it --delay is ignored with a warning.
probe_netem() {
  if tc qdisc add dev "$bridge" root handle 1: netem delay 1ms 2>/dev/null; then
    tc qdisc del dev "$bridge" root
    NETEM=yes
  else
    NETEM=no
  fi
}

# Bytes of burst for a tc rate such as 1gbit, 100mbit, 500kbit, 1000000 (bit/s).
burst_for_rate() {
  local r=${1,,} bits
  case "$r" in
    *gbit) bits=$(( ${r%gbit} * 1000000000 )) ;;
    *mbit) bits=$(( ${r%mbit} * 1000000 )) ;;
    *kbit) bits=$(( ${r%kbit} * 1000 )) ;;
    *bit) bits=${r%bit} ;;
    *[!0-9]*) die "--rate '$1': use an integer with gbit, mbit, kbit or bit (e.g. 1gbit)" ;;
    *) bits=$r ;;
  esac
  [ "$bits" -gt 0 ] 2>/dev/null || die "--rate '$1' must be > 0"
  local b=$(( bits / 8 / 250 ))
  [ "$b" -lt 65536 ] && b=65536
  echo "$b"
}

# Whether namespace $1 reaches address $2, without ping (not always installed): a TCP connect to
# a closed port there is refused at once if the address answers, and times out if not.
reachable() {
  local out
  out=$(ip netns exec "$1" timeout 3 bash -c "exec 3<>/dev/tcp/$2/9" 2>&1) && return 0
  grep -q "refused" <<<"$out"
}

cmd_up() {
  local hosts=0 rate="" delay=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --hosts) hosts=${2:-}; shift 2 ;;
      --hosts=*) hosts=${1#*=}; shift ;;
      --rate) rate=${2:-}; shift 2 ;;
      --rate=*) rate=${1#*=}; shift ;;
      --delay) delay=${2:-}; shift 2 ;;
      --delay=*) delay=${1#*=}; shift ;;
      *) die "up: unknown argument '$1' (want --hosts K [--rate R] [--delay D])" ;;
    esac
  done
  [[ "$hosts" =~ ^[0-9]+$ ]] && [ "$hosts" -ge 1 ] && [ "$hosts" -le 200 ] ||
    die "up: --hosts must be 1..200, got '$hosts'"
  [ "$rate" = none ] && rate=""
  [ "$delay" = none ] && delay=""
  [ -n "$rate" ] && BURST=$(burst_for_rate "$rate")
  need_root
  cmd_down
  mkdir -p "$state"
  # From here on a failure undoes the half-made cluster.
  trap 'echo "netns-cluster.sh: up failed; removing what it made" >&2; cmd_down' ERR

  ip link add "$bridge" type bridge
  ip addr add "$subnet.1/$mask" dev "$bridge"
  ip link set "$bridge" up
  NETEM=no
  if [ -n "$delay" ]; then
    probe_netem
    if [ "$NETEM" = no ]; then
      echo "netns-cluster.sh: warning: this kernel has no netem qdisc (sch_netem); --delay $delay" \
           "is ignored, links get only the rate limit" >&2
      delay=""
    fi
  fi
  local i ns
  for i in $(seq 1 "$hosts"); do
    ns=${ns_prefix}$i
    ip netns add "$ns"
    ip link add "${veth_prefix}$i" type veth peer name "qt${cluster}p$i"
    ip link set "qt${cluster}p$i" netns "$ns"
    ip netns exec "$ns" ip link set "qt${cluster}p$i" name eth0
    ip netns exec "$ns" ip addr add "$(host_ip "$i")/$mask" dev eth0
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set eth0 up
    ip link set "${veth_prefix}$i" master "$bridge"
    ip link set "${veth_prefix}$i" up
    if [ -n "$rate" ] || [ -n "$delay" ]; then
      shape "$ns" eth0 "$rate" "$delay"
      shape "" "${veth_prefix}$i" "$rate" "$delay"
    fi
  done
  trap - ERR
  {
    echo "hosts=$hosts"
    echo "rate=${rate:-unlimited}"
    echo "delay=${delay:-none}"
  } >"$state/config"
  : >"$state/hostfile"
  for i in $(seq 1 "$hosts"); do echo "$(host_ip "$i") slots=1" >>"$state/hostfile"; done

  # Every host must reach the bridge (mpirun) and its neighbour before we say "up".
  for i in $(seq 1 "$hosts"); do
    local peer=$(( i % hosts + 1 ))
    reachable "${ns_prefix}$i" "$subnet.1" ||
      { cmd_down; die "up: ${ns_prefix}$i cannot reach the bridge $subnet.1"; }
    reachable "${ns_prefix}$i" "$(host_ip "$peer")" ||
      { cmd_down; die "up: ${ns_prefix}$i cannot reach ${ns_prefix}$peer"; }
  done
  echo "netns-cluster: $hosts hosts up (${ns_prefix}1..${ns_prefix}$hosts, $(host_ip 1)..$(host_ip "$hosts")," \
       "links ${rate:-unlimited}${delay:+, delay $delay}); hostfile $state/hostfile"
}

cmd_status() {
  if [ ! -f "$state/config" ]; then
    echo "netns-cluster: down"
    return 0
  fi
  # shellcheck disable=SC1091
  . "$state/config"
  echo "netns-cluster: $hosts hosts, links $rate, delay $delay; hostfile $state/hostfile"
  local i
  for i in $(seq 1 "$hosts"); do
    local addr qd
    addr=$(ip netns exec "${ns_prefix}$i" ip -o -4 addr show dev eth0 2>/dev/null | awk '{print $4}')
    qd=$(ip netns exec "${ns_prefix}$i" tc qdisc show dev eth0 2>/dev/null | head -n 1 | cut -c1-70)
    echo "  ${ns_prefix}$i ${addr:-MISSING}  eth0: ${qd:-?}"
  done
}

cmd_run() {
  local np=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --np) np=${2:-}; shift 2 ;;
      --np=*) np=${1#*=}; shift ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  [ $# -gt 0 ] || die "run: nothing to run (usage: run [--np N] -- <program and args>)"
  [ -f "$state/config" ] || die "run: the cluster is down; run 'netns-cluster.sh up --hosts K' first"
  # shellcheck disable=SC1091
  . "$state/config"
  np=${np:-$hosts}
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  local -a oversub=()
  [ "$np" -gt "$hosts" ] && oversub=(--oversubscribe)
  exec "${MPIRUN:-mpirun}" -np "$np" "${oversub[@]}" --hostfile "$state/hostfile" \
    --mca plm_rsh_agent "$here/netns-agent.sh" --mca plm_rsh_no_tree_spawn 1 \
    --mca btl self,tcp --mca btl_tcp_if_include "$subnet.0/$mask" \
    --mca oob_tcp_if_include "$subnet.0/$mask" \
    -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM "$@"
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  up) cmd_up "$@" ;;
  down) cmd_down; echo "netns-cluster: down" ;;
  status) cmd_status ;;
  run) cmd_run "$@" ;;
  -h|--help|help) usage ;;
  *) die "unknown command '$command' (want up, down, run or status)" ;;
esac
