#!/usr/bin/env bash
# A long libFuzzer run of the C API (tests/fuzz/fuzz_api.cpp), for humans:
#   scripts/fuzz_long.sh [seconds=600] [workers=2]
# New inputs go to build-fuzz/fuzz_long_corpus; crashes to build-fuzz/artifacts/;
# the workers' logs to build-fuzz/fuzz-N.log.
# Reproduce one:   build-fuzz/moe_fuzz_api build-fuzz/artifacts/crash-...
# Grow the committed corpus (keep it small) with
#   build-fuzz/moe_fuzz_api -merge=1 tests/fuzz/corpus build-fuzz/fuzz_long_corpus
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_TOTAL=${1:-600}
WORKERS=${2:-2}
BUILD_FUZZ=${BUILD_FUZZ:-$ROOT/build-fuzz}
CC=clang CXX=clang++ cmake -S "$ROOT" -B "$BUILD_FUZZ" -G Ninja -DMOE_ENABLE_CUDA=OFF \
  -DMOE_BUILD_FUZZ=ON -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
ninja -C "$BUILD_FUZZ" -j"$WORKERS" moe_fuzz_api
mkdir -p "$BUILD_FUZZ/fuzz_long_corpus" "$BUILD_FUZZ/artifacts"
export ASAN_OPTIONS=detect_leaks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export MOE_NUM_THREADS=${MOE_NUM_THREADS:-1}
# With -jobs, libFuzzer writes fuzz-N.log into the working directory: keep
# them in the build folder, not in the checkout.
cd "$BUILD_FUZZ"
exec "$BUILD_FUZZ/moe_fuzz_api" -max_total_time="$SECONDS_TOTAL" -jobs="$WORKERS" -workers="$WORKERS" \
  -max_len=4096 -len_control=0 -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
  -artifact_prefix="$BUILD_FUZZ/artifacts/" \
  "$BUILD_FUZZ/fuzz_long_corpus" "$ROOT/tests/fuzz/corpus"
