#!/usr/bin/env bash
# End-to-end checks of the training schedules (issue 9; worker/train/schedule.h, guided.h) on a
# few hundred real Fashion-MNIST images: a two-stage run learns and changes phase, resume with a
# different schedule is refused, a guided run reports its full-precision twin (and qtrain_plot
# draws it), bad flags fail clearly. Usage: qtrain_schedule_test.sh <path to qtrain>
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
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --guided --lambda=0.1 --epochs=2 \
  --max_steps_per_epoch=4 --metrics="$work/guided.jsonl"
# qtrain_plot (worker/train/plot.h) draws that run's accuracy per epoch; bad input is named.
plot="$(dirname "$qtrain")/qtrain_plot"
check "qtrain_plot draws a run" 0 "wrote .*guided.png \(1 series" -- \
  "$plot" --out="$work/guided.png" --title="guided" "guided=$work/guided.jsonl"
check "the plot is a PNG" 0 "89504e470d0a1a0a" -- bash -c "head -c 8 '$work/guided.png' | od -An -tx1 | tr -d ' \n'"
check "qtrain_plot names a missing file" 1 "cannot open metrics file '$work/nope.jsonl'" -- \
  "$plot" --out="$work/x.png" "a=$work/nope.jsonl"
check "qtrain_plot refuses a file without epoch records" 1 "no epoch records" -- \
  "$plot" --out="$work/x.png" "a=$0"
check "bad schedule" 1 "--schedule must be none, ts, pq or pq\+ts" -- \
  "$qtrain" "${common[@]}" --schedule=foo
check "pq bits must decrease" 1 "--bits must decrease" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --schedule=pq --bits=32,2,4 --stage_epochs=1,1,1
check "stage epochs per phase" 1 "--stage_epochs needs one entry per phase" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --schedule=pq+ts --bits=32,2 --stage_epochs=1,1
check "bad guide layer lists the layers" 1 "relu4" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --guided --guide_layers=nope
check "--lambda without --guided" 1 "--lambda and --guide_layers need --guided" -- \
  "$qtrain" "${common[@]}" --quant=dorefa:w=2,a=2 --lambda=0.1

finish
