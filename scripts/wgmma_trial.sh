#!/usr/bin/env bash
# Device calls (each under the 10-minute limit; each builds, since a machine
# goes back 30 s after a call) that verify and measure the wgmma kernel
# variants against each other (runs 20-22), from the repository root on an
# H100 with .deps carried:
#   bash scripts/wgmma_trial.sh check    # 1-3, variant 1 (cp.async)
#   bash scripts/wgmma_trial.sh check2   # 1-3, variant 2 (TMA)
#   bash scripts/wgmma_trial.sh bench    # 4-5, after both passed
#   bash scripts/wgmma_trial.sh modes    # variants 2 and 3 (MOE_TRIAL_MODES):
#     tests, sanitizers, then prefill timings beside variant 1
#   bash scripts/wgmma_trial.sh verify   # after fixes: the FP8 errors of each
#     variant side by side, variant 2 on the runner tests, the sanitizers on
#     both variants, then 4-5
# Steps, each with its own time limit, logged to $OUT (8 files at most):
#   1. build (Release, sm_90a, NCCL off) and count HGMMA/QGMMA/HMMA in SASS;
#   2. the runner, graph and FP8 GPU tests on the phase's variant
#      (MOE_RUNNER_WGMMA=1 or 2) and, only if they failed, the wide-tile cases
#      on mma.sync (=0), to tell the new path from the rest;
#   3. compute-sanitizer memcheck and racecheck on the wide-tile cases;
#   4. the whole GPU suite;
#   5. when it passed: moe_bench.py at the prefill sizes with the peers
#      (variant 1), libmoe-only runs with the TMA variant and with mma.sync,
#      and fp8_bench.py with variant 1 and (T >= 8192) variant 2.
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
  env "$@" timeout "${MOE_TRIAL_TEST_TIMEOUT:-200}" "$tests" -tc="$cases" >> "$out/gpu_tests.log" 2>&1
  local r=$?
  note "$label rc=$r $((SECONDS - start))s: $(grep -E '^\[doctest\] test cases' "$out/gpu_tests.log" | tail -n 1)"
  return $r
}
wide='gpu.runner.wide_tiles_odd_sizes,gpu.fp8.wide_tiles'
# sanitize_wide MODE TIMEOUT_S: memcheck and racecheck over the 128-row
# cases under MOE_RUNNER_WGMMA=MODE.
sanitize_wide() {
  local tool start r
  for tool in memcheck racecheck; do
    start=$SECONDS
    MOE_RUNNER_WGMMA=$1 timeout "$2" compute-sanitizer --tool "$tool" --error-exitcode 9 "$tests" \
      -tc="$wide" >> "$out/sanitize.log" 2>&1
    r=$?
    [ $r -eq 0 ] || status=1
    note "$tool (variant $1) rc=$r $((SECONDS - start))s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitize.log" | tail -n 1)"
  done
}

status=0
if [ "$phase" = check ] || [ "$phase" = check2 ]; then
  mode=$([ "$phase" = check ] && echo 1 || echo 2)
  run_tests "runner+graph+fp8 (variant $mode)" 'gpu.runner.*,gpu.graph*,gpu.fp8.*' MOE_RUNNER_WGMMA=$mode ||
    { status=1; run_tests "wide-tile cases (mma.sync)" "$wide" MOE_RUNNER_WGMMA=0; }
  sanitize_wide "$mode" 90
  [ $status -eq 0 ] && note "$phase: all passed" || note "$phase: FAILURES"
  exit $status
fi

if [ "$phase" = modes ]; then
  # The bf16 runner's cases, the sanitizers on the 128-row cases, then
  # libmoe-only prefill timings, for variant 1 and each of MOE_TRIAL_MODES.
  modes=${MOE_TRIAL_MODES:-2 3}
  export MOE_TRIAL_TEST_TIMEOUT=${MOE_TRIAL_TEST_TIMEOUT:-120}  # a hang must not eat the call
  for mode in $modes; do
    run_tests "runner+graph+fp8 (variant $mode)" 'gpu.runner.*,gpu.graph*,gpu.fp8.*' MOE_RUNNER_WGMMA=$mode || status=1
    sanitize_wide "$mode" 60
  done
  export PYTHONUNBUFFERED=1 PYTHONPATH="$root/bindings/python" MOE_LIB_PATH="$build"
  for mode in 1 $modes; do
    echo "--- MOE_RUNNER_WGMMA=$mode" >> "$out/bench.log"
    MOE_RUNNER_WGMMA=$mode timeout 90 python3 bench/moe_bench.py --no-peers --tokens 1024,4096,16384 \
      --reps 10 --out "$out/modes_$mode.json" >> "$out/bench.log" 2>&1
    note "moe_bench libmoe only, MOE_RUNNER_WGMMA=$mode rc=$?"
    grep -E '^(mixtral|qwen3|deepseek)' "$out/bench.log" | tail -n 9 | cut -c1-100 >> "$summary"
  done
  [ $status -eq 0 ] && note "modes: all passed" || note "modes: FAILURES"
  exit $status
fi

if [ "$phase" = verify ]; then
  # FP8 errors of every check_case under each variant, side by side.
  for mode in 0 1 2; do
    MOE_TEST_PRINT_ERRORS=1 MOE_RUNNER_WGMMA=$mode timeout 100 "$tests" -tc='gpu.fp8.*' \
      > "$build/fp8_mode$mode.log" 2>&1
    note "fp8 cases, MOE_RUNNER_WGMMA=$mode rc=$? $(grep -E '^\[doctest\] test cases' "$build/fp8_mode$mode.log")"
    grep '^fp8 case' "$build/fp8_mode$mode.log" | sed "s/^/mode $mode: /" >> "$summary"
  done
  run_tests "runner+graph (variant 2)" 'gpu.runner.*,gpu.graph*' MOE_RUNNER_WGMMA=2 || status=1
  for mode in 1 2; do
    sanitize_wide "$mode" 90
  done
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
note "moe_bench (variant 1) rc=$?"
for mode in 2 0; do
  echo "--- MOE_RUNNER_WGMMA=$mode" >> "$out/bench.log"
  MOE_RUNNER_WGMMA=$mode timeout 60 python3 bench/moe_bench.py --no-peers --tokens 1024,4096,16384 \
    --reps 10 --out /tmp/mode$mode.json >> "$out/bench.log" 2>&1
  note "moe_bench libmoe only, MOE_RUNNER_WGMMA=$mode rc=$?"
done
timeout 100 python3 bench/fp8_bench.py --tokens 1,64,1024,8192,16384 --reps 10 \
  --out "$out/fp8_bench.json" >> "$out/bench.log" 2>&1
note "fp8_bench (variant 1) rc=$?"
echo "--- fp8, MOE_RUNNER_WGMMA=2" >> "$out/bench.log"
MOE_RUNNER_WGMMA=2 timeout 60 python3 bench/fp8_bench.py --tokens 8192,16384 --reps 10 \
  --out /tmp/fp8_mode2.json >> "$out/bench.log" 2>&1
note "fp8_bench (variant 2) rc=$?"
grep -E '^(mixtral|qwen3|deepseek)' "$out/bench.log" | cut -c1-160 >> "$summary"
cat "$summary"
