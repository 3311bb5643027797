#!/usr/bin/env bash
# Packs binaries built here, every shared library they load (the dynamic loader included) and,
# optionally, the Fashion-MNIST files into devrun/bundle.tar.xz, so that they run on a machine that
# has neither the Debian packages nor apt (the GPU hosts reached through the `device` tool).
#
#   bash deploy/device-bundle.sh [--data] qtrain kernel_bench ...
#
# On the other machine:
#   mkdir -p /tmp/q && tar xJf devrun/bundle.tar.xz -C /tmp/q && /tmp/q/run qtrain --help
# `run NAME ARGS...` starts bin/NAME through the bundled loader with the bundled libraries, and
# data/fashion-mnist/ holds the data set when --data was given (pass --data=idx:/tmp/q/data/fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."

with_data=0
bins=()
for a in "$@"; do
  case "$a" in
    --data) with_data=1 ;;
    *) bins+=("$a") ;;
  esac
done
if [[ ${#bins[@]} -eq 0 ]]; then
  echo "usage: $0 [--data] BINARY..." >&2
  exit 2
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib"
for b in "${bins[@]}"; do
  src=build/bin/$b
  [[ -x $src ]] || { echo "missing $src (run deploy/build.sh first)" >&2; exit 1; }
  cp "$src" "$stage/bin/"
  # ldd prints "name => /path (addr)" for libraries and "/path (addr)" for the loader.
  # The GPU driver, cuBLAS and NCCL come from the GPU machine (they are hundreds of MB and must
  # match its driver): /usr/local/cuda/lib64, and NCCL from PyTorch's wheel when the image has
  # no libnccl of its own.
  ldd "$src" | awk '/=>/ && $3 ~ /^\// {print $3} !/=>/ && $1 ~ /^\// {print $1}' |
    grep -Ev '/lib(cuda|cublas|cublasLt|nccl|nvidia-ml)\.so' |
    while read -r lib; do cp -L "$lib" "$stage/lib/"; done
done
loader=$(cd "$stage/lib" && ls ld-linux-x86-64.so.* | head -n1)
cat >"$stage/run" <<EOF
#!/usr/bin/env bash
here=\$(cd "\$(dirname "\$0")" && pwd)
name=\$1; shift
libs=\$here/lib
# PyTorch's NCCL before the system's: a system libnccl may need a newer glibc than the bundled one.
for d in /usr/local/cuda/lib64 /opt/torch/.venv/lib/python3*/site-packages/nvidia/nccl/lib \\
         /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib /usr/lib/x86_64-linux-gnu; do
  [[ -d \$d ]] && libs=\$libs:\$d
done
exec "\$here/lib/$loader" --library-path "\$libs" "\$here/bin/\$name" "\$@"
EOF
chmod +x "$stage/run"
if [[ $with_data -eq 1 ]]; then
  mkdir -p "$stage/data"
  cp -r /usr/share/datasets/fashion-mnist "$stage/data/"
fi
mkdir -p devrun
tar cJf devrun/bundle.tar.xz -C "$stage" .
ls -l devrun/bundle.tar.xz
