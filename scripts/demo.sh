#!/usr/bin/env bash
# The README's demo command: builds libmoe and runs a real MoE layer end to
# end (route, dispatch, experts), checked against a float64 reference, timed.
# On the GPU when one is present, on the CPU backend otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
moe_configure >/dev/null
cmake --build "$MOE_BUILD_DIR" -j "$MOE_JOBS" --target moe_demo
"$MOE_BUILD_DIR/examples/moe_demo" "$@"
