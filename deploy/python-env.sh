#!/usr/bin/env bash
# Makes the private Python environment the tests use real clients from: schemathesis (the API
# fuzzer) and standardwebhooks (the Standard Webhooks reference library, which checks the
# signatures of our webhook deliveries) and mcp (the official MCP SDK, a client of our MCP
# server). Pinned; redone when the pins change.
#   usage: deploy/python-env.sh   (prints the environment's directory)
set -euo pipefail
venv="$HOME/.cache/runtimeai/venv"
requirements="schemathesis==4.32.5 standardwebhooks==1.0.0 mcp==1.30.0"
if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ]; then
  [ -x "$venv/bin/pip" ] || /usr/bin/python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $requirements >&2
  echo "$requirements" > "$venv/.requirements"
fi
echo "$venv"
