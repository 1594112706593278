#!/usr/bin/env bash
# Runs every check CI runs: formatting, the unit and multi-process tests, clippy.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-debian.sh
source deploy/env.sh
start=$(date +%s)
step() { echo "=== $* ($(( $(date +%s) - start ))s)" >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "build the runtimeai binary the integration tests start"
cargo build --bin runtimeai
step "cargo test"
cargo test --workspace --no-fail-fast
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "all checks passed"
