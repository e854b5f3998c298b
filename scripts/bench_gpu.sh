#!/usr/bin/env bash
# Speed run on the device machine, from the repository root:
#   scripts/bench_gpu.sh [moe_bench.py arguments...]
# Builds libmoe (Release, sm_90a, Ninja, staged deps in .deps, NCCL off),
# runs the GPU test suite (a variant is timed only if it passes), then
# bench/moe_bench.py with plots. Logs, JSON and PNGs go to $OUT
# (or build-bench/out). MOE_BENCH_SKIP_TESTS=1 skips ctest; MOE_BENCH_SWEEP and
# MOE_BENCH_TIMELINE add libmoe-only sweeps and kernel timelines (see below).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOE_BENCH_BUILD_DIR:-$root/build-bench}
out=${OUT:-$build/out}
mkdir -p "$out"
cd "$root"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader | tee "$out/bench.log"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DMOE_DEPS_DIR="$root/.deps" -DMOE_ENABLE_NCCL=OFF > "$out/build.log" 2>&1 &&
  cmake --build "$build" -j "$(nproc)" >> "$out/build.log" 2>&1 || { tail -n 40 "$out/build.log"; exit 1; }
echo "build ok"
if [ "${MOE_BENCH_SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 ctest --test-dir "$build" -L gpu -V > "$out/ctest_gpu.log" 2>&1
  rc=$?
  grep -E 'tests passed|Failed|\*\*\*' "$out/ctest_gpu.log" | tail -n 15
  grep -E 'MESSAGE' "$out/ctest_gpu.log" | sed 's/^.*MESSAGE: /  /' | tail -n 12
  [ $rc -eq 0 ] || { echo "GPU tests failed (rc=$rc): no timing"; exit 1; }
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$root/bindings/python" MOE_LIB_PATH="$build"
python3 bench/moe_bench.py --plots --out "$out/moe_bench.json" "$@" 2>&1 | tee -a "$out/bench.log"
rc=${PIPESTATUS[0]}
# Optional sweep, libmoe only: MOE_BENCH_SWEEP="ENV=VALUE:tokens ..." (one run per
# entry; JSON in sweep_<i>.json).
i=0
for entry in ${MOE_BENCH_SWEEP:-}; do
  i=$((i + 1))
  echo "--- sweep $entry" | tee -a "$out/sweep.log"
  env "${entry%%:*}" python3 bench/moe_bench.py --no-peers --reps 10 --tokens "${entry#*:}" \
    --out "$out/sweep_$i.json" 2>&1 | grep -E '^(mixtral|qwen3|deepseek)' | cut -c1-165 | tee -a "$out/sweep.log"
done
# Optional kernel timelines (bench/layer_timeline.py):
# MOE_BENCH_TIMELINE="ENV=VALUE:shape:T,shape:T ..." (one run per entry).
i=0
for entry in ${MOE_BENCH_TIMELINE:-}; do
  i=$((i + 1))
  echo "--- timeline $entry" | tee -a "$out/timeline.log"
  cases=${entry#*:}
  env "${entry%%:*}" python3 bench/layer_timeline.py ${cases//,/ } --json "$out/timeline_$i.json" 2>&1 |
    tee -a "$out/timeline.log"
done
exit "$rc"
