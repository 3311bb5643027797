#!/usr/bin/env bash
# The main job, data-parallel: build qtrain and train the `cnn` on Fashion-MNIST with 2-bit
# weights (SAWB) and 2-bit activations (PACT) on 4 ranks under `mpirun`, averaging 1-bit SGD
# gradients with error feedback. Rank 0 shows the progress line (loss, accuracy, images/s, ETA and
# per-step compute / encode / communicate / decode milliseconds and bytes sent), and ends with
#   weights hash: <hex> identical on all 4 ranks
#   summary: ... final_test_accuracy=..% ... train_time=.. ranks=4 codec=onebit
#            bytes_sent=.. (fp32 would send .., ratio 31.0x) encode=..s communicate=..s decode=..s
#
#   bash deploy/main-mpi.sh [qtrain flags...]     e.g. --epochs=15, --codec=terngrad, --codec=fp32
#
# Defaults: 3 epochs (4 ranks sharing 2 cores: 12 minutes, 690 s of it training, 82.2% test
# accuracy, on a machine busy with other builds; --epochs=1 for a quick look, --epochs=15 for the
# full schedule), batch 128 per rank (a global batch of 512), every core shared by the 4 ranks
# (--threads = cores / 4, at least 1). Later flags override these. Environment: RANKS (default 4), QTRAIN (a qtrain binary
# to use instead of building build/bin/qtrain), MPIRUN (default mpirun).
set -euo pipefail
cd "$(dirname "$0")/.."

ranks=${RANKS:-4}
if [ -z "${QTRAIN:-}" ]; then
  bash deploy/build.sh
  QTRAIN=build/bin/qtrain
fi
threads=$(( $(nproc) / ranks ))
[ "$threads" -ge 1 ] || threads=1

# Root in containers needs the two ALLOW variables; the shared-memory transport's single-copy
# (CMA) path needs ptrace rights that containers often lack. --oversubscribe: more ranks than
# cores is fine (each rank waits in its collectives without spinning).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
exec "${MPIRUN:-mpirun}" -np "$ranks" --oversubscribe --bind-to none \
  "$QTRAIN" --model=cnn --data=fashion-mnist --wq=sawb:bits=2 --aq=pact:bits=2 --codec=onebit \
  --epochs=3 --threads="$threads" "$@"
