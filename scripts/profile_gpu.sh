#!/usr/bin/env bash
# Nsight Compute over the layer's kernels, one benchmark case at a time, on
# the device machine from the repository root (.deps carried):
#   scripts/profile_gpu.sh [shape:T ...]    # default mixtral:4096 qwen3:4096 deepseek:4096
# Builds like scripts/bench_gpu.sh (Release, sm_90a, NCCL off; an existing
# build folder is reused), then runs `bench/moe_bench.py --no-peers` for each
# case under ncu, profiling the first MOE_PROFILE_LAUNCHES (default 8) launches
# of libmoe's kernels: duration, speed of light, memory, scheduler and warp
# stalls, tensor pipes, instruction mix. MOE_PROFILE_KERNELS replaces the
# kernel regex (e.g. route for the router kernels), MOE_PROFILE_BENCH the
# benchmark and its options before --shapes (e.g. "bench/fp8_bench.py
# --modes block" with MOE_PROFILE_KERNELS=fp8_wgmma for the FP8 GEMMs),
# MOE_PROFILE_ARGS adds ncu options (e.g. "--section SourceCounters
# --print-details all" for the stall reasons and where they occur).
# MOE_PROFILE_SOURCE=1 also samples the warp stalls per SASS instruction
# (SourceCounters, -lineinfo is on in every build): the report is saved and
# its source page written as $OUT/source_<shape>_<T>.csv.gz, and
# scripts/ncu_source_top.py prints the instructions with the most samples
# into $OUT/source_<shape>_<T>.txt.
# Reports go to $OUT/ncu_<shape>_<T>.txt (or build-bench/out).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOE_BENCH_BUILD_DIR:-$root/build-bench}
out=${OUT:-$build/out}
mkdir -p "$out"
cd "$root"
if [ ! -f "$build/build.ninja" ]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DMOE_DEPS_DIR="$root/.deps" -DMOE_ENABLE_NCCL=OFF > "$out/build.log" 2>&1 || exit 1
fi
cmake --build "$build" -j "$(nproc)" --target moe >> "$out/build.log" 2>&1 || { tail -n 30 "$out/build.log"; exit 1; }
export PYTHONUNBUFFERED=1 PYTHONPATH="$root/bindings/python" MOE_LIB_PATH="$build"
cases=${*:-mixtral:4096 qwen3:4096 deepseek:4096}
kernels=${MOE_PROFILE_KERNELS:-gemm|reduce|tile_map|validate|sort_rows|dispatch}
status=0
for c in $cases; do
  shape=${c%%:*} T=${c#*:}
  report="$out/ncu_${shape}_${T}.txt"
  src_args=()
  if [ "${MOE_PROFILE_SOURCE:-0}" = 1 ]; then
    rep="/tmp/ncu_${shape}_${T}"
    rm -f "$rep.ncu-rep"
    src_args=(--section SourceCounters --section WarpStateStats -o "$rep")
  fi
  # shellcheck disable=SC2086  # MOE_PROFILE_BENCH splits at spaces
  timeout 200 ncu --kernel-name-base function \
    --kernel-name "regex:$kernels" \
    --launch-count "${MOE_PROFILE_LAUNCHES:-8}" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section LaunchStats --section Occupancy --section SchedulerStats --section InstructionStats \
    --section ComputeWorkloadAnalysis "${src_args[@]}" ${MOE_PROFILE_ARGS:-} \
    python3 ${MOE_PROFILE_BENCH:-bench/moe_bench.py --no-peers} --shapes "$shape" --tokens "$T" --reps 1 \
    --out /tmp/profile.json > "$report" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  if [ "${MOE_PROFILE_SOURCE:-0}" = 1 ] && [ -f "$rep.ncu-rep" ]; then
    ncu -i "$rep.ncu-rep" --print-details all >> "$report" 2>&1
    ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "/tmp/source_${shape}_${T}.csv" 2> "$out/source_${shape}_${T}.err"
    echo "$c: source page rc=$? ($(wc -c < "/tmp/source_${shape}_${T}.csv") bytes)"
    python3 "$root/scripts/ncu_source_top.py" "/tmp/source_${shape}_${T}.csv" > "$out/source_${shape}_${T}.txt" 2>&1
    gzip -c "/tmp/source_${shape}_${T}.csv" > "$out/source_${shape}_${T}.csv.gz"
    head -n 40 "$out/source_${shape}_${T}.txt"
  fi
  echo "$c: ncu rc=$rc"
  grep -E "^  [a-z_:<>, ]*($kernels)|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Hit|Issued Warp|Executed Instructions  " "$report" | head -n 80
done
exit $status
