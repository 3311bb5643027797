#!/usr/bin/env bash
# The parameter-server cluster of docker-compose.yml on namespaced hosts (deploy/netns-ps.sh over
# deploy/netns-cluster.sh, 1 Gbit/s tc links): 2 qserver shards and 2 workers, each on its own
# host and address; onebit up and down must learn on 512 Fashion-MNIST images with identical
# weights, every host's link must carry the gRPC traffic, a worker pointed at a dead address
# must fail with a clear error, and `down` must leave nothing behind.
# Needs root and `ip netns`; exits 77 (ctest: skipped) where they are not permitted.
# Usage: netns_ps_test.sh <qtrain> <qserver>
set -uo pipefail
export QTRAIN=$1 QSERVER=$2
deploy="$(cd "$(dirname "$0")/../.." && pwd)/deploy"
export QTRAIN_NETNS_CLUSTER=${QTRAIN_NETNS_CLUSTER:-43}
veth=qt${QTRAIN_NETNS_CLUSTER}v
ns=qtrain$QTRAIN_NETNS_CLUSTER-h
source "$(dirname "$0")/check_lib.sh"
require_netns netns_ps_test
work=$(mktemp -d)
trap 'bash "$deploy/netns-cluster.sh" down >/dev/null 2>&1; rm -rf "$work"' EXIT
fail() { failed=$((failed + 1)); echo "FAIL $*"; }

check "up 4 hosts (tc tbf 1gbit)" 0 "4 hosts up" -- \
  bash "$deploy/netns-cluster.sh" up --hosts 4 --rate 1gbit
bytes_of() { cat "/sys/class/net/$veth$1/statistics/$2_bytes" 2>/dev/null || echo 0; }
declare -A rx0 tx0
for i in 1 2 3 4; do rx0[$i]=$(bytes_of "$i" rx); tx0[$i]=$(bytes_of "$i" tx); done

flags=(--max_train=512 --max_test=300 --threads=1 --batch_size=16 --progress=false --epochs=2
       --bucket_mb=0.05 --comm_timeout=60)
check "2 servers + 2 workers on 4 hosts, onebit: learn, identical weights" 0 \
  "2 qserver shard\(s\) on ${ns}1\.\.2 \(10\.77\.$QTRAIN_NETNS_CLUSTER\.11:7070,10\.77\.$QTRAIN_NETNS_CLUSTER\.12:7070\).*ps: worker 0 of 2, 2 server\(s\) \(sync\).*weights hash: [0-9a-f]{16} identical on all 2 ranks.*final_test_accuracy=([4-9][0-9]|100)\..*ranks=2 codec=onebit" -- \
  timeout 120 bash "$deploy/netns-ps.sh" --servers 2 --workers 2 --out "$work/run" -- "${flags[@]}"
# Each worker pushes ~1.8 MB of onebit payload over 32 steps, split over the two shards, and
# pulls as much back: every host's link must have carried at least 0.5 MB each way.
for i in 1 2 3 4; do
  rx=$(( $(bytes_of "$i" rx) - rx0[$i] ))
  tx=$(( $(bytes_of "$i" tx) - tx0[$i] ))
  if [ "$rx" -lt 500000 ] || [ "$tx" -lt 500000 ]; then
    fail "host $i's link carried only $rx bytes out / $tx bytes in (want >= 0.5 MB each way)"
  fi
done
# SIGTERM at the end: each shard writes its final checkpoint before netns-ps.sh returns.
for s in 0 1; do
  [ -s "$work/run/ckpt/qserver.shard$s.ckpt" ] ||
    fail "shard $s left no checkpoint: $(tail -n 3 "$work/run/server$s.log")"
done

# Too few hosts, and qtrain flags before -- : clear usage errors, nothing started.
check "too many processes for the cluster" 2 "need 5 hosts; the cluster has 4" -- \
  bash "$deploy/netns-ps.sh" --servers 2 --workers 3 --out "$work/bad"
check "a qtrain flag before --" 2 "unknown option '--epochs=1'" -- \
  bash "$deploy/netns-ps.sh" --epochs=1

check "down" 0 "down" -- bash "$deploy/netns-cluster.sh" down
[ "$(ip netns list | grep -c "^$ns")" -eq 0 ] || fail "down left namespaces"
check "netns-ps after down is a clear error" 2 "the cluster is down" -- \
  bash "$deploy/netns-ps.sh" --servers 1 --workers 1
finish
