#!/usr/bin/env bash
# Makes the private Python environments the tests use real clients from: schemathesis (the API
# fuzzer), standardwebhooks (the Standard Webhooks reference library, which checks the signatures
# of our webhook deliveries) and mcp (the official MCP SDK, a client of our MCP server); and,
# apart, openapi-python-client, which generates a Python client from our OpenAPI document (with
# what that client needs to run). Pinned; redone when the pins change.
#   usage: deploy/python-env.sh   (prints the first environment's directory)
set -euo pipefail
make_env() {
  local venv=$1 requirements=$2
  if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ]; then
    [ -x "$venv/bin/pip" ] || /usr/bin/python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet --disable-pip-version-check $requirements >&2
    echo "$requirements" > "$venv/.requirements"
  fi
}
make_env "$HOME/.cache/runtimeai/venv" "schemathesis==4.32.5 standardwebhooks==1.0.0 mcp==1.30.0"
make_env "$HOME/.cache/runtimeai/venv-generator" "openapi-python-client==0.29.1 python-dateutil==2.9.0.post0"
echo "$HOME/.cache/runtimeai/venv"
