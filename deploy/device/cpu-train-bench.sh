#!/usr/bin/env bash
# Run on a GPU host through the `device` tool (carry devrun/, made by deploy/device-bundle.sh --data
# qtrain kernel_bench): the training-step benchmarks at 2 threads (FP32 and quantized) beside
# PyTorch, each pinned to cores 0,1, then (optionally) continues a resnet20 FP32 run from
# devrun/ck with every core for TRAIN_SECONDS.
#   BENCH_REPS=3 TRAIN_SECONDS=0 bash deploy/device/cpu-train-bench.sh
set -u
mkdir -p /tmp/q && tar xJf devrun/bundle.tar.xz -C /tmp/q
(lscpu; nproc; free -g) > "$OUT/machine.txt" 2>&1
for rep in $(seq 1 "${BENCH_REPS:-1}"); do
  taskset -c 0,1 python3 worker/bench/pytorch_train_step.py --threads 2 --models cnn,resnet20 2>&1 | tee -a "$OUT/pytorch.txt"
  taskset -c 0,1 /tmp/q/run kernel_bench --benchmark_filter='BM_TrainStep/model:[12]/batch:128/threads:2/' 2>&1 |
    grep -v WARNING | tee -a "$OUT/qtrain_bench.txt"
done
if [ "${TRAIN_SECONDS:-0}" -gt 0 ]; then
  mkdir -p "$OUT/ck"
  [ -f devrun/ck/checkpoint.qtrn ] && cp devrun/ck/checkpoint.qtrn "$OUT/ck/"
  timeout "$TRAIN_SECONDS" /tmp/q/run qtrain --model=resnet20 --data=idx:/tmp/q/data/fashion-mnist --epochs=15 \
    --threads="$(nproc)" --checkpoint_dir="$OUT/ck" --metrics="$OUT/r20.jsonl" --resume --progress=false > "$OUT/r20.log" 2>&1
  tail -3 "$OUT/r20.log"
fi
