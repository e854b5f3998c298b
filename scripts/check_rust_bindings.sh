#!/usr/bin/env bash
# CI check: the committed bindings/rust/moe-sys/src/bindings.rs and
# bindings_nccl.rs equal what scripts/gen_rust_bindings.sh generates now;
# prints the diff and fails if not.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
committed="$root/bindings/rust/moe-sys/src"
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT

"$root/scripts/gen_rust_bindings.sh" "$fresh" >/dev/null
status=0
for f in bindings.rs bindings_nccl.rs; do
  if ! diff -u --label "committed/$f" --label "generated/$f" "$committed/$f" "$fresh/$f"; then
    echo "error: $committed/$f is stale; run scripts/gen_rust_bindings.sh and commit the result" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] && echo "rust bindings up to date"
exit $status
