#!/usr/bin/env bash
# The compressed-allreduce benchmark on this machine's GPUs: worker/bench/allreduce_bench (each
# codec's full AllReduceMeanDevice, encode + communicate + decode, against ncclAllReduce fp32 at
# 16, 64 and 256 MB) with one rank per GPU through deploy/launch-local.sh, once over NVLink/P2P
# (NCCL's defaults) and once over the socket transport (NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1
# NCCL_NET=Socket: the GPUs talk through host TCP sockets, standing in for a multi-node job).
#
#   bash deploy/allreduce-bench.sh [-n GPUS] [--out DIR] [--allreduce=allgather|reduce_scatter|both]
#        [--bench "CMD"] [--sizes 16,64,256] [--codecs fp32,onebit,terngrad,qsgd,threshold,fp16]
#        [--iters 20] [--warmup 3] [--networks "nvlink socket"]
#
# Defaults: every GPU nvidia-smi lists (at least 2 are needed for a meaningful figure), --out
# build/allreduce-bench, both algorithms, --bench build/bin/allreduce_bench (a command prefix is
# fine, e.g. "/tmp/q/run allreduce_bench" from deploy/device-bundle.sh). NCCL_NVLS_ENABLE=0 is
# exported by the launcher.
#
# Output in DIR: allreduce-<network>.json (allreduce_bench --json: one record per codec, algorithm
# and size with ms, algbw_gbps, speedup_vs_fp32, bytes_sent_per_rank, verified), the logs
# allreduce-<network>.log, and summary.txt: the 256 MB speed-ups against the targets (onebit >=
# 2x over NVLink and >= 5x over sockets; terngrad and qsgd >= 1.5x and >= 4x).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

gpus=""
out=build/allreduce-bench
allreduce=both
bench=build/bin/allreduce_bench
sizes=16,64,256
codecs=fp32,onebit,terngrad,qsgd,threshold,fp16
iters=20
warmup=3
networks="nvlink socket"
usage() { echo "allreduce-bench.sh: $*" >&2; echo "see: bash deploy/allreduce-bench.sh --help" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    -n) gpus=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --allreduce) allreduce=$2; shift 2 ;;
    --allreduce=*) allreduce=${1#--allreduce=}; shift ;;
    --bench) bench=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --codecs) codecs=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --networks) networks=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage "unknown argument '$1'" ;;
  esac
done
case "$allreduce" in allgather|reduce_scatter|both) ;; *) usage "--allreduce must be allgather, reduce_scatter or both" ;; esac
for net in $networks; do
  case "$net" in nvlink|socket) ;; *) usage "--networks takes nvlink and/or socket; got '$net'" ;; esac
done
if [ -z "$gpus" ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$gpus" -ge 1 ] 2>/dev/null || usage "no GPU found by nvidia-smi; pass -n"
fi
[[ $gpus =~ ^[1-9][0-9]*$ ]] || usage "-n must be a positive integer; got '$gpus'"
read -r -a bench_cmd <<<"$bench"
if [ "${bench_cmd[0]}" = build/bin/allreduce_bench ] && [ ! -x build/bin/allreduce_bench ]; then
  echo "allreduce-bench.sh: build/bin/allreduce_bench is missing (configure with CUDA and build the" \
       "allreduce_bench target)" >&2
  exit 1
fi
[ "$gpus" -ge 2 ] || echo "allreduce-bench.sh: warning: one GPU measures no communication" >&2
mkdir -p "$out"
out=$(cd "$out" && pwd)

for net in $networks; do
  env_vars=()
  [ "$net" = socket ] && env_vars=(NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket)
  echo "== $net: $gpus ranks ${env_vars[*]:-}"
  if ! env ${env_vars[@]+"${env_vars[@]}"} bash deploy/launch-local.sh -n "$gpus" -- \
      "${bench_cmd[@]}" --label="$net" --allreduce="$allreduce" --sizes_mb="$sizes" \
      --codecs="$codecs" --iters="$iters" --warmup="$warmup" --json="$out/allreduce-$net.json" \
      2>&1 | tee "$out/allreduce-$net.log"; then
    echo "allreduce-bench.sh: the $net run failed (see $out/allreduce-$net.log)" >&2
    exit 1
  fi
done

if command -v python3 >/dev/null 2>&1; then
  python3 - "$out" $networks <<'EOF' | tee "$out/summary.txt"
import json, sys
out, nets = sys.argv[1], sys.argv[2:]
targets = {"onebit": {"nvlink": 2.0, "socket": 5.0},
           "terngrad": {"nvlink": 1.5, "socket": 4.0},
           "qsgd": {"nvlink": 1.5, "socket": 4.0}}
print("256 MB speed-up over ncclAllReduce fp32 (end to end: encode + communicate + decode)")
print(f"{'network':8} {'codec':10} {'algorithm':15} {'ms':>9} {'fp32 ms':>9} {'speedup':>8} {'target':>7}  met")
for net in nets:
    data = json.load(open(f"{out}/allreduce-{net}.json"))
    rows = [r for r in data["results"] if r["mb"] == 256]
    fp32 = next((r for r in rows if r["codec"] == "fp32"), None)
    for r in rows:
        if r["codec"] == "fp32":
            continue
        target = targets.get(r["codec"], {}).get(net)
        met = "" if target is None else ("yes" if r["speedup_vs_fp32"] >= target else "NO")
        print(f"{net:8} {r['codec']:10} {r['algorithm']:15} {r['ms']:9.3f} "
              f"{fp32['ms'] if fp32 else float('nan'):9.3f} {r['speedup_vs_fp32']:7.2f}x "
              f"{'' if target is None else f'{target:.1f}x':>7}  {met}")
EOF
else
  echo "results: $out/allreduce-*.json (no python3 here for the summary)"
fi
