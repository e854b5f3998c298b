#!/usr/bin/env bash
# Multi-GPU check of the NCCL all-to-all dispatcher, run on a machine with at
# least 2 GPUs from the repository root:
#   bash scripts/nccl_check.sh                       # every visible GPU, at most 8
#   MOE_NCCL_RANKS=8 bash scripts/nccl_check.sh      # EP=8 (EP=4: MOE_NCCL_RANKS=4)
#   MOE_NCCL_STEPS="tests example" bash scripts/nccl_check.sh   # a subset of the runs
# Configures and builds libmoe with NCCL (sm_90a, Ninja, staged header-only
# deps in .deps), then runs at MOE_NCCL_RANKS ranks (default: every visible
# GPU, at most 8) the suites (moe_nccl_tests), the expert-parallel layer
# example (nccl_ep_layer) and the benchmark (moe_a2a_bench, JSON in
# a2a_bench.json); on a machine with 8 or more GPUs the benchmark also runs
# at 8 ranks if MOE_NCCL_RANKS asked for fewer (a2a_bench_ep8.json). Logs go
# to $OUT (the device tool's folder) or build-nccl-check/logs; a summary is
# printed last.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0): on shared hosts a program
# that uses it can put the GPUs out of service.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOE_NCCL_BUILD_DIR:-$root/build-nccl-check}
out=${OUT:-$build/logs}
mkdir -p "$out"
summary="$out/nccl_summary.txt"
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
  printf '%-16s %-28s %4ss  %s\n' "$name" "$verdict" $((SECONDS - start)) "$(basename "$log")" | tee -a "$summary"
}

{
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  nvidia-smi topo -m
} >> "$summary" 2>&1

# Visible GPUs (CUDA_VISIBLE_DEVICES narrows them) and the rank count of every run.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  gpus=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
else
  gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c .)
fi
ranks=${MOE_NCCL_RANKS:-$((gpus < 8 ? gpus : 8))}
if ! [[ "$ranks" =~ ^[0-9]+$ ]] || [ "$ranks" -lt 2 ] || [ "$ranks" -gt "$gpus" ]; then
  echo "need 2 <= MOE_NCCL_RANKS <= visible GPUs ($gpus); MOE_NCCL_RANKS=$ranks: stopping" |
    tee -a "$summary"
  exit 1
fi
export MOE_NCCL_RANKS=$ranks
steps=${MOE_NCCL_STEPS:-tests example bench}
echo "ranks $ranks of $gpus visible GPUs; steps: $steps" | tee -a "$summary"
wants() { [[ " $steps " == *" $1 "* ]]; }

# NCCL from the CUDA toolkit when it has one, else the one PyTorch's wheels ship.
nccl_args=()
if [ ! -e /usr/local/cuda/include/nccl.h ] && [ ! -e /usr/include/nccl.h ]; then
  pydir=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null || true)
  if [ -n "$pydir" ] && [ -e "$pydir/include/nccl.h" ]; then
    lib=$(ls "$pydir"/lib/libnccl.so* | head -n 1)
    nccl_args=(-DNCCL_INCLUDE_DIR="$pydir/include" -DNCCL_LIBRARY="$lib")
    export LD_LIBRARY_PATH="$pydir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "NCCL from $pydir" >> "$summary"
  fi
fi

step configure "$out/nccl_build.log" 120 cmake -S "$root" -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a -DMOE_DEPS_DIR="$root/.deps" \
  -DMOE_ENABLE_NCCL=ON "${nccl_args[@]}"
grep -q 'NCCL=ON' "$out/nccl_build.log" || { echo "NCCL not found: stopping" | tee -a "$summary"; exit 1; }
step build "$out/nccl_build.log" 360 cmake --build "$build" -j "$(nproc)" \
  --target moe_nccl_tests nccl_ep_layer moe_a2a_bench
bin="$build/tests/nccl"
if [ ! -x "$bin/moe_nccl_tests" ]; then
  tail -n 40 "$out/nccl_build.log"
  echo "no NCCL test binary; stopping" | tee -a "$summary"
  exit 1
fi

# Time limits grow with the rank count (180 s, 60 s, 150 s at 2 ranks).
logs=()
if wants tests; then
  step tests "$out/nccl_tests.log" $((120 + 30 * ranks)) "$bin/moe_nccl_tests" --duration=true
  logs+=(nccl_tests.log)
fi
if wants example; then
  step example "$out/nccl_example.log" $((50 + 5 * ranks)) "$bin/nccl_ep_layer" "$ranks"
  logs+=(nccl_example.log)
fi
if wants bench && [ $((256 % ranks)) -ne 0 ]; then
  printf '%-16s %s\n' bench "SKIPPED: $ranks ranks do not divide the benchmark's E = 256" |
    tee -a "$summary"
elif wants bench; then
  step bench "$out/a2a_bench.log" $((90 + 30 * ranks)) "$bin/moe_a2a_bench" --ranks "$ranks" \
    --json "$out/a2a_bench.json"
  logs+=(a2a_bench.log)
  if [ "$gpus" -ge 8 ] && [ "$ranks" -ne 8 ]; then
    step bench_ep8 "$out/a2a_bench_ep8.log" 330 "$bin/moe_a2a_bench" --ranks 8 \
      --json "$out/a2a_bench_ep8.json"
    logs+=(a2a_bench_ep8.log)
  fi
fi

for f in "${logs[@]}"; do
  echo "--- tail of $f"
  tail -n 25 "$out/$f"
done
echo "--- summary ($([ $status -eq 0 ] && echo all passed || echo FAILURES)) ---"
cat "$summary"
exit $status
