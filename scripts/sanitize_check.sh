#!/usr/bin/env bash
# ASan + UBSan + LeakSanitizer over every CPU ctest suite (issue 9 item 1), then
# a short libFuzzer run of the C API (issue 9 item 2). CPU only; the GPU's
# compute-sanitizer runs live in scripts/gpu_check.sh.
#   scripts/sanitize_check.sh            # both
#   SKIP_FUZZ=1 scripts/sanitize_check.sh
# Env: JOBS (default 2), BUILD_ASAN, BUILD_FUZZ (build dirs), FUZZ_RUNS.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
JOBS=${JOBS:-2}
BUILD_ASAN=${BUILD_ASAN:-$ROOT/build-asan}
BUILD_FUZZ=${BUILD_FUZZ:-$ROOT/build-fuzz}

export ASAN_OPTIONS=detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# Two workers per CPU call: threaded paths run, and 2 cores are not oversubscribed.
export MOE_NUM_THREADS=${MOE_NUM_THREADS:-2}

echo "== ASan+UBSan build ($BUILD_ASAN)"
cmake -S "$ROOT" -B "$BUILD_ASAN" -G Ninja -DMOE_SANITIZE=ON -DMOE_ENABLE_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C "$BUILD_ASAN" -j"$JOBS"
echo "== ctest -L cpu under ASan+UBSan+LSan"
ctest --test-dir "$BUILD_ASAN" -L cpu --output-on-failure -j"$JOBS"

if [[ "${SKIP_FUZZ:-0}" != 1 ]]; then
  if ! command -v clang++ >/dev/null; then
    echo "clang++ not found: the libFuzzer run needs clang (apt-get install clang libclang-rt-dev)" >&2
    exit 1
  fi
  echo "== libFuzzer build ($BUILD_FUZZ)"
  CC=clang CXX=clang++ cmake -S "$ROOT" -B "$BUILD_FUZZ" -G Ninja -DMOE_ENABLE_CUDA=OFF \
    -DMOE_BUILD_FUZZ=ON -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo ${FUZZ_RUNS:+-DMOE_FUZZ_RUNS=$FUZZ_RUNS} >/dev/null
  ninja -C "$BUILD_FUZZ" -j"$JOBS" moe_fuzz_api
  echo "== short fuzz run (ctest -L fuzz)"
  ctest --test-dir "$BUILD_FUZZ" -L fuzz --output-on-failure
fi
echo "sanitize_check: OK"
