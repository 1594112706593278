"""schemathesis hooks for RuntimeAI (used by deploy/schemathesis.sh).

What the OpenAPI document cannot say, said to the generator for the cases meant to be valid:
- every mutating request gets a fresh Idempotency-Key (the generator draws the same few keys for
  different requests, which the API rightly refuses with 422 idempotency-key-reused), the same in
  the header and in a body's `idempotency_key`;
- the tenant_id header agrees with a body's tenant_id (a rule across header and body);
- the policies the fuzzer makes apply only to runtimes labelled env=fuzz, so that one random
  deny-everything rule does not turn every later request of the run into a 403;
- an If-Match it makes up names a version that never was: a valid case asks for any (`*`);
- a command it makes up runs at most 5 s, logs are read without `follow` and event streams end after
  a second (neither would end otherwise);
- a key's expiry is in the future (the document can say only that it is a date-time);
- a webhook's (and an observer's) URL is a name that never resolves, its event types well formed,
  and the settings' webhook networks are networks;
- an action list runs a migration alone, and a migration names one destination, however often;
- a size catalogue lists its sizes smallest first (cpu and cost never decrease) and names each
  once: rules across the items of an array.
And how to read the answers that are not JSON: exec's lines (NDJSON) and a file's bytes.
And the data random ids never find, made on first use as its own principals would make it, and
made again when the fuzzer has changed it (schemathesis's advice for "missing test data"): a
running sandbox for exec, logs and files, a vcluster for its kubeconfig, intents and restarts, a
webhook subscription, a stopped VM to start
(and read the console of), a paused VM to resume, a runtime with a snapshot to restore and an
intent to read, and operations another principal asked for that wait for approval (nobody may
approve their own).
"""

import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.request
import ssl
import uuid

import schemathesis
from schemathesis import GenerationMode

URL = os.environ["RUNTIMEAI_URL"]
ADMIN = os.environ["RUNTIMEAI_TOKEN"]
TLS = ssl.create_default_context(cafile=os.environ["RUNTIMEAI_CA"])


def call(method, path, body=None, token=ADMIN):
    raw = isinstance(body, bytes)
    data = body if raw or body is None else json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    request.add_header("Idempotency-Key", str(uuid.uuid4()))
    if data is not None:
        request.add_header("Content-Type", "application/octet-stream" if raw else "application/json")
    for attempt in range(50):
        try:
            response = urllib.request.urlopen(request, context=TLS, timeout=30)
            break
        except urllib.error.HTTPError as error:
            # A 503 with Retry-After (an election on a loaded machine) is asked again, briefly.
            if error.code == 503 and attempt < 49:
                time.sleep(0.2)
                continue
            detail = error.read().decode(errors="replace")
            raise RuntimeError(f"fixture: {method} {path}: {error.code} {detail}") from error
    with response:
        answer = response.read()
        return json.loads(answer) if answer and response.headers.get_content_type().endswith("json") else None


def wait_until(path, done, token=ADMIN):
    for _ in range(300):
        value = call("GET", path, token=token)
        if done(value):
            return value
        time.sleep(0.2)
    raise RuntimeError(f"fixture: {path} never got ready")


class Fixtures:
    """The data random ids never find, made on first use and made again when the fuzzer has
    changed it (it finds the ids in lists too, and stops, scales and deletes what it finds)."""

    def __init__(self):
        self.made = 0
        self.kept = {}
        self.operator = call("POST", "/v1/keys", {"name": "fixture-operator", "kind": "human", "tenants": ["*"],
                                                  "roles": ["operator"]})["token"]
        call("POST", "/v1/policies", {"name": "fixture-approval", "scope_env": "fixture-approval",
                                      "rules": [{"kind": "require_approval", "selector": {"actions": "snapshot"}}]})

    def runtime(self, kind, token=ADMIN, labels=None):
        self.made += 1
        body = {"name": f"fixture-{self.made}", "type": kind, "labels": labels or {}}
        made = call("POST", "/v1/runtimes", body, token)
        wait_until(f"/v1/runtimes/{made['id']}", lambda r: r["state"] == "running", token)
        return made["id"]

    def still(self, name, good, make):
        """The fixture `name` if `good(path)` still holds of it, else a new one from `make()`."""
        kept = self.kept.get(name)
        try:
            if kept is not None and good(kept):
                return kept
        except RuntimeError:
            pass
        self.kept[name] = make()
        return self.kept[name]

    def webhook(self):
        """A subscription (to a name that never resolves), made again once the fuzzer deleted it."""
        exists = lambda ids: call("GET", f"/v1/webhooks/{ids['webhook_id']}") is not None
        url = f"https://fixture-{uuid.uuid4().hex[:8]}.invalid/hook"
        return self.still("webhook", exists, lambda: {"webhook_id": call("POST", "/v1/webhooks", {"url": url})["webhook"]["id"]})

    def running(self, kind):
        state = lambda ids: call("GET", f"/v1/runtimes/{ids['runtime_id']}")["state"] == "running"
        return self.still(kind, state, lambda: {"runtime_id": self.runtime(kind)})

    def sandbox(self):
        """A running sandbox with a file to read, `fixture.txt`."""
        def make():
            made = self.runtime("sandbox")
            for attempt in range(50):
                try:
                    call("PUT", f"/v1/runtimes/{made}/files/fixture.txt", b"kept for reading\n")
                    break
                except RuntimeError:
                    if attempt == 49:
                        raise
                    time.sleep(0.2)
            return {"runtime_id": made, "path": "fixture.txt"}
        state = lambda ids: call("GET", f"/v1/runtimes/{ids['runtime_id']}")["state"] == "running"
        return self.still("sandbox", state, make)

    def vm_in(self, state, action):
        """A VM in `state`, brought there by the lifecycle call `action`."""
        def make():
            made = self.runtime("vm")
            done = call("POST", f"/v1/runtimes/{made}/lifecycle/{action}", {})
            wait_until(f"/v1/operations/{done['id']}", lambda o: o["status"] == "succeeded")
            return {"runtime_id": made}
        holds = lambda ids: call("GET", f"/v1/runtimes/{ids['runtime_id']}")["state"] == state
        return self.still(state, holds, make)

    def stopped(self):
        """A stopped VM, for a start to start."""
        return self.vm_in("stopped", "stop")

    def paused(self):
        """A paused VM, for a resume to resume."""
        return self.vm_in("paused", "pause")

    def waiting(self, decision):
        """An operation the operator asked for that waits for approval."""
        def make():
            held = self.runtime("vm", self.operator, {"env": "fixture-approval"})
            asked = call("POST", f"/v1/runtimes/{held}/lifecycle/snapshot", {}, self.operator)
            return {"operation_id": asked["id"]}
        waits = lambda ids: call("GET", f"/v1/operations/{ids['operation_id']}")["status"] == "pending_approval"
        return self.still(decision, waits, make)

    def snapshot(self):
        """A running VM with a snapshot, and an intent planned for it."""
        def make():
            kept = self.runtime("vm")
            made = call("POST", f"/v1/runtimes/{kept}/lifecycle/snapshot", {"name": "fixture"})
            wait_until(f"/v1/operations/{made['id']}", lambda o: o["status"] == "succeeded")
            snapshot_id = call("GET", f"/v1/runtimes/{kept}/snapshots")["items"][0]["id"]
            intent = call("POST", f"/v1/runtimes/{kept}/intent", {"goal": "prepare for a change", "dry_run": True})
            return {"runtime_id": kept, "snapshot_id": snapshot_id, "intent_id": intent["intent_id"]}
        has = lambda ids: any(s["id"] == ids["snapshot_id"]
                              for s in call("GET", f"/v1/runtimes/{ids['runtime_id']}/snapshots")["items"])
        return self.still("snapshot", has, make)

    def existing(self):
        """A runtime that is neither gone nor being deleted (a delete of the last one makes a new
        one the next time)."""
        alive = lambda ids: call("GET", f"/v1/runtimes/{ids['runtime_id']}")["state"] != "deleting"
        return self.still("existing", alive, lambda: {"runtime_id": self.runtime("vcluster")})

    def for_operation(self, label):
        """The ids a valid case of the operation `label` needs, if it needs some."""
        if label in ("DELETE /v1/runtimes/{runtime_id}", "PATCH /v1/runtimes/{runtime_id}"):
            # The runtimes the fuzzer finds in lists are mostly deleted by the time it acts.
            return self.existing()
        if label == "GET /v1/runtimes/{runtime_id}/files/{path}":
            return self.sandbox()
        if label.endswith(("/logs", "/exec", "/files/{path}")):
            return {"runtime_id": self.sandbox()["runtime_id"]}
        if label == "POST /v1/runtimes/{runtime_id}/lifecycle/start":
            return self.stopped()
        if label == "POST /v1/runtimes/{runtime_id}/lifecycle/resume":
            return self.paused()
        if label.endswith("/console"):
            return {"runtime_id": self.stopped()["runtime_id"]}
        if label.endswith("/kubeconfig"):
            return self.running("vcluster")
        if "/v1/webhooks/{webhook_id}" in label:
            return self.webhook()
        if label == "POST /v1/runtimes/{runtime_id}/lifecycle/restart":
            return self.running("vcluster")
        if label == "POST /v1/runtimes/{runtime_id}/intent":
            # A runtime a goal can act on (the stateful phase's own runtimes are often deleted by
            # the time it plans for one).
            return self.running("vcluster")
        if label.endswith(("/lifecycle/restore", "/intent/{intent_id}")):
            ids = self.snapshot()
            return {k: ids[k] for k in ("runtime_id", "snapshot_id" if label.endswith("restore") else "intent_id")}
        for decision in ("approve", "reject", "cancel"):
            if label == f"POST /v1/operations/{{operation_id}}/{decision}":
                return self.waiting(decision)
        return {}


FIXTURES = Fixtures() if os.environ.get("RUNTIMEAI_FIXTURES", "1") == "1" else None


@schemathesis.hook
def map_case(ctx, case):
    label = f"{case.method.upper()} {case.operation.path}"
    # A followed log never ends (until the sandbox does), valid case or not.
    if label == "GET /v1/runtimes/{runtime_id}/logs" and (case.query or {}).get("follow") in (True, "true"):
        case.query["follow"] = "false"
    # Nor does an event stream, unless it is asked to end (as a Kubernetes watch is).
    if case.operation.path.endswith("/stream"):
        case.query = {**(case.query or {}), "timeout_seconds": 1}
    if case.meta is not None and case.meta.generation.mode != GenerationMode.POSITIVE:
        return case
    headers = case.headers if case.headers is not None else {}
    body = case.body if isinstance(case.body, dict) else None
    if "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = str(uuid.uuid4())
    if body is not None and isinstance(body.get("idempotency_key"), str):
        # Said twice, the key must agree: header and body are one key.
        body["idempotency_key"] = headers.get("Idempotency-Key", str(uuid.uuid4()))
    if "If-Match" in headers:
        headers["If-Match"] = "*"

    tenant = body.get("tenant_id") if body is not None else None
    if isinstance(tenant, str) and "tenant_id" in headers:
        if re.fullmatch(r"[!-~]{1,255}", tenant):
            headers["tenant_id"] = tenant
        else:
            del headers["tenant_id"]
    if label == "POST /v1/policies" and body is not None:
        body["scope_env"] = "fuzz"
    if label == "POST /v1/keys" and body is not None and body.get("expires_at") is not None:
        # A time the document can only call a date-time, which must be ahead of the clock.
        body["expires_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    if label == "PUT /v1/cluster/settings" and body is not None and isinstance(body.get("sizes"), list):
        smallest_first(body["sizes"])
    if label == "PUT /v1/cluster/settings" and body is not None:
        networks = body.get("webhook_allowed_destinations")
        if isinstance(networks, list):
            # Networks a pattern cannot tell from look-alikes (an octet over 255).
            body["webhook_allowed_destinations"] = [n for n in networks if is_network(n)]
    if label == "POST /v1/runtimes/{runtime_id}/actions/execute" and isinstance((body or {}).get("actions"), list):
        # A rule across the items of the list (the document says it; JSON Schema cannot): a
        # migration runs alone, its destination's executor carries it out.
        actions = body["actions"]
        if len(actions) > 1 and any(isinstance(a, dict) and a.get("type") == "migrate" for a in actions):
            body["actions"] = [a for a in actions if not (isinstance(a, dict) and a.get("type") == "migrate")]
        for action in body["actions"]:
            params = action.get("params") if isinstance(action, dict) else None
            if action.get("type") == "attach_observer" and isinstance(params, dict):
                params["url"] = f"https://fuzz-{uuid.uuid4().hex[:8]}.invalid/observer"
                params.pop("secret", None)
                well_formed_event_types(params)
            # Named twice (target and params, as the lifecycle call takes it), a node must agree.
            params, target = action.get("params"), action.get("target")
            if isinstance(params, dict) and isinstance(target, dict) and "node" in target and "node_id" in params:
                params["node_id"] = target["node"]
    if label == "POST /v1/webhooks" and body is not None:
        # Somewhere that never answers (RFC 6761's .invalid never resolves): the cluster must not
        # POST the fuzzer's events to whatever host a random name happens to be.
        body["url"] = f"https://fuzz-{uuid.uuid4().hex[:8]}.invalid/hook"
        well_formed_event_types(body)
    if label == "POST /v1/runtimes/{runtime_id}/exec" and body is not None:
        body["timeout_seconds"] = min(body.get("timeout_seconds") or 5, 5)
    fixture = FIXTURES.for_operation(label) if FIXTURES is not None else {}
    if fixture:
        headers.pop("tenant_id", None)
    for name, value in fixture.items():
        if name == "snapshot_id":
            if body is not None:
                body["snapshot_id"] = value
        else:
            case.path_parameters[name] = value
    return case


def is_network(text):
    try:
        ipaddress.ip_network(text, strict=False)
        return "/" in text
    except (TypeError, ValueError):
        return False


def well_formed_event_types(subscription):
    """Keeps the event types (`runtime.created`) and families (`operation.*`) of a subscription
    that are well formed."""
    if isinstance(subscription.get("event_types"), list):
        subscription["event_types"] = [t for t in subscription["event_types"]
                                       if isinstance(t, str) and re.fullmatch(r"[a-z_]+(\.[a-z_]+){0,7}(\.\*)?", t)
                                       and len(t) <= 64]


def smallest_first(sizes):
    """Orders a generated catalogue by cpu, raises each price to at least the one before, and
    names each size once."""
    if not all(isinstance(s, dict) and isinstance(s.get("cpu"), (int, float)) for s in sizes):
        return
    seen = set()
    for i, size in enumerate(sizes):
        if isinstance(size.get("name"), str) and size["name"] in seen:
            size["name"] = f"{size['name'][:55]}-{i}"
        seen.add(size.get("name"))
    sizes.sort(key=lambda s: s["cpu"])
    floor = None
    for size in sizes:
        cost = size.get("cost_per_hour")
        if isinstance(cost, (int, float)) and floor is not None and cost < floor:
            size["cost_per_hour"] = floor
        if isinstance(size.get("cost_per_hour"), (int, float)):
            floor = size["cost_per_hour"]


@schemathesis.deserializer("application/x-ndjson")
def ndjson(ctx, response):
    """Exec's answer: a JSON object per line; the last, how the command ended, which every answer
    has, is checked against the line's schema (every line is, in tests/it/sandbox.rs)."""
    lines = [json.loads(line) for line in response.content.splitlines() if line.strip()]
    return lines[-1] if lines else None


@schemathesis.deserializer("text/event-stream")
def event_stream(ctx, response):
    """Server-sent events: the stream's text, as the document describes it."""
    return response.content.decode("utf-8")


@schemathesis.deserializer("application/octet-stream")
def raw(ctx, response):
    """A file's bytes, as the string of them the document describes (`format: binary`)."""
    return response.content.decode("latin-1")
