#!/usr/bin/env bash
# Builds RuntimeAI and runs a local three-node cluster (`runtimeai dev`); Ctrl-C stops it.
# Extra arguments go to `runtimeai dev` (e.g. --fresh, --nodes 5).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup-debian.sh
source deploy/env.sh
cargo build --bin runtimeai
exec "$CARGO_TARGET_DIR/debug/runtimeai" dev "$@"
