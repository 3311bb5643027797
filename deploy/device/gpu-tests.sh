#!/usr/bin/env bash
# Every GPU test binary on a GPU host, one after another, from a bundle made here with
#   bash deploy/device-bundle.sh $(bash deploy/device/gpu-tests.sh --list)
# and carried as devrun/ (the `device` tool). Prints one line per binary and a summary; exits 1 if
# any binary failed (a skipped test is not a failure: the NCCL tests that need two GPUs skip on
# one). Logs go to $OUT (or /tmp/gpu-tests when OUT is unset) as one tarball, gpu-tests.tgz.
# On a GPU machine with the Debian packages, `ctest --test-dir build -L gpu` runs the same tests.
set -u
tests="cuda_util_test cuda_activation_test cuda_batch_norm_test cuda_conv_test cuda_elementwise_test
cuda_optimizer_test cuda_pooling_test cuda_quantize_test cuda_sgemm_test cuda_softmax_xent_test
cuda_codec_host_test cuda_codec_test cuda_conformance_test gpu_quant_layers_test cuda_engine_test
nccl_communicator_test rendezvous_test"
if [ "${1:-}" = "--list" ]; then
  for t in $tests; do printf 'tests/%s ' "$t"; done
  echo
  exit 0
fi
export NCCL_NVLS_ENABLE=0
out=${OUT:-/tmp/gpu-tests}
logs=$(mktemp -d)
mkdir -p /tmp/q "$out" && tar xJf devrun/bundle.tar.xz -C /tmp/q
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$logs/gpus.txt" 2>&1
failed=0
for t in $tests; do
  timeout 300 /tmp/q/run "$t" > "$logs/$t.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && failed=1
  echo "$t rc=$rc $(grep -E '^\[  (PASSED|FAILED|SKIPPED)  \] [0-9]+ test' "$logs/$t.log" | tr '\n' ' ')"
done | tee "$logs/summary.txt"
grep -q 'rc=[1-9]' "$logs/summary.txt" && failed=1
tar czf "$out/gpu-tests.tgz" -C "$logs" .
echo "GPUs: $(tr '\n' ';' < "$logs/gpus.txt") failed=$failed"
exit $failed
