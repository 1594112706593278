//! `/metrics` as an operator's Prometheus meets it: Debian's Prometheus scrapes every member over
//! TLS with a read-only key, and its query API then holds the write stages of creates made
//! through a follower and each member's memory and store; without a key the endpoint is refused.

use std::time::{Duration, Instant};

use reqwest::Method;
use runtimeai_tests::{free_port, harness_ca, key_for, phase, Cluster, ClusterOptions, EVENTUALLY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_write_stages_of_every_member_with_a_read_only_key() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let leader = cluster.wait_leader(EVENTUALLY).await?;
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");

    phase("without a key, /metrics is refused");
    let refused = cluster.call_as(None, follower, Method::GET, "/metrics", None, &[]).await?;
    assert_eq!(refused.status, 401, "{:?}", refused.body);

    phase("creates through a follower");
    for i in 0..5 {
        cluster.create_runtime_eventually(follower, &format!("metered-{i}"), EVENTUALLY).await?;
    }

    phase("Prometheus scrapes the three members with a reader's key and answers queries of the stages");
    let token = key_for(&cluster, leader, "prometheus", "service", &["*"], &["viewer"], None).await?;
    let promtool = std::process::Command::new("promtool").arg("--version").output();
    anyhow::ensure!(promtool.is_ok_and(|o| o.status.success()), "install Debian's prometheus (deploy/setup-debian.sh)");
    let dir = tempfile::tempdir()?;
    let targets: Vec<String> = (1..=3).map(|n| format!("'{}'", cluster.node(n).http)).collect();
    std::fs::write(dir.path().join("token"), &token)?;
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: runtimeai\n    scheme: https\n    \
         tls_config:\n      ca_file: {ca}\n    authorization:\n      credentials_file: {token}\n    \
         static_configs:\n      - targets: [{targets}]\n",
        ca = harness_ca()?.join("ca.pem").display(),
        token = dir.path().join("token").display(),
        targets = targets.join(", ")
    );
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config)?;
    let checked = std::process::Command::new("promtool").arg("check").arg("config").arg(&config_path).output()?;
    anyhow::ensure!(checked.status.success(), "promtool: {}", String::from_utf8_lossy(&checked.stderr));
    let port = free_port();
    let mut prometheus = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log"))?)
        .spawn()?;
    let answer = query_until(port, "sum(runtimeai_raft_commit_seconds_count)", |v| v >= 1.0).await;
    let up = query_until(port, "sum(up)", |v| v >= 3.0).await;
    let through_follower = format!(
        "sum(runtimeai_http_request_duration_seconds_count{{route=\"/v1/runtimes\",method=\"POST\",status=\"201\",instance=\"{}\"}})",
        cluster.node(follower).http
    );
    let creates = query_until(port, &through_follower, |v| v >= 5.0).await;
    let forwarded = query_until(port, "sum(runtimeai_raft_forward_seconds_count)", |v| v >= 1.0).await;
    // The store's memory by column family, and the process's: the runtimes family holds the five.
    let live = query_until(port, "min(runtimeai_storage_live_data_bytes{family=\"runtimes\"} + runtimeai_storage_memtable_bytes{family=\"runtimes\"})", |v| v > 0.0).await;
    // Memtables readers still hold are memtables too: never fewer bytes than those not flushed.
    let held = "min(runtimeai_storage_memtable_held_bytes{family=\"runtimes\"} - runtimeai_storage_memtable_bytes{family=\"runtimes\"})";
    let held = query_until(port, held, |v| v >= 0.0).await;
    let resident = query_until(port, "min(runtimeai_process_resident_bytes)", |v| v > 10e6).await;
    // Whether compactions lag: level-0 files per family and the write rate RocksDB holds writes to.
    let level0 =
        query_until(port, "count(runtimeai_storage_level0_files{family=\"runtimes\"} >= 0)", |v| v >= 3.0).await;
    let delayed = query_until(port, "count(runtimeai_storage_delayed_write_rate >= 0)", |v| v >= 3.0).await;
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let tail: String = log.lines().rev().take(15).collect::<Vec<_>>().join("\n");
    assert!(up.as_ref().is_ok_and(|v| *v >= 3.0), "every member scraped: {up:?}\n{tail}");
    assert!(answer.as_ref().is_ok_and(|v| *v >= 1.0), "the leader's commits: {answer:?}");
    assert!(creates.as_ref().is_ok_and(|v| *v >= 5.0), "the follower's creates by route: {creates:?}");
    assert!(forwarded.as_ref().is_ok_and(|v| *v >= 1.0), "the follower's forwarding hops: {forwarded:?}");
    assert!(live.as_ref().is_ok_and(|v| *v > 0.0), "the runtimes' bytes on every member: {live:?}");
    assert!(held.as_ref().is_ok_and(|v| *v >= 0.0), "the memtables readers hold, on every member: {held:?}");
    assert!(resident.as_ref().is_ok_and(|v| *v > 10e6), "every member's resident memory: {resident:?}");
    assert!(level0.as_ref().is_ok_and(|v| *v >= 3.0), "every member's level-0 files: {level0:?}");
    assert!(delayed.as_ref().is_ok_and(|v| *v >= 3.0), "every member's delayed write rate: {delayed:?}");
    Ok(())
}

/// Asks Prometheus on `port` for `query` (one scalar-like vector) until `enough` holds or 30 s
/// pass: the last value, or why there was none.
async fn query_until(port: u16, query: &str, enough: impl Fn(f64) -> bool) -> Result<f64, String> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Err("no answer yet".to_string());
    while Instant::now() < deadline {
        let url = format!("http://127.0.0.1:{port}/api/v1/query");
        if let Ok(response) = http.get(&url).query(&[("query", query)]).send().await {
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            last = body["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("{query}: {body}"));
            if last.as_ref().is_ok_and(|v| enough(*v)) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    last
}
