#!/usr/bin/env bash
# Compares the sm_90a SASS of one kernel file at two revisions (no GPU needed):
#   scripts/sass_diff.sh REV_A REV_B kernels/moe_runner_fp8.cu
# Each revision is exported with `git archive` into a temporary folder and
# FILE compiled to a cubin (nvcc -O3, sm_90a, MOE_CUDA_WGMMA; generated
# headers from build-cuda/include or $MOE_SASS_INCLUDE); the instruction text
# of `cuobjdump -sass` (encodings dropped) is compared. Exit 0 when equal.
# cuobjdump: the CUDA toolkit's, else `scripts/setup.sh --sass-tools`.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: sass_diff.sh REV_A REV_B FILE" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
inc=${MOE_SASS_INCLUDE:-$root/build-cuda/include}
cuobjdump=$(command -v cuobjdump || true)
if [ -z "$cuobjdump" ]; then
  cuobjdump=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'bin', 'cuobjdump'))" 2>/dev/null || true)
fi
[ -x "$cuobjdump" ] || { echo "sass_diff: no cuobjdump (scripts/setup.sh --sass-tools)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for rev in "$1" "$2"; do
  dir="$tmp/$(echo "$rev" | tr -c 'A-Za-z0-9' _)"
  mkdir -p "$dir"
  git -C "$root" archive "$rev" | tar -x -C "$dir"
  (cd "$dir" && nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DMOE_CUDA_WGMMA=1 -Iinclude \
     -I"$inc" -Ikernels -Isrc -cubin -o "$dir.cubin" "$3")
  "$cuobjdump" -sass "$dir.cubin" | grep -E '^\s+/\*[0-9a-f]{4,}\*/' | sed 's#/\* 0x[0-9a-f]* \*/##' > "$dir.sass"
done
a="$tmp/$(echo "$1" | tr -c 'A-Za-z0-9' _).sass"
b="$tmp/$(echo "$2" | tr -c 'A-Za-z0-9' _).sass"
if cmp -s "$a" "$b"; then
  echo "sass_diff: $3 equal at $1 and $2 ($(wc -l < "$a") instructions)"
else
  echo "sass_diff: $3 differs between $1 and $2"
  diff "$a" "$b" | head -n 40
  exit 1
fi
