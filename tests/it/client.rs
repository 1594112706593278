//! The Rust client crate (`runtimeai-client`) against a live cluster: typed answers, problems
//! as typed errors, failover past a member it cannot reach, waiting on operations, following
//! the event feed, and the approval of an agent's request.

use serde_json::json;

use runtimeai_client::{
    Client, ClientConfig, ClientError, Consistency, EventQuery, Lifecycle, Relabel, RuntimeQuery, RuntimeState,
};
use runtimeai_tests::{admin_token, harness_ca, key_for, phase, Cluster, ClusterOptions, EVENTUALLY};

fn client(servers: Vec<String>, token: &str) -> anyhow::Result<Client> {
    let ca_pem = Some(std::fs::read(harness_ca()?.join("ca.pem"))?);
    Ok(Client::new(ClientConfig { servers, token: Some(token.into()), ca_pem, ..ClientConfig::default() })?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_crate_drives_a_cluster_with_typed_answers_and_errors() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    cluster.wait_leader(EVENTUALLY).await?;
    // The first member named cannot be reached: the client goes on to the next.
    let servers = vec!["https://127.0.0.1:1".to_string(), cluster.node(2).url(""), cluster.node(3).url("")];
    let admin = client(servers.clone(), admin_token())?;

    phase("create, wait, list, a lifecycle call, and a refusal as a typed problem");
    let runtime = admin.create_runtime(&json!({"name": "sdk-a", "type": "vcluster"})).await?;
    assert_eq!(runtime.name, "sdk-a");
    let create = runtime.active_operation.clone().expect("its create operation");
    let mut versions = Vec::new();
    let created = admin.wait_operation(&create, EVENTUALLY, |op| versions.push(op.status.clone())).await?;
    assert_eq!(created.status, "succeeded", "{created:?}");
    assert!(!versions.is_empty());
    let listed = admin.list_runtimes(&RuntimeQuery { page_size: Some(50), ..RuntimeQuery::default() }).await?;
    assert!(listed.items.iter().any(|r| r.id == runtime.id), "{listed:?}");
    let stop = admin.lifecycle(&runtime.id, Lifecycle::Stop, None).await?;
    assert_eq!(admin.wait_operation(&stop.id, EVENTUALLY, |_| {}).await?.status, "succeeded");
    assert_eq!(admin.get_runtime(&runtime.id).await?.state, RuntimeState::Stopped);
    let again = admin.lifecycle(&runtime.id, Lifecycle::Stop, None).await.unwrap_err();
    match &again {
        ClientError::Api { problem } => {
            assert_eq!(
                (problem.status, problem.type_uri.as_str()),
                (409, "https://runtimeai.dev/problems/illegal-transition")
            )
        }
        other => panic!("{other:?}"),
    }
    let missing = admin.get_runtime("rt_nope/../../v1/keys").await.unwrap_err();
    assert_eq!(missing.status(), Some(404), "an id stays one path segment: {missing:?}");

    phase("a create retried with its idempotency key is one runtime; a relabel is checked against its version");
    let keyed = admin.with_idempotency_key(format!("sdk-retry-{}", runtime.id));
    let first = keyed.create_runtime(&json!({"name": "sdk-keyed", "type": "vcluster"})).await?;
    let retried = keyed.create_runtime(&json!({"name": "sdk-keyed", "type": "vcluster"})).await?;
    assert_eq!(first.id, retried.id, "the retry is answered as the first try");
    let fresh = admin.create_runtime(&json!({"name": "sdk-keyed", "type": "vcluster"})).await.unwrap_err();
    assert_eq!(fresh.status(), Some(409), "without the key it is a second create of a taken name: {fresh:?}");
    let labels = std::collections::BTreeMap::from([("tier".to_string(), Some("gold".to_string()))]);
    let relabeled = match admin.relabel_runtime(&first.id, &labels, Some(first.version)).await? {
        Relabel::Done(runtime) => runtime,
        other => panic!("no policy parks a relabel here: {other:?}"),
    };
    assert_eq!(relabeled.labels.get("tier").map(String::as_str), Some("gold"));
    let stale = admin.relabel_runtime(&first.id, &labels, Some(first.version)).await.unwrap_err();
    assert_eq!(stale.status(), Some(412), "the version moved on: {stale:?}");
    // The member serving this client read its create's operation linearizably: it holds it.
    let seen = admin.get_runtime_at(&runtime.id, Consistency::Stale).await?;
    assert_eq!(seen.id, runtime.id);

    phase("events: a page, then the feed followed as it grows");
    let page = admin.events(&EventQuery { runtime_id: Some(runtime.id.clone()), ..EventQuery::default() }).await?;
    assert!(page.items.iter().any(|e| e.event_type == "runtime.created"), "{page:?}");
    let after = admin.events(&EventQuery { limit: Some(1000), ..EventQuery::default() }).await?;
    let last = after.items.last().map(|e| e.id.clone());
    let writer = admin.clone();
    let writes = tokio::spawn(async move {
        for i in 0..3 {
            writer.create_runtime(&json!({"name": format!("sdk-follow-{i}"), "type": "vcluster"})).await?;
        }
        Ok::<_, ClientError>(())
    });
    let mut followed = Vec::new();
    let filter = EventQuery { after: last, event_type: Some("runtime.created".into()), ..EventQuery::default() };
    admin
        .follow_events(&filter, EVENTUALLY, |event| {
            followed.push(event.data["name"].as_str().unwrap_or_default().to_string());
            followed.len() < 3
        })
        .await?;
    writes.await??;
    assert_eq!(followed, ["sdk-follow-0", "sdk-follow-1", "sdk-follow-2"]);

    phase("an agent's request waits for approval; a human lists and approves it");
    let token = key_for(&cluster, 1, "sdk-agent", "agent", &["*"], &["agent"], Some("act")).await?;
    let agent = client(servers, &token)?;
    let start = agent.execute_actions(&runtime.id, &json!({"actions": [{"type": "start"}]})).await?;
    assert_eq!(start.status, "pending_approval", "{start:?}");
    let waiting = admin.unfinished_operations(Some("pending_approval")).await?;
    assert!(waiting.items.iter().any(|op| op.id == start.id), "{waiting:?}");
    let own = agent.decide(&start.id, true, None).await.unwrap_err();
    assert_eq!(own.status(), Some(403), "an agent decides nothing: {own:?}");
    admin.decide(&start.id, true, Some("fine")).await?;
    let started = admin.wait_operation(&start.id, EVENTUALLY, |_| {}).await?;
    assert_eq!((started.status.as_str(), started.approval.is_some()), ("succeeded", true), "{started:?}");

    let nowhere = client(vec!["https://127.0.0.1:1".into()], admin_token())?;
    assert!(matches!(nowhere.whoami().await, Err(ClientError::Unreachable(_))));

    phase("a Python client generated from the served OpenAPI document parses every answer of the tour");
    python_tour(&cluster).await
}

/// Generates a Python client (openapi-python-client) from the document node 1 serves and runs
/// `tests/python_client_tour.py` with it; then one from the user's own draft (the seed) and
/// `tests/seed_client_tour.py`.
async fn python_tour(cluster: &Cluster) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let document = admin_client(cluster)?.request_raw(reqwest::Method::GET, "/v1/openapi.json", None).await?.1;
    let served = dir.path().join("openapi.json");
    std::fs::write(&served, document.to_string())?;
    let said = generated_tour(&served, "runtimeai_py", "python_client_tour.py", &cluster.node(3).url("")).await?;
    assert!(said.contains("tour parsed") && said.lines().count() >= 20, "{said}");

    phase("a Python client generated from the seed's OpenAPI draft parses every answer, the headline intent's too");
    let seed = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../api/seed/openapi-seed.yaml");
    let said = generated_tour(&seed, "seed_py", "seed_client_tour.py", &cluster.node(2).url("/v1")).await?;
    assert!(said.contains("seed tour parsed") && said.contains("get_intent 200 IntentRecord"), "{said}");
    Ok(())
}

/// Generates package `package` from the OpenAPI `document` and runs `tests/<script>` with it
/// against `base_url`; what the script printed.
async fn generated_tour(
    document: &std::path::Path,
    package: &str,
    script: &str,
    base_url: &str,
) -> anyhow::Result<String> {
    let home = std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default());
    let venv = home.join(".cache/runtimeai/venv-generator/bin");
    anyhow::ensure!(venv.join("openapi-python-client").exists(), "run deploy/python-env.sh");
    let dir = tempfile::tempdir()?;
    let generated = std::process::Command::new(venv.join("openapi-python-client"))
        .args(["generate", "--meta", "none", "--path"])
        .arg(document)
        .arg("--output-path")
        .arg(dir.path().join(package))
        .output()?;
    anyhow::ensure!(generated.status.success(), "the generator failed: {generated:?}");
    let ca = harness_ca()?.join("ca.pem");
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let tour = tokio::process::Command::new(venv.join("python"))
        .arg(script)
        .arg(dir.path())
        .args([base_url, admin_token()])
        .arg(ca)
        .output()
        .await?;
    let said = String::from_utf8_lossy(&tour.stdout).into_owned();
    anyhow::ensure!(tour.status.success(), "{said}{}", String::from_utf8_lossy(&tour.stderr));
    Ok(said)
}

fn admin_client(cluster: &Cluster) -> anyhow::Result<Client> {
    client(vec![cluster.node(1).url("")], admin_token())
}
