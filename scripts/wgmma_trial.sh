#!/usr/bin/env bash
# Two device calls (each under the 10-minute limit; the build folder stays on
# the warm machine between them) that verify and measure the wgmma kernels
# (branch `wgmma`), from the repository root on an H100 with .deps carried:
#   bash scripts/wgmma_trial.sh check   # 1-3
#   bash scripts/wgmma_trial.sh bench   # 4-5, after check passed
# Steps, each with its own time limit, logged to $OUT (8 files at most):
#   1. build (Release, sm_90a, NCCL off) and count HGMMA/QGMMA/HMMA in SASS;
#   2. the runner and FP8 GPU tests on the wgmma path, then (only if they
#      fail) the same with MOE_RUNNER_WGMMA=0, to tell the new path from the rest;
#   3. compute-sanitizer memcheck and racecheck on the two wide-tile tests;
#   4. the whole GPU suite;
#   5. when it passed: moe_bench.py at the prefill sizes with the peers, a
#      libmoe-only run with MOE_RUNNER_WGMMA=0, and fp8_bench.py.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOE_TRIAL_BUILD_DIR:-$root/build-trial}
out=${OUT:-$build/out}
mkdir -p "$out"
cd "$root"
phase=${1:-check}
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >> "$summary" 2>&1

start=$SECONDS
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DMOE_DEPS_DIR="$root/.deps" -DMOE_ENABLE_NCCL=OFF > "$out/build.log" 2>&1 &&
  timeout 220 cmake --build "$build" -j "$(nproc)" >> "$out/build.log" 2>&1
rc=$?
note "build rc=$rc $((SECONDS - start))s"
[ $rc -eq 0 ] || { tail -n 30 "$out/build.log"; exit 1; }
lib=$(ls "$build"/libmoe.so* | head -n 1)
if command -v cuobjdump > /dev/null; then
  note "SASS: HGMMA $(cuobjdump -sass "$lib" | grep -c HGMMA), QGMMA $(cuobjdump -sass "$lib" | grep -c QGMMA), HMMA $(cuobjdump -sass "$lib" | grep -c HMMA)"
fi

tests="$build/tests/moe_gpu_tests"
run_tests() {  # LABEL CASES ENV...
  local label=$1 cases=$2
  shift 2
  start=$SECONDS
  env "$@" timeout 200 "$tests" -tc="$cases" >> "$out/gpu_tests.log" 2>&1
  local r=$?
  note "$label rc=$r $((SECONDS - start))s: $(grep -E '^\[doctest\] test cases' "$out/gpu_tests.log" | tail -n 1)"
  return $r
}
status=0
if [ "$phase" = check ]; then
  wide='gpu.runner.wide_tiles_odd_sizes,gpu.fp8.wide_tiles'
  run_tests "runner+fp8 (wgmma)" 'gpu.runner.*,gpu.fp8.*' MOE_RUNNER_WGMMA=1 || {
    status=1
    run_tests "wide-tile cases (mma.sync only)" "$wide" MOE_RUNNER_WGMMA=0
  }

  for tool in memcheck racecheck; do
    start=$SECONDS
    timeout 70 compute-sanitizer --tool "$tool" --error-exitcode 9 "$tests" -tc="$wide" \
      >> "$out/sanitize.log" 2>&1
    r=$?
    [ $r -eq 0 ] || status=1
    note "$tool rc=$r $((SECONDS - start))s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitize.log" | tail -n 1)"
  done
  [ $status -eq 0 ] && note "check: all passed" || note "check: FAILURES"
  exit $status
fi

start=$SECONDS
timeout 200 ctest --test-dir "$build" -L gpu > "$out/ctest_gpu.log" 2>&1
r=$?
[ $r -eq 0 ] || status=1
note "ctest -L gpu rc=$r $((SECONDS - start))s: $(grep -E 'tests passed' "$out/ctest_gpu.log" | tail -n 1)"

if [ $status -ne 0 ]; then
  note "FAILURES: no timing"
  exit 1
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$root/bindings/python" MOE_LIB_PATH="$build"
timeout 200 python3 bench/moe_bench.py --tokens 1024,4096,16384 --reps 10 \
  --out "$out/moe_bench.json" > "$out/bench.log" 2>&1
note "moe_bench rc=$?"
MOE_RUNNER_WGMMA=0 timeout 60 python3 bench/moe_bench.py --no-peers --tokens 1024,4096,16384 \
  --reps 10 --out /tmp/mma_sync.json >> "$out/bench.log" 2>&1
note "moe_bench mma.sync sweep rc=$?"
timeout 100 python3 bench/fp8_bench.py --tokens 1,64,1024,8192,16384 --reps 10 \
  --out "$out/fp8_bench.json" >> "$out/bench.log" 2>&1
note "fp8_bench rc=$?"
grep -E '^(mixtral|qwen3|deepseek)' "$out/bench.log" | cut -c1-160 >> "$summary"
cat "$summary"
