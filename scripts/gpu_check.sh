#!/usr/bin/env bash
# GPU check, run on the device machine from the repository root:
#   scripts/gpu_check.sh
# Configures and builds libmoe with the CUDA backend (sm_90a, Ninja, staged
# header-only deps in .deps), runs ctest (CPU and GPU labels), then
# compute-sanitizer memcheck, racecheck, initcheck and synccheck over a
# reduced GPU case set. Logs go to $OUT (the device tool's folder) or
# build-gpu/logs; a short summary is printed last and kept in summary.txt.
# Environment: MOE_GPU_CHECK_NCCL=OFF skips the NCCL dispatcher.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOE_GPU_BUILD_DIR:-$root/build-gpu}
out=${OUT:-$build/logs}
mkdir -p "$out"
jobs=$(nproc)
summary="$out/summary.txt"
: > "$summary"
status=0

# step NAME LOG TIMEOUT_S CMD...: runs CMD with a time limit, appends to LOG.
step() {
  local name=$1 log=$2 limit=$3
  shift 3
  local start=$SECONDS rc
  echo "=== $name: $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local verdict=PASS
  if [ $rc -ne 0 ]; then verdict="FAIL (rc=$rc$([ $rc -eq 124 ] && echo ', timed out'))"; status=1; fi
  # The last result line the step wrote (ctest's count, the sanitizer's summary).
  local detail
  detail=$(grep -E 'tests passed|ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -n 1 | sed 's/^=* *//')
  printf '%-20s %-26s %4ss  %-14s %s\n' "$name" "$verdict" $((SECONDS - start)) \
    "$(basename "$log")" "$detail" | tee -a "$summary"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$summary" 2>&1

step configure "$out/build.log" 120 cmake -S "$root" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a -DMOE_DEPS_DIR="$root/.deps" \
  -DMOE_ENABLE_NCCL="${MOE_GPU_CHECK_NCCL:-ON}"
# -k 0: build every target that compiles, so one broken suite does not hide the rest.
step build "$out/build.log" 300 cmake --build "$build" -j "$jobs" -- -k 0
if [ ! -x "$build/tests/moe_gpu_tests" ]; then
  echo "no GPU test binary; stopping" | tee -a "$summary"
  exit 1
fi

step ctest_cpu "$out/ctest_cpu.log" 180 ctest --test-dir "$build" -L cpu --output-on-failure -j 8
step ctest_gpu "$out/ctest_gpu.log" 300 ctest --test-dir "$build" -L gpu -V
grep -E 'MESSAGE' "$out/ctest_gpu.log" | sed 's/^.*MESSAGE: /  /' | tee -a "$summary"

# Reduced case set under the sanitizers: every kernel, small sizes.
san_cases='gpu.fp8.options,gpu.fp8.degenerate_scales,gpu.fp8.nan_confined,gpu.fp8.graph_capture,gpu.threads*,block_gpu.shared_experts*,block_gpu.graph*,gpu.router.num_valid*,gpu.router.packed*,gpu.dispatcher.explicit*,gpu.dispatcher.empty*,gpu.runner.odd_sizes,gpu.runner.wide_tiles_odd_sizes,gpu.fp8.wide_tiles,gpu.runner.swap*,gpu.runner.bad_ids,gpu.graph*'
# initcheck skips the block cases: it reports the block's activation kernel
# reading the f32 pre-activations cuBLASLt has just written (docs/gpu-runs.md
# run 13; the values are right, the tests compare them with the CPU backend),
# which we read as initcheck not tracking cuBLASLt's Hopper stores.
init_cases=$(echo "$san_cases" | tr ',' '\n' | grep -v '^block_gpu' | paste -sd, -)
for tool in memcheck racecheck initcheck synccheck; do
  cases=$san_cases
  [ "$tool" = initcheck ] && cases=$init_cases
  step "sanitize_$tool" "$out/sanitize.log" 300 compute-sanitizer --tool "$tool" \
    --error-exitcode 9 "$build/tests/moe_gpu_tests" -tc="$cases" -sce='*e20000*'
done

echo "--- summary ($([ $status -eq 0 ] && echo all passed || echo FAILURES)) ---"
cat "$summary"
exit $status
