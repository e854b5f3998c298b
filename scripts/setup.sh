#!/usr/bin/env bash
# Installs what a fresh development or CI machine lacks (Debian packages and
# PyPI only). Idempotent: does nothing when everything is present.
set -euo pipefail

apt_packages=(cmake ninja-build pkg-config doctest-dev libdlpack-dev bindgen clang
              libclang-rt-14-dev valgrind)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

py=${PYTHON:-python3}
if ! "$py" -c "import numpy, pytest" >/dev/null 2>&1; then
  echo "setup: pip install numpy pytest"
  "$py" -m pip install -q numpy pytest
fi
# Optional (not needed to build or test): cuobjdump and nvdisasm from PyPI,
# for scripts/sass_diff.sh on a machine whose CUDA toolkit lacks them.
if [ "${1:-}" = "--sass-tools" ]; then
  echo "setup: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm"
  "$py" -m pip install -q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
fi
# Optional (not needed to build or test): matplotlib, for the benchmark's
# PNGs redrawn from a results JSON off the device (bench/moe_bench.py
# --plots-of bench/results/moe_bench.json).
if [ "${1:-}" = "--plot-tools" ]; then
  echo "setup: pip install matplotlib"
  "$py" -m pip install -q matplotlib
fi
echo "setup: done"
