//! The runtime engine end to end: policy decisions and approvals, and the scheduler handing
//! operations to executors with fenced leases while executors and leaders die.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use runtimeai_tests::{key_for, phase, Cluster, ClusterOptions, Eventually, Response, EVENTUALLY};

const SETTLE: Duration = EVENTUALLY;

fn problem(response: &Response, status: u16, kind: &str) -> bool {
    response.status == status
        && response.header("content-type") == Some("application/problem+json")
        && response.body["type"].as_str().is_some_and(|t| t.ends_with(kind))
}

async fn events_of(cluster: &Cluster, via: u64, id: &str) -> anyhow::Result<Vec<Value>> {
    let events =
        cluster.call_eventually(via, Method::GET, &format!("/v1/runtimes/{id}/events?limit=1000"), None, &[]).await?;
    Ok(events.body["items"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_every_action_and_name_the_rule_that_did() -> anyhow::Result<()> {
    let cluster = Cluster::start(
        3,
        ClusterOptions { extra_args: vec!["--simulated-step-ms".into(), "50".into()], ..Default::default() },
    )
    .await?;
    let body = json!({"name": "prod-db", "type": "vm", "spec": {"size": "medium"}, "labels": {"env": "production"}});
    let created = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&body), &[]).await?;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_string();
    cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), SETTLE).await?;
    let lifecycle = |action: &str| format!("/v1/runtimes/{id}/lifecycle/{action}");
    let agent = key_for(&cluster, 1, "ops-bot", "agent", &["*"], &["agent"], Some("act")).await?;
    let alice = key_for(&cluster, 2, "alice", "human", &["*"], &["approver"], None).await?;
    let bob = key_for(&cluster, 3, "bob", "human", &["*"], &["approver"], None).await?;

    phase("a production policy with one rule of each kind");
    let policy = json!({"name": "prod-guard", "scope_env": "production", "rules": [
        {"kind": "deny_action", "selector": {"actions": ["delete"], "actor": "agent"}, "params": {"reason": "agents never delete production"}},
        {"kind": "require_approval", "selector": {"actions": ["stop"]}},
        {"kind": "allow_action", "selector": {"actions": ["restart", "snapshot"]}},
        {"kind": "budget_guardrail", "params": {"max_cost_per_hour": 0.2}},
        {"kind": "data_egress"}
    ]});
    let created_policy = cluster.call_eventually(2, Method::POST, "/v1/policies", Some(&policy), &[]).await?;
    assert_eq!(created_policy.status, 201, "{created_policy:?}");
    let policy_id = created_policy.body["id"].as_str().unwrap().to_string();
    let bad_rule = json!({"name": "bad", "rules": [{"kind": "deny_action", "selector": {"actions": ["explode"]}}]});
    let refused = cluster.call_eventually(2, Method::POST, "/v1/policies", Some(&bad_rule), &[]).await?;
    assert!(problem(&refused, 400, "validation"), "{refused:?}");
    assert_eq!(refused.body["errors"][0]["path"], "$.rules[0].selector.actions[0]");

    phase("deny: an agent's delete is refused with the policy and rule, and an event says so");
    let denied =
        cluster.call_eventually_as(&agent, 3, Method::DELETE, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert!(problem(&denied, 403, "policy-denied"), "{denied:?}");
    assert_eq!(denied.body["decision"]["policy_id"], policy_id.as_str());
    assert_eq!(
        (denied.body["decision"]["rule_index"].as_u64(), denied.body["decision"]["rule_kind"].as_str()),
        (Some(0), Some("deny_action"))
    );
    assert!(denied.body["detail"].as_str().unwrap().contains("agents never delete production"), "{denied:?}");
    let events = events_of(&cluster, 1, &id).await?;
    let denial = events.iter().find(|e| e["type"] == "policy.denied").expect("a policy.denied event");
    assert_eq!(denial["data"]["decision"]["policy_id"], policy_id.as_str());
    assert_eq!(denial["actor"], "agent");

    phase("budget: scaling past 0.2/h is denied by the guardrail rule");
    let scale = cluster
        .call_eventually_as(&agent, 1, Method::POST, &lifecycle("scale"), Some(&json!({"size": "large"})), &[])
        .await?;
    assert!(problem(&scale, 403, "policy-denied"), "{scale:?}");
    assert_eq!(scale.body["decision"]["rule_kind"], "budget_guardrail");
    assert!(scale.body["detail"].as_str().unwrap().contains("0.40/h"), "{scale:?}");

    phase("allow: an explicitly allowed restart runs for an agent in safe_first");
    let restart = cluster.call_eventually_as(&agent, 2, Method::POST, &lifecycle("restart"), None, &[]).await?;
    assert_eq!(restart.status, 202, "{restart:?}");
    assert_eq!(restart.body["status"], "queued");
    assert_eq!(restart.body["policy_mode"], "safe_first", "agents default to safe_first");
    assert_eq!(restart.body["decisions"][0]["verdict"], "allow");
    assert_eq!(restart.body["decisions"][0]["rule_index"], 2);
    let restart_id = restart.body["id"].as_str().unwrap();
    let done = cluster.wait_operation(3, restart_id, SETTLE).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let events = events_of(&cluster, 1, &id).await?;
    let queued = events.iter().find(|e| e["type"] == "lifecycle.restart").expect("a lifecycle.restart event");
    let assigned = events
        .iter()
        .find(|e| e["type"] == "operation.assigned" && e["data"]["operation_id"] == restart_id)
        .expect("an operation.assigned event");
    // The leader hands it to an executor in the entry that queues it if its view of the
    // executors is fresh, else (a loaded machine) in an entry of its own after it: either way
    // the index of the entry that assigned it is the fencing token.
    assert!(assigned["seq"].as_u64() >= queued["seq"].as_u64(), "assigned after it was queued: {events:?}");
    assert_eq!(assigned["data"]["token"], assigned["seq"], "that entry's index is the fencing token");

    phase("require approval: the agent's stop waits; the agent cannot approve it, a human can");
    let stop = cluster.call_eventually_as(&agent, 3, Method::POST, &lifecycle("stop"), None, &[]).await?;
    assert_eq!(stop.status, 202, "{stop:?}");
    assert_eq!(stop.body["status"], "pending_approval");
    assert_eq!(stop.body["decisions"][0]["rule_kind"], "require_approval");
    let stop_id = stop.body["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let parked = cluster.call_eventually(1, Method::GET, &format!("/v1/operations/{stop_id}"), None, &[]).await?;
    assert_eq!(parked.body["status"], "pending_approval", "nothing runs before approval: {parked:?}");
    let approve = format!("/v1/operations/{stop_id}/approve");
    let own = cluster.call_eventually_as(&agent, 1, Method::POST, &approve, None, &[]).await?;
    assert!(problem(&own, 403, "forbidden"), "an agent approves nothing: {own:?}");
    let forged =
        cluster.call_eventually_as(&agent, 1, Method::POST, &approve, None, &[("x-actor", "human:alice")]).await?;
    assert!(problem(&forged, 403, "forbidden"), "X-Actor says nothing about who acts: {forged:?}");
    let approved = cluster
        .call_eventually_as(&alice, 2, Method::POST, &approve, Some(&json!({"reason": "maintenance window"})), &[])
        .await?;
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(approved.body["approval"]["by"], "human:alice");
    let done = cluster.wait_operation(1, &stop_id, SETTLE).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let again = cluster.call_eventually_as(&alice, 3, Method::POST, &approve, None, &[]).await?;
    assert!(problem(&again, 409, "illegal-operation-status"), "{again:?}");

    phase("no rule matches an agent's start: safe_first asks a human; a rejection needs a reason and ends it");
    let start = cluster.call_eventually_as(&agent, 1, Method::POST, &lifecycle("start"), None, &[]).await?;
    assert_eq!(start.body["status"], "pending_approval", "{start:?}");
    assert!(start.body["decisions"][0]["policy_id"].is_null());
    assert!(start.body["decisions"][0]["reason"].as_str().unwrap().starts_with("safe_first"), "{start:?}");
    let reject = format!("/v1/operations/{}/reject", start.body["id"].as_str().unwrap());
    let no_reason = cluster.call_eventually_as(&bob, 2, Method::POST, &reject, Some(&json!({})), &[]).await?;
    assert!(problem(&no_reason, 400, "validation"), "{no_reason:?}");
    let rejected =
        cluster.call_eventually_as(&bob, 2, Method::POST, &reject, Some(&json!({"reason": "not now"})), &[]).await?;
    assert_eq!(rejected.status, 200, "{rejected:?}");
    assert_eq!(
        (rejected.body["status"].as_str(), rejected.body["error"]["code"].as_str()),
        (Some("cancelled"), Some("rejected"))
    );
    let runtime = cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!((runtime.body["state"].as_str(), runtime.body["active_operation"].as_str()), (Some("stopped"), None));

    phase("checked again right before it runs: a deny added after approval fails the operation");
    let start = cluster.call_eventually_as(&agent, 1, Method::POST, &lifecycle("start"), None, &[]).await?;
    assert_eq!(start.body["status"], "pending_approval", "{start:?}");
    let freeze = json!({"name": "freeze", "rules": [{"kind": "deny_action", "selector": {"actions": ["start"]}, "params": {"reason": "change freeze"}}]});
    let freeze = cluster.call_eventually(3, Method::POST, "/v1/policies", Some(&freeze), &[]).await?;
    assert_eq!(freeze.status, 201, "{freeze:?}");
    let start_id = start.body["id"].as_str().unwrap();
    let approved = cluster
        .call_eventually_as(&alice, 2, Method::POST, &format!("/v1/operations/{start_id}/approve"), None, &[])
        .await?;
    assert_eq!(approved.status, 200, "{approved:?}");
    let done = cluster.wait_operation(3, start_id, SETTLE).await?;
    assert_eq!(
        (done["status"].as_str(), done["error"]["code"].as_str()),
        (Some("failed"), Some("policy_denied")),
        "{done}"
    );
    assert!(done["error"]["message"].as_str().unwrap().contains("change freeze"), "{done}");
    let runtime = cluster.call_eventually(1, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(runtime.body["state"], "stopped");

    phase("data egress: a public runtime may not come up in production, elsewhere it may");
    let public = |name: &str, env: &str| json!({"name": name, "type": "sandbox", "labels": {"env": env}, "spec": {"networking": {"exposure": "public"}}});
    let refused =
        cluster.call_eventually(2, Method::POST, "/v1/runtimes", Some(&public("edge", "production")), &[]).await?;
    assert!(problem(&refused, 403, "policy-denied"), "{refused:?}");
    assert_eq!(refused.body["decision"]["rule_kind"], "data_egress");
    let allowed =
        cluster.call_eventually(2, Method::POST, "/v1/runtimes", Some(&public("edge", "staging")), &[]).await?;
    assert_eq!(allowed.status, 201, "{allowed:?}");

    phase("a kubeconfig only for vclusters, and only from a node with a Kubernetes backend");
    let vm_kubeconfig =
        cluster.call_eventually(1, Method::GET, &format!("/v1/runtimes/{id}/kubeconfig"), None, &[]).await?;
    assert!(problem(&vm_kubeconfig, 404, "not-found"), "{vm_kubeconfig:?}");
    let vc = cluster
        .call_eventually(1, Method::POST, "/v1/runtimes", Some(&json!({"name": "vc", "type": "vcluster"})), &[])
        .await?;
    let vc_id = vc.body["id"].as_str().unwrap();
    let simulated =
        cluster.call_eventually(2, Method::GET, &format!("/v1/runtimes/{vc_id}/kubeconfig"), None, &[]).await?;
    assert!(problem(&simulated, 409, "no-kubernetes-backend"), "{simulated:?}");

    phase("placement: a site no node serves is refused");
    let mars = json!({"name": "far", "type": "vm", "labels": {"site": "mars"}});
    let refused = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&mars), &[]).await?;
    assert!(problem(&refused, 422, "invalid-value"), "{refused:?}");
    assert!(refused.body["detail"].as_str().unwrap().contains("mars"), "{refused:?}");
    Ok(())
}

/// Reads the shared journal of the simulated driver: (operation, step) → times applied.
fn journal(path: &std::path::Path) -> BTreeMap<(String, u32), usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut applied = BTreeMap::new();
    for line in text.lines() {
        let field = |name: &str| {
            line.split_whitespace().find_map(|f| f.strip_prefix(&format!("{name}="))).unwrap_or_default().to_string()
        };
        *applied.entry((field("operation"), field("step").parse().unwrap_or(u32::MAX))).or_insert(0) += 1;
    }
    applied
}

/// Waits until the operation runs (through `via`) and returns its executor node.
async fn running_on(cluster: &Cluster, via: u64, operation: &str) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let op = cluster.call_eventually(via, Method::GET, &format!("/v1/operations/{operation}"), None, &[]).await?;
        if op.body["status"] == "running" {
            if let Some(node) = op.body["assignment"]["node_id"].as_u64() {
                return Ok(node);
            }
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "operation never ran: {:?}", op.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks that every step of the operation was applied by the backend exactly once.
fn applied_exactly_once(infra: &std::path::Path, operation: &str, steps: u32) {
    let applied = journal(&infra.join("journal"));
    for step in 0..steps {
        assert_eq!(applied.get(&(operation.to_string(), step)), Some(&1), "step {step} of {operation}: {applied:?}");
    }
    assert!(!applied.contains_key(&(operation.to_string(), steps)), "no step beyond the plan: {applied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_finish_exactly_once_when_their_executor_or_the_leader_dies() -> anyhow::Result<()> {
    let infra = tempfile::tempdir()?;
    let args = [
        // A shared backend, so that another node can take an operation over.
        "--backends",
        "vm=simulated,sandbox=simulated",
        "--simulated-step-ms",
        "1200",
        "--operation-lease-ms",
        "1500",
        "--signals-interval-ms",
        "300",
        "--simulated-infra-dir",
        infra.path().to_str().unwrap(),
    ];
    let mut cluster = Cluster::start(
        3,
        ClusterOptions { extra_args: args.iter().map(|a| a.to_string()).collect(), ..Default::default() },
    )
    .await?;
    let created = cluster
        .call_eventually(1, Method::POST, "/v1/runtimes", Some(&json!({"name": "batch", "type": "sandbox"})), &[])
        .await?;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_string();
    let create_op = created.body["active_operation"].as_str().unwrap().to_string();
    assert_eq!(cluster.wait_operation(1, &create_op, SETTLE).await?["status"], "succeeded");
    applied_exactly_once(infra.path(), &create_op, 1);

    phase("the executor reports signals that GET .../status shows");
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let status = cluster.call_eventually(2, Method::GET, &format!("/v1/runtimes/{id}/status"), None, &[]).await?;
        if status.body["signals"]["health"]["value"] == "healthy" {
            assert_eq!(status.body["health"], "ok");
            assert!(status.body["signals"]["cost_per_hour"]["value"].as_f64().is_some_and(|c| c > 0.0), "{status:?}");
            let cpu = &status.body["signals"]["cpu"];
            let simulated = cpu["unit"] == "vCPU allocated";
            assert!(cpu["value"].is_number() && simulated && cpu["ts"].is_string(), "the seed's shape: {cpu}");
            assert!(status.body["placement"]["node_id"].as_u64().is_some(), "{status:?}");
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no signals: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    phase("kill the executor mid-operation: another takes over after the lease, and each step runs once");
    let execute = format!("/v1/runtimes/{id}/actions/execute");
    let body =
        json!({"actions": [{"type": "stop"}, {"type": "scale", "params": {"size": "large"}}, {"type": "start"}]});
    let accepted = cluster.call_eventually(1, Method::POST, &execute, Some(&body), &[]).await?;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    let operation = accepted.body["id"].as_str().unwrap().to_string();
    let executor = running_on(&cluster, 1, &operation).await?;
    cluster.kill(executor);
    let via = cluster.running()[0];
    let done = cluster.wait_operation(via, &operation, 2 * SETTLE).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(done["attempts"].as_u64().unwrap() >= 2, "taken over: {done}");
    assert_ne!(done["assignment"]["node_id"].as_u64(), Some(executor), "{done}");
    let messages: Vec<&str> =
        done["results"].as_array().unwrap().iter().filter_map(|r| r["message"].as_str()).collect();
    assert_eq!(messages.len(), 3, "each action says how it went: {done}");
    assert!(messages.iter().all(|m| m.contains("simulated driver") || m.contains("already applied")), "{messages:?}");
    applied_exactly_once(infra.path(), &operation, 3);
    let runtime = cluster.call_eventually(via, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(
        (runtime.body["state"].as_str(), runtime.body["spec"]["size"].as_str()),
        (Some("running"), Some("large"))
    );
    let succeeded = events_of(&cluster, via, &id)
        .await?
        .iter()
        .filter(|e| e["type"] == "operation.succeeded" && e["data"]["operation_id"] == operation.as_str())
        .count();
    assert_eq!(succeeded, 1, "finished once");
    cluster.spawn(executor)?;
    cluster.wait_ready(executor, SETTLE).await?;

    phase("kill the leader mid-operation: the operation still finishes, each step once");
    let body = json!({"actions": [{"type": "restart"}, {"type": "snapshot", "params": {"name": "after"}}]});
    let accepted = cluster.call_eventually(executor, Method::POST, &execute, Some(&body), &[]).await?;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    let operation = accepted.body["id"].as_str().unwrap().to_string();
    running_on(&cluster, executor, &operation).await?;
    let leader = cluster.wait_leader(SETTLE).await?;
    cluster.kill(leader);
    let via = cluster.running()[0];
    let done = cluster.wait_operation(via, &operation, 2 * SETTLE).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    applied_exactly_once(infra.path(), &operation, 2);
    Ok(())
}

/// A stand-in for an OpenAI-compatible chat endpoint (no model runs in the tests): it answers
/// by a keyword of the goal and counts its calls.
async fn fake_model() -> anyhow::Result<(String, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |axum::Json(request): axum::Json<Value>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let asked = request["messages"][1]["content"].as_str().unwrap_or_default().to_string();
                let content = if asked.contains("nightly") {
                    json!({"actions": [
                        {"type": "snapshot", "params": {"name": "pre-batch"}},
                        {"type": "scale", "params": {"size": "large"}}
                    ], "rationale": ["a restore point first", "more cpu for the batch"]})
                    .to_string()
                } else if asked.contains("gigantic") {
                    json!({"actions": [{"type": "scale", "params": {"size": "gigantic"}}]}).to_string()
                } else {
                    "Have you tried turning it off and on again?".to_string()
                };
                axum::Json(json!({"choices": [{"message": {"role": "assistant", "content": content}}]}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, calls))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_planner_plans_goals_the_deterministic_one_does_not_know() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    let (url, calls) = fake_model().await?;
    let args = ["--simulated-step-ms", "50", "--planner-url", &url, "--planner-model", "stand-in"];
    let cluster = Cluster::start(
        3,
        ClusterOptions { extra_args: args.iter().map(|a| a.to_string()).collect(), ..Default::default() },
    )
    .await?;
    let created = cluster
        .call_eventually(1, Method::POST, "/v1/runtimes", Some(&json!({"name": "etl", "type": "vm"})), &[])
        .await?;
    let id = created.body["id"].as_str().unwrap().to_string();
    cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), SETTLE).await?;

    phase("a goal the deterministic planner knows never reaches the model");
    let plan = format!("/v1/runtimes/{id}/actions/plan");
    let known = cluster.call_eventually(2, Method::POST, &plan, Some(&json!({"goal": "restart"})), &[]).await?;
    assert_eq!(known.status, 200, "{known:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    phase("an unknown goal is planned by the model, in the API's own action schema");
    let goal = json!({"goal": "get ready for the nightly batch", "policy_mode": "balanced"});
    let planned = cluster.call_eventually(3, Method::POST, &plan, Some(&goal), &[]).await?;
    assert_eq!(planned.status, 200, "{planned:?}");
    let kinds: Vec<&str> =
        planned.body["actions"].as_array().unwrap().iter().map(|a| a["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["snapshot", "scale"]);
    assert!(planned.body["rationale"][0].as_str().unwrap().starts_with("external planner (stand-in)"), "{planned:?}");

    phase("the document served with an external planner takes any goal");
    let document = cluster.call_eventually(2, Method::GET, "/v1/openapi.json", None, &[]).await?.body;
    let goal_schema = &document["components"]["schemas"]["IntentRequest"]["properties"]["goal"];
    assert!(goal_schema.get("pattern").is_none() && goal_schema["minLength"] == 1, "{goal_schema}");

    phase("as an intent it runs like any plan");
    let intent =
        cluster.call_eventually(1, Method::POST, &format!("/v1/runtimes/{id}/intent"), Some(&goal), &[]).await?;
    assert_eq!((intent.status, intent.body["status"].as_str()), (202, Some("accepted")), "{intent:?}");
    let done = cluster.wait_operation(2, intent.body["operation_id"].as_str().unwrap(), SETTLE).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let runtime = cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(runtime.body["spec"]["size"], "large");

    phase("its plans meet the constraints, and output the API would refuse is a 502");
    let budget = json!({"goal": "shrink for the nightly batch", "constraints": {"max_cost_per_hour": 0.1}});
    let runtime_small = cluster
        .call_eventually(
            1,
            Method::POST,
            "/v1/runtimes",
            Some(&json!({"name": "etl2", "type": "vm", "spec": {"size": "small"}})),
            &[],
        )
        .await?;
    let small_id = runtime_small.body["id"].as_str().unwrap().to_string();
    cluster.wait_operation(1, runtime_small.body["active_operation"].as_str().unwrap(), SETTLE).await?;
    let blocked = cluster
        .call_eventually(1, Method::POST, &format!("/v1/runtimes/{small_id}/actions/plan"), Some(&budget), &[])
        .await?;
    assert!(problem(&blocked, 409, "blocked-by-constraint"), "{blocked:?}");
    let invalid =
        cluster.call_eventually(2, Method::POST, &plan, Some(&json!({"goal": "make it gigantic"})), &[]).await?;
    assert!(problem(&invalid, 502, "planner-output-invalid"), "{invalid:?}");
    assert!(invalid.body["detail"].as_str().unwrap().contains("gigantic"), "{invalid:?}");
    let chatty = cluster.call_eventually(3, Method::POST, &plan, Some(&json!({"goal": "do the thing"})), &[]).await?;
    assert!(problem(&chatty, 502, "planner-output-invalid"), "{chatty:?}");
    Ok(())
}

/// The `runtime.drift` events of a runtime.
async fn drift_events(cluster: &Cluster, via: u64, id: &str) -> anyhow::Result<Vec<Value>> {
    Ok(events_of(cluster, via, id).await?.into_iter().filter(|e| e["type"] == "runtime.drift").collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_differs_from_the_backend_is_converged_or_reported() -> anyhow::Result<()> {
    let args = ["--signals-interval-ms", "300"];
    let mut cluster = Cluster::start(
        3,
        ClusterOptions { extra_args: args.iter().map(|a| a.to_string()).collect(), ..Default::default() },
    )
    .await?;
    let vm = cluster
        .call_eventually(1, Method::POST, "/v1/runtimes", Some(&json!({"name": "drifty", "type": "vm"})), &[])
        .await?;
    assert_eq!(vm.status, 201, "{vm:?}");
    let vm_id = vm.body["id"].as_str().unwrap().to_string();
    let vm_node = vm.body["placement"]["node_id"].as_u64().unwrap();
    assert_eq!(vm.body["backend"]["kind"], "vm_backend");
    cluster.wait_operation(1, vm.body["active_operation"].as_str().unwrap(), SETTLE).await?;
    let sandbox = cluster
        .call_eventually(2, Method::POST, "/v1/runtimes", Some(&json!({"name": "crashy", "type": "sandbox"})), &[])
        .await?;
    let sandbox_id = sandbox.body["id"].as_str().unwrap().to_string();
    let sandbox_node = sandbox.body["placement"]["node_id"].as_u64().unwrap();
    cluster.wait_operation(2, sandbox.body["active_operation"].as_str().unwrap(), SETTLE).await?;

    phase("the VM's node restarts: libvirt's test hypervisor lost the domain, the executor re-creates it");
    cluster.kill(vm_node);
    cluster.spawn(vm_node)?;
    cluster.wait_ready(vm_node, SETTLE).await?;
    let via = if vm_node == 1 { 2 } else { 1 };
    let deadline = tokio::time::Instant::now() + SETTLE;
    let drift = loop {
        if let Some(drift) = drift_events(&cluster, via, &vm_id).await?.pop() {
            break drift;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no drift recorded for the VM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(drift["data"]["observed"], "missing from the backend", "{drift}");
    assert_eq!(drift["data"]["action"], "re-created from the spec", "{drift}");
    let runtime = cluster.call_eventually(via, Method::GET, &format!("/v1/runtimes/{vm_id}"), None, &[]).await?;
    assert_eq!(runtime.body["state"], "running");

    phase("a sandbox killed outside RuntimeAI is marked in error, with what happened");
    let sandboxes = std::path::PathBuf::from(format!("{}.sandboxes", cluster.node(sandbox_node).data_dir.display()));
    let pid_file = sandboxes.join(&sandbox_id).join("pid");
    let launch: Value = serde_json::from_str(&std::fs::read_to_string(&pid_file)?)?;
    let pid = launch["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let runtime =
            cluster.call_eventually(via, Method::GET, &format!("/v1/runtimes/{sandbox_id}"), None, &[]).await?;
        if runtime.body["state"] == "error" {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the killed sandbox was not noticed: {runtime:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drift = drift_events(&cluster, via, &sandbox_id).await?.pop().expect("a drift event");
    assert!(drift["data"]["observed"].as_str().unwrap().contains("SIGKILL"), "{drift}");
    assert_eq!(drift["severity"], "critical");
    Ok(())
}
