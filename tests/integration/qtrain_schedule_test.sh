#!/usr/bin/env bash
# End-to-end checks of the training schedules (issue 9; worker/train/schedule.h, guided.h) on a
# few hundred real Fashion-MNIST images: a two-stage run learns and changes phase, resume with a
# different schedule is refused, a guided run reports its full-precision twin, bad flags fail
# clearly. Usage: qtrain_schedule_test.sh <path to qtrain>
set -uo pipefail
qtrain=$1
data=/usr/share/datasets/fashion-mnist
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

source "$(dirname "$0")/check_lib.sh"

if [ ! -d "$data" ]; then
  echo "fashion-mnist is not installed at $data (deploy/install-deps.sh installs it)"
  exit 1
fi
common=(--model=cnn --max_train=512 --max_test=300 --batch_size=64 --threads=2 --progress=false)

check "ts run changes phase" 0 "phase 2/2 \(ts2, 1 epochs\): model rebuilt" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --schedule=ts --stage_epochs=1,1 \
  --checkpoint_dir="$work/ts"
check "ts run learns (10 classes: chance 10%)" 0 "epochs=2 .*final_test_accuracy=([2-9][0-9]|100)\." -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --schedule=ts --stage_epochs=1,1
check "resume with another schedule is refused" 1 "written by schedule 'ts1:1:" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --schedule=ts --stage_epochs=2,1 \
  --checkpoint_dir="$work/ts" --resume
check "resume of a finished schedule trains nothing" 0 "epochs=0 " -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --schedule=ts --stage_epochs=1,1 \
  --checkpoint_dir="$work/ts" --resume
check "guided run reports the twin" 0 "full-precision twin final_test_accuracy=" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --guided --lambda=0.1 --epochs=1 \
  --max_steps_per_epoch=4
check "bad schedule" 1 "--schedule must be none, ts, pq or pq\+ts" -- \
  "$qtrain" "${common[@]}" --schedule=foo
check "pq bits must decrease" 1 "--bits must decrease" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --schedule=pq --bits=32,2,4 --stage_epochs=1,1,1
check "stage epochs per phase" 1 "--stage_epochs needs one entry per phase" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --schedule=pq+ts --bits=32,2 --stage_epochs=1,1
check "bad guide layer lists the layers" 1 "relu4" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --guided --guide_layers=nope

finish
