#!/usr/bin/env bash
# One device call for the sixth session's tuning experiments, from the
# repository root on an H100 with .deps carried:
#   bash scripts/tuning_run.sh STEP...
# Steps (each with its own time limit; logs under $OUT/logs, packed into
# $OUT/logs.tgz at the end, one line per step in $OUT/summary.txt):
#   build      Release, sm_90a, NCCL off, targets moe and moe_gpu_tests
#   tests      the GPU suite (ctest -L gpu), then the dispatcher cases with
#              the histogram/scan/scatter kernels (MOE_DISPATCH_ALGO=0)
#   errors     FP8 per-case errors against the CPU backend with 128-row
#              wgmma tiles and with 64-row mma.sync tiles forced (two runs
#              each, fresh random inputs; max and median per T)
#   (runs 49-51 also timed and checked, with options since removed, a finer
#   FP8 wgmma promotion (MOE_FP8_PROMOTE_K), deeper 64-row pipelines
#   (MOE_FP8_MID_STAGES) and other 64-row tile shapes (MOE_FP8_MID_CFG):
#   all slower; docs/perf-notes.md v10, bench/results/run49-51/)
#   timeline   kernel durations of the Qwen3 and DeepSeek-slice layers at
#              T=4096 with PDL off (the dispatch kernels apart)
#   dispatch   moe_bench --no-peers at T=4096 (router and dispatch times)
#   router_ncu Nsight Compute on the DeepSeek-V3 router at T=4096
#   dispatchbench  bench/dispatch_bench.py: router and dispatch times per
#              MOE_DISPATCH_ALGO (MOE_TUNE_DISPATCH_ALGOS, default 1,0,2) at
#              MOE_TUNE_DISPATCH_T (default 1,64,256,1024,4096,16384)
#   dispatchsan  memcheck, racecheck, initcheck and synccheck on the cases
#              of MOE_TUNE_SAN_TC (default gpu.dispatcher.algorithms_vs_cpu:
#              every dispatch path)
#   stream     the bf16 runner's cases with the streaming decode kernels off
#              (MOE_RUNNER_STREAM=0: gemm_tc_kernel), the GPU suite with them
#              forced for every size (MOE_RUNNER_STREAM=1), then the
#              MOE_TUNE_STREAM_TOOLS sanitizers (memcheck synccheck) on the
#              runner and graph cases with them forced
#   racecheck_old  racecheck on the runner and graph cases with them off
#              (racecheck does not model their mbarriers: step probe)
#   probe      racecheck on scripts/racecheck_mbarrier_probe.cu (does it
#              model mbarrier arrive/wait between warps?)
#   decode     moe_bench --no-peers at T=1,8,64,256 (MOE_TUNE_DECODE_T),
#              once per VAR=VALUE in MOE_TUNE_DECODE_ENVS (default: the
#              streaming decode kernels on, then off)
#   decode_timeline  kernel durations (PDL off) of decode layers, streaming
#              kernels on and off
#   fp8wide    the FP8 suite with the TMA variant's 256- and 128-row weight
#              tiles (MOE_RUNNER_FP8_BN; per-case errors against the CPU
#              backend), bench/fp8_bench.py at MOE_TUNE_FP8_T (default
#              1024,8192,16384) and the kernel timelines of
#              MOE_TUNE_FP8_TIMELINE (default deepseek:8192 mixtral:8192,
#              block scales, PDL off) for each width
#   fp8san     memcheck and synccheck on the FP8 cases with 128-row tiles
#   race6      racecheck with the 16-row decode tiles at 6 stages forced
#              (MOE_RUNNER_DECODE_STAGES=6; the 32-row FP8 tiles have 6) on
#              the runner and FP8 cases (but gpu.runner.model_shapes, too
#              large for it: run 109), with the kernels racecheck models
#              (MOE_RUNNER_STREAM=0, MOE_RUNNER_WGMMA=1: no mbarriers)
#   fp8stream  the FP8 suite with the streaming decode kernels off
#              (MOE_RUNNER_STREAM=0: fp8_gemm_kernel) and forced for every
#              size (=1), then memcheck and synccheck on the FP8 cases with
#              them forced (all but gpu.fp8.model_shapes, too large for them)
#   partial    memcheck and synccheck on gpu.runner.wgmma_variants_partial_tiles
#              and gpu.runner.wgmma_persistent_items (every 128-row variant;
#              warpgroups without rows skip their MMAs; several items per
#              persistent block; the persistent gemm_tc_kernel), racecheck on
#              the runner cases of variant 1 and gemm_tc_kernel
#              (MOE_RUNNER_WGMMA=1, MOE_RUNNER_STREAM=0: kernels without
#              mbarriers)
#   wgmma2     the TMA kernel (variant 2) under each MOE_CLUSTER_EXP (0, 1,
#              2): gpu.runner.wgmma_idle_warpgroup_steps (warpgroups idle
#              through whole items: run 140's hang), the partial-tile and
#              persistent-item cases; then memcheck and synccheck on them
#   skew       a debug build (build dir + "-skew": the watchdog and one warp
#              per warpgroup held 20 us at each idle pipeline step,
#              -DMOE_MBAR_WATCHDOG=ON -DMOE_DEBUG_SKEW_NS=20000), then the
#              variant 2 cases on it: a pipeline that counts on warps staying
#              in step hangs there at once (run 145), and the watchdog
#              turns that into a failure that says where
#   prefill2   moe_bench --no-peers at MOE_TUNE_PREFILL_T (default
#              1024,4096,16384) with variant 1, variant 2 and variant 2 without
#              multicast (MOE_CLUSTER_EXP=1), each under a time limit
#   prefill    moe_bench --no-peers at MOE_TUNE_PREFILL_T (default
#              256,1024,4096,16384), bench/fp8_bench.py (DeepSeek slice, block
#              scales) at MOE_TUNE_FP8_T
#              (default 1024,4096,8192) and the kernel timelines (PDL off) of
#              MOE_TUNE_PREFILL_TIMELINE
#   (run 69 also timed, with an option since removed (MOE_FP8_EPI), h
#   quantized in GEMM1's epilogue instead of by a pass, with the exact and
#   the fast SiLU and code divide: docs/perf-notes.md v12)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOE_TUNE_BUILD_DIR:-$root/build-tune}
out=${OUT:-$build/out}
cd "$root"
# shellcheck source=scripts/run_log.sh
source scripts/run_log.sh
run_log_open "$out/logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$root/bindings/python" MOE_LIB_PATH="$build"
tests="$build/tests/moe_gpu_tests"
# The cases of the TMA kernel (variant 2): steps wgmma2 and skew.
variant2=gpu.runner.wgmma_idle_warpgroup_steps,gpu.runner.wgmma_variants_partial_tiles,gpu.runner.wgmma_persistent_items
status=0

# errors FILE...: max and median relative error per T over the printed cases.
errors() {
  python3 - "$@" <<'EOF'
import re, statistics, sys
by_t = {}
for path in sys.argv[1:]:
    for line in open(path, errors="replace"):
        m = re.search(r"^fp8 case .* T (\d+): rel error vs CPU ([0-9.e+-]+)", line)
        if m:
            by_t.setdefault(int(m.group(1)), []).append(float(m.group(2)))
print("; ".join(f"T={t} n={len(v)} max {max(v):.1e} median {statistics.median(v):.1e}"
                for t, v in sorted(by_t.items())))
EOF
}

# sanitize TOOL CASES NAME LABEL: compute-sanitizer TOOL on the doctest cases
# CASES (the caller's environment applies), log $logs/NAME.log, one summary line.
# EXCLUDE (optional, fifth): doctest cases left out (-tce).
sanitize() {
  timeout 300 compute-sanitizer --tool "$1" --error-exitcode 9 "$tests" -tc="$2" ${5:+-tce="$5"} > "$logs/$3.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  note "$1 $4 rc=$rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|^\[doctest\] test cases' "$logs/$3.log" | tr '\n' ' ')"
}

# cases NAME LABEL CASES [BINARY]: the doctest cases CASES of BINARY (default
# the GPU suite; the caller's environment applies), log $logs/NAME.log, one
# summary line.
cases() {
  timeout 240 "${4:-$tests}" -tc="$3" > "$logs/$1.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  note "$2 rc=$rc: $(grep -E '^\[doctest\] (test cases|assertions)' "$logs/$1.log" | tr '\n' ' ')"
}

step_build() {
  local start=$SECONDS
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DMOE_DEPS_DIR="$root/.deps" -DMOE_ENABLE_NCCL=OFF > "$logs/build.log" 2>&1 &&
    timeout 300 cmake --build "$build" -j "$(nproc)" --target moe moe_gpu_tests >> "$logs/build.log" 2>&1
  local rc=$?
  note "build rc=$rc $((SECONDS - start))s"
  [ $rc -eq 0 ] || { tail -n 30 "$logs/build.log"; return 1; }
}

step_tests() {
  local start=$SECONDS
  timeout 300 ctest --test-dir "$build" -L gpu > "$logs/ctest_gpu.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  note "ctest -L gpu rc=$rc $((SECONDS - start))s: $(grep -E 'tests passed' "$logs/ctest_gpu.log")"
  grep -E 'Failed|\*\*\*' "$logs/ctest_gpu.log" | head -n 10 | tee -a "$summary"
  MOE_DISPATCH_ALGO=0 cases dispatch_algo0 "dispatcher+graph, MOE_DISPATCH_ALGO=0" 'gpu.dispatcher.*,gpu.graph*'
  grep -E 'MESSAGE|median' "$logs/dispatch_algo0.log" | head -n 4 | tee -a "$summary"
}

step_errors() {
  local rows i
  for rows in 128 64; do
    for i in 1 2; do
      MOE_RUNNER_TILE_ROWS=$rows MOE_TEST_PRINT_ERRORS=1 timeout 100 "$tests" \
        -tc='gpu.fp8.block_128,gpu.fp8.per_tensor_dynamic' > "$logs/errors_rows${rows}_$i.log" 2>&1
    done
    note "FP8 errors, $rows-row tiles forced: $(errors "$logs"/errors_rows${rows}_*.log)"
  done
}

step_timeline() {
  MOE_PDL=0 timeout 150 python3 bench/layer_timeline.py qwen3:4096 deepseek:4096 --reps 20 \
    --json "$logs/timeline.json" > "$logs/timeline.log" 2>&1
  note "timeline rc=$?"
  head -n 40 "$logs/timeline.log" >> "$summary"
}

step_dispatch() {
  timeout 150 python3 bench/moe_bench.py --no-peers --shapes qwen3,deepseek,mixtral --tokens 4096 --reps 10 \
    --out "$logs/dispatch.json" > "$logs/dispatch.log" 2>&1
  note "moe_bench --no-peers T=4096 rc=$?"
  grep -E '^(mixtral|qwen3|deepseek)' "$logs/dispatch.log" | cut -c1-200 | tee -a "$summary"
}

step_dispatchbench() {
  timeout 200 python3 bench/dispatch_bench.py --algos "${MOE_TUNE_DISPATCH_ALGOS:-1,0,2}" \
    --tokens "${MOE_TUNE_DISPATCH_T:-1,64,256,1024,4096,16384}" --reps 50 \
    --out "$logs/dispatch_bench.json" > "$logs/dispatch_bench.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || status=1
  note "dispatch_bench rc=$rc"
  tee -a "$summary" < "$logs/dispatch_bench.log" | tail -n 3 > /dev/null
}

step_dispatchsan() {
  local tool cases=${MOE_TUNE_SAN_TC:-gpu.dispatcher.algorithms_vs_cpu}
  for tool in memcheck racecheck initcheck synccheck; do
    sanitize $tool "$cases" "dispatch_$tool" "$cases"
  done
}

step_router_ncu() {
  OUT="$logs" MOE_BENCH_BUILD_DIR="$build" MOE_PROFILE_KERNELS=route MOE_PROFILE_LAUNCHES=2 \
    timeout 200 bash scripts/profile_gpu.sh deepseek:4096 > "$logs/router_ncu_summary.log" 2>&1
  note "router ncu rc=$?"
  head -n 40 "$logs/router_ncu_summary.log" >> "$summary"
}

step_stream() {
  local rc tool
  MOE_RUNNER_STREAM=0 timeout 200 "$tests" -tc='gpu.runner.*,gpu.graph*' > "$logs/stream_off_tests.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  note "runner+graph, MOE_RUNNER_STREAM=0 rc=$rc: $(grep -E '^\[doctest\] test cases' "$logs/stream_off_tests.log")"
  MOE_RUNNER_STREAM=1 timeout 200 ctest --test-dir "$build" -L gpu > "$logs/stream_forced_ctest.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  note "ctest -L gpu, MOE_RUNNER_STREAM=1 rc=$rc: $(grep -E 'tests passed' "$logs/stream_forced_ctest.log")"
  for tool in ${MOE_TUNE_STREAM_TOOLS:-memcheck synccheck}; do
    MOE_RUNNER_STREAM=1 sanitize $tool 'gpu.runner.*,gpu.graph*' "stream_$tool" "runner+graph, MOE_RUNNER_STREAM=1"
  done
}

step_race6() {
  MOE_RUNNER_STREAM=0 MOE_RUNNER_WGMMA=1 MOE_RUNNER_DECODE_STAGES=6 sanitize racecheck \
    'gpu.runner.*,gpu.fp8.block_128,gpu.fp8.per_tensor_dynamic,gpu.fp8.batch_independent' race6 \
    "runner + FP8 decode cases but gpu.runner.model_shapes, 6 stages forced" 'gpu.runner.model_shapes'
}

step_fp8stream() {
  local v tool
  for v in 0 1; do
    MOE_RUNNER_STREAM=$v cases "fp8_stream$v" "gpu.fp8.*, MOE_RUNNER_STREAM=$v" 'gpu.fp8.*'
  done
  for tool in memcheck synccheck; do
    MOE_RUNNER_STREAM=1 sanitize $tool 'gpu.fp8.*' "fp8_stream_$tool" "gpu.fp8.* but model_shapes, MOE_RUNNER_STREAM=1" \
      'gpu.fp8.model_shapes'
  done
}

step_racecheck_old() {
  MOE_RUNNER_STREAM=0 sanitize racecheck 'gpu.runner.*,gpu.graph*' racecheck_stream0 "runner+graph, MOE_RUNNER_STREAM=0"
}

step_probe() {
  local m
  nvcc -std=c++17 -arch=sm_90a -Ikernels -o "$build/racecheck_probe" scripts/racecheck_mbarrier_probe.cu \
    > "$logs/probe.log" 2>&1 || { note "probe build failed"; return 1; }
  for m in 0 1 2; do
    compute-sanitizer --tool racecheck "$build/racecheck_probe" $m >> "$logs/probe.log" 2>&1
    note "racecheck probe mode $m: $(grep -E 'RACECHECK SUMMARY|mode' "$logs/probe.log" | tail -n 2 | tr '\n' ' ')"
  done
}

step_decode() {
  local v i=0
  for v in ${MOE_TUNE_DECODE_ENVS:-MOE_RUNNER_STREAM=1 MOE_RUNNER_STREAM=0}; do
    i=$((i + 1))
    env "$v" timeout 240 python3 bench/moe_bench.py --no-peers --tokens ${MOE_TUNE_DECODE_T:-1,8,64,256} \
      --reps 15 --out "$logs/decode$i.json" > "$logs/decode$i.log" 2>&1
    note "moe_bench --no-peers decode, $v rc=$?"
    grep -E '^(mixtral|qwen3|deepseek)' "$logs/decode$i.log" | cut -c1-100 | tee -a "$summary"
  done
}

step_decode_timeline() {
  local v
  for v in 1 0; do
    MOE_RUNNER_STREAM=$v MOE_PDL=0 timeout 150 python3 bench/layer_timeline.py qwen3:1 deepseek:1 qwen3:8 \
      deepseek:8 mixtral:64 deepseek:256 --reps 20 > "$logs/decode_timeline$v.log" 2>&1
    note "decode timeline MOE_RUNNER_STREAM=$v rc=$?"
    grep -vE 'Warning|warn_once' "$logs/decode_timeline$v.log" | cut -c1-110 | head -n 60 >> "$summary"
  done
}

step_fp8san() {
  local tool
  for tool in memcheck synccheck; do
    sanitize $tool 'gpu.fp8.wide_tiles,gpu.fp8.persistent_items,gpu.fp8.block_128,gpu.fp8.degenerate_scales,gpu.fp8.nan_confined' \
      "fp8_$tool" "FP8 cases"
  done
}

step_fp8wide() {
  local bn rc
  for bn in 256 128; do
    MOE_RUNNER_FP8_BN=$bn MOE_TEST_PRINT_ERRORS=1 timeout 200 "$tests" -tc='gpu.fp8.*' > "$logs/fp8_bn$bn.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || status=1
    note "gpu.fp8.*, MOE_RUNNER_FP8_BN=$bn rc=$rc: $(grep -E '^\[doctest\] test cases' "$logs/fp8_bn$bn.log")"
    note "  $(errors "$logs/fp8_bn$bn.log")"
  done
  for bn in 256 128; do
    MOE_RUNNER_FP8_BN=$bn timeout 200 python3 bench/fp8_bench.py --tokens ${MOE_TUNE_FP8_T:-1024,8192,16384} \
      --reps 10 --out "$logs/fp8_bench_bn$bn.json" > "$logs/fp8_bench_bn$bn.log" 2>&1
    note "fp8_bench MOE_RUNNER_FP8_BN=$bn rc=$?"
    grep -vE 'Warning|warn_once' "$logs/fp8_bench_bn$bn.log" | cut -c1-170 | tail -n 16 | tee -a "$summary"
  done
  for bn in 256 128; do
    MOE_RUNNER_FP8_BN=$bn MOE_PDL=0 timeout 120 python3 bench/layer_timeline.py --quant block \
      ${MOE_TUNE_FP8_TIMELINE:-deepseek:8192 mixtral:8192} > "$logs/fp8_timeline_bn$bn.log" 2>&1
    note "FP8 timeline MOE_RUNNER_FP8_BN=$bn rc=$?"
    grep -vE 'Warning|warn_once' "$logs/fp8_timeline_bn$bn.log" | cut -c1-120 | head -n 40 >> "$summary"
  done
}

step_partial() {
  local tool
  for tool in memcheck synccheck; do
    sanitize $tool gpu.runner.wgmma_variants_partial_tiles,gpu.runner.wgmma_persistent_items "partial_$tool" \
      "partial tiles and several items per block, every variant"
  done
  MOE_RUNNER_WGMMA=1 MOE_RUNNER_STREAM=0 sanitize racecheck \
    'gpu.runner.wide_tiles_odd_sizes,gpu.runner.large_batch_small_model,gpu.runner.activation_gated_dtype,gpu.runner.wgmma_persistent_items' \
    partial_racecheck "runner cases, MOE_RUNNER_WGMMA=1 MOE_RUNNER_STREAM=0"
}

step_wgmma2() {
  local exp tool
  for exp in 0 1 2; do
    MOE_CLUSTER_EXP=$exp cases "wgmma2_exp$exp" "variant 2 cases, MOE_CLUSTER_EXP=$exp" "$variant2"
  done
  for tool in memcheck synccheck; do
    sanitize $tool "$variant2" "wgmma2_$tool" "variant 2 cases (idle warpgroups, partial tiles, persistent items)"
  done
}

step_skew() {
  local skew="$build-skew" rc
  cmake -S . -B "$skew" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DMOE_DEPS_DIR="$root/.deps" -DMOE_ENABLE_NCCL=OFF -DMOE_MBAR_WATCHDOG=ON -DMOE_DEBUG_SKEW_NS=20000 \
    > "$logs/skew_build.log" 2>&1 &&
    timeout 300 cmake --build "$skew" -j "$(nproc)" --target moe_gpu_tests >> "$logs/skew_build.log" 2>&1
  rc=$?
  note "skew build rc=$rc"
  [ $rc -eq 0 ] || { status=1; return 1; }
  cases skew "variant 2 cases with skewed warps" "$variant2" "$skew/tests/moe_gpu_tests"
  note "  watchdog reports: $(grep -c 'mbar watchdog' "$logs/skew.log")"
}

step_prefill2() {
  local env
  for env in MOE_RUNNER_WGMMA=1 MOE_RUNNER_WGMMA=2 "MOE_RUNNER_WGMMA=2 MOE_CLUSTER_EXP=1"; do
    env $env timeout 200 python3 bench/moe_bench.py --no-peers --tokens ${MOE_TUNE_PREFILL_T:-1024,4096,16384} \
      --reps 10 --out "$logs/prefill2_${env//[ =]/_}.json" > "$logs/prefill2_${env//[ =]/_}.log" 2>&1
    note "moe_bench --no-peers, $env rc=$?"
    grep -E '^(mixtral|qwen3|deepseek)' "$logs/prefill2_${env//[ =]/_}.log" | cut -c1-100 | tee -a "$summary"
  done
}

step_prefill() {
  timeout 240 python3 bench/moe_bench.py --no-peers --tokens ${MOE_TUNE_PREFILL_T:-256,1024,4096,16384} \
    --reps 10 --out "$logs/prefill.json" > "$logs/prefill.log" 2>&1
  note "moe_bench --no-peers prefill rc=$?"
  grep -E '^(mixtral|qwen3|deepseek)' "$logs/prefill.log" | cut -c1-100 | tee -a "$summary"
  timeout 200 python3 bench/fp8_bench.py --shapes deepseek --modes block --tokens ${MOE_TUNE_FP8_T:-1024,4096,8192} --reps 10 \
    --out "$logs/fp8_bench.json" > "$logs/fp8_bench.log" 2>&1
  note "fp8_bench rc=$?"
  grep -vE 'Warning|warn_once' "$logs/fp8_bench.log" | cut -c1-170 | tail -n 16 | tee -a "$summary"
  MOE_PDL=0 timeout 150 python3 bench/layer_timeline.py \
    ${MOE_TUNE_PREFILL_TIMELINE:-qwen3:1024 qwen3:4096 deepseek:1024 deepseek:4096 mixtral:1024} --reps 10 \
    > "$logs/prefill_timeline.log" 2>&1
  note "prefill timeline rc=$?"
  grep -vE 'Warning|warn_once' "$logs/prefill_timeline.log" | cut -c1-120 | head -n 60 >> "$summary"
}

for s in "$@"; do
  "step_$s" || { status=1; [ "$s" = build ] && break; }
done
tar -C "$out" -czf "$out/logs.tgz" logs && rm -rf "$logs"
note "status=$status"
exit $status
