//! A real etcd cluster on loopback, the yardstick of the benchmarks: Debian's `etcd` (package
//! etcd-server), one process per member with its default durability (fsync on every commit),
//! talked to through its v3 JSON gateway. Like RuntimeAI's clusters it runs TLS on both sides:
//! HTTPS for clients, mutual TLS between members, with certificates of the harness's CA.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::free_port;
use crate::error::{Error, Result};

pub struct EtcdMember {
    pub name: String,
    /// `https://127.0.0.1:<port>`: the client URL (JSON gateway at `/v3/...`).
    pub client_url: String,
    child: Option<Child>,
    /// How to start it again (after the first start: joining the existing cluster).
    command: Vec<String>,
    log: PathBuf,
}

pub struct EtcdCluster {
    _dir: tempfile::TempDir,
    pub members: Vec<EtcdMember>,
    client: reqwest::Client,
}

/// The `etcd` binary: `ETCD_BIN`, else `etcd` on the PATH.
fn etcd_binary() -> PathBuf {
    std::env::var_os("ETCD_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("etcd"))
}

/// Standard base64 with padding, as etcd's JSON gateway wants keys and values.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl EtcdMember {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(Error::io(format!("open {}", self.log.display())))?;
        let child = Command::new(etcd_binary())
            .args(&self.command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::Unsupported {
                fault: "an etcd cluster".into(),
                reason: format!("cannot run {}: {e} (install Debian's etcd-server)", etcd_binary().display()),
            })?;
        self.child = Some(child);
        Ok(())
    }
}

/// Member `id`'s TLS flags: HTTPS for clients (not asked for a certificate: with
/// `--trusted-ca-file`, etcd 3.4's JSON gateway refuses clients without one, and RuntimeAI's REST
/// port does not require one either), mutual TLS between members, certificates of the harness's
/// CA written to `certs`.
fn tls_flags(certs: &std::path::Path, id: usize) -> Result<Vec<String>> {
    let ca_dir = crate::cluster::harness_ca()?;
    let (out, ca_path, id) = (certs.display().to_string(), ca_dir.display().to_string(), id.to_string());
    let args = ["node", "--dir", &ca_path, "--out", &out, "--id", &id, "--hosts", "127.0.0.1,localhost"];
    crate::cluster::certs(&args).map_err(Error::Cluster)?;
    let cert = certs.join(format!("node-{id}.pem")).display().to_string();
    let key = certs.join(format!("node-{id}-key.pem")).display().to_string();
    let ca = ca_dir.join("ca.pem").display().to_string();
    let flags = ["--cert-file", &cert, "--key-file", &key, "--peer-cert-file", &cert, "--peer-key-file", &key];
    Ok(flags
        .into_iter()
        .chain(["--peer-trusted-ca-file", &ca, "--peer-client-cert-auth"])
        .map(str::to_string)
        .collect())
}

impl EtcdCluster {
    /// Starts `size` members (with TLS, or on plain http) and waits until the cluster has a
    /// leader.
    pub async fn start(size: usize, tls: bool) -> Result<EtcdCluster> {
        let dir = tempfile::Builder::new().prefix("runtimeai-bench-etcd-").tempdir().map_err(Error::io("temp dir"))?;
        let scheme = if tls { "https" } else { "http" };
        let peers: Vec<(String, String, String)> = (1..=size)
            .map(|i| {
                (
                    format!("e{i}"),
                    format!("{scheme}://127.0.0.1:{}", free_port()),
                    format!("{scheme}://127.0.0.1:{}", free_port()),
                )
            })
            .collect();
        let certs = dir.path().join("certs");
        let initial: Vec<String> = peers.iter().map(|(name, peer, _)| format!("{name}={peer}")).collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for (i, (name, peer, client_url)) in peers.iter().enumerate() {
            let data_dir = dir.path().join(name).display().to_string();
            let mut command = if tls { tls_flags(&certs, i + 1)? } else { Vec::new() };
            command.extend(
                [
                    "--name",
                    name,
                    "--data-dir",
                    &data_dir,
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                    "--listen-client-urls",
                    client_url,
                    "--advertise-client-urls",
                    client_url,
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "runtimeai-bench",
                    "--log-level",
                    "warn",
                ]
                .iter()
                .map(|a| a.to_string()),
            );
            let mut member = EtcdMember {
                name: name.clone(),
                client_url: client_url.clone(),
                child: None,
                command,
                log: dir.path().join(format!("{name}.log")),
            };
            member.spawn()?;
            members.push(member);
        }
        let client = crate::cluster::client_builder()?.timeout(Duration::from_secs(5)).build()?;
        let cluster = EtcdCluster { _dir: dir, members, client };
        cluster.wait_leader(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// `POST /v3/maintenance/status` of member `index`: its id and the leader's.
    async fn status(&self, index: usize) -> Option<(u64, u64)> {
        let url = format!("{}/v3/maintenance/status", self.members[index].client_url);
        let body: Value = self.client.post(url).json(&json!({})).send().await.ok()?.json().await.ok()?;
        let id = body["header"]["member_id"].as_str()?.parse().ok()?;
        let leader = body["leader"].as_str()?.parse().ok()?;
        Some((id, leader))
    }

    /// Waits until a running member names a leader that is running, and returns its index.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut ids = Vec::new();
            for index in 0..self.members.len() {
                if self.members[index].child.is_some() {
                    ids.push((index, self.status(index).await));
                }
            }
            let leader = ids.iter().find_map(|(_, s)| s.map(|(_, leader)| leader));
            if let Some(leader) = leader {
                if let Some((index, _)) = ids.iter().find(|(_, s)| s.is_some_and(|(id, _)| id == leader)) {
                    return Ok(*index);
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Cluster(format!("etcd has no leader after {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs member `index`.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `index` again on its data (it rejoins the cluster it was in).
    pub fn restart(&mut self, index: usize) -> Result<()> {
        let member = &mut self.members[index];
        if member.child.is_none() {
            member.spawn()?;
        }
        Ok(())
    }

    /// The process id of member `index` while it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.members[index].child.as_ref().map(Child::id)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}
