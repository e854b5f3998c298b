#!/usr/bin/env bash
# Device diagnostic of the variant 2 hang (MOE_RUNNER_WGMMA=2): builds the
# library twice (with and without -DMOE_MBAR_WATCHDOG=ON), runs the cases that
# hung in runs 133-138 under the watchdog (a wait of 2 s reports block, rank,
# thread, barrier state, step and item, then traps), and, without it, attaches
# cuda-gdb to a hung process to see where every warp waits (runs 139-140 found
# the cause this way: docs/perf-notes.md v20; since 5acfd53 these cases
# finish, so the cuda-gdb part reports "finished"). A template for the next hang.
#   bash scripts/hang_probe.sh [OUTDIR]
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/hang_probe}}
mkdir -p "$out"
build() {  # dir, extra cmake args
  cmake -S . -B "$1" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DMOE_DEPS_DIR="$PWD/.deps" -DMOE_ENABLE_NCCL=OFF -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF \
    -DMOE_BUILD_BENCH=OFF "${@:2}" >/dev/null && cmake --build "$1" -j 8 --target moe >/dev/null 2>&1
  echo "built $1 rc=$?"
}
build build-wd -DMOE_MBAR_WATCHDOG=ON &
build build-rel &
wait
export PYTHONPATH=$PWD/bindings/python:$PWD/bench PYTHONUNBUFFERED=1 MOE_RUNNER_WGMMA=2
case_run() {  # lib dir, exp, shape, T, seconds
  echo "== $1 MOE_CLUSTER_EXP=$2 $3 T=$4"
  MOE_CLUSTER_EXP=$2 MOE_LIB_PATH=$PWD/$1 timeout "$5" python3 bench/moe_bench.py --no-peers --shapes "$3" \
    --tokens "$4" --reps 3 --out /tmp/x.json 2>&1 | head -3000
  echo "rc=${PIPESTATUS[0]}"
}
{
  case_run build-wd 0 mixtral 1024 60
  case_run build-wd 2 mixtral 1024 60
  case_run build-wd 2 mixtral 4096 60
  case_run build-wd 0 deepseek 1024 60
  case_run build-wd 1 mixtral 1024 60
  MOE_PDL=0 case_run build-rel 0 mixtral 1024 60
  MOE_PDL=0 case_run build-rel 2 mixtral 4096 60
} > "$out/watchdog.log" 2>&1
# Without the watchdog: attach cuda-gdb to the hung process.
gdb=$(command -v cuda-gdb || echo /usr/local/cuda/bin/cuda-gdb)
{
  echo "cuda-gdb: $gdb"; ls -l "$gdb" 2>&1
  MOE_CLUSTER_EXP=0 MOE_LIB_PATH=$PWD/build-rel python3 bench/moe_bench.py --no-peers --shapes mixtral \
    --tokens 1024 --reps 3 --out /tmp/y.json > "$out/rel_bench.log" 2>&1 &
  pid=$!
  sleep 40
  if kill -0 $pid 2>/dev/null; then
    echo "still running after 40 s: attaching"
    cat > /tmp/gdbcmds <<'G'
set pagination off
set width 0
python
def run(cmd, limit=120):
    try:
        out = gdb.execute(cmd, to_string=True)
    except Exception as e:
        out = "ERR %s" % e
    lines = out.splitlines()
    print(">>> " + cmd)
    print("\n".join(lines[:limit]) + ("\n... %d more lines" % (len(lines) - limit) if len(lines) > limit else ""))
run("info cuda kernels")
for k in range(3):
    run("cuda kernel %d" % k)
    run("info cuda blocks")
    run("info cuda threads", 200)
    run("bt")
    run("x/8i $pc")
run("info cuda sms", 200)
end
G
    timeout 120 "$gdb" -p $pid -batch -x /tmp/gdbcmds 2>&1 | grep -v "LWP" | head -900
  else
    echo "finished within 40 s"; wait $pid; echo "rc=$?"
  fi
  kill -9 $pid 2>/dev/null
} > "$out/gdb.log" 2>&1
tail -5 "$out/watchdog.log"
