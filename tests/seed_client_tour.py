"""A tour through a Python client generated from the user's own OpenAPI draft (the seed,
api/seed/openapi-seed.yaml, by openapi-python-client): every answer of every seed operation
must come with a status the seed names and parse into the seed's models, the intent API's
headline example included.

    usage: seed_client_tour.py <generated package's parent dir> <base URL ending in /v1> <token> <CA file>

Prints the calls made, one per line; exits non-zero on the first answer that does not parse.
"""
import sys
import time

sys.path.insert(0, sys.argv[1])
url, token, ca = sys.argv[2], sys.argv[3], sys.argv[4]

from seed_py import AuthenticatedClient  # noqa: E402
from seed_py import models  # noqa: E402
from tour import parsed  # noqa: E402
import tour  # noqa: E402
from seed_py.api.actions import execute_actions, plan_actions  # noqa: E402
from seed_py.api.events import list_events  # noqa: E402
from seed_py.api.health import get_health  # noqa: E402
from seed_py.api.intent import get_intent, submit_intent  # noqa: E402
from seed_py.api.lifecycle import (  # noqa: E402
    restart_runtime, scale_runtime, snapshot_runtime, start_runtime, stop_runtime)
from seed_py.api.policies import create_policy, delete_policy, get_policy, list_policies  # noqa: E402
from seed_py.api.runtimes import (  # noqa: E402
    create_runtime, delete_runtime, get_operation, get_runtime, get_runtime_status, list_runtimes)

client = AuthenticatedClient(base_url=url, token=token, verify_ssl=ca, raise_on_unexpected_status=True)


def wait(operation_id):
    operation = tour.wait(operation_id, lambda i: get_operation.sync_detailed(i, client=client), models.Operation)
    if operation.status != models.OperationStatus.SUCCEEDED:
        sys.exit(f"operation {operation_id} ended {operation.status}: {operation.error}")
    return operation


def operation(name, response):
    return wait(parsed(name, response, models.Operation).id)


parsed("get_health", get_health.sync_detailed(client=client), models.GetHealthResponse200)
spec = {"size": "large", "resources": {"replicas": 2}}
body = models.RuntimeCreateRequest.from_dict(
    {"name": "seed-tour", "type": "vcluster", "labels": {"env": "seed-tour"}, "spec": spec})
runtime = parsed("create_runtime", create_runtime.sync_detailed(client=client, body=body), models.Runtime)
# The seed's Runtime names no operation: wait for the runtime itself.
for _ in range(300):
    runtime = parsed("get_runtime", get_runtime.sync_detailed(runtime.id, client=client), models.Runtime)
    if runtime.state == models.RuntimeState.RUNNING:
        break
    time.sleep(0.2)
else:
    sys.exit(f"runtime {runtime.id} never ran: {runtime.state}")
listed = parsed("list_runtimes", list_runtimes.sync_detailed(client=client, page_size=10), models.RuntimeListResponse)
assert any(item.id == runtime.id for item in listed.items), listed
status = parsed("get_runtime_status", get_runtime_status.sync_detailed(runtime.id, client=client), models.RuntimeStatus)
assert status.runtime_id == runtime.id, status

operation("stop_runtime", stop_runtime.sync_detailed(runtime.id, client=client, body=models.LifecycleStopRequest()))
operation("start_runtime", start_runtime.sync_detailed(runtime.id, client=client, body=models.LifecycleStartRequest()))
operation("restart_runtime", restart_runtime.sync_detailed(runtime.id, client=client))
scale = models.LifecycleScaleRequest.from_dict({"size": "large"})
operation("scale_runtime", scale_runtime.sync_detailed(runtime.id, client=client, body=scale))
snapshot = models.LifecycleSnapshotRequest.from_dict({"name": "seed-tour", "description": "before the intent"})
operation("snapshot_runtime", snapshot_runtime.sync_detailed(runtime.id, client=client, body=snapshot))

plan_body = models.ActionPlanRequest.from_dict({"goal": "restart"})
plan = parsed("plan_actions", plan_actions.sync_detailed(runtime.id, client=client, body=plan_body), models.ActionPlan)
assert [a.type_ for a in plan.actions] == [models.ActionType.RESTART], plan
actions = models.ActionExecutionRequest.from_dict({"actions": [a.to_dict() for a in plan.actions]})
operation("execute_actions", execute_actions.sync_detailed(runtime.id, client=client, body=actions))

# The seed's headline example, on a large runtime.
headline = {"goal": "reduce cost", "constraints": {"latency": "<50ms", "availability": "high"},
            "context": {"env": "staging", "service": "seed-tour"}, "policy_mode": "balanced"}
submitted = parsed("submit_intent", submit_intent.sync_detailed(
    runtime.id, client=client, body=models.IntentRequest.from_dict(headline)), models.IntentResponse)
assert submitted.operation_id and submitted.planned_actions, submitted
wait(submitted.operation_id)
record = parsed("get_intent", get_intent.sync_detailed(runtime.id, submitted.intent_id, client=client),
                models.IntentRecord)
assert record.status == models.IntentRecordStatus.SUCCEEDED, record
executed = record.result.executed_actions
assert executed and all(isinstance(r.action, models.Action) for r in executed), record
assert all(r.status == models.ActionResultStatus.SUCCEEDED for r in executed), record

events = parsed("list_events", list_events.sync_detailed(runtime.id, client=client, limit=100),
                models.EventListResponse)
assert any(e.type_ == "lifecycle.restart" for e in events.items), events

rule = {"kind": "deny_action", "selector": {"actions": ["delete"], "labels": {"env": "seed-tour-other"}}}
policy_body = models.PolicyCreateRequest.from_dict({"name": "seed-tour-no-delete", "rules": [rule]})
policy = parsed("create_policy", create_policy.sync_detailed(client=client, body=policy_body), models.Policy)
parsed("list_policies", list_policies.sync_detailed(client=client), models.PolicyListResponse)
parsed("get_policy", get_policy.sync_detailed(policy.id, client=client), models.Policy)
removed = delete_policy.sync_detailed(policy.id, client=client)
if removed.status_code != 204:
    sys.exit(f"delete_policy: {removed.status_code} {removed.content[:300]!r}")
print("delete_policy 204")

operation("delete_runtime", delete_runtime.sync_detailed(runtime.id, client=client))
print("seed tour parsed")
