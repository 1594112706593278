//! The MCP server as agents meet it, through the official Python SDK (`mcp` on PyPI): over
//! Streamable HTTP at `/mcp` through any node and over stdio (`runtimeai mcp`); the tools a
//! principal sees follow its permissions, every tool is called against a live cluster, one
//! action waits for a human's approval (followed with progress notifications), one is denied by
//! a policy, and refusals come back as tool errors carrying the problem+json.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use runtimeai_tests::{binary, harness_ca, key_for, phase, Cluster, ClusterOptions, Eventually, EVENTUALLY};

fn python() -> anyhow::Result<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    let python = PathBuf::from(home).join(".cache/runtimeai/venv/bin/python");
    anyhow::ensure!(python.exists(), "no {} (run deploy/python-env.sh)", python.display());
    Ok(python)
}

/// Runs `tests/mcp_client.py` with `args`; what it saw.
async fn client(args: Vec<String>) -> anyhow::Result<Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mcp_client.py");
    let run = tokio::process::Command::new(python()?).arg(script).args(args).output();
    let output = tokio::time::timeout(Duration::from_secs(120), run).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(output.status.success(), "the MCP client failed: {stderr}");
    serde_json::from_slice(&output.stdout).map_err(|e| anyhow::anyhow!("{e}: {stderr}"))
}

/// The CA the test clusters' certificates come from.
fn ca_file() -> anyhow::Result<PathBuf> {
    Ok(harness_ca()?.join("ca.pem"))
}

/// Over Streamable HTTP through node `via`, as `token`.
async fn over_http(cluster: &Cluster, via: u64, token: &str, calls: Value) -> anyhow::Result<Value> {
    let ca = ca_file()?.display().to_string();
    client(vec!["http".into(), cluster.node(via).url("/mcp"), token.into(), ca, calls.to_string()]).await
}

fn tool_names(seen: &Value) -> Vec<String> {
    seen["tools"].as_array().into_iter().flatten().filter_map(|t| t["name"].as_str().map(String::from)).collect()
}

fn tool<'a>(seen: &'a Value, name: &str) -> &'a Value {
    seen["tools"].as_array().and_then(|tools| tools.iter().find(|t| t["name"] == name)).unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_use_the_cluster_through_mcp_within_their_permissions() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    cluster.wait_leader(EVENTUALLY).await?;
    let made = cluster
        .call_eventually(1, Method::POST, "/v1/runtimes", Some(&json!({"name": "mcp-a", "type": "vcluster"})), &[])
        .await?;
    let runtime = made.body["id"].as_str().unwrap_or_default().to_string();
    cluster.wait_operation(1, made.body["active_operation"].as_str().unwrap_or_default(), EVENTUALLY).await?;
    let policy = json!({"name": "no-agent-snapshots",
        "rules": [{"kind": "deny_action", "selector": {"actions": ["snapshot"], "actor": "agent"}}]});
    assert_eq!(cluster.call_eventually(1, Method::POST, "/v1/policies", Some(&policy), &[]).await?.status, 201);

    phase("no credentials, no MCP");
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "anyone", "version": "1"}}});
    let anonymous = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca_file()?)?)?)
        .build()?
        .post(cluster.node(2).url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&initialize)
        .send()
        .await?;
    assert_eq!(anonymous.status(), 401);

    phase("a read-only agent sees read tools only, and cannot call another");
    let reader = key_for(&cluster, 1, "mcp-reader", "agent", &["*"], &["agent"], Some("read_only")).await?;
    let calls = json!([
        {"name": "list_runtimes", "arguments": {"page_size": 10}},
        {"name": "get_runtime", "arguments": {"runtime_id": runtime}},
        {"name": "get_runtime", "arguments": {"runtime_id": "rt_nope"}},
        {"name": "list_events", "arguments": {"runtime_id": runtime, "limit": 5}},
        {"name": "execute_actions", "arguments": {"runtime_id": runtime, "actions": [{"type": "restart"}]}},
    ]);
    let seen = over_http(&cluster, 3, &reader, calls).await?;
    assert_eq!(seen["server"], "runtimeai", "{seen}");
    let names = tool_names(&seen);
    assert!(names.contains(&"list_runtimes".into()) && names.contains(&"wait_operation".into()), "{names:?}");
    assert!(
        !names
            .iter()
            .any(|n| ["plan_actions", "execute_actions", "submit_intent", "cancel_operation"].contains(&n.as_str())),
        "{names:?}"
    );
    assert!(names.iter().all(|n| tool(&seen, n)["annotations"]["readOnlyHint"] == true), "{seen}");
    let results = seen["results"].as_array().unwrap();
    let listed = &results[0]["structuredContent"]["items"];
    assert!(listed.as_array().unwrap().iter().any(|r| r["id"] == runtime.as_str()), "{}", results[0]);
    assert_eq!(results[1]["structuredContent"]["name"], "mcp-a");
    assert_eq!(
        (results[2]["isError"].as_bool(), results[2]["structuredContent"]["status"].as_u64()),
        (Some(true), Some(404))
    );
    assert_eq!(results[2]["structuredContent"]["type"], "https://runtimeai.dev/problems/not-found", "problem+json");
    assert!(results[3]["structuredContent"]["items"].as_array().is_some_and(|e| !e.is_empty()), "{}", results[3]);
    assert!(results[4]["protocolError"].is_string(), "not its tool: {}", results[4]);

    phase("a suggest-only agent plans and dry-runs; acting is refused");
    let suggester = key_for(&cluster, 1, "mcp-suggester", "agent", &["*"], &["agent"], Some("suggest_only")).await?;
    let calls = json!([
        {"name": "plan_actions", "arguments": {"runtime_id": runtime, "goal": "restart"}},
        {"name": "submit_intent", "arguments": {"runtime_id": runtime, "goal": "restart", "dry_run": true}},
        {"name": "submit_intent", "arguments": {"runtime_id": runtime, "goal": "restart"}},
    ]);
    let seen = over_http(&cluster, 1, &suggester, calls).await?;
    let names = tool_names(&seen);
    assert!(names.contains(&"plan_actions".into()) && !names.contains(&"execute_actions".into()), "{names:?}");
    let results = seen["results"].as_array().unwrap();
    assert!(results[0]["structuredContent"]["actions"].as_array().is_some_and(|a| !a.is_empty()), "{}", results[0]);
    assert_eq!(results[1]["isError"], false, "{}", results[1]);
    assert_eq!(
        (results[2]["isError"].as_bool(), results[2]["structuredContent"]["status"].as_u64()),
        (Some(true), Some(403))
    );

    phase("an acting agent: schemas and hints, a denied action, one that waits for approval");
    let actor = key_for(&cluster, 1, "mcp-actor", "agent", &["*"], &["agent"], Some("act")).await?;
    let calls = json!([
        {"name": "execute_actions", "arguments": {"runtime_id": runtime, "actions": [{"type": "snapshot"}]}},
        {"name": "execute_actions", "arguments": {"runtime_id": runtime, "actions": [{"type": "restart"}]}},
        {"name": "list_pending_approvals", "arguments": {}},
        {"name": "get_runtime_status", "arguments": {"runtime_id": runtime}},
    ]);
    let seen = over_http(&cluster, 2, &actor, calls).await?;
    let names = tool_names(&seen);
    assert!(names.iter().all(|n| !n.contains("approve") && !n.contains("reject")), "no agent approves: {names:?}");
    let execute = tool(&seen, "execute_actions");
    assert_eq!(execute["annotations"]["destructiveHint"], true, "{execute}");
    assert_eq!(execute["inputSchema"]["required"], json!(["runtime_id", "actions"]), "{execute}");
    assert!(execute["inputSchema"]["$defs"]["Action"].is_object(), "{execute}");
    assert_eq!(tool(&seen, "cancel_operation")["annotations"]["idempotentHint"], true);
    let results = seen["results"].as_array().unwrap();
    assert_eq!(
        results[0]["structuredContent"]["type"], "https://runtimeai.dev/problems/policy-denied",
        "{}",
        results[0]
    );
    assert_eq!(results[0]["isError"], true);
    let waiting = &results[1]["structuredContent"];
    assert_eq!(waiting["status"], "pending_approval", "an agent's restart in safe_first: {waiting}");
    let operation = waiting["id"].as_str().unwrap_or_default().to_string();
    let pending = results[2]["structuredContent"]["items"].as_array().cloned().unwrap_or_default();
    assert!(pending.iter().any(|o| o["id"] == operation.as_str()), "{}", results[2]);
    assert!(results[3]["structuredContent"]["state"].is_string(), "{}", results[3]);
    let other_tenant = key_for(&cluster, 1, "mcp-acme-viewer", "human", &["acme"], &["viewer"], None).await?;
    let theirs = cluster
        .call_as(Some(&other_tenant), 2, Method::GET, "/v1/operations?status=pending_approval", None, &[])
        .await?;
    assert_eq!(theirs.body["items"], json!([]), "another tenant's waiting operations stay hidden: {theirs:?}");
    let ended = cluster.call(2, Method::GET, "/v1/operations?status=succeeded", None, &[]).await?;
    assert_eq!(ended.status, 400, "only unfinished ones are listed: {ended:?}");

    phase("over stdio (`runtimeai mcp`), the agent waits for the operation while a human approves it");
    let token_calls =
        json!([{"name": "wait_operation", "arguments": {"operation_id": operation, "timeout_seconds": 60}}]);
    let binary = binary().display().to_string();
    let servers = format!("https://127.0.0.1:1,{}", cluster.node(3).url(""));
    let args = vec![
        "stdio".into(),
        actor.clone(),
        ca_file()?.display().to_string(),
        token_calls.to_string(),
        binary,
        "mcp".into(),
        "--server".into(),
        servers,
    ];
    let waiter = tokio::spawn(client(args));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let approve = format!("/v1/operations/{operation}/approve");
    let approved = cluster.call_eventually(1, Method::POST, &approve, Some(&json!({"reason": "fine"})), &[]).await?;
    assert_eq!(approved.status, 200, "{approved:?}");
    let seen = waiter.await??;
    let waited = &seen["results"][0];
    assert_eq!(waited["structuredContent"]["status"], "succeeded", "{waited}");
    let progress = waited["progress"].as_array().cloned().unwrap_or_default();
    assert!(!progress.is_empty(), "progress while it waited: {waited}");
    assert!(
        progress.iter().any(|p| p["message"].as_str().is_some_and(|m| m.starts_with("pending_approval"))),
        "{progress:?}"
    );

    phase("the TypeScript SDK's client (npm, on the machine's Node.js): read, then get and cancel as the agent");
    let seen =
        typescript_client(&cluster, 1, &reader, json!([{"name": "get_runtime", "arguments": {"runtime_id": runtime}}]))
            .await?;
    assert_eq!(seen["server"], "runtimeai", "{seen}");
    let names = tool_names(&seen);
    assert!(names.contains(&"get_operation".into()) && !names.contains(&"execute_actions".into()), "{names:?}");
    assert_eq!(seen["results"][0]["structuredContent"]["id"], runtime.as_str(), "{seen}");
    let path = format!("/v1/runtimes/{runtime}/actions/execute");
    let body = json!({"actions": [{"type": "restart"}]});
    let parked = cluster.call_eventually_as(&actor, 2, Method::POST, &path, Some(&body), &[]).await?;
    let parked = parked.body["id"].as_str().unwrap_or_default().to_string();
    let calls = json!([
        {"name": "get_operation", "arguments": {"operation_id": operation}},
        {"name": "cancel_operation", "arguments": {"operation_id": parked}},
    ]);
    let seen = typescript_client(&cluster, 3, &actor, calls).await?;
    assert_eq!(seen["results"][0]["structuredContent"]["status"], "succeeded", "{seen}");
    assert_eq!(seen["results"][1]["structuredContent"]["status"], "cancelled", "{seen}");
    Ok(())
}

/// `tests/mcp_client.mjs` beside the SDK `deploy/node-env.sh` installs (ES modules resolve
/// packages from the script's directory), over Streamable HTTP through node `via`.
async fn typescript_client(cluster: &Cluster, via: u64, token: &str, calls: Value) -> anyhow::Result<Value> {
    let home = std::env::var("HOME").unwrap_or_default();
    let dir = PathBuf::from(home).join(".cache/runtimeai/node");
    anyhow::ensure!(dir.join("node_modules/@modelcontextprotocol/sdk").exists(), "run deploy/node-env.sh");
    let script = dir.join("mcp_client.mjs");
    std::fs::copy(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mcp_client.mjs"), &script)?;
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .args([cluster.node(via).url("/mcp"), token.to_string(), calls.to_string()])
        .env("NODE_EXTRA_CA_CERTS", ca_file()?)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(output.status.success(), "the TypeScript MCP client failed: {stderr}");
    serde_json::from_slice(&output.stdout).map_err(|e| anyhow::anyhow!("{e}: {stderr}"))
}
