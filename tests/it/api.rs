//! The REST API through every node of a real three-node cluster.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use runtimeai_tests::{key_for, phase, Cluster, ClusterOptions, Eventually, EVENTUALLY};

const SETTLE: Duration = EVENTUALLY;

/// POSTs an 8 MiB body `times` with Python's `http.client`, which sends the whole body before
/// reading the answer: the statuses it got, or the names of the errors it met instead.
async fn answered_before_the_body_is_read(cluster: &Cluster, times: usize) -> anyhow::Result<Vec<String>> {
    const CLIENT: &str = r#"
import http.client, os, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
context = ssl.create_default_context(cafile=sys.argv[2])
body = b"{" + b" " * (8 << 20) + b"}"
headers = {"Authorization": "Bearer " + os.environ["TOKEN"], "Content-Type": "application/json"}
for _ in range(int(sys.argv[3])):
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        connection.request("POST", "/v1/runtimes", body=body, headers=headers)
        print(connection.getresponse().status)
    except Exception as e:
        print(type(e).__name__)
    connection.close()
"#;
    let ca = runtimeai_tests::harness_ca()?.join("ca.pem");
    let output = tokio::process::Command::new("python3")
        .args(["-c", CLIENT, &cluster.node(1).http, &ca.display().to_string(), &times.to_string()])
        .env("TOKEN", runtimeai_tests::admin_token())
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "python3: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8_lossy(&output.stdout).split_whitespace().map(str::to_string).collect())
}

async fn cluster() -> anyhow::Result<Cluster> {
    let options = ClusterOptions { extra_args: vec!["--simulated-step-ms".into(), "50".into()], ..Default::default() };
    Ok(Cluster::start(3, options).await?)
}

fn is_problem(response: &runtimeai_tests::Response, status: u16) -> bool {
    response.status == status
        && response.header("content-type") == Some("application/problem+json")
        && response.body["status"] == status
        && response.body["title"].is_string()
        && response.body["detail"].is_string()
        && response.body["type"].is_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_goes_through_its_whole_lifecycle_across_nodes() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    phase("create through node 1; the create operation is followed through node 2");
    let created = cluster
        .call_eventually(
            1,
            Method::POST,
            "/v1/runtimes",
            Some(&json!({"name": "finance-prod", "type": "vm", "spec": {"size": "small"}})),
            &[],
        )
        .await?;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body["state"], "creating");
    let id = created.body["id"].as_str().unwrap().to_string();
    let create_op = created.body["active_operation"].as_str().unwrap().to_string();
    let done = cluster.wait_operation(2, &create_op, SETTLE).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["kind"], "create");
    assert_eq!(done["progress"]["percent"], 100);
    let runtime = cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(runtime.body["state"], "running");

    phase("stop, start, scale, snapshot, restore — each through a different node");
    let steps: Vec<(u64, &str, Value, &str)> = vec![
        (2, "stop", json!({"force": true, "timeout_seconds": 5}), "stopped"),
        (3, "start", json!({"reason": "morning"}), "running"),
        (1, "scale", json!({"size": "large"}), "running"),
        (2, "snapshot", json!({"name": "before-upgrade"}), "running"),
        (3, "restart", Value::Null, "running"),
    ];
    for (via, action, body, expected_state) in steps {
        let body = if body.is_null() { None } else { Some(&body) };
        let accepted = cluster
            .call_eventually(via, Method::POST, &format!("/v1/runtimes/{id}/lifecycle/{action}"), body, &[])
            .await?;
        assert_eq!(accepted.status, 202, "{action}: {accepted:?}");
        assert_eq!(accepted.body["status"], "queued");
        assert_eq!(accepted.body["kind"], action);
        let location = accepted.header("location").unwrap().to_string();
        assert_eq!(location, format!("/v1/operations/{}", accepted.body["id"].as_str().unwrap()));
        let done = cluster.wait_operation(via, accepted.body["id"].as_str().unwrap(), SETTLE).await?;
        assert_eq!(done["status"], "succeeded", "{action}: {done}");
        let runtime =
            cluster.call_eventually(1 + via % 3, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
        assert_eq!(runtime.body["state"], expected_state, "after {action}: {}", runtime.body);
    }
    let runtime = cluster.call_eventually(1, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(runtime.body["spec"]["size"], "large");
    let snapshots = cluster.call_eventually(2, Method::GET, &format!("/v1/runtimes/{id}/snapshots"), None, &[]).await?;
    assert_eq!(snapshots.body["items"][0]["name"], "before-upgrade", "{snapshots:?}");
    let snapshot_id = snapshots.body["items"][0]["id"].as_str().unwrap().to_string();
    let restore = cluster
        .call_eventually(
            3,
            Method::POST,
            &format!("/v1/runtimes/{id}/lifecycle/restore"),
            Some(&json!({"snapshot_id": snapshot_id})),
            &[],
        )
        .await?;
    assert_eq!(restore.status, 202, "{restore:?}");
    assert_eq!(cluster.wait_operation(1, restore.body["id"].as_str().unwrap(), SETTLE).await?["status"], "succeeded");

    phase("illegal transitions and unknown things are problems");
    let again =
        cluster.call_eventually(1, Method::POST, &format!("/v1/runtimes/{id}/lifecycle/start"), None, &[]).await?;
    assert!(is_problem(&again, 409), "{again:?}");
    assert!(again.body["detail"].as_str().unwrap().contains("running"), "{again:?}");
    let unknown =
        cluster.call_eventually(2, Method::POST, &format!("/v1/runtimes/{id}/lifecycle/explode"), None, &[]).await?;
    assert!(is_problem(&unknown, 404), "{unknown:?}");
    let missing = cluster
        .call_eventually(
            2,
            Method::POST,
            &format!("/v1/runtimes/{id}/lifecycle/restore"),
            Some(&json!({"snapshot_id": "snap_nope"})),
            &[],
        )
        .await?;
    assert!(is_problem(&missing, 404), "{missing:?}");

    phase("the runtime's operations and events tell the story in order");
    let operations =
        cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{id}/operations"), None, &[]).await?;
    let kinds: Vec<&str> =
        operations.body["items"].as_array().unwrap().iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["create", "stop", "start", "scale", "snapshot", "restart", "restore"]);
    let mut paged = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = match &token {
            None => format!("/v1/runtimes/{id}/operations?page_size=3"),
            Some(token) => format!("/v1/runtimes/{id}/operations?page_size=3&page_token={token}"),
        };
        let page = cluster.call_eventually(2, Method::GET, &page, None, &[]).await?;
        let items = page.body["items"].as_array().unwrap();
        assert!(items.len() <= 3, "{page:?}");
        paged.extend(items.iter().map(|o| o["kind"].as_str().unwrap().to_string()));
        match page.body["next_page_token"].as_str() {
            Some(next) => token = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(paged, kinds, "pages of 3 hold every operation once, in order");
    let events =
        cluster.call_eventually(1, Method::GET, &format!("/v1/runtimes/{id}/events?limit=1000"), None, &[]).await?;
    let items = events.body["items"].as_array().unwrap();
    // One entry may write several events (an operation queued and handed to its executor):
    // they share its seq and are numbered within it by their id's last part.
    let order: Vec<(u64, u64)> = items.iter().map(seq_and_number).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "events in log order: {order:?}");
    // The leader hands an operation to an executor in the entry that queues it when its view of
    // the executors is fresh, else in an entry of its own: either way, that entry's index is the
    // fencing token, and it is never before the operation was queued.
    for operation in operations.body["items"].as_array().unwrap() {
        let about: Vec<&Value> = items.iter().filter(|e| e["data"]["operation_id"] == operation["id"]).collect();
        let queued = about.first().unwrap_or_else(|| panic!("no event about {operation}"));
        assert_ne!(queued["type"], "operation.assigned", "queued first: {about:?}");
        let assigned: Vec<&&Value> = about.iter().filter(|e| e["type"] == "operation.assigned").collect();
        assert!(!assigned.is_empty(), "never assigned: {about:?}");
        for event in assigned {
            assert_eq!(event["data"]["token"], event["seq"], "the assigning entry's index is the token: {event}");
            assert!(event["seq"].as_u64() >= queued["seq"].as_u64(), "{about:?}");
        }
    }
    assert_eq!(items[0]["type"], "runtime.created");
    assert_eq!(items[0]["actor"], "human");
    assert!(items.iter().any(|e| e["type"] == "lifecycle.scale" && e["data"]["action"] == "scale"));
    assert!(items.iter().any(|e| e["actor"] == "system"), "the executor's progress is the system's");
    let limited =
        cluster.call_eventually(2, Method::GET, &format!("/v1/runtimes/{id}/events?limit=2"), None, &[]).await?;
    assert_eq!(limited.body["items"].as_array().unwrap().len(), 2);
    let last_ts = items.last().unwrap()["ts"].as_str().unwrap();
    let since = cluster
        .call_eventually(
            3,
            Method::GET,
            &format!("/v1/runtimes/{id}/events?since={}", last_ts.replace('+', "%2B")),
            None,
            &[],
        )
        .await?;
    let recent = since.body["items"].as_array().unwrap();
    assert!(!recent.is_empty() && recent.len() < items.len(), "{since:?}");

    phase("delete: 202, deleting, then gone; the name is free and the audit trail stays");
    let deleted = cluster.call_eventually(2, Method::DELETE, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(deleted.status, 202, "{deleted:?}");
    assert_eq!(cluster.wait_operation(3, deleted.body["id"].as_str().unwrap(), SETTLE).await?["status"], "succeeded");
    let gone = cluster.call_eventually(1, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert!(is_problem(&gone, 404), "{gone:?}");
    let trail =
        cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{id}/events?limit=1000"), None, &[]).await?;
    let trail = trail.body["items"].as_array().unwrap();
    assert_eq!(trail.last().unwrap()["type"], "runtime.deleted");
    // The entry that ends the delete writes two events: numbered 0 and 1 within its seq.
    let ending: Vec<(u64, u64)> = trail[trail.len() - 2..].iter().map(seq_and_number).collect();
    assert_eq!(trail[trail.len() - 2]["type"], "operation.succeeded", "{trail:?}");
    assert_eq!((ending[0].0, ending[0].1, ending[1].1), (ending[1].0, 0, 1), "{trail:?}");
    let reuse = cluster
        .call_eventually(3, Method::POST, "/v1/runtimes", Some(&json!({"name": "finance-prod", "type": "vm"})), &[])
        .await?;
    assert_eq!(reuse.status, 201, "{reuse:?}");
    Ok(())
}

/// An event's seq (the index of the entry that wrote it) and its number within that entry.
fn seq_and_number(event: &Value) -> (u64, u64) {
    let within = event["id"].as_str().unwrap().rsplit('_').next().unwrap().parse().unwrap();
    (event["seq"].as_u64().unwrap(), within)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_problem_and_writes_nothing() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let post = |via: u64, body: &'static str, content_type: &'static str| {
        let request =
            cluster.client.post(cluster.node(via).url("/v1/runtimes")).header("content-type", content_type).body(body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
            let body: Value = response.json().await.unwrap();
            (status, content_type, body)
        }
    };
    let cases: Vec<(&str, &str, u16, Option<&str>)> = vec![
        ("{\"name\":", "application/json", 400, None),
        ("{\"name\": \"a\", \"type\": \"mainframe\"}", "application/json", 400, Some("$.type")),
        ("{\"name\": 5, \"type\": \"vm\"}", "application/json", 400, Some("$.name")),
        ("{\"name\": \"Bad Name\", \"type\": \"vm\"}", "application/json", 400, Some("$.name")),
        ("{\"name\": \"a\", \"type\": \"vm\", \"colour\": 1}", "application/json", 400, None),
        (
            "{\"name\": \"a\", \"type\": \"vm\", \"spec\": {\"size\": \"huge\"}}",
            "application/json",
            422,
            Some("$.spec.size"),
        ),
        (
            "{\"name\": \"a\", \"type\": \"vm\", \"spec\": {\"resources\": {\"replicas\": -1}}}",
            "application/json",
            422,
            Some("$.spec.resources.replicas"),
        ),
        (
            "{\"name\": \"a\", \"type\": \"vm\", \"spec\": {\"resources\": {\"memory\": \"lots\"}}}",
            "application/json",
            422,
            Some("$.spec.resources.memory"),
        ),
        ("{\"name\": \"a\", \"type\": \"vm\"}", "text/plain", 415, None),
    ];
    for (via, (body, content_type, status, path)) in (1..=3).cycle().zip(cases) {
        let (got, got_type, problem) = post(via, body, content_type).await;
        assert_eq!(got, status, "{body}: {problem}");
        assert_eq!(got_type, "application/problem+json");
        assert_eq!(problem["status"], status);
        if let Some(path) = path {
            assert_eq!(problem["errors"][0]["path"], path, "{body}: {problem}");
        }
    }
    phase("a body over the limit is 413");
    let big = format!("{{\"name\": \"a\", \"type\": \"vm\", \"labels\": {{\"x\": \"{}\"}}}}", "y".repeat(2 << 20));
    let response = cluster
        .client
        .post(cluster.node(2).url("/v1/runtimes"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await?;
    assert_eq!(response.status(), 413);
    phase("an answer given before the body was read says Connection: close, and a pooled client's next request works");
    let pooled = runtimeai_tests::admin_client_builder()?.http1_only().build()?;
    let anonymous = runtimeai_tests::client_builder()?.http1_only().build()?;
    let body = format!("{{\"name\": \"a\", \"type\": \"vm\", \"labels\": {{\"x\": \"{}\"}}}}", "y".repeat(2 << 20));
    for round in 0..5 {
        for (client, status) in [(&pooled, 413), (&anonymous, 401)] {
            let refused = client
                .post(cluster.node(2).url("/v1/runtimes"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await?;
            assert_eq!(refused.status(), status, "round {round}");
            let connection = refused.headers().get("connection").and_then(|v| v.to_str().ok());
            assert_eq!(connection, Some("close"), "round {round}: the {status} says the connection closes");
            let next = client.get(cluster.node(2).url("/healthz")).send().await;
            assert!(next.as_ref().is_ok_and(|r| r.status() == 200), "round {round}: the next request: {next:?}");
        }
    }
    let small = pooled.get(cluster.node(2).url("/v1/cluster")).send().await?;
    assert_eq!(small.headers().get("connection"), None, "a request read whole keeps its connection");
    phase("a client that sends its whole body before it reads (Python's http.client) gets the 413 too, not a reset");
    let statuses = answered_before_the_body_is_read(&cluster, 3).await?;
    assert_eq!(statuses, ["413", "413", "413"], "the answer must reach the client");
    phase("nothing malformed was written");
    let list = cluster.call_eventually(3, Method::GET, "/v1/runtimes", None, &[]).await?;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 0, "{list:?}");
    let unknown = cluster.call_eventually(1, Method::GET, "/v1/operations/op_nope", None, &[]).await?;
    assert!(is_problem(&unknown, 404));
    let bad_size = cluster.call_eventually(1, Method::GET, "/v1/runtimes?page_size=0", None, &[]).await?;
    assert!(is_problem(&bad_size, 400), "{bad_size:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_guard_updates_and_lists_filter_and_page() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut ids = Vec::new();
    for (i, (kind, env)) in
        [("vm", "prod"), ("vm", "dev"), ("sandbox", "prod"), ("vcluster", "prod"), ("vm", "prod")].iter().enumerate()
    {
        let tenant = if i == 4 { "globex" } else { "acme" };
        let body = json!({"name": format!("rt-{i}"), "type": kind, "labels": {"env": env}});
        let created = cluster
            .call_eventually(1 + i as u64 % 3, Method::POST, "/v1/runtimes", Some(&body), &[("tenant_id", tenant)])
            .await?;
        assert_eq!(created.status, 201, "{created:?}");
        ids.push(created.body["id"].as_str().unwrap().to_string());
        // Let the create finish: the executor's progress changes the version too.
        cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), SETTLE).await?;
    }
    phase("PATCH with the current ETag succeeds and bumps it; a stale one is 412");
    let read = cluster.call_eventually(2, Method::GET, &format!("/v1/runtimes/{}", ids[0]), None, &[]).await?;
    let etag = read.header("etag").unwrap().to_string();
    let patch = json!({"labels": {"team": "risk", "env": null}});
    let patched = cluster
        .call_eventually(3, Method::PATCH, &format!("/v1/runtimes/{}", ids[0]), Some(&patch), &[("if-match", &etag)])
        .await?;
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_eq!(patched.body["labels"], json!({"team": "risk"}));
    assert_ne!(patched.header("etag").unwrap(), etag);
    let stale = cluster
        .call_eventually(1, Method::PATCH, &format!("/v1/runtimes/{}", ids[0]), Some(&patch), &[("if-match", &etag)])
        .await?;
    assert!(is_problem(&stale, 412), "{stale:?}");
    let stale_stop = cluster
        .call_eventually(
            1,
            Method::POST,
            &format!("/v1/runtimes/{}/lifecycle/stop", ids[0]),
            None,
            &[("if-match", "\"1\"")],
        )
        .await?;
    assert!(is_problem(&stale_stop, 412), "{stale_stop:?}");

    phase("filters: tenant header, type, label selector; pages");
    let acme = cluster.call_eventually(2, Method::GET, "/v1/runtimes", None, &[("tenant_id", "acme")]).await?;
    assert_eq!(acme.body["items"].as_array().unwrap().len(), 4);
    let hidden = cluster
        .call_eventually(2, Method::GET, &format!("/v1/runtimes/{}", ids[4]), None, &[("tenant_id", "acme")])
        .await?;
    assert!(is_problem(&hidden, 404), "another tenant's runtime is not found: {hidden:?}");
    let vms = cluster.call_eventually(3, Method::GET, "/v1/runtimes?type=vm", None, &[("tenant_id", "acme")]).await?;
    assert_eq!(vms.body["items"].as_array().unwrap().len(), 2);
    let prod = cluster.call_eventually(1, Method::GET, "/v1/runtimes?label_selector=env%3Dprod", None, &[]).await?;
    assert_eq!(prod.body["items"].as_array().unwrap().len(), 3, "{prod:?}");
    let not_prod =
        cluster.call_eventually(1, Method::GET, "/v1/runtimes?label_selector=env!%3Dprod,!team", None, &[]).await?;
    assert_eq!(not_prod.body["items"].as_array().unwrap().len(), 1, "{not_prod:?}");
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let path = if token.is_empty() {
            "/v1/runtimes?page_size=2".to_string()
        } else {
            format!("/v1/runtimes?page_size=2&page_token={token}")
        };
        let page = cluster.call_eventually(2, Method::GET, &path, None, &[]).await?;
        seen.extend(page.body["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()));
        match page.body["next_page_token"].as_str() {
            Some(next) => token = next.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, ids, "pages cover every runtime once, in creation order");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_return_the_first_reply_on_any_node() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let body = json!({"name": "once", "type": "sandbox"});
    let first =
        cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&body), &[("idempotency-key", "k-1")]).await?;
    assert_eq!(first.status, 201);
    for via in [2, 3, 1] {
        let retry = cluster
            .call_eventually(via, Method::POST, "/v1/runtimes", Some(&body), &[("idempotency-key", "k-1")])
            .await?;
        assert_eq!(retry.status, 201, "{retry:?}");
        assert_eq!(retry.body["id"], first.body["id"], "same runtime, not a second one");
    }
    let reused = cluster
        .call_eventually(
            2,
            Method::POST,
            "/v1/runtimes",
            Some(&json!({"name": "other", "type": "vm"})),
            &[("idempotency-key", "k-1")],
        )
        .await?;
    assert!(is_problem(&reused, 422), "{reused:?}");
    let id = first.body["id"].as_str().unwrap();
    let stop_op = cluster.wait_operation(2, first.body["active_operation"].as_str().unwrap(), SETTLE).await?;
    assert_eq!(stop_op["status"], "succeeded");
    let stop_path = format!("/v1/runtimes/{id}/lifecycle/stop");
    let stop = |via| cluster.call_eventually(via, Method::POST, &stop_path, None, &[("idempotency-key", "stop-1")]);
    let (a, b) = (stop(3).await?, stop(1).await?);
    assert_eq!((a.status, b.status), (202, 202), "{a:?} {b:?}");
    assert_eq!(a.body["id"], b.body["id"], "one stop operation");

    phase("a key is bound to its request's method and path: another runtime's delete with it is refused");
    let other = cluster.create_runtime_eventually(1, "spared", SETTLE).await?;
    cluster.wait_operation(2, a.body["id"].as_str().unwrap(), SETTLE).await?;
    let path = format!("/v1/runtimes/{id}");
    let delete = |via| cluster.call_eventually(via, Method::DELETE, &path, None, &[("idempotency-key", "del-1")]);
    let deleted = delete(2).await?;
    assert_eq!(deleted.status, 202, "{deleted:?}");
    let retried = delete(3).await?;
    assert_eq!(retried.body["id"], deleted.body["id"], "the retry gets the first delete's operation: {retried:?}");
    let misused = cluster
        .call_eventually(1, Method::DELETE, &format!("/v1/runtimes/{other}"), None, &[("idempotency-key", "del-1")])
        .await?;
    assert!(is_problem(&misused, 422), "{misused:?}");
    let spared = cluster.call_eventually(1, Method::GET, &format!("/v1/runtimes/{other}"), None, &[]).await?;
    assert_eq!(spared.status, 200, "{spared:?}");
    assert_ne!(spared.body["state"], "deleting");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_can_be_cancelled_until_they_finish() -> anyhow::Result<()> {
    // A vCluster, whose simulated driver here takes ten minutes per call (libvirt's test driver
    // takes none, and an operation starts as soon as it is queued): the create is still under
    // way however slowly the requests below are served. The cluster is this test's own.
    let cluster = Cluster::start(
        3,
        ClusterOptions { extra_args: vec!["--simulated-step-ms".into(), "600000".into()], ..Default::default() },
    )
    .await?;
    let created = cluster
        .call_eventually(1, Method::POST, "/v1/runtimes", Some(&json!({"name": "slow", "type": "vcluster"})), &[])
        .await?;
    let id = created.body["id"].as_str().unwrap().to_string();
    let op = created.body["active_operation"].as_str().unwrap().to_string();
    let busy =
        cluster.call_eventually(2, Method::POST, &format!("/v1/runtimes/{id}/lifecycle/stop"), None, &[]).await?;
    assert!(is_problem(&busy, 409), "one operation at a time: {busy:?}");
    let cancelled = cluster.call_eventually(3, Method::POST, &format!("/v1/operations/{op}/cancel"), None, &[]).await?;
    assert_eq!(cancelled.status, 200, "{cancelled:?}");
    assert_eq!(cancelled.body["status"], "cancelled");
    let runtime = cluster.call_eventually(1, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(runtime.body["state"], "error", "a cancelled create leaves no backend: {runtime:?}");
    let twice = cluster.call_eventually(2, Method::POST, &format!("/v1/operations/{op}/cancel"), None, &[]).await?;
    assert!(is_problem(&twice, 409), "{twice:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_created_listed_and_deleted_through_any_node() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let body = json!({"name": "no-public-prod", "scope_env": "production", "rules": [
        {"kind": "data_egress", "params": {"deny_open_egress": false}},
        {"kind": "require_approval", "selector": {"actions": ["stop"]}}
    ]});
    let created =
        cluster.call_eventually(2, Method::POST, "/v1/policies", Some(&body), &[("tenant_id", "acme")]).await?;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body["rules"][0]["params"]["deny_open_egress"], false, "free-form JSON survives the log");
    let id = created.body["id"].as_str().unwrap();
    let listed = cluster
        .call_eventually(3, Method::GET, "/v1/policies?scope_env=production", None, &[("tenant_id", "acme")])
        .await?;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    let other_env = cluster.call_eventually(3, Method::GET, "/v1/policies?scope_env=staging", None, &[]).await?;
    assert_eq!(other_env.body["items"].as_array().unwrap().len(), 0);
    let bad = cluster
        .call_eventually(
            1,
            Method::POST,
            "/v1/policies",
            Some(&json!({"name": "x", "rules": [{"kind": "allow_everything"}]})),
            &[],
        )
        .await?;
    assert!(is_problem(&bad, 400), "{bad:?}");
    assert_eq!(bad.body["errors"][0]["path"], "$.rules[0].kind");
    let path = format!("/v1/policies/{id}");
    let deleted = cluster.call_eventually(1, Method::DELETE, &path, None, &[("idempotency-key", "del-pol")]).await?;
    assert_eq!(deleted.status, 204);
    let retried = cluster.call_eventually(3, Method::DELETE, &path, None, &[("idempotency-key", "del-pol")]).await?;
    assert_eq!(retried.status, 204, "a retry of a delete that is done gets its answer: {retried:?}");
    let unkeyed = cluster.call_eventually(2, Method::DELETE, &path, None, &[]).await?;
    assert!(is_problem(&unkeyed, 404), "without the key, the policy is gone: {unkeyed:?}");
    let gone = cluster.call_eventually(2, Method::GET, &format!("/v1/policies/{id}"), None, &[]).await?;
    assert!(is_problem(&gone, 404));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_create_is_applied_exactly_once_across_a_leader_kill() -> anyhow::Result<()> {
    let mut cluster = cluster().await?;
    let leader = cluster.wait_leader(SETTLE).await?;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    phase("a stream of creates with idempotency keys, retried on 503 or transport errors; the leader dies midway");
    let total = 60;
    let mut acknowledged = Vec::new();
    for i in 0..total {
        if i == total / 3 {
            cluster.kill(leader);
        }
        // Alternate between the survivors and, until it dies, the leader.
        let via = if i < total / 3 && i % 3 == 0 { leader } else { followers[i % 2] };
        let body = json!({"name": format!("stream-{i}"), "type": "vm", "labels": {"stream": "yes"}});
        let key = format!("stream-key-{i}");
        let deadline = std::time::Instant::now() + SETTLE;
        loop {
            let target = if cluster.node(via).is_running() { via } else { followers[i % 2] };
            match cluster.call(target, Method::POST, "/v1/runtimes", Some(&body), &[("idempotency-key", &key)]).await {
                Ok(response) if response.status == 201 => {
                    acknowledged.push(response.body["id"].as_str().unwrap().to_string());
                    break;
                }
                Ok(response) if response.status == 503 => {}
                Ok(response) => panic!("create {i}: {response:?}"),
                Err(_) => {}
            }
            assert!(std::time::Instant::now() < deadline, "create {i} never succeeded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    phase("every acknowledged create is there exactly once, on both survivors");
    for via in &followers {
        let list = cluster
            .call_eventually(*via, Method::GET, "/v1/runtimes?label_selector=stream%3Dyes&page_size=200", None, &[])
            .await?;
        let mut names: Vec<String> =
            list.body["items"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_string()).collect();
        let ids: Vec<String> =
            list.body["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), total, "node {via}: one runtime per request");
        assert_eq!(ids.len(), total, "node {via}: no duplicates");
        for id in &acknowledged {
            assert!(ids.contains(id), "acknowledged {id} is missing on node {via}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_the_committed_openapi_document() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let committed: Value = serde_json::from_str(include_str!("../../api/openapi.json"))?;
    for via in 1..=3 {
        let served = cluster.call_eventually(via, Method::GET, "/v1/openapi.json", None, &[]).await?;
        assert_eq!(served.status, 200);
        assert!(served.body == committed, "node {via} serves a document that differs from api/openapi.json");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_retention_is_a_cluster_setting_every_node_applies() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let defaults = cluster.call_eventually(1, Method::GET, "/v1/cluster/settings", None, &[]).await?;
    assert_eq!(
        (defaults.body["event_retention_count"].as_u64(), defaults.body["event_retention_days"].as_u64()),
        (Some(1000), Some(30))
    );
    let names: Vec<&str> =
        defaults.body["sizes"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["small", "medium", "large", "xlarge"]);
    let bad = cluster
        .call_eventually(
            2,
            Method::PUT,
            "/v1/cluster/settings",
            Some(&json!({"event_retention_count": 99, "event_retention_days": 30})),
            &[],
        )
        .await?;
    assert!(is_problem(&bad, 422), "below the floor: {bad:?}");
    assert_eq!(bad.body["errors"][0]["path"], "$.event_retention_count", "{bad:?}");
    let set = cluster
        .call_eventually(
            2,
            Method::PUT,
            "/v1/cluster/settings",
            Some(&json!({"event_retention_count": 100, "event_retention_days": 30})),
            &[],
        )
        .await?;
    assert_eq!(set.status, 200, "{set:?}");
    let created = cluster
        .call_eventually(3, Method::POST, "/v1/runtimes", Some(&json!({"name": "chatty", "type": "vm"})), &[])
        .await?;
    let id = created.body["id"].as_str().unwrap().to_string();
    cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), SETTLE).await?;
    for i in 0..100 {
        let patch = json!({"labels": {"round": i.to_string()}});
        assert_eq!(
            cluster
                .call_eventually(1 + i % 3, Method::PATCH, &format!("/v1/runtimes/{id}"), Some(&patch), &[])
                .await?
                .status,
            200
        );
    }
    for via in 1..=3 {
        let path = format!("/v1/runtimes/{id}/events?limit=1000");
        let events = cluster.call_eventually(via, Method::GET, &path, None, &[]).await?;
        let items = events.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 100, "node {via}: the oldest dropped past 100");
        assert_eq!(items.last().unwrap()["data"]["labels"]["round"], "99");
        assert_ne!(items[0]["type"], "runtime.created", "node {via}: the oldest went first");
    }

    phase("the size catalogue is a setting too: sizes are checked against it");
    let catalogue = json!({"event_retention_count": 1000, "event_retention_days": 30, "sizes": [
        {"name": "tiny", "cpu": 0.5, "memory": "1Gi", "replicas": 1, "cost_per_hour": 0.01},
        {"name": "huge", "cpu": 16.0, "memory": "64Gi", "replicas": 2, "cost_per_hour": 3.0}
    ]});
    let set = cluster.call_eventually(3, Method::PUT, "/v1/cluster/settings", Some(&catalogue), &[]).await?;
    assert_eq!(set.status, 200, "{set:?}");
    let unordered = json!({"event_retention_count": 1000, "event_retention_days": 30, "sizes": [
        {"name": "huge", "cpu": 16.0, "memory": "64Gi", "replicas": 2, "cost_per_hour": 3.0},
        {"name": "tiny", "cpu": 0.5, "memory": "1Gi", "replicas": 1, "cost_per_hour": 0.01}
    ]});
    let refused = cluster.call_eventually(1, Method::PUT, "/v1/cluster/settings", Some(&unordered), &[]).await?;
    assert!(is_problem(&refused, 422), "{refused:?}");
    let medium = json!({"name": "m", "type": "vm", "spec": {"size": "medium"}});
    let refused = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&medium), &[]).await?;
    assert!(is_problem(&refused, 422), "{refused:?}");
    assert!(refused.body["detail"].as_str().unwrap().contains("tiny, huge"), "{refused:?}");
    let tiny = json!({"name": "t", "type": "vm", "spec": {"size": "tiny"}});
    assert_eq!(cluster.call_eventually(2, Method::POST, "/v1/runtimes", Some(&tiny), &[]).await?.status, 201);

    phase("every node's OpenAPI document names the sizes the cluster has now");
    for via in 1..=3 {
        let document = cluster.call_eventually(via, Method::GET, "/v1/openapi.json", None, &[]).await?.body;
        let scale = &document["components"]["schemas"]["LifecycleScaleRequest"]["allOf"][0];
        assert_eq!(scale["properties"]["size"]["enum"], json!(["tiny", "huge", null]), "node {via}: {scale}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_execute_a_checked_list_of_actions_as_one_operation() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let created = cluster
        .call_eventually(1, Method::POST, "/v1/runtimes", Some(&json!({"name": "agentic", "type": "vcluster"})), &[])
        .await?;
    let id = created.body["id"].as_str().unwrap().to_string();
    cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), SETTLE).await?;
    let execute = format!("/v1/runtimes/{id}/actions/execute");
    // An automation in balanced mode: an agent principal may ask for safe_first only.
    let planner = key_for(&cluster, 1, "planner", "service", &["*"], &["operator"], None).await?;

    phase("stop, scale, snapshot, start in one operation, with the key in the body, through two nodes");
    let body = json!({"idempotency_key": "plan-42", "policy_mode": "balanced", "actions": [
        {"type": "stop", "params": {"force": true}},
        {"type": "scale", "params": {"size": "large"}},
        {"type": "snapshot", "params": {"name": "pre-change"}},
        {"type": "start"}
    ]});
    let accepted = cluster.call_eventually_as(&planner, 2, Method::POST, &execute, Some(&body), &[]).await?;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    assert_eq!(accepted.body["kind"], "execute");
    assert_eq!(accepted.body["results"], json!([]), "nothing has run yet: no results");
    let replay = cluster.call_eventually_as(&planner, 3, Method::POST, &execute, Some(&body), &[]).await?;
    assert_eq!(replay.body["id"], accepted.body["id"], "the idempotency key in the body works like the header");
    let done = cluster.wait_operation(1, accepted.body["id"].as_str().unwrap(), SETTLE).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let results: Vec<(&str, &str)> = done["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["action"]["type"].as_str().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        results,
        [("stop", "succeeded"), ("scale", "succeeded"), ("snapshot", "succeeded"), ("start", "succeeded")]
    );
    let runtime = cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(runtime.body["state"], "running");
    assert_eq!(runtime.body["spec"]["size"], "large");
    assert_eq!(runtime.body["snapshots"][0]["name"], "pre-change");
    let events = cluster.call_eventually(2, Method::GET, &format!("/v1/runtimes/{id}/events"), None, &[]).await?;
    let execute_event =
        events.body["items"].as_array().unwrap().iter().find(|e| e["type"] == "lifecycle.execute").cloned().unwrap();
    assert_eq!(
        (execute_event["actor"].as_str(), execute_event["actor_name"].as_str()),
        (Some("service"), Some("planner"))
    );

    phase("the seed's rollout_restart: the vcluster's control plane rolled over");
    let rollout = json!({"policy_mode": "balanced", "actions": [{"type": "rollout_restart"}]});
    let rolling = cluster.call_eventually_as(&planner, 3, Method::POST, &execute, Some(&rollout), &[]).await?;
    assert_eq!(rolling.status, 202, "{rolling:?}");
    let rolled = cluster.wait_operation(1, rolling.body["id"].as_str().unwrap(), SETTLE).await?;
    assert_eq!(
        (&rolled["status"], &rolled["results"][0]["action"]["type"]),
        (&json!("succeeded"), &json!("rollout_restart"))
    );

    phase("the seed's tune_policy: the runtime's own mode and budget, then held to them");
    let tune = json!({"policy_mode": "balanced", "actions": [{"type": "tune_policy",
        "params": {"mode": "safe_first", "max_cost_per_hour": 0.5}}]});
    let tuning = cluster.call_eventually_as(&planner, 2, Method::POST, &execute, Some(&tune), &[]).await?;
    assert_eq!(tuning.status, 202, "tightening needs no approval: {tuning:?}");
    let tuned = cluster.wait_operation(1, tuning.body["id"].as_str().unwrap(), SETTLE).await?;
    assert_eq!(tuned["status"], "succeeded", "{tuned}");
    let runtime = cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(runtime.body["policy"], json!({"mode": "safe_first", "max_cost_per_hour": 0.5}), "{runtime:?}");
    let dearer = json!({"policy_mode": "balanced", "actions": [{"type": "scale", "params": {"size": "xlarge"}}]});
    let denied = cluster.call_eventually_as(&planner, 1, Method::POST, &execute, Some(&dearer), &[]).await?;
    assert!(is_problem(&denied, 403), "{denied:?}");
    assert!(denied.body["detail"].as_str().is_some_and(|d| d.contains("own budget of 0.50/h")), "{denied:?}");
    let restart = json!({"policy_mode": "balanced", "actions": [{"type": "restart"}]});
    let waits = cluster.call_eventually_as(&planner, 1, Method::POST, &execute, Some(&restart), &[]).await?;
    assert_eq!(waits.body["status"], "pending_approval", "judged in the runtime's safe_first: {waits:?}");
    let cancel = format!("/v1/operations/{}/cancel", waits.body["id"].as_str().unwrap());
    cluster.call_eventually(1, Method::POST, &cancel, None, &[]).await?;

    phase("every action is checked before anything is queued");
    let cases = [
        (json!({"actions": [{"type": "start"}]}), 409, None),
        (json!({"actions": [{"type": "stop"}, {"type": "stop"}]}), 409, None),
        (json!({"actions": [{"type": "migrate"}]}), 409, Some("$.actions[0].type")),
        (json!({"actions": [{"type": "pause"}]}), 409, Some("$.actions[0].type")),
        (
            json!({"actions": [{"type": "stop"}, {"type": "scale", "params": {"size": "huge"}}]}),
            422,
            Some("$.actions[1].params.size"),
        ),
        (json!({"actions": [{"type": "scale", "params": {"replicas": 3}}]}), 400, Some("$.actions[0].params.replicas")),
        (json!({"actions": [{"type": "explode"}]}), 400, None),
        (json!({"actions": []}), 400, Some("$.actions")),
    ];
    for (body, status, path) in cases {
        let response = cluster.call_eventually(1, Method::POST, &execute, Some(&body), &[]).await?;
        assert!(is_problem(&response, status), "{body}: {response:?}");
        if let Some(path) = path {
            assert_eq!(response.body["errors"][0]["path"], path, "{body}: {response:?}");
        }
    }
    let operations =
        cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{id}/operations"), None, &[]).await?;
    assert_eq!(operations.body["items"].as_array().unwrap().len(), 5, "refused requests queue nothing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intents_are_planned_executed_and_reported() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let body = json!({"name": "risk-api", "type": "vm", "spec": {"size": "large", "resources": {"replicas": 3}}, "labels": {"env": "production"}});
    let created = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&body), &[]).await?;
    let id = created.body["id"].as_str().unwrap().to_string();
    cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), SETTLE).await?;

    phase("actions/plan answers without running anything");
    let plan = cluster
        .call_eventually(
            2,
            Method::POST,
            &format!("/v1/runtimes/{id}/actions/plan"),
            Some(&json!({"goal": "reduce cost"})),
            &[],
        )
        .await?;
    assert_eq!(plan.status, 200, "{plan:?}");
    let kinds: Vec<&str> =
        plan.body["actions"].as_array().unwrap().iter().map(|a| a["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["snapshot", "scale"], "safe_first snapshots before downsizing");
    assert!(!plan.body["rationale"].as_array().unwrap().is_empty());

    phase("an intent through a follower: planned, then executed as one operation");
    let finops = key_for(&cluster, 1, "finops", "agent", &["*"], &["agent"], Some("act")).await?;
    let cfo = key_for(&cluster, 2, "cfo", "human", &["*"], &["approver"], None).await?;
    let intent_body = json!({"goal": "reduce cost while keeping latency < 50ms", "constraints": {"availability": "high"}, "context": {"env": "production"}});
    let submitted = cluster
        .call_eventually_as(&finops, 3, Method::POST, &format!("/v1/runtimes/{id}/intent"), Some(&intent_body), &[])
        .await?;
    assert_eq!(submitted.status, 202, "{submitted:?}");
    let waits = (&submitted.body["status"], &submitted.body["approval_pending"]);
    assert_eq!(waits, (&json!("accepted"), &json!(true)), "safe_first: a downsize waits for a human");
    let decisions = submitted.body["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 2, "one decision per planned action: {submitted:?}");
    let operation_id = submitted.body["operation_id"].as_str().unwrap();
    let approve = format!("/v1/operations/{operation_id}/approve");
    let own = cluster.call_eventually_as(&finops, 1, Method::POST, &approve, None, &[]).await?;
    assert!(is_problem(&own, 403), "the agent cannot approve its own intent: {own:?}");
    let approved = cluster.call_eventually_as(&cfo, 2, Method::POST, &approve, None, &[]).await?;
    assert_eq!(approved.status, 200, "{approved:?}");
    assert_eq!(cluster.wait_operation(1, operation_id, SETTLE).await?["status"], "succeeded");
    let intent_id = submitted.body["intent_id"].as_str().unwrap();
    let record =
        cluster.call_eventually(2, Method::GET, &format!("/v1/runtimes/{id}/intent/{intent_id}"), None, &[]).await?;
    assert_eq!(record.status, 200, "{record:?}");
    assert_eq!(record.body["status"], "succeeded");
    assert_eq!(record.body["request"]["goal"], intent_body["goal"]);
    let executed: Vec<&str> = record.body["result"]["executed_actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(executed, ["succeeded", "succeeded"]);
    let first = &record.body["result"]["executed_actions"][0]["action"];
    assert!(first["type"].is_string() && first["params"].is_object(), "the seed's Action: {first}");
    assert!(!record.body["result"]["recommendations"].as_array().unwrap().is_empty());
    let runtime = cluster.call_eventually(1, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(runtime.body["spec"]["size"], "medium");

    phase("a constraint that rules out the only option is 409, a goal the planner does not know 422");
    let blocked = cluster
        .call_eventually(
            1,
            Method::POST,
            &format!("/v1/runtimes/{id}/intent"),
            Some(&json!({"goal": "improve performance", "constraints": {"cost": "optimize"}})),
            &[],
        )
        .await?;
    assert!(is_problem(&blocked, 409), "{blocked:?}");
    assert!(blocked.body["detail"].as_str().unwrap().contains("cost optimize"), "{blocked:?}");
    let unknown = cluster
        .call_eventually(
            2,
            Method::POST,
            &format!("/v1/runtimes/{id}/intent"),
            Some(&json!({"goal": "make it web scale"})),
            &[],
        )
        .await?;
    assert!(is_problem(&unknown, 422), "{unknown:?}");
    assert!(
        unknown.body["detail"].as_str().unwrap().contains("reduce cost"),
        "lists the goals it understands: {unknown:?}"
    );

    phase("a dry run plans and runs nothing");
    let dry = cluster
        .call_eventually(
            3,
            Method::POST,
            &format!("/v1/runtimes/{id}/intent"),
            Some(&json!({"goal": "improve performance", "dry_run": true})),
            &[],
        )
        .await?;
    assert_eq!(dry.status, 202);
    assert_eq!(dry.body["status"], "planned");
    assert_eq!(dry.body["operation_id"], "", "no operation; the seed's required string is empty");
    assert_eq!(dry.body["planned_actions"][0]["params"]["size"], "large");
    assert_eq!(dry.body["decisions"][0]["verdict"], "require_approval", "a dry run previews the policies: {dry:?}");
    let runtime = cluster.call_eventually(1, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    assert_eq!(runtime.body["spec"]["size"], "medium", "a dry run changes nothing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_endpoint_answers_the_same_through_every_node() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let created = cluster
        .call_eventually(1, Method::POST, "/v1/runtimes", Some(&json!({"name": "same", "type": "sandbox"})), &[])
        .await?;
    let id = created.body["id"].as_str().unwrap().to_string();
    let create_op = created.body["active_operation"].as_str().unwrap().to_string();
    cluster.wait_operation(2, &create_op, SETTLE).await?;
    let snap =
        cluster.call_eventually(2, Method::POST, &format!("/v1/runtimes/{id}/lifecycle/snapshot"), None, &[]).await?;
    cluster.wait_operation(3, snap.body["id"].as_str().unwrap(), SETTLE).await?;
    let intent = cluster
        .call_eventually(
            3,
            Method::POST,
            &format!("/v1/runtimes/{id}/intent"),
            Some(&json!({"goal": "restart", "policy_mode": "balanced"})),
            &[],
        )
        .await?;
    let intent_id = intent.body["intent_id"].as_str().unwrap().to_string();
    cluster.wait_operation(1, intent.body["operation_id"].as_str().unwrap(), SETTLE).await?;
    let policy = cluster
        .call_eventually(
            1,
            Method::POST,
            "/v1/policies",
            Some(&json!({"name": "p", "rules": [{"kind": "deny_action"}]})),
            &[],
        )
        .await?;
    let policy_id = policy.body["id"].as_str().unwrap().to_string();
    let paths = [
        "/v1/runtimes".to_string(),
        format!("/v1/runtimes/{id}"),
        format!("/v1/runtimes/{id}/status"),
        format!("/v1/runtimes/{id}/operations"),
        format!("/v1/runtimes/{id}/snapshots"),
        format!("/v1/runtimes/{id}/events?limit=1000"),
        format!("/v1/runtimes/{id}/intent/{intent_id}"),
        format!("/v1/operations/{create_op}"),
        "/v1/policies".to_string(),
        format!("/v1/policies/{policy_id}"),
        "/v1/cluster/settings".to_string(),
        "/v1/health".to_string(),
    ];
    // Executors report their runtimes' signals now and then: a report committed between two of
    // the three reads changes the answer, so the three are read again until they agree (the
    // reads are linearizable: with no write in between they must).
    for path in &paths {
        let mut tries = 0;
        loop {
            let mut bodies = Vec::new();
            for via in 1..=3 {
                let response = cluster.call_eventually(via, Method::GET, path, None, &[]).await?;
                assert_eq!(response.status, 200, "GET {path} through node {via}: {response:?}");
                let mut body = response.body;
                if let Some(object) = body.as_object_mut() {
                    object.remove("observed_at");
                }
                bodies.push(body);
            }
            if bodies.windows(2).all(|w| w[0] == w[1]) {
                break;
            }
            tries += 1;
            assert!(tries < 20, "GET {path} differs between nodes, {tries} times in a row: {bodies:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_a_follower_each_get_their_own_answer() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let leader = cluster.wait_leader(SETTLE).await?;
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    phase("64 creates at once through one follower (forwarded to the leader in batches); 16 names twice");
    // Under load a create may be answered 503 with Retry-After: it is asked again, with the
    // idempotency key it was sent with (see `call_eventually`), so each still has one outcome.
    let names: Vec<String> = (0..64).map(|i| format!("batch-{}", i % 48)).collect();
    let cluster = &cluster;
    let calls = names.iter().map(|name| {
        let body = json!({"name": name, "type": "vcluster"});
        async move {
            (name.clone(), cluster.call_eventually(follower, Method::POST, "/v1/runtimes", Some(&body), &[]).await)
        }
    });
    let mut created = std::collections::BTreeMap::new();
    let mut refused = 0;
    for (name, response) in futures::future::join_all(calls).await {
        let response = response?;
        match response.status {
            201 => {
                assert_eq!(response.body["name"], name.as_str(), "its own runtime: {response:?}");
                assert!(created.insert(name, response.body["id"].clone()).is_none(), "one create per name");
            }
            409 => {
                assert!(is_problem(&response, 409), "{response:?}");
                let detail = response.body["detail"].as_str().unwrap_or_default();
                assert!(detail.contains(&format!("{name:?}")) || detail.contains(&name), "about {name}: {detail}");
                refused += 1;
            }
            other => panic!("create {name}: {other} {response:?}"),
        }
    }
    assert_eq!((created.len(), refused), (48, 16), "each name created once, each second try refused");
    let listed = cluster.call_eventually(leader, Method::GET, "/v1/runtimes?page_size=100", None, &[]).await?;
    let mut listed: Vec<(String, Value)> = listed.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| (r["name"].as_str().unwrap_or_default().to_string(), r["id"].clone()))
        .collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed, created.into_iter().collect::<Vec<_>>(), "what was acknowledged is what exists");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_sharing_a_read_index_see_every_write_acknowledged_before_them() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let leader = cluster.wait_leader(SETTLE).await?;
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    let created = cluster
        .call_eventually(leader, Method::POST, "/v1/runtimes", Some(&json!({"name": "reg", "type": "vcluster"})), &[])
        .await?;
    let path = format!("/v1/runtimes/{}", created.body["id"].as_str().expect("id"));
    let cluster = &cluster;
    for round in 0..5 {
        phase(&format!("round {round}: a label written through the leader, then 32 reads at once through a follower"));
        let patch = json!({"labels": {"round": round.to_string()}});
        let patched = cluster.call_eventually(leader, Method::PATCH, &path, Some(&patch), &[]).await?;
        assert_eq!(patched.status, 200, "{patched:?}");
        let reads = (0..32).map(|_| cluster.call_eventually(follower, Method::GET, &path, None, &[]));
        for read in futures::future::join_all(reads).await {
            let read = read?;
            assert_eq!(read.status, 200, "{read:?}");
            assert_eq!(read.body["labels"]["round"], round.to_string(), "a read after the write sees it");
        }
    }
    Ok(())
}
