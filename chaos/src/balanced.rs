//! The benchmark the way users send traffic: Debian's haproxy in front of each system's three
//! members (round robin per request, keep-alive on both sides) and wrk, a standard load
//! generator, driving both with the same payload sizes. Each level runs the systems in turn,
//! etcd then ours, `rounds` times (etcd, ours, etcd, ours, ...), so that the machine's drift hits
//! both; a level's figures are each system's median run, and the report names the run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bench::{etcd_cpu, quiesce, runtimeai_cpu, BenchOptions, Level, Systems};
use crate::error::{Error, Result};
use crate::stages::{between, scrape, Stage};

/// The requests wrk sends (see the script for the kinds).
const REQUESTS_LUA: &str = include_str!("wrk/requests.lua");

/// A haproxy in front of one system's members. Dropping it stops it.
pub struct Haproxy {
    child: Child,
    /// `http(s)://127.0.0.1:<port>`: where clients send their requests.
    pub url: String,
}

/// The certificate haproxy presents to clients, and the CA it checks the members' against.
pub struct BalancerTls {
    /// Certificate chain and key in one PEM file, as haproxy reads them.
    pub cert_and_key: PathBuf,
    pub ca: PathBuf,
}

impl Haproxy {
    /// Starts haproxy in `dir` balancing over `members` (`host:port`), with TLS on both sides
    /// when `tls` is given, and waits until it accepts connections.
    pub async fn start(dir: &Path, name: &str, members: &[String], tls: Option<&BalancerTls>) -> Result<Haproxy> {
        let port = crate::cluster::free_port();
        let config = dir.join(format!("haproxy-{name}.cfg"));
        std::fs::write(&config, haproxy_config(port, members, tls))
            .map_err(Error::io(format!("write {}", config.display())))?;
        let log_path = dir.join(format!("haproxy-{name}.log"));
        let log = std::fs::File::create(&log_path).map_err(Error::io("haproxy log"))?;
        let child = Command::new(haproxy_binary())
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::Unsupported {
                fault: "a load balancer".into(),
                reason: format!("cannot run {}: {e} (install Debian's haproxy)", haproxy_binary().display()),
            })?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut haproxy = Haproxy { child, url: format!("{scheme}://127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            let exited = haproxy.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let said = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(Error::Cluster(format!("haproxy did not listen on {port} ({exited:?}): {said}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(haproxy)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn haproxy_binary() -> PathBuf {
    std::env::var_os("HAPROXY_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"))
}

/// One frontend on `port`, one backend of `members`, round robin per request. HTTP mode keeps
/// client connections alive and reuses idle connections to the members (`http-reuse always`),
/// as a production load balancer does; one thread, so that it takes the same share of this
/// machine's cores in front of either system.
fn haproxy_config(port: u16, members: &[String], tls: Option<&BalancerTls>) -> String {
    let bind_tls = tls.map(|t| format!(" ssl crt {}", t.cert_and_key.display())).unwrap_or_default();
    let server_tls = tls.map(|t| format!(" ssl verify required ca-file {}", t.ca.display())).unwrap_or_default();
    let servers: String =
        members.iter().enumerate().map(|(i, member)| format!("    server m{} {member}{server_tls}\n", i + 1)).collect();
    format!(
        "global\n    nbthread 1\n    maxconn 4096\n\n\
         defaults\n    mode http\n    option http-keep-alive\n    http-reuse always\n    \
         timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
         frontend clients\n    bind 127.0.0.1:{port}{bind_tls}\n    default_backend members\n\n\
         backend members\n    balance roundrobin\n{servers}"
    )
}

/// What one wrk run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WrkReport {
    pub requests: u64,
    pub duration_us: u64,
    /// Answers that were not 2xx or 3xx.
    pub status_errors: u64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
}

impl WrkReport {
    pub fn errors(&self) -> u64 {
        self.status_errors + self.connect_errors + self.read_errors + self.write_errors + self.timeouts
    }

    pub fn ok(&self) -> u64 {
        self.requests.saturating_sub(self.status_errors)
    }

    pub fn per_second(&self) -> f64 {
        self.ok() as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }
}

/// A kind of request wrk sends, with its arguments (see `wrk/requests.lua`).
pub enum WrkRequest<'a> {
    Create { token: &'a str, tag: &'a str },
    Get { token: &'a str, id: &'a str },
    Put { value: &'a str, tag: &'a str },
    Range { key: &'a str },
}

impl WrkRequest<'_> {
    fn args(&self) -> Vec<&str> {
        match self {
            WrkRequest::Create { token, tag } => vec!["create", token, tag],
            WrkRequest::Get { token, id } => vec!["get", token, id],
            WrkRequest::Put { value, tag } => vec!["put", value, tag],
            WrkRequest::Range { key } => vec!["range", key],
        }
    }
}

/// Runs wrk against `url` with `clients` connections (each one request at a time) for
/// `duration`, sending `request`s; the script lives in `dir`.
pub async fn wrk(
    dir: &Path,
    url: &str,
    clients: usize,
    duration: Duration,
    request: WrkRequest<'_>,
) -> Result<WrkReport> {
    let script = dir.join("requests.lua");
    if !script.exists() {
        std::fs::write(&script, REQUESTS_LUA).map_err(Error::io(format!("write {}", script.display())))?;
    }
    let threads = clients.min(2).to_string();
    let seconds = format!("{}s", duration.as_secs().max(1));
    let output = tokio::process::Command::new(wrk_binary())
        .args(["-t", &threads, "-c", &clients.to_string(), "-d", &seconds, "--timeout", "10s", "-s"])
        .arg(&script)
        .arg(url)
        .arg("--")
        .args(request.args())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| Error::Unsupported {
            fault: "a load generator".into(),
            reason: format!("cannot run {}: {e} (install Debian's wrk)", wrk_binary().display()),
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let parsed = line.and_then(|l| serde_json::from_str::<WrkReport>(l).ok());
    match parsed {
        Some(report) if output.status.success() => Ok(report),
        _ => Err(Error::Cluster(format!(
            "wrk against {url} failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))),
    }
}

fn wrk_binary() -> PathBuf {
    std::env::var_os("WRK_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/wrk"))
}

/// The run whose throughput is the median of `runs` (the lower one of an even count), and its
/// index.
pub fn median_run<T>(runs: &[T], per_second: impl Fn(&T) -> f64) -> Option<(usize, &T)> {
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|a, b| per_second(&runs[*a]).total_cmp(&per_second(&runs[*b])));
    let index = *order.get(runs.len().saturating_sub(1) / 2)?;
    Some((index, &runs[index]))
}

/// What the levels through the load balancer measured.
#[derive(Default)]
pub(crate) struct Measured {
    /// Each system's median run per workload and level.
    pub levels: Vec<Level>,
    /// Every run, in order.
    pub runs: Vec<Level>,
    /// Where our creates' time went, in each write level's first run.
    pub stages: Vec<Stage>,
}

/// The writes and linearizable reads of every level through a haproxy per system.
pub(crate) async fn levels(systems: &Systems, options: &BenchOptions, progress: &impl Fn(&str)) -> Result<Measured> {
    let dir = tempfile::Builder::new().prefix("runtimeai-bench-lb-").tempdir().map_err(Error::io("temp dir"))?;
    let tls = if options.plaintext { None } else { Some(balancer_tls(dir.path())?) };
    let ours: Vec<String> = (1..=3).map(|n| systems.runtimeai.node(n).http.clone()).collect();
    let theirs: Vec<String> =
        systems.theirs.iter().map(|url| url.split("://").last().unwrap_or(url).to_string()).collect();
    let ours = Haproxy::start(dir.path(), "runtimeai", &ours, tls.as_ref()).await?;
    let theirs = Haproxy::start(dir.path(), "etcd", &theirs, tls.as_ref()).await?;
    let rounds = options.rounds.max(1);
    let token = crate::cluster::admin_token();
    let mut measured = Measured::default();
    for (workload, duration) in [("write", options.duration), ("read-linearizable", options.duration / 2)] {
        for &clients in &options.concurrency {
            progress(&format!("{workload}, {clients} clients, through haproxy with wrk, {rounds} rounds"));
            let (mut mine, mut etcd) = (Vec::new(), Vec::new());
            for round in 1..=rounds {
                let tag = format!("{clients}-{round}");
                let request = match workload {
                    "write" => WrkRequest::Put { value: &systems.value, tag: &tag },
                    _ => WrkRequest::Range { key: &systems.etcd_key },
                };
                let cpu = etcd_cpu(&systems.etcd);
                let report = wrk(dir.path(), &theirs.url, clients, duration, request).await?;
                etcd.push(level_of("etcd", workload, clients, round, &report, etcd_cpu(&systems.etcd) - cpu)?);
                let request = match workload {
                    "write" => WrkRequest::Create { token, tag: &tag },
                    _ => WrkRequest::Get { token, id: &systems.sample_id },
                };
                let traced = workload == "write" && round == 1;
                let before = if traced { scrape(&systems.runtimeai).await } else { Default::default() };
                let cpu = runtimeai_cpu(&systems.runtimeai);
                let report = wrk(dir.path(), &ours.url, clients, duration, request).await?;
                // The operations the creates queued are part of their cost.
                quiesce(&systems.runtimeai, progress).await;
                let cpu = runtimeai_cpu(&systems.runtimeai) - cpu;
                if traced {
                    measured.stages.extend(between(clients, &before, &scrape(&systems.runtimeai).await));
                }
                mine.push(level_of("runtimeai", workload, clients, round, &report, cpu)?);
            }
            for runs in [etcd, mine] {
                measured.levels.extend(median_run(&runs, |l| l.per_second).map(|(_, level)| level.clone()));
                measured.runs.extend(runs);
            }
        }
    }
    Ok(measured)
}

/// A [`Level`] of one wrk run; a run without a single success is an error (the tool broke).
fn level_of(
    system: &'static str,
    workload: &'static str,
    clients: usize,
    round: usize,
    report: &WrkReport,
    cpu_seconds: f64,
) -> Result<Level> {
    if report.ok() == 0 {
        return Err(Error::Cluster(format!("wrk got no successful answer from {system} ({workload}): {report:?}")));
    }
    Ok(Level {
        system,
        workload,
        clients,
        ok: report.ok() as usize,
        errors: report.errors() as usize,
        per_second: report.per_second(),
        p50_ms: report.p50_us as f64 / 1000.0,
        p99_ms: report.p99_us as f64 / 1000.0,
        p999_ms: report.p999_us as f64 / 1000.0,
        run: Some(round),
        cpu_ms_per_op: cpu_seconds * 1000.0 / report.ok() as f64,
    })
}

/// A certificate for haproxy's frontend from the harness's CA, in the one file haproxy reads.
fn balancer_tls(dir: &Path) -> Result<BalancerTls> {
    let ca_dir = crate::cluster::harness_ca()?;
    let (out, ca) = (dir.display().to_string(), ca_dir.display().to_string());
    let args = ["node", "--dir", &ca, "--out", &out, "--id", "99", "--hosts", "127.0.0.1,localhost"];
    crate::cluster::certs(&args).map_err(Error::Cluster)?;
    let read = |name: &str| std::fs::read(dir.join(name)).map_err(Error::io(format!("read {name}")));
    let combined = [read("node-99.pem")?, read("node-99-key.pem")?].concat();
    let cert_and_key = dir.join("balancer.pem");
    std::fs::write(&cert_and_key, combined).map_err(Error::io("write balancer.pem"))?;
    Ok(BalancerTls { cert_and_key, ca: ca_dir.join("ca.pem") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_run_is_named_and_the_lower_of_an_even_count() {
        let runs = [30.0, 10.0, 20.0];
        assert_eq!(median_run(&runs, |r| *r), Some((2, &20.0)));
        assert_eq!(median_run(&[5.0, 9.0], |r| *r), Some((0, &5.0)));
        assert_eq!(median_run(&[] as &[f64], |r| *r), None);
    }

    #[test]
    fn haproxy_balances_every_member_with_tls_on_both_sides_when_asked() {
        let members = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let plain = haproxy_config(9, &members, None);
        assert!(plain.contains("bind 127.0.0.1:9\n") && plain.contains("balance roundrobin"), "{plain}");
        assert!(plain.contains("server m1 127.0.0.1:1\n") && plain.contains("server m2 127.0.0.1:2\n"), "{plain}");
        let tls = BalancerTls { cert_and_key: "/c/lb.pem".into(), ca: "/c/ca.pem".into() };
        let secure = haproxy_config(9, &members, Some(&tls));
        assert!(secure.contains("bind 127.0.0.1:9 ssl crt /c/lb.pem"), "{secure}");
        assert!(secure.contains("server m2 127.0.0.1:2 ssl verify required ca-file /c/ca.pem"), "{secure}");
    }
}
