//! Webhooks as a receiver meets them: every delivery's signature checked by the Standard
//! Webhooks reference library (Python `standardwebhooks`), failures retried with the same
//! `webhook-id`, a tenant's subscription getting its tenant's events only, internal addresses
//! refused until allowed, and nothing lost when the node delivering is SIGKILLed.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use runtimeai_tests::{key_for, phase, Cluster, ClusterOptions, Eventually, EVENTUALLY};

/// The feed position an event id names, to compare ids by.
fn position(id: &str) -> (u64, u32) {
    let (seq, sub) = id.trim_start_matches("ev_").split_once('_').unwrap_or_default();
    (u64::from_str_radix(seq, 16).unwrap_or_default(), sub.parse().unwrap_or_default())
}

/// `tests/webhook_receiver.py` under the tests' Python environment (`deploy/python-env.sh`).
struct Receiver {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Receiver {
    /// Listens on a free loopback port; answers the first `failures` deliveries with 500.
    async fn start(failures: u32) -> anyhow::Result<Receiver> {
        let home = std::env::var("HOME").unwrap_or_default();
        let python = PathBuf::from(home).join(".cache/runtimeai/venv/bin/python");
        anyhow::ensure!(python.exists(), "no {} (run deploy/python-env.sh)", python.display());
        let dir = tempfile::tempdir()?;
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("webhook_receiver.py");
        let child = Command::new(python)
            .arg(script)
            .args(["port", "secret", "log"].map(|f| dir.path().join(f)))
            .arg(failures.to_string())
            .spawn()?;
        let port_file = dir.path().join("port");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !port_file.exists() {
            anyhow::ensure!(Instant::now() < deadline, "the receiver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let port = std::fs::read_to_string(port_file)?.trim().parse()?;
        Ok(Receiver { child, dir, port })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn set_secret(&self, secret: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(self.dir.path().join("secret"), secret)?)
    }

    /// What it logged, in order.
    fn log(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }

    /// The runtime names of the `runtime.created` deliveries whose signature checked out, in
    /// the order they first arrived, each once.
    fn created_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for entry in self.log() {
            if entry["type"] == "runtime.created" {
                let name = entry["data"]["data"]["name"].as_str().unwrap_or_default().to_string();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&Receiver) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + EVENTUALLY;
        while !done(self) {
            anyhow::ensure!(Instant::now() < deadline, "the receiver never got {what}: {:?}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a vcluster named `name` through node `via` (in `tenant`, if given).
async fn create(cluster: &Cluster, via: u64, name: &str, tenant: Option<&str>) -> anyhow::Result<String> {
    let headers: Vec<(&str, &str)> = tenant.map(|t| ("tenant_id", t)).into_iter().collect();
    let body = json!({"name": name, "type": "vcluster"});
    let made = cluster.call_eventually(via, Method::POST, "/v1/runtimes", Some(&body), &headers).await?;
    anyhow::ensure!(made.status == 201, "create {name}: {made:?}");
    Ok(made.body["id"].as_str().unwrap_or_default().to_string())
}

async fn subscribe(cluster: &Cluster, token: Option<&str>, body: Value) -> anyhow::Result<(String, String)> {
    let made = match token {
        Some(token) => cluster.call_eventually_as(token, 1, Method::POST, "/v1/webhooks", Some(&body), &[]).await?,
        None => cluster.call_eventually(1, Method::POST, "/v1/webhooks", Some(&body), &[]).await?,
    };
    anyhow::ensure!(made.status == 201, "subscribe {body}: {made:?}");
    assert!(made.body["webhook"].get("secret").is_none(), "the secret is shown beside, once: {made:?}");
    let (secret, id) = (&made.body["secret"], &made.body["webhook"]["id"]);
    Ok((id.as_str().unwrap_or_default().into(), secret.as_str().unwrap_or_default().into()))
}

async fn deliveries(cluster: &Cluster, via: u64, webhook: &str) -> anyhow::Result<Vec<Value>> {
    let log = cluster.get_eventually(via, &format!("/v1/webhooks/{webhook}/deliveries")).await?;
    Ok(log.body["items"].as_array().cloned().unwrap_or_default())
}

/// `webhook`'s delivery attempts through node `via` once `done` holds for them, polled for up to
/// [`EVENTUALLY`]: an attempt is recorded after the receiver answers it, by a replicated write.
async fn deliveries_until(
    cluster: &Cluster,
    via: u64,
    webhook: &str,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let log = deliveries(cluster, via, webhook).await?;
        if done(&log) {
            return Ok(log);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what} was not recorded: {log:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_confined_and_outlive_the_node_delivering_them() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    cluster.wait_leader(EVENTUALLY).await?;

    phase("internal destinations are refused: at once for an address, at delivery for a name");
    for url in [
        "http://127.0.0.1:9/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]/",
        "http://[::1]/",
    ] {
        let refused = cluster.call_eventually(2, Method::POST, "/v1/webhooks", Some(&json!({"url": url})), &[]).await?;
        assert_eq!(refused.status, 422, "{url}: {refused:?}");
        assert_eq!(refused.body["type"], "https://runtimeai.dev/problems/destination-refused", "{refused:?}");
    }
    for (url, field) in [("file:///etc/passwd", "$.url"), ("http://u:p@example.com/", "$.url")] {
        let bad = cluster.call_eventually(2, Method::POST, "/v1/webhooks", Some(&json!({"url": url})), &[]).await?;
        assert_eq!((bad.status, bad.body["errors"][0]["path"].as_str()), (400, Some(field)), "{bad:?}");
    }
    let sneaky = Receiver::start(0).await?;
    let by_name = json!({"url": format!("http://localhost:{}/hook", sneaky.port)});
    let (sneaky_id, sneaky_secret) = subscribe(&cluster, None, by_name).await?;
    sneaky.set_secret(&sneaky_secret)?;
    create(&cluster, 2, "hook-probe", None).await?;
    let failed = |d: &&Value| d["outcome"] == "failed";
    let log =
        deliveries_until(&cluster, 3, &sneaky_id, "a failed attempt", |log| log.iter().any(|d| failed(&d))).await?;
    let refusal = log.iter().find(failed).expect("a failed attempt");
    assert!(refusal["error"].as_str().unwrap_or_default().contains("refused"), "{refusal}");
    assert!(sneaky.log().is_empty(), "a name that resolves to loopback reached it: {:?}", sneaky.log());
    let gone = cluster.call_eventually(1, Method::DELETE, &format!("/v1/webhooks/{sneaky_id}"), None, &[]).await?;
    assert_eq!(gone.status, 204, "{gone:?}");
    drop(sneaky);

    phase("an allow-list opens loopback; a tenant's subscription sees its tenant only");
    let bad_setting = {
        let mut settings = cluster.get_eventually(1, "/v1/cluster/settings").await?.body;
        settings["webhook_allowed_destinations"] = json!(["localhost"]);
        cluster.call_eventually(1, Method::PUT, "/v1/cluster/settings", Some(&settings), &[]).await?
    };
    assert_eq!(bad_setting.status, 400, "{bad_setting:?}");
    let mut settings = cluster.get_eventually(1, "/v1/cluster/settings").await?.body;
    settings["webhook_allowed_destinations"] = json!(["127.0.0.1/32"]);
    let put = cluster.call_eventually(1, Method::PUT, "/v1/cluster/settings", Some(&settings), &[]).await?;
    assert_eq!(put.status, 200, "{put:?}");
    let all = Receiver::start(2).await?;
    let filter = json!({"url": all.url(), "event_types": ["runtime.created"], "description": "every tenant"});
    let (all_id, all_secret) = subscribe(&cluster, None, filter).await?;
    all.set_secret(&all_secret)?;
    let acme_key = key_for(&cluster, 1, "hook-acme-operator", "human", &["acme"], &["operator"], None).await?;
    let acme = Receiver::start(0).await?;
    let (acme_id, acme_secret) =
        subscribe(&cluster, Some(&acme_key), json!({"url": acme.url(), "event_types": ["runtime.*"]})).await?;
    acme.set_secret(&acme_secret)?;
    let listed = cluster.call_as(Some(&acme_key), 2, Method::GET, "/v1/webhooks", None, &[]).await?;
    let ids: Vec<&str> = listed.body["items"].as_array().unwrap().iter().filter_map(|w| w["id"].as_str()).collect();
    assert_eq!(ids, [acme_id.as_str()], "a tenant lists its own: {listed:?}");
    let foreign =
        cluster.call_as(Some(&acme_key), 2, Method::DELETE, &format!("/v1/webhooks/{all_id}"), None, &[]).await?;
    assert_eq!(foreign.status, 404, "another tenant's subscription: {foreign:?}");

    phase("deliveries in order, the first two refused by the receiver and retried");
    let mut names: Vec<String> = (0..4).map(|i| format!("hook-{i}")).collect();
    let mut ids = Vec::new();
    for name in &names {
        ids.push(create(&cluster, 2, name, None).await?);
    }
    let acme_runtime = create(&cluster, 3, "hook-acme", Some("acme")).await?;
    create(&cluster, 3, "hook-other", Some("other")).await?;
    names.extend(["hook-acme".to_string(), "hook-other".to_string()]);
    all.wait_for("every runtime.created", |r| r.created_names().len() >= names.len()).await?;
    assert_eq!(all.created_names(), names, "each, in the order they were created");
    let log = all.log();
    assert!(log.iter().all(|e| e.get("bad_signature").is_none()), "every signature checks out: {log:?}");
    let refused: Vec<&Value> = log.iter().filter_map(|e| e.get("refused")).collect();
    assert_eq!(refused.len(), 2, "{log:?}");
    let first = log.iter().find(|e| e.get("type").is_some()).expect("a delivery");
    assert!(refused.iter().all(|id| **id == first["id"]), "a retry keeps its webhook-id: {log:?}");
    let attempts = deliveries_until(&cluster, 1, &all_id, "the third attempt", |log| log.len() >= 3).await?;
    let outcomes: Vec<(u64, &str, Option<u64>)> = attempts
        .iter()
        .take(3)
        .map(|d| (d["attempt"].as_u64().unwrap(), d["outcome"].as_str().unwrap(), d["status"].as_u64()))
        .collect();
    assert_eq!(outcomes, [(1, "failed", Some(500)), (2, "failed", Some(500)), (3, "delivered", Some(204))]);
    acme.wait_for("acme's runtime", |r| r.created_names() == ["hook-acme"]).await?;
    let acme_log = acme.log();
    assert!(acme_log.iter().all(|e| e["data"]["runtime_id"] == acme_runtime.as_str()), "acme's only: {acme_log:?}");

    observers(&cluster, &ids[0], &ids[1]).await?;
    names.push(SHORT_LIVED.into());

    phase("the node delivering is SIGKILLed: another takes the lease, nothing is lost");
    let holder = attempts.last().and_then(|d| d["node_id"].as_u64()).expect("a delivering node");
    cluster.kill(holder);
    let survivor = (1..=3).find(|n| *n != holder).unwrap();
    let later: Vec<String> = (0..8).map(|i| format!("hook-after-{i}")).collect();
    for name in &later {
        create(&cluster, survivor, name, None).await?;
    }
    names.extend(later);
    all.wait_for("every runtime.created after the kill", |r| r.created_names().len() >= names.len()).await?;
    assert_eq!(all.created_names(), names, "each at least once, first seen in order");
    let after = deliveries(&cluster, survivor, &all_id).await?;
    let last = after.last().expect("deliveries");
    assert_ne!(last["node_id"].as_u64(), Some(holder), "another node delivers now: {last}");
    let record = cluster.get_eventually(survivor, &format!("/v1/webhooks/{all_id}")).await?;
    let through = record.body["delivered_through"].as_str().map(position);
    assert!(through >= last["event_id"].as_str().map(position), "its cursor is past what it delivered: {record:?}");
    assert!(record.body.get("secret").is_none(), "{record:?}");
    Ok(())
}

/// Runs `actions` on `runtime` through node 1 (as `token`, else the admin).
async fn execute(cluster: &Cluster, token: Option<&str>, runtime: &str, actions: Value) -> anyhow::Result<Value> {
    let path = format!("/v1/runtimes/{runtime}/actions/execute");
    let body = json!({ "actions": actions });
    let begun = match token {
        Some(token) => cluster.call_eventually_as(token, 1, Method::POST, &path, Some(&body), &[]).await?,
        None => cluster.call_eventually(1, Method::POST, &path, Some(&body), &[]).await?,
    };
    if begun.status != 202 {
        return Ok(begun.body);
    }
    cluster.wait_operation(1, begun.body["id"].as_str().unwrap_or_default(), EVENTUALLY).await.map_err(Into::into)
}

/// The seed's `attach_observer` / `detach_observer`: an observer is a webhook scoped to the
/// runtime, made by an operation the policies judge.
async fn observers(cluster: &Cluster, observed: &str, other: &str) -> anyhow::Result<()> {
    phase("an observer attached by an action gets its runtime's events only; policies judge it");
    let policy = json!({"name": "no-agent-observers",
        "rules": [{"kind": "deny_action", "selector": {"actions": ["attach_observer"], "actor": "agent"}}]});
    let made = cluster.call_eventually(1, Method::POST, "/v1/policies", Some(&policy), &[]).await?;
    assert_eq!(made.status, 201, "{made:?}");
    let receiver = Receiver::start(0).await?;
    // The caller's own secret (32 bytes): the receiver knows it before the first delivery.
    let chosen = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    receiver.set_secret(chosen)?;
    let attach = json!([{"type": "attach_observer",
        "params": {"url": receiver.url(), "event_types": ["lifecycle.*", "operation.*"], "secret": chosen}}]);
    let agent = key_for(cluster, 1, "hook-agent", "agent", &["*"], &["agent"], Some("act")).await?;
    let denied = execute(cluster, Some(&agent), observed, attach.clone()).await?;
    assert_eq!(denied["type"], "https://runtimeai.dev/problems/policy-denied", "{denied}");
    let internal = json!([{"type": "attach_observer", "params": {"url": "http://169.254.169.254/"}}]);
    let refused = execute(cluster, None, observed, internal).await?;
    assert_eq!(refused["type"], "https://runtimeai.dev/problems/destination-refused", "{refused}");
    let attached = execute(cluster, None, observed, attach).await?;
    assert_eq!(attached["status"], "succeeded", "{attached}");
    assert!(!attached.to_string().contains("whsec_"), "the operation does not show the secret: {attached}");
    let observer = attached["params"]["actions"][0]["params"]["webhook_id"].as_str().expect("its webhook").to_string();
    let secret = cluster.get_eventually(2, &format!("/v1/webhooks/{observer}/secret")).await?;
    assert_eq!(secret.body["secret"], chosen, "{secret:?}");
    let described = cluster.get_eventually(3, &format!("/v1/webhooks/{observer}")).await?;
    assert_eq!(described.body["filter"]["runtime_id"], observed, "{described:?}");
    let mut restarts = Vec::new();
    for runtime in [other, observed] {
        let path = format!("/v1/runtimes/{runtime}/lifecycle/restart");
        let begun = cluster.call_eventually(2, Method::POST, &path, None, &[]).await?;
        let id = begun.body["id"].as_str().unwrap_or_default().to_string();
        assert_eq!(cluster.wait_operation(2, &id, EVENTUALLY).await?["status"], "succeeded");
        restarts.push(id);
    }
    let ended = |r: &Receiver| {
        r.log().iter().any(|e| e["type"] == "operation.succeeded" && e["data"]["data"]["operation_id"] == restarts[1])
    };
    receiver.wait_for("the observed runtime's restart", ended).await?;
    let log = receiver.log();
    assert!(log.iter().all(|e| e["data"]["runtime_id"] == observed), "its runtime's only, signed: {log:?}");
    assert!(log.iter().any(|e| e["type"] == "lifecycle.restart"), "{log:?}");

    let detach = json!([{"type": "detach_observer", "params": {"webhook_id": observer}}]);
    let foreign = execute(cluster, None, other, detach.clone()).await?;
    assert_eq!(
        (foreign["status"].as_str(), foreign["error"]["code"].as_str()),
        (Some("failed"), Some("observer_refused"))
    );
    assert_eq!(execute(cluster, None, observed, detach).await?["status"], "succeeded");
    let gone = cluster.call_eventually(1, Method::GET, &format!("/v1/webhooks/{observer}"), None, &[]).await?;
    assert_eq!(gone.status, 404, "{gone:?}");
    observers_end_with_their_runtime(cluster).await
}

/// The runtime [`observers_end_with_their_runtime`] creates and deletes.
const SHORT_LIVED: &str = "hook-short-lived";

/// An observer gets its runtime's `runtime.deleted` and is then removed (one whose filter
/// passes over that event too); nobody can subscribe to a runtime that is gone.
async fn observers_end_with_their_runtime(cluster: &Cluster) -> anyhow::Result<()> {
    phase("an observer ends with its runtime's deletion, once delivered through it");
    let runtime = create(cluster, 1, SHORT_LIVED, None).await?;
    let described = cluster.get_eventually(1, &format!("/v1/runtimes/{runtime}")).await?;
    let creating = described.body["active_operation"].as_str().unwrap_or_default().to_string();
    cluster.wait_operation(1, &creating, EVENTUALLY).await?;
    let receiver = Receiver::start(0).await?;
    let secret = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    receiver.set_secret(secret)?;
    let mut observers = Vec::new();
    for event_types in [json!(["runtime.*"]), json!(["lifecycle.restart"])] {
        let params = json!({"url": receiver.url(), "event_types": event_types, "secret": secret});
        let attached = execute(cluster, None, &runtime, json!([{"type": "attach_observer", "params": params}])).await?;
        assert_eq!(attached["status"], "succeeded", "{attached}");
        observers
            .push(attached["params"]["actions"][0]["params"]["webhook_id"].as_str().unwrap_or_default().to_string());
    }
    let deleted = cluster.call_eventually(2, Method::DELETE, &format!("/v1/runtimes/{runtime}"), None, &[]).await?;
    assert_eq!(deleted.status, 202, "{deleted:?}");
    let operation = deleted.body["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(cluster.wait_operation(2, &operation, EVENTUALLY).await?["status"], "succeeded");
    receiver.wait_for("runtime.deleted", |r| r.log().iter().any(|e| e["type"] == "runtime.deleted")).await?;
    let log = receiver.log();
    assert!(log.iter().all(|e| e.get("bad_signature").is_none() && e["data"]["runtime_id"] == runtime), "{log:?}");
    // The second passes over the deletion: its cursor moves past it within seconds.
    let deadline = Instant::now() + EVENTUALLY;
    for observer in &observers {
        loop {
            let seen = cluster.call(3, Method::GET, &format!("/v1/webhooks/{observer}"), None, &[]).await?;
            if seen.status == 404 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "observer {observer} outlived its runtime: {seen:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let audit = cluster.get_eventually(1, "/v1/events?runtime_id=cluster&type=webhook.deleted&limit=1000").await?;
    let items = audit.body["items"].as_array().cloned().unwrap_or_default();
    let removals = items.iter().filter(|e| e["data"]["runtime_id"] == runtime.as_str()).count();
    assert_eq!(removals, 2, "each removal is audited: {audit:?}");
    let late = json!({"url": receiver.url(), "runtime_id": runtime});
    let refused = cluster.call_eventually(1, Method::POST, "/v1/webhooks", Some(&late), &[]).await?;
    assert_eq!(refused.status, 404, "a subscription to a deleted runtime: {refused:?}");
    Ok(())
}
