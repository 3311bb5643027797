#!/usr/bin/env bash
# qtrain across 4 "hosts" that are network namespaces (deploy/netns-cluster.sh): each rank must run
# in its own namespace with its own address and host name, a 4-rank 1-bit SGD run on 512
# Fashion-MNIST images must learn and end with identical weights, its traffic must cross every
# host's (1 Gbit/s, tc tbf) link, and `down` must leave nothing behind.
# Needs root and `ip netns` (CAP_SYS_ADMIN + CAP_NET_ADMIN); where they are not permitted (e.g. an
# unprivileged container) it says so and exits 77, which ctest reports as skipped.
# Usage: netns_mpi_test.sh <path to qtrain> [<path to mpirun>]
set -uo pipefail
qtrain=$1
export MPIRUN=${2:-mpirun}
cluster_sh="$(cd "$(dirname "$0")/../.." && pwd)/deploy/netns-cluster.sh"
# A cluster id of its own (namespaces qtrain42-h1..4, 10.77.42.0/24), so that the test never
# touches a cluster someone brought up with the default id.
export QTRAIN_NETNS_CLUSTER=${QTRAIN_NETNS_CLUSTER:-42}
ns=qtrain$QTRAIN_NETNS_CLUSTER-h
veth=qt${QTRAIN_NETNS_CLUSTER}v
source "$(dirname "$0")/check_lib.sh"
require_netns netns_mpi_test

trap 'bash "$cluster_sh" down >/dev/null 2>&1' EXIT

fail() { failed=$((failed + 1)); echo "FAIL $*"; }

# Two ups in a row: the second must clear the first (as after a crashed run).
check "up 4 hosts (tc tbf 1gbit)" 0 "4 hosts up" -- bash "$cluster_sh" up --hosts 4 --rate 1gbit
check "up again is idempotent" 0 "4 hosts up .*10\.77\.$QTRAIN_NETNS_CLUSTER\.11\.\.10\.77\.$QTRAIN_NETNS_CLUSTER\.14" -- \
  bash "$cluster_sh" up --hosts 4 --rate 1gbit
check "status lists the hosts and their tbf" 0 "${ns}4 10\.77\.$QTRAIN_NETNS_CLUSTER\.14/24 +eth0: qdisc tbf" -- \
  bash "$cluster_sh" status

# Each rank reports its host name, its only non-loopback address and its network namespace inode.
check "every rank runs in its own namespace" 0 "rank=" -- timeout 60 bash "$cluster_sh" run -- \
  sh -c 'echo "rank=$OMPI_COMM_WORLD_RANK host=$(hostname) addr=$(ip -o -4 addr show dev eth0 | awk "{print \$4}") netns=$(readlink /proc/self/ns/net)"'
for what in host addr netns; do
  n=$(grep -Eo "$what=[^ ]+" <<<"$last_output" | sort -u | wc -l)
  [ "$n" -eq 4 ] || fail "4 ranks should show 4 distinct $what values, got $n: $last_output"
done
for i in 1 2 3 4; do
  grep -q "host=$ns$i addr=10.77.$QTRAIN_NETNS_CLUSTER.$((10 + i))/24" <<<"$last_output" ||
    fail "no rank ran on $ns$i with 10.77.$QTRAIN_NETNS_CLUSTER.$((10 + i)): $last_output"
done
[ "$(grep -Eo "netns=[^ ]+" <<<"$last_output" | grep -c "$(readlink /proc/self/ns/net)")" -eq 0 ] ||
  fail "a rank ran in the root network namespace"

bytes_of() { cat "/sys/class/net/$veth$1/statistics/$2_bytes" 2>/dev/null || echo 0; }
declare -A rx0 tx0
for i in 1 2 3 4; do rx0[$i]=$(bytes_of "$i" rx); tx0[$i]=$(bytes_of "$i" tx); done

# 512 images / 4 ranks / batch 16 = 8 steps per epoch; 1-bit SGD with error feedback.
learns="final_test_accuracy=([5-9][0-9]|100)\."
same="weights hash: [0-9a-f]{16} identical on all 4 ranks"
check "onebit: 4 namespaced ranks learn, identical weights" 0 \
  "$same.*$learns.*ranks=4 codec=onebit bytes_sent=[0-9]+ \(fp32 would send [0-9]+, ratio (2[0-9]|3[0-9])\.[0-9]x\)" -- \
  timeout 90 bash "$cluster_sh" run -- "$qtrain" --max_train=512 --max_test=300 --batch_size=16 \
  --threads=1 --progress=false --epochs=2 --codec=onebit
# ~1.8 MB of payload per rank over 16 steps (sent to 3 peers through the bridge): each host's link
# must have carried at least 1 MB each way.
for i in 1 2 3 4; do
  rx=$(( $(bytes_of "$i" rx) - rx0[$i] ))
  tx=$(( $(bytes_of "$i" tx) - tx0[$i] ))
  if [ "$rx" -lt 1000000 ] || [ "$tx" -lt 1000000 ]; then
    fail "host $i's link carried only $rx bytes out / $tx bytes in (want >= 1 MB each way)"
  fi
done

check "down" 0 "down" -- bash "$cluster_sh" down
left=$(ip netns list | grep -c "^$ns")
[ "$left" -eq 0 ] || fail "down left $left namespaces"
[ -z "$(ip -o link show | grep -E ": ($veth[0-9]+|qtbr$QTRAIN_NETNS_CLUSTER)[@:]")" ] ||
  fail "down left links: $(ip -o link show | grep -E "$veth|qtbr$QTRAIN_NETNS_CLUSTER")"
check "run after down is a clear error" 1 "cluster is down" -- bash "$cluster_sh" run -- true

finish
