#!/usr/bin/env bash
# A/B timing of library builds in one device call. Each DIR is a source tree
# (for example `git archive REV | tar -x -C build-ab/NAME`, under a gitignored
# build-* folder carried to the device); its library (target moe, sm_90a,
# NCCL off) is built into DIR/build, all of them at once. Then
# bench/moe_bench.py --no-peers of this checkout runs against each library in
# turn, MOE_AB_ROUNDS times (default 2, alternating, so that a drift of the
# clock shows up as a drift and not as a difference), on MOE_AB_SHAPES
# (default mixtral,qwen3,deepseek) and MOE_AB_T (default 1024,4096,16384).
# MOE_AB_BENCH replaces the benchmark and its arguments (for example
# "bench/fp8_bench.py --shapes deepseek --modes block --tokens 1024 --reps 3"),
# MOE_AB_TIMEOUT its time limit per run (default 300 s). MOE_AB_ENVS (a
# space-separated list of NAME=VALUE) runs each library once per setting in
# every round, as a column of its own (DIR@NAME=VALUE): one build, several
# run-time switches.
#   bash scripts/ab_libs.sh build-ab/base build-ab/new
# Writes $OUT/summary.txt (layer us per case, one column per library and
# round) and $OUT/ab.tgz (logs and JSON).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/build-ab-out}
cd "$root"
# shellcheck source=scripts/run_log.sh
source scripts/run_log.sh
run_log_open "$out/ab"
[ $# -ge 1 ] || { note "usage: ab_libs.sh DIR..."; exit 2; }
status=0

start=$SECONDS
for d in "$@"; do
  (cmake -S "$d" -B "$d/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a \
     -DMOE_DEPS_DIR="$root/.deps" -DMOE_ENABLE_NCCL=OFF > "$logs/build_$(basename "$d").log" 2>&1 &&
   timeout 400 cmake --build "$d/build" -j "$(nproc)" --target moe >> "$logs/build_$(basename "$d").log" 2>&1) &
done
wait
for d in "$@"; do
  if [ -e "$d/build/libmoe.so" ]; then
    note "built $d"
  else
    note "build of $d failed"
    tail -n 20 "$logs/build_$(basename "$d").log"
    status=1
  fi
done
note "builds $((SECONDS - start))s"
[ $status -eq 0 ] || exit 1

export PYTHONUNBUFFERED=1 PYTHONPATH="$root/bindings/python"
envs=${MOE_AB_ENVS:-}
columns=()
for d in "$@"; do
  if [ -z "$envs" ]; then
    columns+=("$(basename "$d")")
  else
    for e in $envs; do columns+=("$(basename "$d")@$e"); done
  fi
done
for r in $(seq 1 "${MOE_AB_ROUNDS:-2}"); do
  for d in "$@"; do
    for e in ${envs:-none}; do
      name=$(basename "$d")
      setting=()
      if [ "$e" != none ]; then
        name="$name@$e"
        setting=("$e")
      fi
      bench=${MOE_AB_BENCH:-bench/moe_bench.py --no-peers --shapes ${MOE_AB_SHAPES:-mixtral,qwen3,deepseek} --tokens ${MOE_AB_T:-1024,4096,16384} --reps 10}
      # shellcheck disable=SC2086  # the benchmark's arguments split at spaces
      env "${setting[@]}" MOE_LIB_PATH="$d/build" timeout "${MOE_AB_TIMEOUT:-300}" python3 $bench \
        --out "$logs/${name}_$r.json" > "$logs/${name}_$r.log" 2>&1
      rc=$?
      [ $rc -eq 0 ] || status=1
      note "bench $name round $r rc=$rc"
    done
  done
done

python3 - "$logs" "${columns[@]}" <<'EOF' | tee -a "$summary"
import glob, json, os, sys
logs, dirs = sys.argv[1], sys.argv[2:]
runs = {}
for d in dirs:
    for path in sorted(glob.glob(os.path.join(logs, f"{d}_*.json"))):
        for r in json.load(open(path))["results"]:
            key = (r["shape"], r.get("mode", "bf16"), r["T"])
            runs.setdefault(key, {}).setdefault(d, []).append(
                (r.get("layer_us", r.get("runner_us")), r["valid_slots"], r["experts_hit"]))
print("us per round (moe_bench: layer, fp8_bench: runner); valid slots / experts hit of the first round")
for (shape, mode, T), by in sorted(runs.items()):
    cells = []
    for d in dirs:
        v = by.get(d, [])
        cells.append(f"{d} " + "/".join(f"{x[0]:.1f}" for x in v) + (f" ({v[0][1]:.0f}/{v[0][2]:.1f})" if v else ""))
    print(f"{shape:9s} {mode:10s} T={T:6d}  " + "  ".join(cells))
EOF
tar -C "$out" -czf "$out/ab.tgz" ab && rm -rf "$logs"
note "status=$status"
exit $status
