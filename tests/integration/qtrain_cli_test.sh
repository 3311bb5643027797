#!/usr/bin/env bash
# End-to-end checks of the qtrain binary on a few hundred real Fashion-MNIST images: a short
# training run that learns, checkpoint + resume, L-DNQ of it with packed export and inference,
# and clear errors for bad flags, bad data and a corrupt checkpoint.
# Usage: qtrain_cli_test.sh <path to qtrain>
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
common=(--max_train=512 --max_test=300 --batch_size=64 --threads=2 --progress=false)

# Abseil's flag library prints the help and exits with status 1.
check "help lists flags" 1 "--model \(Model: mlp, cnn, resnet20 or mlp-wide" -- "$qtrain" --help
check "short run learns" 0 "final_test_accuracy=([5-9][0-9]|100)\." -- \
  "$qtrain" --model=cnn --epochs=2 "${common[@]}" --checkpoint_dir="$work/ck" --metrics="$work/m.jsonl"
check "metrics file has epoch records" 0 '"type":"epoch"' -- cat "$work/m.jsonl"
# `qtrain ldnq` of that FP model to 3 levels from 64 images (method dq, L-DNQ's baseline: the
# same levels in seconds, where ADMM on the 3137-wide fc1 takes minutes), packed as 2-bit level
# indices; packed inference (FP32 on the decoded weights: the result keeps FP activations)
# predicts every test image as `eval` of the checkpoint does.
lflags=(--model=cnn --max_train=512 --max_test=300 --threads=2)
check "ldnq quantizes the FP model to 3 levels" 0 "ldnq: done.*to pack it: qtrain export .*--wq=pow2:levels=3 --fp_first_last=false" -- \
  "$qtrain" ldnq "${lflags[@]}" --checkpoint_dir="$work/ck" --out="$work/l3" --calib=64 --levels=3 --method=dq
check "ldnq with a bad --admm_rho_scale list" 1 "--admm_rho_scale: '0' is not a positive number" -- \
  "$qtrain" ldnq "${lflags[@]}" --checkpoint_dir="$work/ck" --out="$work/l3x" --calib=64 --levels=3 --admm_rho_scale=1,0
check "export of the L-DNQ result without pow2 flags is refused" 1 "FAILED_PRECONDITION.*--wq=pow2:levels=3 --aq=none --fp_first_last=false" -- \
  "$qtrain" export "${lflags[@]}" --checkpoint_dir="$work/l3"
check "export packs the L-DNQ result" 0 "export: .*model.qpack [0-9]+ bytes, fp32 model [0-9]+ bytes \((1[2-9]|[2-9][0-9])\.[0-9]x smaller\)" -- \
  "$qtrain" export "${lflags[@]}" --wq=pow2:levels=3 --fp_first_last=false --checkpoint_dir="$work/l3"
check "packed L-DNQ model predicts like the checkpoint" 0 "0 of 300 predictions differ" -- \
  "$qtrain" eval "${lflags[@]}" --wq=pow2:levels=3 --fp_first_last=false --checkpoint_dir="$work/l3" --packed="$work/l3/model.qpack"
check "resume of a finished run trains nothing" 0 "epochs=0 " -- \
  "$qtrain" --model=cnn --epochs=2 "${common[@]}" --checkpoint_dir="$work/ck" --resume
check "a quantized run fine-tunes from the FP run" 0 "--init_from: copied ([0-9]+)/\1 parameters and ([0-9]+)/\2 buffers" -- \
  "$qtrain" --model=cnn --epochs=1 "${common[@]}" --wq=sawb:bits=2 --init_from="$work/ck"
check "--init_from of a missing run" 1 "NOT_FOUND: --init_from: .*nowhere" -- \
  "$qtrain" --model=cnn --epochs=1 "${common[@]}" --init_from="$work/nowhere"
check "resume into another model is refused" 1 "holds model 'cnn'" -- \
  "$qtrain" --model=mlp --epochs=3 "${common[@]}" --checkpoint_dir="$work/ck" --resume
printf 'garbage' | dd of="$work/ck/checkpoint.qtrn" bs=1 seek=40 conv=notrunc status=none
check "corrupt checkpoint is DATA_LOSS" 1 "DATA_LOSS.*checksum" -- \
  "$qtrain" --model=cnn --epochs=3 "${common[@]}" --checkpoint_dir="$work/ck" --resume
check "2-bit weights and activations learn" 0 "quant=w=sawb:bits=2;a=pact:bits=2.*final_test_accuracy=([4-9][0-9]|100)\." -- \
  "$qtrain" --model=cnn --epochs=2 "${common[@]}" --wq=sawb:bits=2 --aq=pact:bits=2 --checkpoint_dir="$work/q"
qflags=(--model=cnn --wq=sawb:bits=2 --aq=pact:bits=2 --max_train=512 --max_test=300 --threads=2)
check "export packs the 2-bit model" 0 "export: .*model.qpack [0-9]+ bytes, fp32 model [0-9]+ bytes \((1[2-9]|[2-9][0-9])\.[0-9]x smaller\)" -- \
  "$qtrain" export "${qflags[@]}" --checkpoint_dir="$work/q"
check "packed inference predicts like the fake-quantized model" 0 "0 of 300 predictions differ" -- \
  "$qtrain" eval "${qflags[@]}" --checkpoint_dir="$work/q" --packed="$work/q/model.qpack"
check "eval with other quant flags is refused" 1 "trained with quant=w=sawb:bits=2" -- \
  "$qtrain" eval --model=cnn --wq=sawb:bits=3 --aq=pact:bits=2 --max_train=512 --max_test=300 --checkpoint_dir="$work/q"
sflags=(--model=cnn --wq=sawb:bits=2 --aq=pact:bits=2 --scalar_layer --max_train=512 --max_test=300 --threads=2)
# The scalar starts at 0.01, which also scales every gradient by 0.01: a short run needs a larger lr.
check "the scalar layer trains" 0 "final_test_accuracy=([3-9][0-9]|100)\." -- \
  "$qtrain" "${sflags[@]}" --epochs=2 --batch_size=64 --lr=0.2 --progress=false --checkpoint_dir="$work/s"
check "export keeps the scalar layer" 0 "export: .*model.qpack" -- \
  "$qtrain" export "${sflags[@]}" --checkpoint_dir="$work/s"
check "packed inference with the scalar layer" 0 "0 of 300 predictions differ" -- \
  "$qtrain" eval "${sflags[@]}" --checkpoint_dir="$work/s" --packed="$work/s/model.qpack"
check "eval without --scalar_layer is refused" 1 "checkpoint has [0-9]+ parameters, the model has" -- \
  "$qtrain" eval "${qflags[@]}" --checkpoint_dir="$work/s"
check "unknown command" 1 "unknown command 'exprot'" -- "$qtrain" exprot
check "resume of a quantized run into fp32 is refused" 1 "parameters.*settings: .*quant=w=sawb" -- \
  "$qtrain" --model=cnn --epochs=3 "${common[@]}" --checkpoint_dir="$work/q" --resume
check "activation method as weight quantizer" 1 "weight quantizer spec 'pact:bits=2'.*valid: " -- \
  "$qtrain" --wq=pact:bits=2 "${common[@]}"
check "--quant with --wq is refused" 1 "do not combine" -- \
  "$qtrain" --quant=qil:w=3,a=3 --wq=sawb:bits=2 "${common[@]}"
check "unknown model lists the valid ones" 1 "valid models: mlp, cnn, resnet20" -- \
  "$qtrain" --model=vgg "${common[@]}"
check "unknown flag is refused" 1 "Unknown command line flag" -- "$qtrain" --epoch=3
check "bad epochs" 1 "--epochs must be >= 1" -- "$qtrain" --epochs=0 "${common[@]}"
check "missing data directory" 1 "NOT_FOUND" -- "$qtrain" --data=idx:"$work/none" "${common[@]}"
check "bad data spec lists forms" 1 "fashion-mnist" -- "$qtrain" --data=mnist "${common[@]}"
check "bad lr schedule" 1 "valid: constant, cosine" -- "$qtrain" --lr_schedule=linear "${common[@]}"

finish
