# Sourced by the scripts in deploy/: one place for the build environment.
# Build output lives outside the clone and survives fresh clones, so warm runs stay fast.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/runtimeai/target}"
# No incremental cache: it does not help clean CI builds and costs disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
