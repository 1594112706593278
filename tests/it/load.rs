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
    // The largest env, command and labels the limits allow make a create over the largest
    // command a log entry holds.
    let mut settings = cluster.call_eventually(1, Method::GET, "/v1/cluster/settings", None, &[]).await?.body;
    let most = json!({"env_bytes": 1 << 20, "command_bytes": 1 << 20, "labels_per_runtime": 1024,
        "label_key_bytes": 253, "label_value_bytes": 253});
    settings["limits"] = most;
    let put = cluster.call_eventually(1, Method::PUT, "/v1/cluster/settings", Some(&settings), &[]).await?;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let labels: serde_json::Map<String, serde_json::Value> =
        (0..400).map(|i| (format!("{i:0>250}"), json!("v".repeat(250)))).collect();
    let spec = json!({"env": {"BLOB": "x".repeat(1_040_000)}, "command": ["sh", "x".repeat(1_040_000)]});
    let huge = json!({"name": "huge", "type": "vm", "spec": spec, "labels": labels});
    let refused = cluster.call(2, Method::POST, "/v1/runtimes", Some(&huge), &[]).await?;
    assert_eq!(
        (refused.status, refused.body["type"].as_str()),
        (413, Some("https://runtimeai.dev/problems/command-too-large")),
        "{:?}",
        refused.body["detail"]
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

/// Opens a connection to `addr` that sends a request's headers, promising a body of 1000 bytes,
/// and then the body's first byte only.
async fn slow_body(addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let headers = format!(
        "POST /v1/runtimes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{",
        runtimeai_tests::admin_token()
    );
    tcp.write_all(headers.as_bytes()).await?;
    Ok(tcp)
}

/// Everything `tcp` receives until the server closes it, or `within` passes.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream, within: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let _ = tokio::time::timeout(within, tcp.read_to_end(&mut received)).await;
    String::from_utf8_lossy(&received).into_owned()
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
    let args = ["--header-read-timeout-ms", "1000", "--max-connections", "64", "--request-timeout-ms", "2000"]
        .map(String::from)
        .to_vec();
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

    phase("plain text too: a client that sends a whole 8 MiB body before it reads gets the 413, not a reset");
    let mut eager = tokio::net::TcpStream::connect(&addr).await?;
    let body_len = 8 << 20;
    let request = format!(
        "POST /v1/runtimes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {body_len}\r\n\r\n",
        runtimeai_tests::admin_token()
    );
    {
        use tokio::io::AsyncWriteExt;
        eager.write_all(request.as_bytes()).await?;
        eager.write_all(&vec![b' '; body_len]).await?;
    }
    let answer = read_until_closed(&mut eager, Duration::from_secs(20)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{}", answer.lines().next().unwrap_or("(nothing)"));

    phase("a request whose body never finishes arriving is answered 504 once the request timeout passes");
    let started = std::time::Instant::now();
    let mut stalled = slow_body(&addr).await?;
    let answer = read_until_closed(&mut stalled, Duration::from_secs(20)).await;
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("problems/request-timeout") && answer.contains("Idempotency-Key"), "{answer}");
    assert!(waited >= Duration::from_millis(1900), "not before the 2 s timeout: {waited:?}");
    eprintln!("a stalled upload was answered after {waited:?}");
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

/// The problem's `limit.setting`, after checking it is a 422 `limit-exceeded`.
fn limit_setting(answer: &runtimeai_tests::Response) -> String {
    assert_eq!(
        (answer.status, answer.body["type"].as_str()),
        (422, Some("https://runtimeai.dev/problems/limit-exceeded")),
        "{:?}",
        answer.body
    );
    answer.body["limit"]["setting"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_replicated_settings_and_one_tenant_cannot_spend_anothers_quota() -> anyhow::Result<()> {
    let cluster = &Cluster::start(3, ClusterOptions::default()).await?;
    let acme = runtimeai_tests::key_for(cluster, 1, "acme-ops", "human", &["acme"], &["operator"], None).await?;
    let globex = runtimeai_tests::key_for(cluster, 1, "globex-ops", "human", &["globex"], &["operator"], None).await?;
    let create = |token: &str, name: &str, spec: serde_json::Value| {
        let body = json!({"name": name, "type": "sandbox", "spec": spec});
        let token = token.to_string();
        async move { cluster.call_eventually_as(&token, 2, Method::POST, "/v1/runtimes", Some(&body), &[]).await }
    };

    phase("the settings read back as they are written, usage included; a limit out of its range is 422");
    let mut settings = cluster.call_eventually(1, Method::GET, "/v1/cluster/settings", None, &[]).await?.body;
    assert_eq!(settings["limits"]["runtimes_per_tenant"], 10_000, "{settings}");
    assert_eq!(settings["usage"]["runtimes"], 0, "{settings}");
    settings["limits"]["runtimes_per_tenant"] = json!(2);
    settings["limits"]["env_bytes"] = json!(1000);
    let put = cluster.call_eventually(1, Method::PUT, "/v1/cluster/settings", Some(&settings), &[]).await?;
    assert_eq!(put.status, 200, "a GET's answer, usage and all, is a valid PUT: {:?}", put.body);
    let mut bad = settings.clone();
    bad["limits"]["labels_per_runtime"] = json!(0);
    let refused = cluster.call_eventually(1, Method::PUT, "/v1/cluster/settings", Some(&bad), &[]).await?;
    assert_eq!(refused.status, 422, "{:?}", refused.body);
    assert_eq!(refused.body["errors"][0]["path"], "$.limits.labels_per_runtime", "{:?}", refused.body);

    phase("acme fills its quota through node 2 (the settings were written through node 1)");
    for name in ["a1", "a2"] {
        let made = create(&acme, name, json!({})).await?;
        assert_eq!(made.status, 201, "{:?}", made.body);
    }
    assert_eq!(limit_setting(&create(&acme, "a3", json!({})).await?), "runtimes_per_tenant");

    phase("globex's quota is its own");
    let made = create(&globex, "g1", json!({})).await?;
    assert_eq!(made.status, 201, "{:?}", made.body);

    phase("an env over limits.env_bytes is refused and names the setting");
    let big = json!({"env": {"BLOB": "x".repeat(2000)}});
    assert_eq!(limit_setting(&create(&globex, "g2", big).await?), "env_bytes");

    phase("usage counts each tenant's runtimes, on every node");
    for via in 1..=3 {
        let now = cluster.call_eventually(via, Method::GET, "/v1/cluster/settings", None, &[]).await?.body;
        assert_eq!(now["usage"]["runtimes_per_tenant"], json!({"acme": 2, "globex": 1}), "node {via}: {now}");
        assert_eq!(now["usage"]["runtimes"], 3, "node {via}");
    }

    phase("a tenant's list, read through its index, pages and shows only its own");
    let page = |token: &str, query: &str| {
        let (token, path) = (token.to_string(), format!("/v1/runtimes?{query}"));
        async move { cluster.call_eventually_as(&token, 3, Method::GET, &path, None, &[]).await }
    };
    let first = page(&acme, "page_size=1").await?.body;
    let names = |list: &serde_json::Value| -> Vec<String> {
        list["items"].as_array().into_iter().flatten().map(|r| r["name"].as_str().unwrap_or("").to_string()).collect()
    };
    assert_eq!(names(&first), ["a1"], "{first}");
    let token = first["next_page_token"].as_str().unwrap_or_default().to_string();
    let second = page(&acme, &format!("page_size=1&page_token={token}")).await?.body;
    assert_eq!(names(&second), ["a2"], "{second}");
    assert!(second["next_page_token"].is_null(), "{second}");
    assert_eq!(names(&page(&globex, "type=sandbox").await?.body), ["g1"]);
    assert!(names(&page(&globex, "type=vm").await?.body).is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_read_a_page_at_a_time_after_a_cursor() -> anyhow::Result<()> {
    let cluster = &Cluster::start(1, ClusterOptions::default()).await?;
    let id = cluster.create_runtime_eventually(1, "paged", EVENTUALLY).await?;
    for _ in 0..3 {
        let patch = json!({"labels": {"round": null}});
        cluster.call_eventually(1, Method::PATCH, &format!("/v1/runtimes/{id}"), Some(&patch), &[]).await?;
    }
    let id = &id;
    let events = |query: String| {
        let path = format!("/v1/runtimes/{id}/events?{query}");
        async move { cluster.call_eventually(1, Method::GET, &path, None, &[]).await }
    };
    let all = events("limit=1000".into()).await?.body;
    let ids: Vec<String> =
        all["items"].as_array().into_iter().flatten().map(|e| e["id"].as_str().unwrap_or("").into()).collect();
    assert!(ids.len() >= 4, "created and three relabels: {all}");

    phase("page by page with `after`, every event once, in order");
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let query = if after.is_empty() { "limit=2".to_string() } else { format!("limit=2&after={after}") };
        let page = events(query).await?;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let items = page.body["items"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            break;
        }
        assert!(items.len() <= 2);
        paged.extend(items.iter().map(|e| e["id"].as_str().unwrap_or("").to_string()));
        after = paged.last().cloned().unwrap_or_default();
    }
    assert_eq!(paged, ids);

    phase("an `after` that is no event id is 400");
    let bad = events("after=yesterday".into()).await?;
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    Ok(())
}
