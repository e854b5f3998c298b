#!/usr/bin/env bash
# CI check: the committed bindings/rust/moe-sys/src/bindings.rs equals what
# scripts/gen_rust_bindings.sh generates now; prints the diff and fails if not.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
committed="$root/bindings/rust/moe-sys/src/bindings.rs"
fresh="$(mktemp --suffix=.rs)"
trap 'rm -f "$fresh"' EXIT

"$root/scripts/gen_rust_bindings.sh" "$fresh" >/dev/null
if ! diff -u --label committed/bindings.rs --label generated/bindings.rs "$committed" "$fresh"; then
  echo "error: $committed is stale; run scripts/gen_rust_bindings.sh and commit the result" >&2
  exit 1
fi
echo "rust bindings up to date"
