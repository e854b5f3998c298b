#!/usr/bin/env bash
# Runs the Rust create/use/destroy tests (bindings/rust/moe/tests/lifecycle.rs)
# and the error-path tests under valgrind: any leak or memory error fails.
# Needs libmoe.so where moe-sys/build.rs finds it (MOE_LIB_DIR, pkg-config or build*/).
# MOE_CARGO_FEATURES=nccl (a libmoe built with NCCL) adds the a2a handle's cycles.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
manifest="$root/bindings/rust/Cargo.toml"
command -v valgrind >/dev/null || { echo "error: valgrind not found (apt-get install valgrind)" >&2; exit 2; }

status=0
for test in lifecycle errors; do
  exe="$(cargo test --offline --manifest-path "$manifest" -p moe ${MOE_CARGO_FEATURES:+--features "$MOE_CARGO_FEATURES"} --test "$test" --no-run --message-format=json \
         | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' | tail -n 1)"
  [[ -x "$exe" ]] || { echo "error: no test binary for $test" >&2; exit 2; }
  echo "== valgrind $test ($exe)"
  # One test thread: the harness's worker threads stay out of the leak report.
  if ! valgrind --leak-check=full --error-exitcode=1 --quiet \
       --suppressions="$root/bindings/rust/valgrind.supp" "$exe" --test-threads=1; then
    echo "FAILED: valgrind found leaks or memory errors in $test" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] && echo "rust leak check: clean"
exit $status
