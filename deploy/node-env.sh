#!/usr/bin/env bash
# Installs the npm packages the tests use as real clients, with the machine's Node.js: the
# official MCP TypeScript SDK (a second MCP client beside the Python one). Pinned; redone when
# the pin changes.
#   usage: deploy/node-env.sh   (prints the directory holding node_modules)
set -euo pipefail
dir="$HOME/.cache/runtimeai/node"
packages="@modelcontextprotocol/sdk@1.32.2"
if [ "$(cat "$dir/.packages" 2>/dev/null)" != "$packages" ]; then
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  npm install --prefix "$dir" --no-audit --no-fund --silent $packages >&2
  echo "$packages" > "$dir/.packages"
fi
echo "$dir"
