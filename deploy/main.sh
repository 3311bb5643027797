#!/usr/bin/env bash
# The main job: build qtrain and train the default model (cnn) on the bundled Fashion-MNIST
# data with every core, ending with a summary line. Extra arguments go to qtrain.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
build/bin/qtrain "$@"
