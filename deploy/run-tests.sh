#!/usr/bin/env bash
# Builds qtrain and runs every test: each libFuzzer target for a short while (clang, ASan),
# then the GoogleTest suites through ctest. Exits non-zero on the first failure.
#   QTRAIN_FUZZ_SECONDS  seconds per fuzz target (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

echo "== fuzz targets (clang, -fsanitize=fuzzer,address)"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DQTRAIN_FUZZ=ON -DQTRAIN_BUILD_TESTS=OFF -DQTRAIN_BUILD_BENCH=OFF -DQTRAIN_CUDA=OFF >/dev/null
cmake --build build-fuzz --target fuzzers -j "$jobs"
mkdir -p build-fuzz/artifacts
for f in build-fuzz/bin/fuzz/*_fuzzer; do
  name=$(basename "$f")
  corpus="build-fuzz/corpus/$name"
  log="build-fuzz/$name.log"
  mkdir -p "$corpus"
  if ! "$f" "$corpus" -max_total_time="${QTRAIN_FUZZ_SECONDS:-20}" -rss_limit_mb=2048 \
      -malloc_limit_mb=512 -timeout=10 -seed=1 \
      -artifact_prefix="build-fuzz/artifacts/$name-" >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz target $name failed; the input is in build-fuzz/artifacts/"
    exit 1
  fi
  echo "$name: $(grep -E '^#[0-9]+' "$log" | tail -n 1)"
done

echo "== unit tests (g++, Release)"
bash deploy/build.sh
ctest --test-dir build --output-on-failure -j "$jobs"
