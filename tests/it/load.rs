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

/// `count` creates named `<name>-<i>` with a `spec.env` of `bytes` bytes, sent at once through
/// nodes 1 to `nodes` in turn: each one's answer, in the order sent.
async fn large_creates_at_once(
    cluster: &Arc<Cluster>,
    name: &str,
    count: u64,
    bytes: usize,
    nodes: u64,
) -> anyhow::Result<Vec<runtimeai_tests::Response>> {
    let calls = (0..count).map(|i| {
        let cluster = cluster.clone();
        let body = json!({"name": format!("{name}-{i}"), "type": "vm", "spec": {"env": {"BLOB": "y".repeat(bytes)}}});
        tokio::spawn(async move {
            let timeout = Some(Duration::from_secs(60));
            let answer = cluster.call_within(1 + i % nodes, Method::POST, "/v1/runtimes", Some(&body), &[], timeout);
            answer.await.map_err(|e| anyhow::anyhow!("create {i}: {e}"))
        })
    });
    futures::future::try_join_all(calls).await?.into_iter().collect()
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
    let answers = large_creates_at_once(&cluster, "big", 60, 900_000, 3).await?;
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut created = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
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

/// Opens a connection to `addr` that sends the start of a request's headers and then nothing.
async fn slow_client(addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await?;
    Ok(tcp)
}

/// Whether the server closed `tcp` within `within` (EOF or reset).
async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_are_closed_and_past_the_cap_refused_while_others_are_served() -> anyhow::Result<()> {
    let args = ["--header-read-timeout-ms", "1000", "--max-connections", "64"].map(String::from).to_vec();
    let cluster = Cluster::start(1, ClusterOptions { extra_args: args, plaintext: true, ..Default::default() }).await?;
    let addr = cluster.node(1).http.clone();

    phase("48 connections send half their headers and stop; another client is served meanwhile");
    let mut slow = Vec::new();
    for _ in 0..48 {
        slow.push(slow_client(&addr).await?);
    }
    let started = std::time::Instant::now();
    let served = cluster.call(1, Method::GET, "/v1/cluster", None, &[]).await?;
    assert_eq!(served.status, 200, "{:?}", served.body);
    eprintln!("served in {:?} beside 48 slow connections", started.elapsed());

    phase("past the cap of 64 connections, a new one is closed at once");
    for _ in 0..16 {
        slow.push(slow_client(&addr).await?);
    }
    let mut over = slow_client(&addr).await?;
    let closed = closed_within(&mut over, Duration::from_millis(300)).await;
    assert!(closed, "a connection past the cap is closed at once, not when its headers time out (1 s)");

    phase("the slow ones are closed once the header-read timeout passes, and the node serves again");
    for (i, tcp) in slow.iter_mut().enumerate() {
        assert!(closed_within(tcp, Duration::from_secs(10)).await, "slow connection {i} still open");
    }
    let again = cluster.call_eventually(1, Method::GET, "/v1/cluster", None, &[]).await?;
    assert_eq!(again.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_rate_gets_429_with_retry_after_and_others_are_still_served() -> anyhow::Result<()> {
    let args = ["--rate-limit-principal", "20", "--rate-limit-address", "10"].map(String::from).to_vec();
    let cluster = Cluster::start(1, ClusterOptions { extra_args: args, ..Default::default() }).await?;
    let viewer = runtimeai_tests::key_for(&cluster, 1, "quiet", "human", &["*"], &["viewer"], None).await?;
    let statuses = |answers: &[runtimeai_tests::Response]| {
        let mut counts = BTreeMap::<u16, usize>::new();
        answers.iter().for_each(|a| *counts.entry(a.status).or_default() += 1);
        counts
    };

    phase("the admin sends 60 requests at once: past a second's worth, 429 with Retry-After");
    let greedy =
        futures::future::join_all((0..60).map(|_| cluster.call(1, Method::GET, "/v1/runtimes", None, &[]))).await;
    let greedy: Vec<_> = greedy.into_iter().collect::<Result<_, _>>()?;
    let limited: Vec<_> = greedy.iter().filter(|a| a.status == 429).collect();
    assert!(!limited.is_empty() && limited.len() < 60, "{:?}", statuses(&greedy));
    assert!(limited.iter().all(|a| a.header("retry-after").is_some()), "Retry-After on every 429");
    assert_eq!(limited[0].body["type"], "https://runtimeai.dev/problems/rate-limited", "{:?}", limited[0].body);

    phase("meanwhile another principal is served");
    let quiet = cluster.call_as(Some(&viewer), 1, Method::GET, "/v1/runtimes", None, &[]).await?;
    assert_eq!(quiet.status, 200, "{:?}", quiet.body);

    phase("guessing keys from one address: past its rate, 429 before any key is looked up");
    let forged = "rai_k0000000000000000000000000_0000000000000000000000000000000000000000000";
    let guesses = futures::future::join_all(
        (0..30).map(|_| cluster.call_as(Some(forged), 1, Method::GET, "/v1/runtimes", None, &[])),
    )
    .await;
    let guesses: Vec<_> = guesses.into_iter().collect::<Result<_, _>>()?;
    let counts = statuses(&guesses);
    assert!(counts.get(&429).is_some_and(|n| *n > 0) && counts.get(&401).is_some_and(|n| *n > 0), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), counts[&401] + counts[&429], "only 401 and 429: {counts:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_requests_in_flight_a_node_sheds_with_503_and_serves_again() -> anyhow::Result<()> {
    let args = ["--max-inflight", "4"].map(String::from).to_vec();
    let cluster = Arc::new(Cluster::start(1, ClusterOptions { extra_args: args, ..Default::default() }).await?);

    phase("40 creates of ~200 kB at once against a node that works on 4 requests at a time");
    let answers = large_creates_at_once(&cluster, "heavy", 40, 200_000, 1).await?;
    let mut statuses = BTreeMap::<u16, usize>::new();
    for answer in answers {
        *statuses.entry(answer.status).or_default() += 1;
        if answer.status == 503 {
            assert!(answer.header("retry-after").is_some(), "{:?}", answer.body);
            let detail = answer.body["detail"].as_str().unwrap_or_default();
            assert!(detail.contains("max-inflight") || detail.contains("in flight"), "{detail}");
        } else {
            assert_eq!(answer.status, 201, "{:?}", answer.body);
        }
    }
    eprintln!("statuses: {statuses:?}");
    assert!(statuses.get(&503).is_some_and(|n| *n > 0), "some shed: {statuses:?}");
    assert!(statuses.get(&201).is_some_and(|n| *n > 0), "some served: {statuses:?}");

    phase("once they are answered, the node serves again");
    cluster.create_runtime_eventually(1, "light", EVENTUALLY).await?;
    Ok(())
}
