#!/usr/bin/env bash
# Data-parallel qtrain under `mpirun -np 4` on a few hundred real Fashion-MNIST images: fp32 and
# 1-bit SGD runs that learn and end with bit-identical weights on every rank, metrics with
# traffic, an fp32 warm start, checkpoint + resume (with per-rank error-feedback residuals), a bad --codec, and a
# stalled rank that must end the job within the communication timeout, never hang.
# Usage: mpi_train_test.sh <path to qtrain> [<path to mpirun>]
set -uo pipefail
qtrain=$1
mpirun=${2:-mpirun}
data=/usr/share/datasets/fashion-mnist
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Root in containers needs the two ALLOW variables; the vader BTL's single-copy (CMA) path needs
# ptrace rights that containers often lack.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
mpi=(timeout 60 "$mpirun" -np 4 --oversubscribe)

source "$(dirname "$0")/check_lib.sh"

if [ ! -d "$data" ]; then
  echo "fashion-mnist is not installed at $data (deploy/install-deps.sh installs it)"
  exit 1
fi
# 512 images / 4 ranks / batch 16 = 8 steps per epoch (a global batch of 64).
common=(--max_train=512 --max_test=300 --batch_size=16 --threads=1 --progress=false)
learns="final_test_accuracy=([5-9][0-9]|100)\."
same="weights hash: [0-9a-f]{16} identical on all 4 ranks"

check "fp32: 4 ranks learn, identical weights" 0 "$same.*$learns.*ranks=4 codec=fp32 " -- \
  "${mpi[@]}" "$qtrain" --epochs=2 "${common[@]}" --metrics="$work/fp32.jsonl"
check "fp32: step records carry traffic and timings" 0 \
  '"seconds_compute":[0-9.e-]+,"seconds_encode":[0-9.e-]+,"seconds_communicate":[0-9.e-]+,"seconds_decode":[0-9.e-]+,"bytes_sent":[1-9][0-9]*,"bytes_received":[1-9]' -- \
  cat "$work/fp32.jsonl"

check "onebit: 4 ranks learn with ~30x fewer bytes" 0 \
  "$same.*$learns.*ranks=4 codec=onebit bytes_sent=[0-9]+ \(fp32 would send [0-9]+, ratio (2[0-9]|3[0-9])\.[0-9]x\)" -- \
  "${mpi[@]}" "$qtrain" --epochs=2 "${common[@]}" --codec=onebit --bucket_mb=1

# Warm start: the first 8 of 16 steps averaged in fp32, the rest with onebit: about half fp32's
# bytes (ratio ~1.9x), identical weights.
check "onebit after 8 fp32 warm-up steps" 0 \
  "codec onebit.*after 8 fp32 warm-up steps.*$same.*ratio (1\.9|2\.0)x" -- \
  "${mpi[@]}" "$qtrain" --epochs=2 "${common[@]}" --codec=onebit --bucket_mb=1 --codec_warmup_steps=8
check "--codec_warmup_steps without a codec is a clear error" fail \
  "codec_warmup_steps needs a compressing --codec" -- \
  "${mpi[@]}" "$qtrain" "${common[@]}" --codec_warmup_steps=8
check "negative --codec_warmup_steps is a clear error" fail "codec_warmup_steps must be >= 0" -- \
  "${mpi[@]}" "$qtrain" "${common[@]}" --codec=onebit --codec_warmup_steps=-1

# Checkpoint after 1 epoch, resume to 2: every rank reads checkpoint.qtrn, and each its residuals;
# the result must equal a straight 2-epoch run bit for bit (constant learning rate).
short=(--max_steps_per_epoch=4 --lr_schedule=constant "${common[@]}" --codec=onebit)
hash_of() { grep -Eo "weights hash: [0-9a-f]{16}" <<<"$1"; }
check "onebit: straight 2 epochs" 0 "$same" -- "${mpi[@]}" "$qtrain" --epochs=2 "${short[@]}"
straight=$(hash_of "$last_output")
check "onebit: 1 epoch with checkpoints" 0 "$same" -- \
  "${mpi[@]}" "$qtrain" --epochs=1 "${short[@]}" --checkpoint_dir="$work/ck"
check "every rank wrote its residual sidecar" 0 "checkpoint.rank3.qtrn" -- ls "$work/ck"
check "onebit: resume under mpirun continues with residuals" 0 \
  "resumed from .* at epoch 1, step 4.*restored [0-9]+ error-feedback residuals.*$same.*epochs=1 steps=8" -- \
  "${mpi[@]}" "$qtrain" --epochs=2 "${short[@]}" --checkpoint_dir="$work/ck" --resume
if [ -z "$straight" ] || [ "$(hash_of "$last_output")" != "$straight" ]; then
  failed=$((failed + 1))
  echo "FAIL resumed run ($(hash_of "$last_output")) differs from the straight run ($straight)"
fi
check "resume of a finished run trains nothing" 0 "$same.*epochs=0 steps=8" -- \
  "${mpi[@]}" "$qtrain" --epochs=2 "${short[@]}" --checkpoint_dir="$work/ck" --resume

check "guided 2/2 under mpirun: both nets averaged, identical on all ranks" 0 \
  "full-precision twin test acc.*$same.*guided: full-precision twin final_test_accuracy" -- \
  "${mpi[@]}" "$qtrain" --epochs=1 "${short[@]}" --quant=dorefa:w=2,a=2 --guided --lambda=0.01

check "bad --codec is a clear error" fail "--codec: unknown codec 'bogus'.*valid codecs: fp32" -- \
  "${mpi[@]}" "$qtrain" "${common[@]}" --codec=bogus
check "bad --allreduce is a clear error" fail "allgather" -- \
  "${mpi[@]}" "$qtrain" "${common[@]}" --allreduce=ring

# Rank 2 sleeps at step 3: the others must give up after --comm_timeout=3 s naming the rank, the
# step and the operation, and MPI_Abort ends the job (timeout 60 would exit 124 on a hang).
start=$SECONDS
check "stalled rank ends the job with a clear error" fail \
  "DEADLINE_EXCEEDED: rank [0-9] of 4 at step 3: .*AllReduceMean of bucket 'b0'.*timed out after 3 s" -- \
  env QTRAIN_TEST_STALL_RANK=2 QTRAIN_TEST_STALL_STEP=3 \
  "${mpi[@]}" -x QTRAIN_TEST_STALL_RANK -x QTRAIN_TEST_STALL_STEP "$qtrain" --epochs=2 \
  "${common[@]}" --comm_timeout=3
if [ $((SECONDS - start)) -gt 30 ]; then
  failed=$((failed + 1))
  echo "FAIL stalled rank: the job took $((SECONDS - start)) s to end (want < 30 s)"
fi

finish
