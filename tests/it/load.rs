//! Hostile load: large writes from many clients at once, and commands too large to ever fit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use runtimeai_tests::{phase, Cluster, ClusterOptions, Eventually, EVENTUALLY};

/// A cluster that takes bodies of up to 4 MiB, so that a legal body can make a command over the
/// largest one a log entry holds.
async fn cluster() -> anyhow::Result<Cluster> {
    let options =
        ClusterOptions { extra_args: vec!["--max-body-bytes".into(), (4 << 20).to_string()], ..Default::default() };
    Ok(Cluster::start(3, options).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_from_many_clients_succeed_or_are_shed_and_never_wedge_replication() -> anyhow::Result<()> {
    let cluster = Arc::new(cluster().await?);

    phase("a command larger than any log entry holds is 413, before it is proposed");
    let huge = json!({"name": "huge", "type": "vm", "spec": {"env": {"BLOB": "x".repeat(3 << 20)}}});
    let refused = cluster.call(2, Method::POST, "/v1/runtimes", Some(&huge), &[]).await?;
    assert_eq!(
        (refused.status, refused.body["type"].as_str()),
        (413, Some("https://runtimeai.dev/problems/command-too-large")),
        "{:?}",
        refused.body
    );
    assert!(
        refused.body["detail"].as_str().unwrap_or_default().contains("at most"),
        "names the limit: {:?}",
        refused.body
    );

    phase("60 creates of ~900 kB each, at once, through all three nodes");
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..60u64 {
        let cluster = cluster.clone();
        writers.spawn(async move {
            let body =
                json!({"name": format!("big-{i}"), "type": "vm", "spec": {"env": {"BLOB": "y".repeat(900_000)}}});
            let answer = cluster
                .call_within(1 + i % 3, Method::POST, "/v1/runtimes", Some(&body), &[], Some(Duration::from_secs(60)))
                .await;
            (i, answer)
        });
    }
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut created = Vec::new();
    while let Some(joined) = writers.join_next().await {
        let (i, answer) = joined?;
        let answer = answer.map_err(|e| anyhow::anyhow!("create {i}: {e}"))?;
        *statuses.entry(answer.status).or_default() += 1;
        match answer.status {
            201 => created.push(answer.body["id"].as_str().unwrap().to_string()),
            503 | 429 => assert!(answer.header("retry-after").is_some(), "shed with Retry-After: {:?}", answer.body),
            _ => panic!("create {i}: a legal create is created or shed, never {}: {:?}", answer.status, answer.body),
        }
    }
    eprintln!("statuses: {statuses:?}");
    assert!(created.len() >= 20, "most are taken: {statuses:?}");

    phase("afterwards small writes succeed through every node, and every acknowledged create is on every node");
    for via in 1..=3 {
        cluster.create_runtime_eventually(via, &format!("small-{via}"), EVENTUALLY).await?;
    }
    for via in 1..=3 {
        cluster.wait_replicated(via, &created, EVENTUALLY).await?;
    }
    let one = cluster.call_eventually(3, Method::GET, &format!("/v1/runtimes/{}", created[0]), None, &[]).await?;
    assert_eq!(one.body["spec"]["env"]["BLOB"].as_str().map(str::len), Some(900_000), "whole");
    Ok(())
}
