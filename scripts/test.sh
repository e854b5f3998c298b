#!/usr/bin/env bash
# The README's test command: builds libmoe and runs every test suite that
# runs without a GPU (C++ doctest via ctest, the C ABI checks, Python pytest,
# Rust cargo test, the bindings' freshness check). GPU suites: scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
root=$PWD

echo "== build ($MOE_BUILD_DIR)"
moe_configure
cmake --build "$MOE_BUILD_DIR" -j "$MOE_JOBS"

echo "== C/C++ suites (ctest, label cpu)"
ctest --test-dir "$MOE_BUILD_DIR" -L cpu --output-on-failure -j "$MOE_JOBS"

echo "== Python (pytest)"
MOE_LIB_PATH="$root/$MOE_BUILD_DIR" ${PYTHON:-python3} -m pytest -q bindings/python/tests

echo "== Rust (cargo test --offline)"
scripts/check_rust_bindings.sh
# The all-to-all bindings are a cargo feature, on when the library has them.
features=()
if nm -D "$MOE_BUILD_DIR/libmoe.so" | grep -q ' moe_a2a_create'; then
  features=(--features moe/nccl)
  export MOE_CARGO_FEATURES=nccl
fi
MOE_LIB_DIR="$root/$MOE_BUILD_DIR" cargo test --offline --manifest-path bindings/rust/Cargo.toml "${features[@]}"
MOE_LIB_DIR="$root/$MOE_BUILD_DIR" scripts/rust_leak_check.sh

echo "== CPU suites again under ASan + UBSan + LeakSanitizer, then a short libFuzzer run"
scripts/sanitize_check.sh

echo "== all suites passed"
