#!/usr/bin/env bash
# Fetch the cp312 wheels of benchmarks/gpu_wheels.txt into .gpu-wheels/ (git-ignored) for
# benchmarks/gpu_check.sh, and print their total size (the device tool carries at most
# 64 MiB, working tree included). Run from anywhere; needs pip and a package registry.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DEST=$ROOT/.gpu-wheels
mkdir -p "$DEST"
grep -v '^#' "$ROOT/benchmarks/gpu_wheels.txt" | grep -v '^$' > "$DEST/requirements.txt"
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d "$DEST" -r "$DEST/requirements.txt"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes in $DEST"
