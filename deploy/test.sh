#!/usr/bin/env bash
# Runs every check CI runs: formatting, the unit and multi-process tests, clippy.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-debian.sh
source deploy/env.sh
start=$(date +%s)
step() { echo "=== $* ($(( $(date +%s) - start ))s)" >&2; }
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT

step "cargo fmt --check"
cargo fmt --all -- --check
step "build the runtimeai binary the integration tests start"
cargo build --bin runtimeai
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test"
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$test_log" || status=$?
step "schemathesis against a live cluster"
fuzz=passed
deploy/schemathesis.sh "$CARGO_TARGET_DIR/debug/runtimeai" 90 || { fuzz=failed; status=1; }
passed=$(grep -oE '^test result: .* ([0-9]+) passed' "$test_log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed;' "$test_log" | awk '{s+=$1} END {print s+0}')
[ "$fuzz" = passed ] && passed=$((passed + 1)) || failed=$((failed + 1))
step "done"
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
