#!/usr/bin/env bash
# Fuzzes the REST API of a real local cluster with schemathesis, driven by the OpenAPI document
# the cluster serves: no response may be a 5xx or differ from the document. Bounded in time.
# Membership changes are left out: random ids and addresses would take the cluster apart; so are
# revoking and rotating keys by id (a lucky id would lock the run out). Requests authenticate as
# the admin `runtimeai dev` made, over HTTPS checked against dev's CA.
#   usage: deploy/schemathesis.sh <path to the runtimeai binary> [max seconds]
set -euo pipefail
binary=$1
max_time=${2:-90}
deploy=$(cd "$(dirname "$0")" && pwd)
source "$deploy/env.sh"

venv=$("$deploy/python-env.sh")

# Three consecutive free ports for REST and three for gRPC, below Linux's ephemeral range
# (32768-60999): there no client's outgoing connection takes a node's port before it listens.
free_base() {
  /usr/bin/python3 - <<'PY'
import random, socket
for _ in range(200):
    base = random.randint(20000, 31997)
    socks = []
    try:
        for p in range(base, base + 3):
            s = socket.socket(); s.bind(("127.0.0.1", p)); socks.append(s)
        print(base); break
    except OSError:
        pass
    finally:
        for s in socks: s.close()
PY
}
http=$(free_base); grpc=$(free_base)
work=$(mktemp -d)
# mktemp makes it 0700; the sandboxes' users (host uid 100000 and up) must pass through it.
chmod 755 "$work"
setsid "$binary" dev --data-dir "$work/dev" --http-port "$http" --grpc-port "$grpc" > "$work/dev.out" 2>&1 &
dev=$!
# The nodes end their sandboxes and unmount their roots when they stop; whatever a node that did
# not stop cleanly left mounted is unmounted before the directory goes.
cleanup() {
  kill -TERM -- "-$dev" 2>/dev/null || true
  wait "$dev" 2>/dev/null || true
  findmnt -rn -o TARGET 2>/dev/null | grep "^$work/" | sort -r | xargs -r umount -l 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# Up to 120 s: a loaded machine starts three nodes slowly (the wait ends as soon as they are ready).
for _ in $(seq 1 600); do
  grep -q "cluster ready" "$work/dev.out" && break
  kill -0 "$dev" 2>/dev/null || break
  sleep 0.2
done
grep -q "cluster ready" "$work/dev.out" || { cat "$work/dev.out" "$work"/dev/node-*.log >&2; echo "error: the cluster did not start" >&2; exit 1; }

# Run from the scratch directory: schemathesis leaves a cache where it runs.
# Hypothesis's too_slow and filter_too_much health checks judge how fast inputs are generated
# and answered, which says nothing about the API on a loaded machine: suppressed. A generous
# request timeout for the same reason (a server that does not answer still fails after it).
cd "$work"
# A 503 (with Retry-After) is a documented answer of every route while the cluster elects a
# leader, which a loaded machine can make it do during the run: expected, like a 4xx. A 500, or
# any other 5xx, still fails the run.
# A warning fails the run too: each one says the document and the API disagree somewhere, or that
# a call was never reached with data it accepts.
cat > schemathesis.toml <<'TOML'
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]

[warnings]
fail-on = true
TOML
# The hooks (deploy/schemathesis_hooks.py) say to the generator what the document cannot (fresh
# idempotency keys, a tenant header that agrees with the body, policies scoped to env=fuzz) and
# make, before the run, the data random ids never find (a running sandbox, a snapshot, operations
# waiting for another principal's approval).
export RUNTIMEAI_URL="https://127.0.0.1:$http" RUNTIMEAI_CA="$work/dev/certs/ca.pem" RUNTIMEAI_TOKEN="$(cat "$work/dev/admin.key")"
# Two runs: the settings change the rules every other request is judged by (sizes, limits,
# quotas), so a random catalogue or a quota of 0 would make later valid requests fail for reasons
# of their own; they are fuzzed on their own, after the rest, without fixtures.
fuzz() {
  PYTHONPATH="$deploy" SCHEMATHESIS_HOOKS=schemathesis_hooks "$venv/bin/st" --config-file schemathesis.toml run \
    "https://127.0.0.1:$http/v1/openapi.json" --tls-verify "$work/dev/certs/ca.pem" \
    --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
    --max-examples 15 --seed 1 \
    --suppress-health-check too_slow,filter_too_much --request-timeout 30 \
    -H "Authorization: Bearer $RUNTIMEAI_TOKEN" --no-color "$@"
}
fuzz --max-time "$max_time" --phases examples,coverage,fuzzing,stateful \
  --exclude-path-regex '^/v1/(cluster/members|cluster/settings|keys/)'
RUNTIMEAI_FIXTURES=0 fuzz --max-time 30 --phases examples,coverage,fuzzing --include-path /v1/cluster/settings
