//! `runtimeai dev`: a local cluster on loopback for trying RuntimeAI at once. Each member is a
//! real `runtimeai node` child process with its own data directory and log file.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What `runtimeai dev` nodes drive.
pub const DEV_BACKENDS: &str = "vm=libvirt:test:///default,sandbox=process,agent_runtime=process,vcluster=simulated";
/// [`DEV_BACKENDS`] on a machine that cannot run sandboxes (not root, or no crun): simulated.
const DEV_BACKENDS_WITHOUT_SANDBOXES: &str =
    "vm=libvirt:test:///default,sandbox=simulated,agent_runtime=simulated,vcluster=simulated";

/// The backends dev's nodes use here, their data (and sandboxes) in `data_dir`, saying why
/// sandboxes are simulated if they are.
fn dev_backends(data_dir: &std::path::Path) -> &'static str {
    use crate::backend::sandbox::{unavailable, unreachable, IdRange};
    match unavailable().or_else(|| unreachable(data_dir, IdRange::default())) {
        None => DEV_BACKENDS,
        Some(why) => {
            eprintln!("note: sandboxes are simulated in this dev cluster: {why}");
            DEV_BACKENDS_WITHOUT_SANDBOXES
        }
    }
}

/// How long dev waits for its cluster before giving up: generous, since a loaded machine can
/// take long to start three nodes, and dev goes on as soon as the cluster is ready.
const READY_WITHIN: Duration = Duration::from_secs(180);

/// Prints a line to stdout, ignoring a closed pipe (`runtimeai dev | head` must not panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// How many members to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    pub nodes: u64,
    /// Directory for the members' data and logs (kept between runs).
    #[arg(long, default_value = "runtimeai-dev")]
    pub data_dir: PathBuf,
    /// REST port of node 1; node i listens on this + i - 1.
    #[arg(long, default_value_t = 8081)]
    pub http_port: u16,
    /// gRPC port of node 1; node i listens on this + i - 1.
    #[arg(long, default_value_t = 7101)]
    pub grpc_port: u16,
    /// Start from empty data directories (removes the previous run's data).
    #[arg(long)]
    pub fresh: bool,
}

struct Member {
    id: u64,
    http: String,
    /// The command line that started it, to restart it by hand after it stops.
    command_line: String,
    child: Child,
    exited: bool,
}

pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the runtimeai executable")?;
    if args.fresh && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("cannot remove {}", args.data_dir.display()))?;
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let port =
        |base: u16, id: u64| -> anyhow::Result<u16> { base.checked_add(id as u16 - 1).context("port out of range") };
    let mut initial = Vec::new();
    for id in 1..=args.nodes {
        initial.push(format!("{id}=127.0.0.1:{}", port(args.grpc_port, id)?));
    }
    let initial = initial.join(",");
    // Authentication is on, as in production: the first admin's key is made once and kept
    // with the data.
    let admin_key = args.data_dir.join(crate::admin_key::GENERATED_FILE);
    if !admin_key.exists() {
        crate::admin_key::generate_file(&admin_key)?;
    }
    // TLS too: a CA of its own, and a certificate per member for both its ports.
    let certs = args.data_dir.join("certs");
    if !certs.join("ca.pem").exists() {
        crate::certs::make_ca(&certs, 3650)?;
    }

    let backends = dev_backends(&args.data_dir);
    let mut members: Vec<Member> = Vec::new();
    for id in 1..=args.nodes {
        let http = format!("127.0.0.1:{}", port(args.http_port, id)?);
        let grpc = format!("127.0.0.1:{}", port(args.grpc_port, id)?);
        let log_path = args.data_dir.join(format!("node-{id}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let data_dir = args.data_dir.join(format!("node-{id}"));
        let (cert, key) = (certs.join(format!("node-{id}.pem")), certs.join(format!("node-{id}-key.pem")));
        if !cert.exists() {
            crate::certs::make_node(&certs, None, id, &["localhost".into(), "127.0.0.1".into()], 365)?;
        }
        let tls = [("--tls-cert", &cert), ("--tls-key", &key), ("--peer-cert", &cert), ("--peer-key", &key)];
        let mut node_args: Vec<String> = vec![
            "node".into(),
            "--id".into(),
            id.to_string(),
            "--http".into(),
            http.clone(),
            "--grpc".into(),
            grpc.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--initial-cluster".into(),
            initial.clone(),
            "--cluster-name".into(),
            "runtimeai-dev".into(),
            // One pretend infrastructure for all members, as real nodes share a hypervisor or
            // an API server: a step retried on another node after a failover converges.
            "--simulated-infra-dir".into(),
            args.data_dir.join("simulated-infra").display().to_string(),
            // Real drivers that need nothing installed: libvirt's built-in test hypervisor
            // for VMs, isolated processes for sandboxes; vClusters are simulated (no
            // Kubernetes API server here).
            "--backends".into(),
            backends.into(),
            "--bootstrap-admin-key-file".into(),
            admin_key.display().to_string(),
            "--peer-ca".into(),
            ca_of(&args.data_dir).display().to_string(),
        ];
        for (flag, path) in tls {
            node_args.extend([flag.to_string(), path.display().to_string()]);
        }
        let command_line = format!("{} {} 2>>{}", exe.display(), node_args.join(" "), log_path.display());
        let child = Command::new(&exe)
            .args(&node_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        say!("node {id}: https://{http}  (grpc {grpc}, log {})", log_path.display());
        members.push(Member { id, http, command_line, child, exited: false });
    }

    write_context(&args.data_dir, &members)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let outcome = runtime.block_on(supervise(&mut members, &admin_key, &ca_of(&args.data_dir)));
    stop_all(&mut members);
    outcome
}

/// A CLI config with one context, `dev`, for this cluster (`<data dir>/config.toml`; its
/// paths are relative to it): `RUNTIMEAI_CONFIG=<data dir>/config.toml runtimeai runtimes list`.
fn write_context(data_dir: &std::path::Path, members: &[Member]) -> anyhow::Result<()> {
    use crate::ctl::config::{ConfigFile, ContextConfig};
    let context = ContextConfig {
        servers: members.iter().map(|m| format!("https://{}", m.http)).collect(),
        ca: Some(PathBuf::from("certs/ca.pem")),
        token_file: Some(PathBuf::from(crate::admin_key::GENERATED_FILE)),
        ..ContextConfig::default()
    };
    let file = ConfigFile { current_context: Some("dev".into()), contexts: [("dev".to_string(), context)].into() };
    file.save(&data_dir.join("config.toml"))
}

/// The data directory the admin key file is in.
fn data_dir_of(admin_key: &std::path::Path) -> PathBuf {
    admin_key.parent().map(PathBuf::from).unwrap_or_default()
}

/// The CA dev's members have their certificates from.
fn ca_of(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("certs").join("ca.pem")
}

async fn supervise(members: &mut [Member], admin_key: &std::path::Path, ca: &std::path::Path) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(admin_key).context("cannot read the admin key")?;
    let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .timeout(Duration::from_secs(3))
        .build()?;
    // Ready once the first node is ready and takes the admin's key (stored once a leader is
    // elected, possibly just after readiness).
    let started = Instant::now();
    let first = members[0].http.clone();
    let ready = |path: &'static str| {
        let request = client.get(format!("https://{first}{path}")).bearer_auth(token.trim());
        async move { request.send().await.is_ok_and(|r| r.status().is_success()) }
    };
    let mut announced = false;
    let shutdown = crate::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        for member in members.iter_mut().filter(|m| !m.exited) {
            if let Some(status) = member.child.try_wait()? {
                member.exited = true;
                say!("node {} exited ({status}); the others keep running. To restart it:", member.id);
                say!("  {}", member.command_line);
            }
        }
        if members.iter().all(|m| m.exited) {
            anyhow::bail!("every node has exited; see the node logs in the data directory");
        }
        if !announced {
            if ready("/readyz").await && ready("/v1/auth/whoami").await {
                announced = true;
                say!(
                    "\ncluster ready in {:.1}s. Every request needs the admin's API key. Try:",
                    started.elapsed().as_secs_f64()
                );
                say!("  export RUNTIMEAI_TOKEN=$(cat {}) CURL_CA_BUNDLE={}", admin_key.display(), ca.display());
                say!("  curl -s https://{first}/v1/cluster -H \"Authorization: Bearer $RUNTIMEAI_TOKEN\"");
                say!(
                    "  curl -s -XPOST https://{first}/v1/runtimes -H \"Authorization: Bearer $RUNTIMEAI_TOKEN\" \
                     -H 'content-type: application/json' -d '{{\"name\":\"demo\",\"type\":\"vm\"}}'"
                );
                say!("Or with the CLI (a context `dev` for this cluster is in the data directory):");
                say!("  export RUNTIMEAI_CONFIG={}", data_dir_of(admin_key).join("config.toml").display());
                say!("  runtimeai cluster members; runtimeai runtimes create demo --type vm --wait");
                say!("Ctrl-C stops the cluster (data stays in the data directory).");
            } else if started.elapsed() > READY_WITHIN {
                anyhow::bail!("the cluster did not become ready within {READY_WITHIN:?}; see the node logs");
            }
        }
        tokio::select! {
            _ = &mut shutdown => {
                say!("\nstopping the cluster...");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// SIGTERM every member, give them ten seconds to stop cleanly, then SIGKILL what is left.
fn stop_all(members: &mut [Member]) {
    for member in members.iter() {
        let _ = kill(Pid::from_raw(member.child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for member in members.iter_mut() {
        loop {
            match member.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = member.child.kill();
                    let _ = member.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
