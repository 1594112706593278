//! Following events: the cluster-wide feed in one order, what a tenant sees of it, and a stream
//! that outlives the node it came through.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use runtimeai_tests::{key_for, phase, Cluster, ClusterOptions, Eventually, EVENTUALLY};

/// The position an event id names, to compare ids by.
fn position(id: &str) -> (u64, u32) {
    let (seq, sub) = id.trim_start_matches("ev_").split_once('_').expect("an event id");
    (u64::from_str_radix(seq, 16).expect("hex"), sub.parse().expect("a number"))
}

/// The server-sent events in `buffer` that are complete (`id` and `data`), taken out of it.
fn take_events(buffer: &mut String) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    while let Some(end) = buffer.find("\n\n") {
        let block: String = buffer.drain(..end + 2).collect();
        let field = |name: &str| block.lines().find_map(|line| line.strip_prefix(name)).map(str::to_string);
        if let (Some(id), Some(data)) = (field("id: "), field("data: ")) {
            events.push((id, serde_json::from_str(&data).expect("an event as JSON")));
        }
    }
    events
}

/// Opens the feed's stream of `runtime.created` events through node `via`, after `last`.
async fn open(cluster: &Cluster, via: u64, last: Option<&str>) -> anyhow::Result<reqwest::Response> {
    let mut request = cluster.client.get(cluster.node(via).url("/v1/events/stream?type=runtime.created"));
    if let Some(last) = last {
        request = request.header("Last-Event-ID", last);
    }
    let response = request.send().await?;
    anyhow::ensure!(response.status() == 200, "stream through node {via}: {}", response.status());
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_is_one_ordered_stream_a_client_follows_across_a_node_kill() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let leader = cluster.wait_leader(EVENTUALLY).await?;
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let (through, writer_node) = (others[0], others[1]);

    phase("every runtime's events and the audit stream's, in one order, a page at a time, filtered");
    let mut created = Vec::new();
    for name in ["feed-a", "feed-b"] {
        let body = json!({"name": name, "type": "vcluster"});
        let answer = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&body), &[]).await?;
        cluster.wait_operation(1, answer.body["active_operation"].as_str().unwrap(), EVENTUALLY).await?;
        created.push(answer.body["id"].as_str().unwrap().to_string());
    }
    let policy =
        json!({"name": "feed-policy", "rules": [{"kind": "deny_action", "selector": {"actions": ["delete"]}}]});
    assert_eq!(cluster.call_eventually(2, Method::POST, "/v1/policies", Some(&policy), &[]).await?.status, 201);
    let tenant = json!({"name": "feed-acme", "type": "vcluster"});
    let acme = cluster.call_eventually(3, Method::POST, "/v1/runtimes", Some(&tenant), &[("tenant_id", "acme")]);
    let acme = acme.await?.body;
    // Its create ends with events of its own: wait for them, so that the feed stands still.
    cluster.wait_operation(3, acme["active_operation"].as_str().unwrap_or_default(), EVENTUALLY).await?;
    let acme = acme["id"].as_str().unwrap().to_string();
    let all = cluster.call_eventually(3, Method::GET, "/v1/events?limit=1000", None, &[]).await?;
    let items = all.body["items"].as_array().unwrap().clone();
    let ids: Vec<(u64, u32)> = items.iter().map(|e| position(e["id"].as_str().unwrap())).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "one order: {ids:?}");
    let of = |id: &str| items.iter().filter(|e| e["runtime_id"] == id).count();
    assert!(created.iter().chain([&acme]).all(|id| of(id) > 0), "every runtime's events: {items:?}");
    assert!(items.iter().any(|e| e["type"] == "policy.created"), "and the audit stream's");
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let page = cluster.call_eventually(2, Method::GET, &format!("/v1/events?limit=3{cursor}"), None, &[]).await?;
        let page_items = page.body["items"].as_array().unwrap().clone();
        paged.extend(page_items.iter().map(|e| e["id"].clone()));
        after = page.body["next_after"].as_str().map(String::from);
        if after.is_none() {
            break;
        }
    }
    assert_eq!(paged, items.iter().map(|e| e["id"].clone()).collect::<Vec<_>>(), "pages add up to the whole");
    let path = format!("/v1/events?type=runtime.created&runtime_id={}", created[0]);
    let one = cluster.call_eventually(1, Method::GET, &path, None, &[]).await?;
    assert_eq!(one.body["items"].as_array().unwrap().len(), 1, "{one:?}");
    let viewer = key_for(&cluster, 1, "feed-viewer", "human", &["acme"], &["viewer"], None).await?;
    let seen = cluster.call_as(Some(&viewer), 2, Method::GET, "/v1/events?limit=1000", None, &[]).await?;
    let seen = seen.body["items"].as_array().unwrap().clone();
    assert!(!seen.is_empty() && seen.iter().all(|e| e["runtime_id"] == acme.as_str()), "a tenant's own: {seen:?}");

    phase("an operation followed as server-sent events until it ends");
    let restart = format!("/v1/runtimes/{}/lifecycle/restart", created[0]);
    let begun = cluster.call_eventually(2, Method::POST, &restart, None, &[]).await?;
    assert_eq!(begun.status, 202, "{begun:?}");
    let url = cluster.node(3).url(&format!("/v1/operations/{}/stream", begun.body["id"].as_str().unwrap()));
    let answer = cluster.client.get(url).send().await?;
    assert_eq!(answer.headers()["content-type"], "text/event-stream");
    let text = tokio::time::timeout(EVENTUALLY, answer.text()).await??;
    let updates = take_events(&mut format!("{text}\n\n"));
    let versions: Vec<u64> = updates.iter().map(|(id, _)| id.parse().unwrap()).collect();
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    assert_eq!(
        updates.last().map(|(_, op)| op["status"].clone()),
        Some(json!("succeeded")),
        "it ends when the operation does: {text}"
    );

    let started = Instant::now();
    let bounded = cluster.client.get(cluster.node(1).url("/v1/events/stream?timeout_seconds=1")).send().await?;
    let text = tokio::time::timeout(EVENTUALLY, bounded.text()).await??;
    assert!(started.elapsed() < Duration::from_secs(30) && text.contains("id: ev_"), "ends when asked to: {text}");
    let refused = cluster.call(1, Method::GET, "/v1/events/stream?timeout_seconds=0", None, &[]).await?;
    assert_eq!(refused.status, 400, "{refused:?}");

    phase("a stream through one node, that node SIGKILLed, resumed through another from Last-Event-ID");
    let (client, url) = (cluster.client.clone(), cluster.node(writer_node).url("/v1/runtimes"));
    let writer = tokio::spawn(async move {
        for i in 0..20 {
            let body = json!({"name": format!("followed-{i:02}"), "type": "vcluster"});
            loop {
                let answer = client.post(&url).json(&body).send().await;
                if answer.is_ok_and(|a| a.status() == 201) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut received: Vec<(String, Value)> = Vec::new();
    let mut buffer = String::new();
    let mut stream = open(&cluster, through, None).await?;
    let deadline = Instant::now() + EVENTUALLY;
    let followed = |events: &[(String, Value)]| {
        events.iter().filter(|(_, e)| e["data"]["name"].as_str().is_some_and(|n| n.starts_with("followed-"))).count()
    };
    while followed(&received) < 8 && Instant::now() < deadline {
        if let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await.ok().transpose()? {
            buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap_or_default()));
            received.extend(take_events(&mut buffer));
        }
    }
    cluster.kill(through);
    let before_kill = followed(&received);
    assert!((8..20).contains(&before_kill), "the node died mid-stream, after {before_kill} of 20");
    let last = received.last().map(|(id, _)| id.clone());
    let mut stream = open(&cluster, leader, last.as_deref()).await?;
    buffer.clear();
    while followed(&received) < 20 && Instant::now() < deadline {
        if let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await.ok().transpose()? {
            buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap_or_default()));
            received.extend(take_events(&mut buffer));
        }
    }
    writer.await?;
    let names: Vec<&str> = received.iter().filter_map(|(_, e)| e["data"]["name"].as_str()).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("followed-{i:02}")).collect();
    let followed_names: Vec<&str> = names.into_iter().filter(|n| n.starts_with("followed-")).collect();
    assert_eq!(followed_names, expected, "each once, in order");
    let ids: Vec<(u64, u32)> = received.iter().map(|(id, _)| position(id)).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    Ok(())
}
