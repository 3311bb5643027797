#!/usr/bin/env bash
# The README's 15-epoch accuracy tables, on a GPU host through the `device` tool (carry devrun/,
# made here by `bash deploy/device-bundle.sh --data qtrain`). Runs are queued and stop being
# started when they could not end before DEADLINE seconds; whatever finished is packed into
# $OUT/tables.tgz (one log and metrics file per run, FP checkpoints, summary.txt).
#   RUNS="fp:cnn fp:resnet20 q:cnn:dorefa22 ... ldnq:cnn:3:dq ..." DEADLINE=540 bash deploy/device/tables.sh
# Run kinds:
#   fp:M            full-precision M on the GPU, 15 epochs, checkpoint kept (for the other kinds)
#   q:M:NAME        quantized M on the GPU, NAME from the list below; ft-NAME fine-tunes from fp:M
#   ldnq:M:L:METHOD qtrain ldnq of fp:M on two CPU cores, 600 calibration images
#   abl:M:ROW:K:SEED the schedule ablation (README, training schedules): ROW at K/K bits (DoReFa)
#                   with --seed=SEED, E epochs in all; ROW is fp (K ignored), base, ts, pq, guided,
#                   pqts, tsg, pqtsg, pqtsg2 (pqtsg with the first and last layers quantized too)
# FP checkpoints already under devrun/fp/M/ are used instead of training fp:M.
# MPS=1 runs the GPU jobs under an MPS daemon of this script's own (when the host has
# nvidia-cuda-mps-control), so that their small kernels share the GPU instead of taking turns:
# on one H200 with GPU_JOBS=8 MPS=1, each of 8 resnet20 runs at once trained at 5,000-9,000
# images/s (3,500 guided), against 28,000 for one FP run alone (the estimates below hold for it).
set -u
start=$SECONDS
mkdir -p /tmp/q && tar xJf devrun/bundle.tar.xz -C /tmp/q
E=${EPOCHS:-15}
DEADLINE=${DEADLINE:-540}
GPU_JOBS=${GPU_JOBS:-4}
CPU_JOBS=${CPU_JOBS:-6}
top=${OUT:-/tmp/out}
mps=0
if [ "${MPS:-0}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/qtrain-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/qtrain-mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY" && nvidia-cuda-mps-control -d && mps=1
fi
res=$top/tables
mkdir -p "$res/fp"
data=--data=idx:/tmp/q/data/fashion-mnist
for m in cnn resnet20; do
  [ -f devrun/fp/$m/checkpoint.qtrn ] && mkdir -p "$res/fp/$m" && cp devrun/fp/$m/checkpoint.qtrn "$res/fp/$m/" && touch "$res/fp/$m/done"
done

declare -A Q=(
  [dorefa44]="--quant=dorefa:w=4,a=4" [dorefa33]="--quant=dorefa:w=3,a=3" [dorefa22]="--quant=dorefa:w=2,a=2"
  [pactsawb44]="--wq=sawb:bits=4 --aq=pact:bits=4" [pactsawb33]="--wq=sawb:bits=3 --aq=pact:bits=3"
  [pactsawb22]="--wq=sawb:bits=2 --aq=pact:bits=2" [pactsawb22a3]="--wq=sawb:bits=2 --aq=pact:bits=2,alpha=3"
  [pactsawb44a3]="--wq=sawb:bits=4 --aq=pact:bits=4,alpha=3"
  [qil44]="--quant=qil:w=4,a=4" [qil33]="--quant=qil:w=3,a=3" [qil22]="--quant=qil:w=2,a=2"
  [binary]="--wq=binary" [ternary]="--wq=ternary"
)
# The ablation's flags for ROW at K/K bits over E epochs (phases split E as evenly as they can).
split() {  # split N PARTS -> "a,b,c" summing to N
  local n=$1 k=$2 i out=""
  for ((i = 0; i < k; i++)); do out+="${out:+,}$(( (n * (i + 1)) / k - (n * i) / k ))"; done
  echo "$out"
}
ablation_args() {  # ROW K
  local row=$1 k=$2 q="--quant=dorefa:w=$2,a=$2" bits
  if [ "$k" = 4 ]; then bits=32,8,4; else bits=32,8,4,2; fi
  local n=$(( $(tr -cd , <<<"$bits" | wc -c) + 1 ))  # pq steps
  case $row in
    fp) echo "--epochs=$E" ;;
    base) echo "$q --epochs=$E" ;;
    ts) echo "$q --schedule=ts --stage_epochs=$(split "$E" 2)" ;;
    pq) echo "$q --schedule=pq --bits=$bits --stage_epochs=$(split "$E" $n)" ;;
    guided) echo "$q --guided --epochs=$E" ;;
    pqts) echo "$q --schedule=pq+ts --bits=$bits --stage_epochs=$(split "$E" $((2 * n - 1)))" ;;
    tsg) echo "$q --schedule=ts --stage_epochs=$(split "$E" 2) --guided" ;;
    pqtsg) echo "$q --schedule=pq+ts --bits=$bits --stage_epochs=$(split "$E" $((2 * n - 1))) --guided" ;;
    pqtsg2) echo "$q --schedule=pq+ts --bits=$bits --stage_epochs=$(split "$E" $((2 * n - 1))) --guided --fp_first_last=false" ;;
    *) echo "unknown ablation row $row" >&2; return 1 ;;
  esac
}
# Seconds a run takes with GPU_JOBS sharing the GPU (H200), to decide whether it can still end.
estimate() {
  [ -n "${EST_FIXED:-}" ] && { echo "$EST_FIXED"; return; }  # for a dry run of this script
  case $1 in
    abl:cnn:*g*) echo 95 ;; abl:cnn:*) echo 55 ;;
    abl:resnet20:*g*) echo 350 ;; abl:resnet20:*) echo 200 ;;
    fp:cnn) echo 40 ;; fp:resnet20) echo 60 ;;
    q:cnn:*) echo 70 ;; q:resnet20:*) echo 200 ;;
    ldnq:cnn:*) echo 120 ;; ldnq:resnet20:*) echo 240 ;;
  esac
}
gpu_slot=0; cpu_slot=0
launch() {  # $1 = run; runs it in the background
  local run=$1 kind m rest args name
  IFS=: read -r kind m rest <<<"$run"
  local left=$((DEADLINE - (SECONDS - start)))
  case $kind in
    fp)
      name=fp-$m; mkdir -p "$res/fp/$m"
      cmd="taskset -c $((gpu_slot % GPU_JOBS)) timeout $left /tmp/q/run qtrain --model=$m $data --device=cuda --epochs=$E --threads=1 --progress=false --checkpoint_dir=$res/fp/$m --metrics=$res/$name.jsonl"
      gpu_slot=$((gpu_slot + 1)) ;;
    q)
      local base=${rest#ft-}; args=${Q[$base]}
      [ "$base" != "$rest" ] && args="$args --init_from=$res/fp/$m"
      name=$m-$rest
      cmd="taskset -c $((gpu_slot % GPU_JOBS)) timeout $left /tmp/q/run qtrain --model=$m $data --device=cuda --epochs=$E --threads=1 --progress=false $args --metrics=$res/$name.jsonl"
      gpu_slot=$((gpu_slot + 1)) ;;
    abl)
      local row k seed
      IFS=: read -r row k seed <<<"$rest"
      args=$(ablation_args "$row" "$k") || return
      name=abl-$m-$row-$k-s$seed
      cmd="taskset -c $((gpu_slot % GPU_JOBS)) timeout $left /tmp/q/run qtrain --model=$m $data --device=cuda --threads=1 --progress=false --seed=$seed $args ${ABL_ARGS:-} --metrics=$res/$name.jsonl"
      gpu_slot=$((gpu_slot + 1)) ;;
    ldnq)
      local L=${rest%%:*} method=${rest#*:}
      name=ldnq-$m-L$L-$method
      local c0=$((GPU_JOBS + 2 * (cpu_slot % CPU_JOBS)))
      cmd="taskset -c $c0,$((c0 + 1)) timeout $left /tmp/q/run qtrain ldnq --model=$m $data --checkpoint_dir=$res/fp/$m --out=/tmp/ldnq/$name --calib=600 --levels=$L --method=$method --threads=2 --metrics=$res/$name.jsonl"
      cpu_slot=$((cpu_slot + 1)) ;;
  esac
  echo "$((SECONDS - start)) s: start $run" >> "$res/schedule.txt"
  ( $cmd > "$res/$name.log" 2>&1; rc=$?
    [ $rc = 0 ] && [ "$kind" = fp ] && touch "$res/fp/$m/done"
    echo "$((SECONDS - start)) s: end $run rc=$rc" >> "$res/schedule.txt" ) &
  if [ "$kind" = ldnq ]; then cpu_pids+=($!); else gpu_pids+=($!); fi
}
gpu_pids=(); cpu_pids=()
alive() { local n=0 p; for p in "$@"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done; echo $n; }
# A run that needs fp:M waits until its checkpoint exists; GPU and CPU runs have separate slots.
pending=(${RUNS:?set RUNS})
while [ ${#pending[@]} -gt 0 ] && [ $((SECONDS - start)) -lt "$DEADLINE" ]; do
  next=()
  for run in "${pending[@]}"; do
    IFS=: read -r kind m rest <<<"$run"
    gpu_busy=$(alive "${gpu_pids[@]}"); cpu_busy=$(alive "${cpu_pids[@]}")
    need_fp=0; [ "$kind" != fp ] && { [ "$kind" = ldnq ] || [ "${rest#ft-}" != "$rest" ]; } && need_fp=1
    if [ $need_fp = 1 ] && [ ! -f "$res/fp/$m/done" ]; then next+=("$run"); continue; fi
    if [ $((SECONDS - start + $(estimate "$run"))) -gt "$DEADLINE" ]; then echo "skip $run (no time)" >> "$res/schedule.txt"; continue; fi
    if [ "$kind" = ldnq ] && [ "$cpu_busy" -lt "$CPU_JOBS" ]; then launch "$run"; sleep 1; continue; fi
    if [ "$kind" != ldnq ] && [ "$gpu_busy" -lt "$GPU_JOBS" ]; then launch "$run"; sleep 1; continue; fi
    next+=("$run")
  done
  pending=("${next[@]}")
  sleep 2
done
for run in "${pending[@]}"; do echo "not started $run" >> "$res/schedule.txt"; done
wait
[ $mps = 1 ] && echo quit | nvidia-cuda-mps-control
grep -h "summary:\|ldnq.*accuracy\|test accuracy" "$res"/*.log > "$res/summary.txt" 2>/dev/null
tar czf "$top/tables.tgz" -C "$top" tables
echo "done in $((SECONDS - start)) s (MPS: $mps)"; cat "$res/schedule.txt" | tail -5
