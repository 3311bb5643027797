#!/usr/bin/env bash
# The main job for now: build qtrain and print the codec benchmark summary (one core), every
# codec's throughput as a ratio to memcpy measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
taskset -c 0 build/bin/codec_bench --benchmark_color=false "$@"
