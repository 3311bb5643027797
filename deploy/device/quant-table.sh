#!/usr/bin/env bash
# Run on a GPU host through the `device` tool (carry devrun/, made by deploy/device-bundle.sh --data
# qtrain kernel_bench): one cnn training run per quantization, all at once, one core each.
#   EPOCHS=2 LIMIT=545 bash deploy/device/quant-table.sh     (MODEL=resnet20 for the other model)
mkdir -p /tmp/q && tar xJf devrun/bundle.tar.xz -C /tmp/q
E=${EPOCHS:-2}
runs=(
  "fp32|"
  "dorefa44|--quant=dorefa:w=4,a=4"
  "dorefa33|--quant=dorefa:w=3,a=3"
  "dorefa22|--quant=dorefa:w=2,a=2"
  "pactsawb44|--wq=sawb:bits=4 --aq=pact:bits=4"
  "pactsawb33|--wq=sawb:bits=3 --aq=pact:bits=3"
  "pactsawb22|--wq=sawb:bits=2 --aq=pact:bits=2"
  "pactsawb22a3|--wq=sawb:bits=2 --aq=pact:bits=2,alpha=3"
  "qil44|--quant=qil:w=4,a=4"
  "qil33|--quant=qil:w=3,a=3"
  "qil22|--quant=qil:w=2,a=2"
  "binary|--wq=binary"
  "ternary|--wq=ternary"
)
core=0
for r in "${runs[@]}"; do
  name=${r%%|*}; args=${r#*|}
  ( taskset -c $core timeout ${LIMIT:-540} /tmp/q/run qtrain --model=${MODEL:-cnn} --data=idx:/tmp/q/data/fashion-mnist \
      --epochs=$E --threads=1 $args --metrics=$OUT/$name.jsonl --progress=false > $OUT/$name.log 2>&1 ) &
  core=$((core+1))
done
wait
grep -h summary $OUT/*.log
