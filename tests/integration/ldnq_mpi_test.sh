#!/usr/bin/env bash
# Distributed L-DNQ calibration: `mpirun -np 2 qtrain ldnq` on synthetic data gives the result of
# the one-process run on the same calibration set. Compared: the test accuracy both print (equal),
# each layer's alpha and output error in the --metrics records (equal to 1e-5 / 1e-4 relative),
# and the two quantized networks on every test image (`eval` of the one-process checkpoint against
# the packed 2-rank model: no prediction differs, logits within 1e-3 relative). Tolerances, not
# bit equality, are the claim: the Hessian, BN and error sums are added in another order (the
# script also reports whether the checkpoints came out byte-identical, as they did so far, since
# all other work runs per whole batch exactly as in one process). A bad flag under mpirun ends
# the job with the error instead of hanging.
# Usage: ldnq_mpi_test.sh <path to qtrain> [<path to mpirun>]
set -uo pipefail
qtrain=$1
mpirun=${2:-mpirun}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Root in containers needs the two ALLOW variables; the vader BTL's single-copy (CMA) path needs
# ptrace rights that containers often lack.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
mpi=(timeout 120 "$mpirun" -np 2 --oversubscribe)

source "$(dirname "$0")/check_lib.sh"

syn="synthetic:n=512,test=200,classes=4,shape=1x8x8,seed=7"
check "FP cnn learns the synthetic data" 0 "final_test_accuracy=([5-9][0-9]|100)\." -- \
  "$qtrain" --model=cnn --data="$syn" --epochs=4 --batch_size=32 --threads=1 --progress=false \
  --checkpoint_dir="$work/fp"
# 250 calibration images in batches of 100, 100 and 50: rank 0 holds batches 0 and 2, rank 1
# batch 1 (the retrain exercises the label path of the broadcast gradients).
# ADMM kept short (30 iterations, one alpha start): the comparison, not the quality, is tested.
ldnq=(ldnq --model=cnn --data="$syn" --threads=1 --checkpoint_dir="$work/fp" --calib=250
      --levels=3 --admm_iters=30 --admm_alpha_starts=1 --retrain_epochs=1)
accuracy='ldnq: test accuracy [0-9.]+%'
check "one process" 0 "$accuracy" -- "$qtrain" "${ldnq[@]}" --out="$work/one" --metrics="$work/one.jsonl"
one=$(grep -Eo "$accuracy" <<<"$last_output")
check "two ranks: the ranks agree, rank 0 writes" 0 \
  "2 ranks: calibration batch b on rank b % 2.*weights hash [0-9a-f]{16} identical on all 2 ranks.*wrote $work/two/checkpoint.qtrn" -- \
  "${mpi[@]}" "$qtrain" "${ldnq[@]}" --out="$work/two" --metrics="$work/two.jsonl"
two=$(grep -Eo "$accuracy" <<<"$last_output")
check "two ranks print the one-process test accuracy" 0 "same: $one" -- \
  bash -c "[ \"$one\" = \"$two\" ] && echo \"same: $two\" || echo \"differ: '$one' vs '$two'\""

# Per layer: alpha within 1e-5 and output error within 1e-4 (relative) of the one-process run.
compare_metrics() {
  paste -d' ' <(grep '"ldnq_layer"' "$1") <(grep '"ldnq_layer"' "$2") | awk '
    function field(line, key,   s) {
      s = substr(line, index(line, "\"" key "\":") + length(key) + 3)
      return substr(s, 1, index(s, ",") - 1) + 0
    }
    function rel(a, b) { d = a - b; if (d < 0) d = -d; m = (a < 0 ? -a : a); return m > 0 ? d / m : d }
    {
      split($0, half, "} {")
      n++
      a = rel(field(half[1], "alpha"), field(half[2], "alpha"))
      e = rel(field(half[1], "output_error"), field(half[2], "output_error"))
      if (a > worst_a) worst_a = a
      if (e > worst_e) worst_e = e
    }
    END {
      printf "%d layers, largest relative difference: alpha %.3g, output error %.3g\n", n, worst_a, worst_e
      exit !(n == 6 && worst_a <= 1e-5 && worst_e <= 1e-4)
    }'
}
check "per-layer alpha and output error agree" 0 "6 layers, largest relative difference" -- \
  compare_metrics "$work/one.jsonl" "$work/two.jsonl"
pow2=(--model=cnn --data="$syn" --threads=1 --wq=pow2:levels=3 --fp_first_last=false)
check "export the 2-rank result" 0 "export: " -- \
  "$qtrain" export "${pow2[@]}" --checkpoint_dir="$work/two"
check "the two networks predict every test image alike" 0 \
  "0 of 200 predictions differ .*largest logit difference (0|[0-9.]+e-(0[3-9]|[1-9][0-9])) " -- \
  "$qtrain" eval "${pow2[@]}" --checkpoint_dir="$work/one" --packed="$work/two/model.qpack"
if cmp -s "$work/one/checkpoint.qtrn" "$work/two/checkpoint.qtrn"; then
  echo "info checkpoints of 1 process and 2 ranks are byte-identical"
else
  echo "info checkpoints of 1 process and 2 ranks differ in some bits (within the tolerances above)"
fi
check "a bad flag under mpirun ends the job" fail "levels must be 3, 5, 7 or 9" -- \
  "${mpi[@]}" "$qtrain" "${ldnq[@]}" --levels=4 --out="$work/bad"

finish
