#!/usr/bin/env bash
# The scaling benchmark of compressed data-parallel training: on K namespaced hosts
# (deploy/netns-cluster.sh) with rate-limited links and again with unlimited links, trains each
# model a fixed number of steps with the fp32 allreduce and with each codec, and prints, per run,
# the step time, the speed-up over fp32, the payload bytes each rank sends per step against the
# codec's formula, and the compression ratio. Run as root (it creates network namespaces).
#
#   bash deploy/scaling-bench.sh [--qtrain PATH] [--hosts 4] [--rate 1gbit] [--out DIR]
#        [--models "mlp-wide cnn"] [--codecs "fp32 onebit ..."] [--batch 32]
#        [--steps "mlp-wide=8 cnn=16"] [--warmup 2] [--networks "rate unlimited"]
#
# Defaults: 4 hosts, 1gbit, models mlp-wide (36.8M parameters, the communication-heavy one) and
# cnn (0.87M), codecs fp32 fp32@ring onebit terngrad qsgd:levels=16 threshold:tau=0.003 fp16,
# batch 32 per rank, --threads=1 per rank, 8 steps of mlp-wide and 16 of cnn of which the first
# --warmup are not timed. --qtrain defaults to build/bin/qtrain (built by deploy/build.sh if
# missing). Takes ~7 minutes on 2 cores.
#
# Two fp32 yardsticks: "fp32" is qtrain's fp32 path as it runs by default (MPI_Iallreduce with
# MPI_IN_PLACE, for which Open MPI 4.1's libnbc always picks its binomial reduce+broadcast: each
# link carries up to 2 x 4n bytes each way, one after the other); "fp32@ring" is the same run with
# OMPI_MCA_coll_libnbc_iallreduce_algorithm=1, the bandwidth-optimal ring (2(K-1)/K x 4n per link),
# the fair baseline. Speed-ups are given against both. Results go to DIR (default build/scaling-bench): per run the log,
# the metrics JSONL and a JSON record; summary.jsonl (all records) and summary.txt (the table).
#
# Step time: rank 0's per-step metric records (--log_every=1), seconds = batch / images_per_second
# of that step, averaged over the steps after the warm-up. It includes compute, which with 4 ranks
# oversubscribing few cores is slow: the speed-up is that of the whole step, not of the
# communication alone (the "comm" column is the seconds per step spent waiting in collectives).
#
# Bytes per step per rank: the serialized payload (compression/wire.h envelope) a rank contributes
# per step, from the metrics' bytes_sent (the allgather sends it to the other K-1 ranks; the fp32
# row counts the 4n bytes of the allreduce input, as the trainer's "fp32 would send" does). The
# formula for n gradient elements, from the codec headers in compression/ (plus a few dozen bytes
# of envelope per bucket, not counted; buckets are 1-D so onebit uses 2048-element columns):
#   fp32      4n                                    fp16       2n
#   onebit    n/8 + 8 per 2048-element column      = 0.12890625 n   (1.03 bits per element)
#   terngrad  n/4 + 4 per bucket (the scale)       ~ 0.25 n          (2 bits)
#   qsgd      n*b/8 + 4 per d-element bucket, b = 1 + ceil(log2(s+1)); s=16, d=512: 0.7578125 n
#   threshold depends on the data: one 1..5-byte varint per element with |v| > tau (the density
#             is printed instead)
set -Eeuo pipefail
cd "$(dirname "$0")/.."

qtrain=build/bin/qtrain
hosts=4
rate=1gbit
out=build/scaling-bench
models="mlp-wide cnn"
codecs="fp32 fp32@ring onebit terngrad qsgd:levels=16 threshold:tau=0.003 fp16"
batch=32
steps="mlp-wide=8 cnn=16"
warmup=2
networks="rate unlimited"
table_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --qtrain) qtrain=$2; shift 2 ;;
    --hosts) hosts=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --codecs) codecs=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --networks) networks=$2; shift 2 ;;
    --table) table_only=1; out=$2; shift 2 ;;
    -h|--help) sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scaling-bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case " $codecs " in *" fp32 "*) ;; *) codecs="fp32 $codecs" ;; esac  # the yardstick comes first
[ "$(id -u)" -eq 0 ] || { echo "scaling-bench.sh: must run as root (network namespaces)" >&2; exit 1; }
if [ ! -x "$qtrain" ]; then
  [ "$qtrain" = build/bin/qtrain ] || { echo "scaling-bench.sh: no qtrain at $qtrain" >&2; exit 1; }
  bash deploy/build.sh
fi
qtrain=$(cd "$(dirname "$qtrain")" && pwd)/$(basename "$qtrain")

# A cluster id of its own (10.77.1.0/24, namespaces qtrain1-h*), so that a cluster brought up by
# hand with the default id is left alone; removed on exit, however the script ends.
export QTRAIN_NETNS_CLUSTER=${QTRAIN_NETNS_CLUSTER:-1}
cluster() { bash deploy/netns-cluster.sh "$@"; }
trap 'cluster down >/dev/null 2>&1 || true' EXIT
mkdir -p "$out"

steps_for() {  # the --steps entry of model $1 (default 8)
  local kv
  for kv in $steps; do [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }; done
  echo 8
}

# Expected payload bytes per step for codec spec $1 and n elements ("" when data-dependent).
formula_bytes() {
  awk -v spec="$1" -v n="$2" 'BEGIN {
    split(spec, a, ":"); codec = a[1]; s = 16; d = 512
    m = split(a[2], kv, ",")
    for (i = 1; i <= m; i++) { split(kv[i], p, "="); if (p[1] == "levels") s = p[2]; if (p[1] == "bucket") d = p[2] }
    if (codec == "fp32") printf "%d", 4 * n
    else if (codec == "fp16") printf "%d", 2 * n
    else if (codec == "onebit") printf "%d", n / 8 + 8 * int((n + 2047) / 2048)
    else if (codec == "terngrad") printf "%d", n / 4 + 4
    else if (codec == "qsgd") { b = 1; while (2 ^ (b - 1) < s + 1) b++; printf "%d", n * b / 8 + 4 * int((n + d - 1) / d) }
    else printf ""
  }'
}

# Mean over the steps after the warm-up of a numeric field of rank 0's step records.
mean_field() {  # mean_field <jsonl> <field> [divide-into]
  awk -v f="$2" -v w="$warmup" -v num="${3:-}" '
    /"type":"step"/ {
      if (!match($0, "\"step\":[0-9]+")) next
      step = substr($0, RSTART + 7, RLENGTH - 7) + 0
      if (step <= w) next
      if (!match($0, "\"" f "\":[-0-9.e+]+")) next
      v = substr($0, RSTART + length(f) + 3, RLENGTH - length(f) - 3) + 0
      if (num != "") v = (v > 0 ? num / v : 0)
      sum += v; k++
    }
    END { if (k) printf "%.6f", sum / k; else printf "nan" }' "$1"
}

run_one() {  # run_one <network label> <model> <codec spec>
  local net=$1 model=$2 codec=${3%@ring} label=$3
  local -a env_mca=()
  [ "$label" = fp32@ring ] && env_mca=(env OMPI_MCA_coll_libnbc_iallreduce_algorithm=1)
  local n_steps tag log jsonl
  n_steps=$(steps_for "$model")
  tag="${net}_${model}_$(tr ':=,@' '_-__' <<<"$label")"
  log="$out/$tag.log"
  jsonl="$out/$tag.jsonl"
  rm -f "$jsonl"
  local start=$SECONDS
  if ! timeout 900 "${env_mca[@]}" bash deploy/netns-cluster.sh run -- "$qtrain" --model="$model" \
      --max_train=$((hosts * batch * n_steps)) --max_test=100 --batch_size="$batch" --threads=1 \
      --epochs=1 --max_steps_per_epoch="$n_steps" --lr_schedule=constant --log_every=1 \
      --progress=false --metrics="$jsonl" --codec="$codec" >"$log" 2>&1; then
    echo "scaling-bench.sh: $tag failed; the end of $log:" >&2
    tail -n 15 "$log" >&2
    exit 1
  fi
  local params step comm bytes formula ratio vs_formula density
  params=$(grep -Eo "model $model, [0-9]+ parameters" "$log" | grep -Eo "[0-9]+ parameters" | cut -d' ' -f1)
  grep -Eq "weights hash: [0-9a-f]{16} identical on all $hosts ranks" "$log" ||
    { echo "scaling-bench.sh: $tag: no identical-weights line in $log" >&2; exit 1; }
  step=$(mean_field "$jsonl" images_per_second "$batch")
  comm=$(mean_field "$jsonl" seconds_communicate)
  bytes=$(mean_field "$jsonl" bytes_sent)
  formula=$(formula_bytes "$codec" "$params")
  ratio=$(awk -v n="$params" -v b="$bytes" 'BEGIN { printf "%.1f", (b > 0 ? 4 * n / b : 0) }')
  vs_formula=$(awk -v f="$formula" -v b="$bytes" 'BEGIN { if (f == "") printf "null"; else printf "%.4f", b / f }')
  density=$(awk -v n="$params" -v b="$bytes" 'BEGIN { printf "%.4f", b / n }')
  local link
  if [ "$net" = rate ]; then link=$rate; else link=unlimited; fi
  printf '{"link":"%s","hosts":%d,"model":"%s","params":%d,"codec":"%s","batch":%d,"steps":%d,"timed_steps":%d,"step_seconds":%s,"communicate_seconds":%s,"bytes_per_step_per_rank":%.0f,"formula_bytes":%s,"measured_over_formula":%s,"bytes_per_element":%s,"compression_ratio":%s,"log":"%s","metrics":"%s"}\n' \
    "$link" "$hosts" "$model" "$params" "$label" "$batch" "$n_steps" "$((n_steps - warmup))" \
    "$step" "$comm" "$bytes" "${formula:-null}" "$vs_formula" "$density" "$ratio" \
    "$log" "$jsonl" | tee "$out/$tag.json" >>"$out/runs.jsonl"
  printf '  %-9s %-9s %-22s step %7.3f s  comm %7.3f s  %10.0f B/step  (formula %s)  %5.1fx  [%d s]\n' \
    "$link" "$model" "$label" "$step" "$comm" "$bytes" "${formula:-data-dependent}" \
    "$ratio" "$((SECONDS - start))"
}

# summary.jsonl: every run's record with its speed-ups over the two fp32 yardsticks of the same
# link and model; summary.txt: the table. (--table DIR re-prints them from DIR/runs.jsonl.)
print_table() {
  awk '
    function field(name,   re, v) {
      re = "\"" name "\":(\"[^\"]*\"|[-0-9.e+]+|null)"
      if (!match($0, re)) return ""
      v = substr($0, RSTART + length(name) + 3, RLENGTH - length(name) - 3); gsub("\"", "", v); return v
    }
    NR == FNR {
      if (field("codec") == "fp32") fp32[field("link") "/" field("model")] = field("step_seconds")
      if (field("codec") == "fp32@ring") ring[field("link") "/" field("model")] = field("step_seconds")
      next
    }
    {
      k = field("link") "/" field("model"); t = field("step_seconds")
      a = (k in fp32 && t > 0) ? sprintf("%.2f", fp32[k] / t) : "null"
      b = (k in ring && t > 0) ? sprintf("%.2f", ring[k] / t) : "null"
      line = $0; sub(/}$/, ",\"speedup_vs_fp32\":" a ",\"speedup_vs_fp32_ring\":" b "}", line)
      print line
    }' "$out/runs.jsonl" "$out/runs.jsonl" >"$out/summary.jsonl"
  {
    echo "scaling: $hosts hosts (network namespaces), batch $batch per rank, --threads=1, $(nproc) cores;" \
         "step time = mean over the steps after the first $warmup; load average at the start" \
         "$(cat "$out/loadavg" 2>/dev/null || echo unknown)"
    printf '| %-9s | %-8s | %-22s | %9s | %8s | %8s | %9s | %15s | %14s | %9s | %6s |\n' link model \
      codec "step (s)" "vs fp32" "vs ring" "comm (s)" "bytes/step/rank" "formula" "meas/form" ratio
    printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' -----------  ---------- ------------------------ \
      ----------- ---------- ---------- ----------- ----------------- ---------------- ----------- --------
    awk '
      function field(name,   re, v) {
        re = "\"" name "\":(\"[^\"]*\"|[-0-9.e+]+|null)"
        if (!match($0, re)) return ""
        v = substr($0, RSTART + length(name) + 3, RLENGTH - length(name) - 3); gsub("\"", "", v); return v
      }
      function x(v) { return v == "null" ? "-" : sprintf("%.2fx", v) }
      {
        f = field("formula_bytes"); mf = field("measured_over_formula")
        printf "| %-9s | %-8s | %-22s | %9.3f | %8s | %8s | %9.3f | %15.0f | %14s | %9s | %5.1fx |\n",
          field("link"), field("model"), field("codec"), field("step_seconds"),
          x(field("speedup_vs_fp32")), x(field("speedup_vs_fp32_ring")),
          field("communicate_seconds"), field("bytes_per_step_per_rank"),
          (f == "null" ? "data-dep." : f), (mf == "null" ? "-" : mf), field("compression_ratio")
      }' "$out/summary.jsonl"
  } | tee "$out/summary.txt"
  echo "results: $out/summary.txt, $out/summary.jsonl, and per run $out/<link>_<model>_<codec>.{log,jsonl,json}"
}

if [ -n "$table_only" ]; then
  print_table
  exit 0
fi
: >"$out/runs.jsonl"
cut -d' ' -f1-3 /proc/loadavg >"$out/loadavg"  # other work on the machine skews the step times
for net in $networks; do
  case "$net" in
    rate) cluster up --hosts "$hosts" --rate "$rate" ;;
    unlimited) cluster up --hosts "$hosts" ;;
    *) echo "scaling-bench.sh: --networks takes 'rate' and/or 'unlimited', got '$net'" >&2; exit 2 ;;
  esac
  for model in $models; do
    for codec in $codecs; do run_one "$net" "$model" "$codec"; done
  done
done
cluster down >/dev/null
print_table
