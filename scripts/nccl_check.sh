#!/usr/bin/env bash
# Two-GPU check of the NCCL all-to-all dispatcher, run on a machine with at
# least 2 GPUs from the repository root:
#   scripts/nccl_check.sh
# Configures and builds libmoe with NCCL (sm_90a, Ninja, staged header-only
# deps in .deps), then runs the two-GPU suites (moe_nccl_tests), the
# expert-parallel layer example (nccl_ep_layer) and the benchmark
# (moe_a2a_bench, JSON in a2a_bench.json). Logs go to $OUT (the device
# tool's folder) or build-nccl-check/logs; a summary is printed last.
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
  echo "no two-GPU test binary; stopping" | tee -a "$summary"
  exit 1
fi

step tests "$out/nccl_tests.log" 180 "$bin/moe_nccl_tests" --duration=true
step example "$out/nccl_example.log" 60 "$bin/nccl_ep_layer"
step bench "$out/a2a_bench.log" 150 "$bin/moe_a2a_bench" --json "$out/a2a_bench.json"

for f in nccl_tests.log nccl_example.log a2a_bench.log; do
  echo "--- tail of $f"
  tail -n 25 "$out/$f"
done
echo "--- summary ($([ $status -eq 0 ] && echo all passed || echo FAILURES)) ---"
cat "$summary"
exit $status
