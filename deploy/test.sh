#!/usr/bin/env bash
# Runs every check CI runs: formatting, the unit and multi-process tests, clippy.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-debian.sh
source deploy/env.sh
# Real clients the tests use (schemathesis, the Standard Webhooks library, the MCP SDKs).
deploy/python-env.sh >/dev/null
deploy/node-env.sh >/dev/null
# As root (CI), the sandbox tests must run: a host that cannot run sandboxes fails them.
[ "$(id -u)" -eq 0 ] && export RUNTIMEAI_REQUIRE_SANDBOXES=1
start=$(date +%s)
step() { echo "=== $* ($(( $(date +%s) - start ))s)" >&2; }
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT

step "cargo fmt --check"
cargo fmt --all -- --check
step "build the binaries the integration tests start (runtimeai, runtimeai-chaos, runtimeai-bench)"
cargo build --bins
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test"
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$test_log" || status=$?
step "schemathesis against a live cluster"
fuzz=passed
deploy/schemathesis.sh "$CARGO_TARGET_DIR/debug/runtimeai" 90 || { fuzz=failed; status=1; }
step "chaos: every scenario in a short run"
chaos=passed
chaos_log=$(mktemp)
"$CARGO_TARGET_DIR/debug/runtimeai-chaos" run --scenario all --duration 15s --seed "${CHAOS_SEED:-1}" \
  --out "$CARGO_TARGET_DIR/chaos-reports" | tee "$chaos_log" || { chaos=failed; status=1; }
chaos_passed=$(grep -oE '^chaos: [0-9]+ scenarios passed' "$chaos_log" | grep -oE '[0-9]+' || echo 0)
chaos_failed=$(grep -oE ', [0-9]+ failed' "$chaos_log" | tail -1 | grep -oE '[0-9]+' || echo 1)
rm -f "$chaos_log"
step "benchmark smoke run (runtimeai-bench --smoke)"
bench=passed
"$CARGO_TARGET_DIR/debug/runtimeai-bench" --smoke --out "$CARGO_TARGET_DIR/bench-smoke" >/dev/null || { bench=failed; status=1; }
passed=$(grep -oE '^test result: .* ([0-9]+) passed' "$test_log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed;' "$test_log" | awk '{s+=$1} END {print s+0}')
[ "$fuzz" = passed ] && passed=$((passed + 1)) || failed=$((failed + 1))
passed=$((passed + chaos_passed))
[ "$bench" = passed ] && passed=$((passed + 1)) || failed=$((failed + 1))
failed=$((failed + chaos_failed))
[ "$chaos" = passed ] || [ "$chaos_failed" -gt 0 ] || failed=$((failed + 1))
step "done"
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
