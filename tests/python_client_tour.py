"""The README's tour through a Python client generated from the OpenAPI document the cluster
serves (openapi-python-client): every answer must parse into the generated models.

    usage: python_client_tour.py <generated package's parent dir> <base URL> <token> <CA file>

Prints the calls made, one per line; exits non-zero on the first answer that does not parse.
"""
import sys

sys.path.insert(0, sys.argv[1])
url, token, ca = sys.argv[2], sys.argv[3], sys.argv[4]

from runtimeai_py import AuthenticatedClient  # noqa: E402
from runtimeai_py.api.actions import plan_actions  # noqa: E402
from runtimeai_py.api.cluster import cluster_status, get_settings  # noqa: E402
from runtimeai_py.api.events import events, runtime_events  # noqa: E402
from runtimeai_py.api.intent import submit_intent  # noqa: E402
from runtimeai_py.api.lifecycle import scale_runtime, snapshot_runtime, start_runtime, stop_runtime  # noqa: E402
from runtimeai_py.api.operations import get_operation, list_operations  # noqa: E402
from runtimeai_py.api.policies import create_policy, list_policies  # noqa: E402
from runtimeai_py.api.runtimes import create_runtime, get_runtime, list_runtimes, runtime_status  # noqa: E402
from runtimeai_py import models  # noqa: E402
from tour import parsed  # noqa: E402
import tour  # noqa: E402

client = AuthenticatedClient(base_url=url, token=token, verify_ssl=ca, raise_on_unexpected_status=True)


def wait(operation_id):
    return tour.wait(operation_id, lambda i: get_operation.sync_detailed(i, client=client), models.OperationView)


parsed("cluster_status", cluster_status.sync_detailed(client=client), models.ClusterView)
parsed("get_settings", get_settings.sync_detailed(client=client), models.ClusterSettings)
body = models.RuntimeCreateRequest.from_dict({"name": "py-tour", "type": "vcluster", "labels": {"env": "tour"}})
runtime = parsed("create_runtime", create_runtime.sync_detailed(client=client, body=body), models.Runtime)
wait(runtime.active_operation)
parsed("get_runtime", get_runtime.sync_detailed(runtime.id, client=client), models.Runtime)
parsed("list_runtimes", list_runtimes.sync_detailed(client=client, page_size=10), models.RuntimeList)
parsed("runtime_status", runtime_status.sync_detailed(runtime.id, client=client), models.RuntimeStatus)
# The generator sends its `Unset` for an optional body left out: give one, empty.
stop_body = models.LifecycleStopRequest.from_dict({})
stop = parsed("stop_runtime", stop_runtime.sync_detailed(runtime.id, client=client, body=stop_body), models.OperationView)
wait(stop.id)
start_body = models.LifecycleStartRequest.from_dict({})
start = parsed("start_runtime", start_runtime.sync_detailed(runtime.id, client=client, body=start_body), models.OperationView)
wait(start.id)
scale = models.LifecycleScaleRequest.from_dict({"size": "medium"})
wait(parsed("scale_runtime", scale_runtime.sync_detailed(runtime.id, client=client, body=scale), models.OperationView).id)
snapshot_body = models.LifecycleSnapshotRequest.from_dict({"name": "tour"})
snapshot = parsed("snapshot_runtime", snapshot_runtime.sync_detailed(runtime.id, client=client, body=snapshot_body),
                  models.OperationView)
wait(snapshot.id)
intent = models.IntentRequest.from_dict({"goal": "reduce cost", "dry_run": True})
parsed("submit_intent", submit_intent.sync_detailed(runtime.id, client=client, body=intent), models.IntentResponse)
plan = models.ActionPlanRequest.from_dict({"goal": "restart"})
parsed("plan_actions", plan_actions.sync_detailed(runtime.id, client=client, body=plan), models.ActionPlan)
rule = {"kind": "deny_action", "selector": {"actions": ["delete"], "labels": {"env": "tour"}}}
policy = models.PolicyCreateRequest.from_dict({"name": "py-tour-no-delete", "rules": [rule]})
parsed("create_policy", create_policy.sync_detailed(client=client, body=policy), models.Policy)
parsed("list_policies", list_policies.sync_detailed(client=client), models.PolicyList)
parsed("list_operations", list_operations.sync_detailed(client=client), models.UnfinishedOperations)
parsed("events", events.sync_detailed(client=client, limit=50), models.EventFeedPage)
parsed("runtime_events", runtime_events.sync_detailed(runtime.id, client=client), models.EventList)
print("tour parsed")
