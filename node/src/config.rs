//! The node's configuration: one clap + serde struct, layered TOML file → environment
//! (`RUNTIMEAI_<FLAG>`) → flags, then checked into a [`NodeConfig`] whose fields state their
//! defaults and effects.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use runtimeai_model::RuntimeType;
use runtimeai_raft::tls::TlsFiles;
use serde::Deserialize;

/// Runtime types an executor can serve.
pub const BACKENDS: &[&str] = &["vm", "vcluster", "sandbox", "agent_runtime"];

/// Which driver runs a runtime type's operations on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    /// Fenced and idempotent, but changes no infrastructure (`--simulated-*`).
    Simulated,
    /// VMs through libvirt at this URI.
    Libvirt { uri: String },
    /// Isolated local processes (sandboxes and agent runtimes).
    Process,
    /// vClusters on the host cluster of this kubeconfig.
    Kubernetes { kubeconfig: PathBuf },
}

/// `--backends` when it is not given.
pub const DEFAULT_BACKENDS: &str = "vm=libvirt:qemu:///system,sandbox=process,agent_runtime=process";

/// One `--backends` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub runtime_type: RuntimeType,
    pub driver: Driver,
}

/// Parses `--backends`: `none`, or `<type>[=<driver>[:<target>]]` entries.
fn parse_backends(text: Option<&str>) -> Result<Vec<BackendSpec>, ConfigError> {
    let text = text.map(str::trim).unwrap_or(DEFAULT_BACKENDS);
    if text == "none" || text.is_empty() {
        return Ok(Vec::new());
    }
    let bad = |entry: &str, why: String| ConfigError::Conflict(format!("--backends {entry:?}: {why}"));
    let mut specs: Vec<BackendSpec> = Vec::new();
    for entry in text.split(',').map(str::trim) {
        let (kind, driver) = entry.split_once('=').unwrap_or((entry, ""));
        let runtime_type = match kind {
            "vm" => RuntimeType::Vm,
            "vcluster" => RuntimeType::Vcluster,
            "sandbox" => RuntimeType::Sandbox,
            "agent_runtime" => RuntimeType::AgentRuntime,
            _ => return Err(bad(entry, format!("unknown runtime type; expected one of {}", BACKENDS.join(", ")))),
        };
        let (name, target) = driver.split_once(':').unwrap_or((driver, ""));
        let default_driver = match runtime_type {
            RuntimeType::Vm => "libvirt",
            RuntimeType::Sandbox | RuntimeType::AgentRuntime => "process",
            RuntimeType::Vcluster => "simulated",
        };
        let driver = match (if name.is_empty() { default_driver } else { name }, runtime_type) {
            ("simulated", _) => Driver::Simulated,
            ("libvirt", RuntimeType::Vm) => {
                Driver::Libvirt { uri: if target.is_empty() { "qemu:///system".into() } else { target.into() } }
            }
            ("process", RuntimeType::Sandbox | RuntimeType::AgentRuntime) => Driver::Process,
            ("kubernetes", RuntimeType::Vcluster) if !target.is_empty() => {
                Driver::Kubernetes { kubeconfig: PathBuf::from(target) }
            }
            ("kubernetes", RuntimeType::Vcluster) => {
                return Err(bad(entry, "give the host cluster's kubeconfig: vcluster=kubernetes:<path>".into()));
            }
            ("libvirt" | "process" | "kubernetes", _) => {
                return Err(bad(entry, format!("the {name} driver does not run {kind} runtimes")));
            }
            (other, _) => {
                return Err(bad(
                    entry,
                    format!("unknown driver {other:?}; drivers: libvirt, process, kubernetes, simulated"),
                ))
            }
        };
        if specs.iter().any(|s| s.runtime_type == runtime_type) {
            return Err(bad(entry, "names a runtime type twice".into()));
        }
        specs.push(BackendSpec { runtime_type, driver });
    }
    Ok(specs)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// How QEMU runs a VM's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmAccel {
    /// KVM where QEMU may open `/dev/kvm`, else TCG.
    #[default]
    Auto,
    Kvm,
    /// QEMU's software emulation: slower, but it runs where KVM is absent or does not work
    /// (some nested virtualization).
    Tcg,
}

/// `runtimeai node` flags. Every flag is also `RUNTIMEAI_<FLAG>` in the environment and
/// `<flag> = ...` in the TOML file given by `--config`; flags beat the environment, which beats
/// the file.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeArgs {
    /// TOML file with any of the options below (kebab-case keys, e.g. `data-dir`).
    #[arg(long, env = "RUNTIMEAI_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id in the cluster (a positive integer, unique and never reused).
    #[arg(long, env = "RUNTIMEAI_ID")]
    pub id: Option<u64>,
    /// REST listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "RUNTIMEAI_HTTP")]
    pub http: Option<String>,
    /// Peer (gRPC) listen address [default: 127.0.0.1:7100].
    #[arg(long, env = "RUNTIMEAI_GRPC")]
    pub grpc: Option<String>,
    /// REST address other nodes and clients should use, when it differs from --http.
    #[arg(long, env = "RUNTIMEAI_ADVERTISE_HTTP")]
    pub advertise_http: Option<String>,
    /// Peer address other nodes should use, when it differs from --grpc.
    #[arg(long, env = "RUNTIMEAI_ADVERTISE_GRPC")]
    pub advertise_grpc: Option<String>,
    /// Where the node keeps its log, state and snapshots [default: ./runtimeai-<id>.data].
    #[arg(long, env = "RUNTIMEAI_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Founding members as `id=host:port,...` (gRPC addresses). The lowest id initializes the
    /// cluster; a node with existing data ignores this. Omit it on a node that will be added
    /// later with `POST /v1/cluster/members`.
    #[arg(long, env = "RUNTIMEAI_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Reach these peers at other addresses than the ones they announce, as
    /// `id=host:port,...`: a port forward or NAT between nodes, or the fault-injecting proxy of
    /// `runtimeai-chaos`. Affects only this node's outgoing connections [default: none].
    #[arg(long, env = "RUNTIMEAI_PEER_ROUTES")]
    pub peer_routes: Option<String>,
    /// Name shared by all members; a node refuses data and peers of another cluster
    /// [default: runtimeai].
    #[arg(long, env = "RUNTIMEAI_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Log format on stderr [default: text]. The level comes from RUST_LOG.
    #[arg(long, env = "RUNTIMEAI_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Leader heartbeat interval in milliseconds [default: 100].
    #[arg(long, env = "RUNTIMEAI_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Minimum election timeout in milliseconds; the maximum is twice this [default: 500].
    #[arg(long, env = "RUNTIMEAI_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,
    /// Build a snapshot after this many applied entries [default: 10000].
    #[arg(long, env = "RUNTIMEAI_SNAPSHOT_COUNT")]
    pub snapshot_count: Option<u64>,
    /// Entries kept behind a snapshot so slow followers catch up from the log, and a follower
    /// that installed a snapshot finds the entries written meanwhile; while a snapshot is on its
    /// way to a member (and a minute after), the leader also keeps what members lack
    /// [default: 5000].
    #[arg(long, env = "RUNTIMEAI_SNAPSHOT_CATCHUP_ENTRIES")]
    pub snapshot_catchup_entries: Option<u64>,
    /// Write groups (log entries on the leader, forwarded batches on a follower) that leave as
    /// soon as they form; past this many on their way, new writes wait for one to be done and
    /// go together: fewer entries, a longer wait. From 1 to 4 [default: 1].
    #[arg(long, env = "RUNTIMEAI_WRITE_GROUPS_AT_ONCE", value_parser = clap::value_parser!(u32).range(1..=4))]
    pub write_groups_at_once: Option<u32>,
    /// Largest piece of a snapshot sent to a follower in one RPC, in bytes [default: 3145728].
    #[arg(long, env = "RUNTIMEAI_SNAPSHOT_CHUNK_BYTES")]
    pub snapshot_chunk_bytes: Option<u64>,
    /// Largest REST request body accepted, in bytes; larger ones get 413 [default: 1048576].
    #[arg(long, env = "RUNTIMEAI_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// How long a REST client may take to send a request's headers before the connection is
    /// closed (slow-loris), in milliseconds [default: 10000].
    #[arg(long, env = "RUNTIMEAI_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// How long a REST request may take from its headers to its answer, body upload included;
    /// past it 504 `request-timeout` (a write may still take effect: retry it with the same
    /// Idempotency-Key), in milliseconds [default: 60000].
    #[arg(long, env = "RUNTIMEAI_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// REST connections a node holds at most; past it, new ones are closed at once
    /// [default: 10000].
    #[arg(long, env = "RUNTIMEAI_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// REST requests a node works on at once; past it, new ones get 503 with Retry-After at
    /// once [default: 1024].
    #[arg(long, env = "RUNTIMEAI_MAX_INFLIGHT")]
    pub max_inflight: Option<usize>,
    /// Requests per second one principal may make to this node (bursts of a second's worth;
    /// past it 429 with Retry-After); 0 turns the limit off [default: 1000].
    #[arg(long, env = "RUNTIMEAI_RATE_LIMIT_PRINCIPAL")]
    pub rate_limit_principal: Option<u32>,
    /// Requests per second one client address may make to this node without valid credentials
    /// (the probes, and failed authentications); 0 turns the limit off [default: 100].
    #[arg(long, env = "RUNTIMEAI_RATE_LIMIT_ADDRESS")]
    pub rate_limit_address: Option<u32>,
    /// The backends this node's executor drives, comma-separated, one per runtime type:
    /// `<type>[=<driver>[:<target>]]`. Drivers: `libvirt[:<uri>]` for vm (default URI
    /// qemu:///system; test:///default is libvirt's built-in test hypervisor), `process` for
    /// sandbox and agent_runtime, `kubernetes:<kubeconfig>` for vcluster, `simulated` for any
    /// type (changes no infrastructure). `none`
    /// for a node that only votes and serves the API
    /// [default: vm=libvirt:qemu:///system,sandbox=process,agent_runtime=process].
    #[arg(long, env = "RUNTIMEAI_BACKENDS")]
    pub backends: Option<String>,
    /// The libvirt network VMs join when their networking lets them reach out (open egress,
    /// or internal/public exposure); other VMs get no network interface [default: default].
    #[arg(long, env = "RUNTIMEAI_LIBVIRT_NETWORK")]
    pub libvirt_network: Option<String>,
    /// How QEMU runs VMs: `kvm`, `tcg` (software) or `auto` (KVM where usable) [default: auto].
    #[arg(long, env = "RUNTIMEAI_VM_ACCEL")]
    pub vm_accel: Option<VmAccel>,
    /// The site this node is in (runtimes labelled `site=<name>` are placed on its nodes).
    #[arg(long, env = "RUNTIMEAI_SITE")]
    pub site: Option<String>,
    /// The zone within the site.
    #[arg(long, env = "RUNTIMEAI_ZONE")]
    pub zone: Option<String>,
    /// How long an executor holds an operation without renewing its lease before the leader
    /// hands it to another, in milliseconds [default: 3000].
    #[arg(long, env = "RUNTIMEAI_OPERATION_LEASE_MS")]
    pub operation_lease_ms: Option<u64>,
    /// How often the executor reports its runtimes' signals, in milliseconds [default: 5000].
    #[arg(long, env = "RUNTIMEAI_SIGNALS_INTERVAL_MS")]
    pub signals_interval_ms: Option<u64>,
    /// Base URL of an OpenAI-compatible chat API (e.g. `https://api.openai.com/v1`) asked for
    /// a plan when the deterministic planner does not understand a goal. Its key, if it needs
    /// one, comes from the environment variable RUNTIMEAI_PLANNER_API_KEY [default: none].
    #[arg(long, env = "RUNTIMEAI_PLANNER_URL")]
    pub planner_url: Option<String>,
    /// The model the external planner asks [default: gpt-4o-mini].
    #[arg(long, env = "RUNTIMEAI_PLANNER_MODEL")]
    pub planner_model: Option<String>,
    /// How long to wait for the external planner, in milliseconds [default: 30000].
    #[arg(long, env = "RUNTIMEAI_PLANNER_TIMEOUT_MS")]
    pub planner_timeout_ms: Option<u64>,
    /// Time one backend call of the simulated driver takes, in milliseconds [default: 200].
    #[arg(long, env = "RUNTIMEAI_SIMULATED_STEP_MS")]
    pub simulated_step_ms: Option<u64>,
    /// Where the simulated driver keeps the state of the infrastructure it pretends to manage
    /// (fencing tokens, applied steps, a journal of backend calls); nodes that share it act on
    /// the same pretend infrastructure [default: <data-dir>/simulated-infra].
    #[arg(long, env = "RUNTIMEAI_SIMULATED_INFRA_DIR")]
    pub simulated_infra_dir: Option<PathBuf>,
    /// Where this node keeps its sandboxes (their layers, logs and snapshots) and their images:
    /// outside the data directory, so that sandboxes filling a disk do not fill raft's
    /// [default: <data-dir>.sandboxes].
    #[arg(long, env = "RUNTIMEAI_SANDBOX_DIR")]
    pub sandbox_dir: Option<PathBuf>,
    /// Registries (`host:port`, comma-separated) that sandbox images are pulled from over plain
    /// HTTP, without TLS: for a registry on a trusted network only (logged at start).
    #[arg(long, env = "RUNTIMEAI_INSECURE_REGISTRY")]
    pub insecure_registry: Option<String>,
    /// A file holding the first cluster admin's API key (`rai_<id>_<secret>`, secret of at
    /// least 32 characters). The node that initializes the cluster, and any node given this,
    /// makes sure the key exists. Without it the initializing node makes one and writes it to
    /// `<data-dir>/admin.key` (mode 0600) [default: none].
    #[arg(long, env = "RUNTIMEAI_BOOTSTRAP_ADMIN_KEY_FILE")]
    pub bootstrap_admin_key_file: Option<PathBuf>,
    /// The REST port's certificate (PEM, chain first); with --tls-key the port speaks HTTPS only.
    #[arg(long, env = "RUNTIMEAI_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "RUNTIMEAI_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Ask REST clients for a certificate signed by this CA (PEM), not required: a client that sends one and no API key is authenticated by it, as the principal of a valid API key whose name is the certificate's common name [default: none].
    #[arg(long, env = "RUNTIMEAI_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// This member's certificate for the gRPC port, naming it with the URI SAN urn:runtimeai:member:<id> (`runtimeai certs node`).
    #[arg(long, env = "RUNTIMEAI_PEER_CERT")]
    pub peer_cert: Option<PathBuf>,
    /// The private key of --peer-cert (PEM).
    #[arg(long, env = "RUNTIMEAI_PEER_KEY")]
    pub peer_key: Option<PathBuf>,
    /// The cluster's CA (PEM): peers are accepted, and dialled, only with certificates it signed.
    #[arg(long, env = "RUNTIMEAI_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// Run without TLS on the REST and gRPC ports: anyone who reaches a port can read what
    /// it carries, and the gRPC port believes whoever calls it. For a trusted test network
    /// only; the node says so loudly in its log.
    #[arg(long, env = "RUNTIMEAI_INSECURE")]
    #[serde(default)]
    pub insecure: bool,
    /// OIDC: the issuer (`iss`) tokens must name; with --oidc-audience and --oidc-jwks-file, bearer tokens that are not API keys are checked as JWTs [default: none].
    #[arg(long, env = "RUNTIMEAI_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// OIDC: the audience (`aud`) tokens must name.
    #[arg(long, env = "RUNTIMEAI_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// OIDC: the issuer's signing keys (a JWKS document), re-read when the file changes.
    #[arg(long, env = "RUNTIMEAI_OIDC_JWKS_FILE")]
    pub oidc_jwks_file: Option<PathBuf>,
    /// OIDC: the issuer's signing keys at a URL (instead of --oidc-jwks-file), fetched at
    /// start, every five minutes, and when a token names a key not yet fetched.
    #[arg(long, env = "RUNTIMEAI_OIDC_JWKS_URL")]
    pub oidc_jwks_url: Option<String>,
    /// OIDC: the claim naming the principal [default: sub].
    #[arg(long, env = "RUNTIMEAI_OIDC_NAME_CLAIM")]
    pub oidc_name_claim: Option<String>,
    /// OIDC: the claim listing its tenants [default: tenants].
    #[arg(long, env = "RUNTIMEAI_OIDC_TENANTS_CLAIM")]
    pub oidc_tenants_claim: Option<String>,
    /// OIDC: the claim listing its roles [default: roles].
    #[arg(long, env = "RUNTIMEAI_OIDC_ROLES_CLAIM")]
    pub oidc_roles_claim: Option<String>,
    /// OIDC: the claim giving its kind, human, agent or service [default: kind; absent: human].
    #[arg(long, env = "RUNTIMEAI_OIDC_KIND_CLAIM")]
    pub oidc_kind_claim: Option<String>,
    /// OIDC: the claim giving an agent's mode [default: agent_mode].
    #[arg(long, env = "RUNTIMEAI_OIDC_AGENT_MODE_CLAIM")]
    pub oidc_agent_mode_claim: Option<String>,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    /// REST listen address.
    pub http: SocketAddr,
    /// gRPC listen address for peers.
    pub grpc: SocketAddr,
    /// REST address announced to the cluster.
    pub advertise_http: String,
    /// gRPC address announced to the cluster (must match this node's `--initial-cluster` entry).
    pub advertise_grpc: String,
    pub data_dir: PathBuf,
    /// Founding members (id → gRPC address); empty for a node that joins later.
    pub initial_cluster: BTreeMap<u64, String>,
    /// Peers this node dials elsewhere than at their announced address (id → address).
    pub peer_routes: BTreeMap<u64, String>,
    pub cluster_name: String,
    pub log_format: LogFormat,
    pub heartbeat: Duration,
    pub election_timeout: Duration,
    pub snapshot_count: u64,
    pub snapshot_catchup_entries: u64,
    pub snapshot_chunk_bytes: u64,
    pub write_groups_at_once: u32,
    pub max_body_bytes: usize,
    /// Bounds on REST connections.
    pub http_limits: crate::http::HttpLimits,
    /// Per-client request rates.
    pub rate_limits: runtimeai_api::throttle::RateLimitConfig,
    /// The backends this node drives, one per runtime type.
    pub backends: Vec<BackendSpec>,
    pub site: Option<String>,
    pub zone: Option<String>,
    pub libvirt_network: String,
    pub vm_accel: VmAccel,
    pub operation_lease: Duration,
    pub signals_interval: Duration,
    pub simulated_step: Duration,
    pub simulated_infra_dir: PathBuf,
    pub sandbox_dir: PathBuf,
    pub insecure_registries: Vec<String>,
    /// The external planner, if configured.
    pub planner: Option<runtimeai_api::external_planner::ExternalPlannerConfig>,
    /// The first admin's key, from `--bootstrap-admin-key-file`.
    pub bootstrap_admin_key_file: Option<PathBuf>,
    /// HTTPS for the REST port (`--tls-cert`, `--tls-key`, `--client-ca`); `None` only with
    /// `--insecure`.
    pub rest_tls: Option<runtimeai_raft::tls::TlsFiles>,
    /// Mutual TLS between members (`--peer-cert`, `--peer-key`, `--peer-ca`); `None` only with
    /// `--insecure`.
    pub peer_tls: Option<runtimeai_raft::tls::TlsFiles>,
    /// OIDC bearer tokens (`--oidc-*`), if configured.
    pub oidc: Option<runtimeai_api::oidc::OidcConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("--id is required (a positive integer)")]
    MissingId,
    #[error("--id must be a positive integer, got 0")]
    ZeroId,
    #[error("--{flag} {value:?}: {reason}")]
    BadAddress { flag: &'static str, value: String, reason: String },
    #[error("--{flag}: {message}")]
    MemberList { flag: &'static str, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("--{flag} must be at least {min}, got {value}")]
    TooSmall { flag: &'static str, min: u64, value: u64 },
    #[error("--{flag} must be at most {max}, got {value}")]
    TooLarge { flag: &'static str, max: u64, value: u64 },
}

impl NodeArgs {
    fn http_limits(&self) -> Result<crate::http::HttpLimits, ConfigError> {
        let defaults = crate::http::HttpLimits::default();
        let header_ms = self.header_read_timeout_ms.unwrap_or(defaults.header_read_timeout.as_millis() as u64);
        if header_ms < 100 {
            return Err(ConfigError::TooSmall { flag: "header-read-timeout-ms", min: 100, value: header_ms });
        }
        let request_ms = self.request_timeout_ms.unwrap_or(defaults.request_timeout.as_millis() as u64);
        if request_ms < 1000 {
            return Err(ConfigError::TooSmall { flag: "request-timeout-ms", min: 1000, value: request_ms });
        }
        let max_connections = self.max_connections.unwrap_or(defaults.max_connections);
        if max_connections < 16 {
            return Err(ConfigError::TooSmall { flag: "max-connections", min: 16, value: max_connections as u64 });
        }
        let max_inflight = self.max_inflight.unwrap_or(defaults.max_inflight);
        if max_inflight < 4 {
            return Err(ConfigError::TooSmall { flag: "max-inflight", min: 4, value: max_inflight as u64 });
        }
        Ok(crate::http::HttpLimits {
            header_read_timeout: Duration::from_millis(header_ms),
            request_timeout: Duration::from_millis(request_ms),
            max_connections,
            max_inflight,
            ..defaults
        })
    }

    /// Layers the TOML file (if any) under these flags.
    pub fn with_file(self) -> Result<NodeArgs, ConfigError> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text =
            std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile { path: path.clone(), source })?;
        let file: NodeArgs = toml::from_str(&text)
            .map_err(|e| ConfigError::ParseFile { path: path.clone(), message: e.message().to_string() })?;
        Ok(NodeArgs {
            config: self.config,
            id: self.id.or(file.id),
            http: self.http.or(file.http),
            grpc: self.grpc.or(file.grpc),
            advertise_http: self.advertise_http.or(file.advertise_http),
            advertise_grpc: self.advertise_grpc.or(file.advertise_grpc),
            data_dir: self.data_dir.or_else(|| file.data_dir.map(|d| relative_to(&path, d))),
            initial_cluster: self.initial_cluster.or(file.initial_cluster),
            peer_routes: self.peer_routes.or(file.peer_routes),
            cluster_name: self.cluster_name.or(file.cluster_name),
            log_format: self.log_format.or(file.log_format),
            heartbeat_ms: self.heartbeat_ms.or(file.heartbeat_ms),
            election_timeout_ms: self.election_timeout_ms.or(file.election_timeout_ms),
            snapshot_count: self.snapshot_count.or(file.snapshot_count),
            snapshot_catchup_entries: self.snapshot_catchup_entries.or(file.snapshot_catchup_entries),
            snapshot_chunk_bytes: self.snapshot_chunk_bytes.or(file.snapshot_chunk_bytes),
            write_groups_at_once: self.write_groups_at_once.or(file.write_groups_at_once),
            max_body_bytes: self.max_body_bytes.or(file.max_body_bytes),
            header_read_timeout_ms: self.header_read_timeout_ms.or(file.header_read_timeout_ms),
            request_timeout_ms: self.request_timeout_ms.or(file.request_timeout_ms),
            max_connections: self.max_connections.or(file.max_connections),
            max_inflight: self.max_inflight.or(file.max_inflight),
            rate_limit_principal: self.rate_limit_principal.or(file.rate_limit_principal),
            rate_limit_address: self.rate_limit_address.or(file.rate_limit_address),
            backends: self.backends.or(file.backends),
            site: self.site.or(file.site),
            libvirt_network: self.libvirt_network.or(file.libvirt_network),
            vm_accel: self.vm_accel.or(file.vm_accel),
            zone: self.zone.or(file.zone),
            operation_lease_ms: self.operation_lease_ms.or(file.operation_lease_ms),
            signals_interval_ms: self.signals_interval_ms.or(file.signals_interval_ms),
            planner_url: self.planner_url.or(file.planner_url),
            planner_model: self.planner_model.or(file.planner_model),
            planner_timeout_ms: self.planner_timeout_ms.or(file.planner_timeout_ms),
            simulated_step_ms: self.simulated_step_ms.or(file.simulated_step_ms),
            simulated_infra_dir: self
                .simulated_infra_dir
                .or_else(|| file.simulated_infra_dir.map(|d| relative_to(&path, d))),
            sandbox_dir: self.sandbox_dir.or_else(|| file.sandbox_dir.map(|d| relative_to(&path, d))),
            insecure_registry: self.insecure_registry.or(file.insecure_registry),
            bootstrap_admin_key_file: self
                .bootstrap_admin_key_file
                .or_else(|| file.bootstrap_admin_key_file.map(|d| relative_to(&path, d))),
            tls_cert: self.tls_cert.or_else(|| file.tls_cert.map(|d| relative_to(&path, d))),
            tls_key: self.tls_key.or_else(|| file.tls_key.map(|d| relative_to(&path, d))),
            client_ca: self.client_ca.or_else(|| file.client_ca.map(|d| relative_to(&path, d))),
            peer_cert: self.peer_cert.or_else(|| file.peer_cert.map(|d| relative_to(&path, d))),
            peer_key: self.peer_key.or_else(|| file.peer_key.map(|d| relative_to(&path, d))),
            peer_ca: self.peer_ca.or_else(|| file.peer_ca.map(|d| relative_to(&path, d))),
            insecure: self.insecure || file.insecure,
            oidc_issuer: self.oidc_issuer.or(file.oidc_issuer),
            oidc_audience: self.oidc_audience.or(file.oidc_audience),
            oidc_jwks_file: self.oidc_jwks_file.or_else(|| file.oidc_jwks_file.map(|d| relative_to(&path, d))),
            oidc_jwks_url: self.oidc_jwks_url.or(file.oidc_jwks_url),
            oidc_name_claim: self.oidc_name_claim.or(file.oidc_name_claim),
            oidc_tenants_claim: self.oidc_tenants_claim.or(file.oidc_tenants_claim),
            oidc_roles_claim: self.oidc_roles_claim.or(file.oidc_roles_claim),
            oidc_kind_claim: self.oidc_kind_claim.or(file.oidc_kind_claim),
            oidc_agent_mode_claim: self.oidc_agent_mode_claim.or(file.oidc_agent_mode_claim),
        })
    }

    /// Checks every option and fills in defaults.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let http_limits = self.http_limits()?;
        let (heartbeat_ms, election_ms) = self.raft_timing()?;
        let (snapshot_count, snapshot_chunk_bytes) = self.snapshot_sizes()?;
        let (lease_ms, signals_ms) = self.executor_timing()?;
        let planner = self.planner()?;
        let rate_defaults = runtimeai_api::throttle::RateLimitConfig::default();
        let rate_limits = runtimeai_api::throttle::RateLimitConfig {
            per_principal: self.rate_limit_principal.unwrap_or(rate_defaults.per_principal),
            per_address: self.rate_limit_address.unwrap_or(rate_defaults.per_address),
        };
        let id = self.id.ok_or(ConfigError::MissingId)?;
        if id == 0 {
            return Err(ConfigError::ZeroId);
        }
        // Checked last, so that a malformed flag is reported as such before the TLS choice.
        let tls = tls_files(&self);
        let oidc = oidc_config(&self);
        let http = listen_addr("http", self.http.as_deref().unwrap_or("127.0.0.1:8080"))?;
        let grpc = listen_addr("grpc", self.grpc.as_deref().unwrap_or("127.0.0.1:7100"))?;
        if http == grpc {
            return Err(ConfigError::Conflict(format!("--http and --grpc both use {http}")));
        }
        let advertise_http = match self.advertise_http {
            Some(a) => peer_addr("advertise-http", &a)?,
            None => http.to_string(),
        };
        let advertise_grpc = match self.advertise_grpc {
            Some(a) => peer_addr("advertise-grpc", &a)?,
            None => grpc.to_string(),
        };
        let initial_cluster = match self.initial_cluster.as_deref() {
            None | Some("") => BTreeMap::new(),
            Some(text) => parse_member_addrs("initial-cluster", text)?,
        };
        let peer_routes = match self.peer_routes.as_deref() {
            None | Some("") => BTreeMap::new(),
            Some(text) => parse_member_addrs("peer-routes", text)?,
        };
        check_initial_cluster(&initial_cluster, id, &advertise_grpc)?;
        let cluster_name = self.cluster_name.unwrap_or_else(|| "runtimeai".to_string());
        if cluster_name.is_empty() || cluster_name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ConfigError::Conflict(format!(
                "--cluster-name {cluster_name:?} must be non-empty without spaces"
            )));
        }
        let backends = parse_backends(self.backends.as_deref())?;
        let data_dir = self.data_dir.unwrap_or_else(|| PathBuf::from(format!("runtimeai-{id}.data")));
        let (rest_tls, peer_tls) = tls?;
        let oidc = oidc?;
        Ok(NodeConfig {
            id,
            http,
            grpc,
            advertise_http,
            advertise_grpc,
            simulated_infra_dir: self.simulated_infra_dir.unwrap_or_else(|| data_dir.join("simulated-infra")),
            sandbox_dir: self.sandbox_dir.unwrap_or_else(|| PathBuf::from(format!("{}.sandboxes", data_dir.display()))),
            insecure_registries: self
                .insecure_registry
                .iter()
                .flat_map(|list| list.split(','))
                .map(str::trim)
                .filter(|registry| !registry.is_empty())
                .map(str::to_string)
                .collect(),
            data_dir,
            initial_cluster,
            peer_routes,
            cluster_name,
            log_format: self.log_format.unwrap_or_default(),
            heartbeat: Duration::from_millis(heartbeat_ms),
            election_timeout: Duration::from_millis(election_ms),
            snapshot_count,
            snapshot_catchup_entries: self.snapshot_catchup_entries.unwrap_or(5_000),
            snapshot_chunk_bytes,
            write_groups_at_once: self
                .write_groups_at_once
                .unwrap_or(runtimeai_raft::replica::DEFAULT_WRITE_GROUPS_AT_ONCE)
                .clamp(1, 4),
            max_body_bytes: self.max_body_bytes.unwrap_or(1 << 20).max(1024),
            http_limits,
            rate_limits,
            backends,
            site: self.site.filter(|s| !s.is_empty()),
            libvirt_network: self.libvirt_network.filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into()),
            vm_accel: self.vm_accel.unwrap_or_default(),
            zone: self.zone.filter(|z| !z.is_empty()),
            operation_lease: Duration::from_millis(lease_ms),
            signals_interval: Duration::from_millis(signals_ms),
            simulated_step: Duration::from_millis(self.simulated_step_ms.unwrap_or(200).max(1)),
            planner,
            bootstrap_admin_key_file: self.bootstrap_admin_key_file,
            rest_tls,
            peer_tls,
            oidc,
        })
    }
}

impl NodeArgs {
    /// `--heartbeat-ms` and `--election-timeout-ms`, checked against each other.
    fn raft_timing(&self) -> Result<(u64, u64), ConfigError> {
        let heartbeat_ms = self.heartbeat_ms.unwrap_or(100);
        if heartbeat_ms < 10 {
            return Err(ConfigError::TooSmall { flag: "heartbeat-ms", min: 10, value: heartbeat_ms });
        }
        let election_ms = self.election_timeout_ms.unwrap_or(500);
        if election_ms < 3 * heartbeat_ms {
            return Err(ConfigError::Conflict(format!(
                "--election-timeout-ms ({election_ms}) must be at least three heartbeats (3 × {heartbeat_ms} ms)"
            )));
        }
        Ok((heartbeat_ms, election_ms))
    }

    /// `--snapshot-count` and `--snapshot-chunk-bytes` (a chunk is one gRPC message, with room to
    /// spare for its header).
    fn snapshot_sizes(&self) -> Result<(u64, u64), ConfigError> {
        let snapshot_count = self.snapshot_count.unwrap_or(10_000);
        if snapshot_count < 10 {
            return Err(ConfigError::TooSmall { flag: "snapshot-count", min: 10, value: snapshot_count });
        }
        let chunk_bytes = self.snapshot_chunk_bytes.unwrap_or(3 << 20);
        if chunk_bytes < 1024 {
            return Err(ConfigError::TooSmall { flag: "snapshot-chunk-bytes", min: 1024, value: chunk_bytes });
        }
        let max_chunk = (runtimeai_raft::limits::MAX_MESSAGE_BYTES / 2) as u64;
        if chunk_bytes > max_chunk {
            return Err(ConfigError::TooLarge { flag: "snapshot-chunk-bytes", max: max_chunk, value: chunk_bytes });
        }
        Ok((snapshot_count, chunk_bytes))
    }

    /// `--operation-lease-ms` and `--signals-interval-ms`.
    fn executor_timing(&self) -> Result<(u64, u64), ConfigError> {
        let lease_ms = self.operation_lease_ms.unwrap_or(3_000);
        if lease_ms < 300 {
            return Err(ConfigError::TooSmall { flag: "operation-lease-ms", min: 300, value: lease_ms });
        }
        let signals_ms = self.signals_interval_ms.unwrap_or(5_000);
        if signals_ms < 100 {
            return Err(ConfigError::TooSmall { flag: "signals-interval-ms", min: 100, value: signals_ms });
        }
        Ok((lease_ms, signals_ms))
    }

    /// The external planner `--planner-url` names, if any.
    fn planner(&self) -> Result<Option<runtimeai_api::external_planner::ExternalPlannerConfig>, ConfigError> {
        let Some(url) = self.planner_url.clone().filter(|u| !u.is_empty()) else { return Ok(None) };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            let reason = "expected an http:// or https:// URL".into();
            return Err(ConfigError::BadAddress { flag: "planner-url", value: url, reason });
        }
        Ok(Some(runtimeai_api::external_planner::ExternalPlannerConfig {
            url,
            model: self.planner_model.clone().unwrap_or_else(|| "gpt-4o-mini".to_string()),
            api_key: std::env::var("RUNTIMEAI_PLANNER_API_KEY").ok().filter(|k| !k.is_empty()),
            timeout: Duration::from_millis(self.planner_timeout_ms.unwrap_or(30_000).max(100)),
        }))
    }
}

/// A founding member's `--initial-cluster` lists itself, at its own gRPC address.
fn check_initial_cluster(
    initial_cluster: &BTreeMap<u64, String>,
    id: u64,
    advertise_grpc: &str,
) -> Result<(), ConfigError> {
    match initial_cluster.get(&id) {
        None if !initial_cluster.is_empty() => Err(ConfigError::Conflict(format!(
            "--initial-cluster does not list this node's --id {id}; list every founding member, or omit \
             --initial-cluster on a node that joins later"
        ))),
        Some(addr) if addr != advertise_grpc => Err(ConfigError::Conflict(format!(
            "--initial-cluster gives node {id} the address {addr}, but this node's gRPC address is \
             {advertise_grpc} (--grpc / --advertise-grpc)"
        ))),
        _ => Ok(()),
    }
}

/// The TLS files of both ports: each port gets all of its files or none, and a node without
/// both refuses to start unless `--insecure` says so.
fn tls_files(args: &NodeArgs) -> Result<(Option<TlsFiles>, Option<TlsFiles>), ConfigError> {
    let rest = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: args.client_ca.clone() }),
        (None, None) if args.client_ca.is_none() => None,
        _ => {
            return Err(ConfigError::Conflict(
                "HTTPS needs both --tls-cert and --tls-key (and --client-ca only with them)".into(),
            ))
        }
    };
    let peer = match (&args.peer_cert, &args.peer_key, &args.peer_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            Some(TlsFiles { cert: cert.clone(), key: key.clone(), ca: Some(ca.clone()) })
        }
        (None, None, None) => None,
        _ => {
            return Err(ConfigError::Conflict(
                "mutual TLS between members needs --peer-cert, --peer-key and --peer-ca".into(),
            ))
        }
    };
    if (rest.is_none() || peer.is_none()) && !args.insecure {
        let missing = match (&rest, &peer) {
            (None, None) => "--tls-cert/--tls-key (REST) and --peer-cert/--peer-key/--peer-ca (members)",
            (None, _) => "--tls-cert/--tls-key (REST)",
            _ => "--peer-cert/--peer-key/--peer-ca (members)",
        };
        return Err(ConfigError::Conflict(format!(
            "no TLS: give {missing} (`runtimeai certs` makes them), or --insecure to run in plain text on a trusted network"
        )));
    }
    Ok((rest, peer))
}

/// OIDC, when issuer, audience and keys are all given (some without the others is an error).
fn oidc_config(args: &NodeArgs) -> Result<Option<runtimeai_api::oidc::OidcConfig>, ConfigError> {
    use runtimeai_api::oidc::JwksSource;
    let jwks = match (&args.oidc_jwks_file, &args.oidc_jwks_url) {
        (Some(file), None) => Some(JwksSource::File(file.clone())),
        (None, Some(url)) if url.starts_with("https://") || url.starts_with("http://") => {
            Some(JwksSource::Url(url.clone()))
        }
        (None, Some(url)) => {
            let reason = "expected an https:// URL".to_string();
            return Err(ConfigError::BadAddress { flag: "oidc-jwks-url", value: url.clone(), reason });
        }
        (None, None) => None,
        (Some(_), Some(_)) => {
            return Err(ConfigError::Conflict("give --oidc-jwks-file or --oidc-jwks-url, not both".into()))
        }
    };
    let (issuer, audience, jwks) = match (&args.oidc_issuer, &args.oidc_audience, jwks) {
        (None, None, None) => return Ok(None),
        (Some(issuer), Some(audience), Some(jwks)) => (issuer.clone(), audience.clone(), jwks),
        _ => {
            return Err(ConfigError::Conflict(
                "OIDC needs --oidc-issuer, --oidc-audience and --oidc-jwks-file or --oidc-jwks-url".into(),
            ))
        }
    };
    let claim = |given: &Option<String>, default: &str| given.clone().unwrap_or_else(|| default.to_string());
    Ok(Some(runtimeai_api::oidc::OidcConfig {
        issuer,
        audience,
        jwks,
        name_claim: claim(&args.oidc_name_claim, "sub"),
        tenants_claim: claim(&args.oidc_tenants_claim, "tenants"),
        roles_claim: claim(&args.oidc_roles_claim, "roles"),
        kind_claim: claim(&args.oidc_kind_claim, "kind"),
        agent_mode_claim: claim(&args.oidc_agent_mode_claim, "agent_mode"),
    }))
}

/// A path in a config file is relative to the file.
fn relative_to(config_file: &Path, path: PathBuf) -> PathBuf {
    match config_file.parent() {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path,
    }
}

/// A listen address: `ip:port`, or `localhost:port`.
fn listen_addr(flag: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    let bad = |reason: &str| ConfigError::BadAddress { flag, value: value.to_string(), reason: reason.to_string() };
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = value.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?;
    port.parse::<u16>().map_err(|_| bad("the port must be a number from 0 to 65535"))?;
    if host != "localhost" {
        return Err(bad("listen on an IP address (e.g. 0.0.0.0:8080) or localhost"));
    }
    value.to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or_else(|| bad("cannot resolve"))
}

/// An address peers dial: `host:port` with a numeric port.
fn peer_addr(flag: &'static str, value: &str) -> Result<String, ConfigError> {
    let bad = |reason: &str| ConfigError::BadAddress { flag, value: value.to_string(), reason: reason.to_string() };
    let (host, port) = value.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?;
    if host.is_empty() || host.contains('/') || host.contains(' ') {
        return Err(bad("expected host:port"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad("the port must be a number from 1 to 65535")),
        Ok(_) => Ok(value.to_string()),
    }
}

/// Parses `1=127.0.0.1:7101,2=127.0.0.1:7102` (etcd style), the value of `--{flag}`.
pub fn parse_member_addrs(flag: &'static str, text: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let error = |message: String| ConfigError::MemberList { flag, message };
    let mut members = BTreeMap::new();
    for item in text.split(',').map(str::trim) {
        let (id, addr) = item.split_once('=').ok_or_else(|| error(format!("{item:?} is not id=host:port")))?;
        let id: u64 = id.trim().parse().map_err(|_| error(format!("{id:?} in {item:?} is not a node id")))?;
        if id == 0 {
            return Err(error("node ids start at 1".into()));
        }
        let addr = peer_addr(flag, addr.trim())?;
        if members.values().any(|a| *a == addr) {
            return Err(error(format!("address {addr} is listed twice")));
        }
        if members.insert(id, addr).is_some() {
            return Err(error(format!("node {id} is listed twice")));
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(id: u64) -> NodeArgs {
        NodeArgs {
            id: Some(id),
            http: Some("127.0.0.1:8081".into()),
            grpc: Some("127.0.0.1:7101".into()),
            initial_cluster: Some("1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103".into()),
            insecure: true,
            ..NodeArgs::default()
        }
    }

    #[test]
    fn oidc_takes_an_issuer_an_audience_and_one_source_of_keys() {
        use runtimeai_api::oidc::JwksSource;
        let oidc = |file: Option<&str>, url: Option<&str>| NodeArgs {
            oidc_issuer: Some("https://idp".into()),
            oidc_audience: Some("runtimeai".into()),
            oidc_jwks_file: file.map(PathBuf::from),
            oidc_jwks_url: url.map(str::to_string),
            ..args(1)
        };
        let by_url = oidc(None, Some("https://idp/keys")).resolve().unwrap().oidc.unwrap();
        assert_eq!(by_url.jwks, JwksSource::Url("https://idp/keys".into()));
        assert_eq!((by_url.name_claim.as_str(), by_url.roles_claim.as_str()), ("sub", "roles"));
        let by_file = oidc(Some("keys.json"), None).resolve().unwrap().oidc.unwrap();
        assert_eq!(by_file.jwks, JwksSource::File("keys.json".into()));
        for (bad, expected) in [
            (oidc(Some("k"), Some("https://idp/keys")), "not both"),
            (oidc(None, Some("ftp://idp/keys")), "https:// URL"),
            (oidc(None, None), "needs --oidc-issuer"),
            (NodeArgs { oidc_issuer: Some("https://idp".into()), ..args(1) }, "needs --oidc-issuer"),
        ] {
            let error = bad.resolve().unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        assert!(args(1).resolve().unwrap().oidc.is_none());
    }

    #[test]
    fn the_example_configurations_are_complete_and_secure() {
        for i in 1..=3 {
            let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/examples/node-{i}.toml"));
            let config = NodeArgs { config: Some(file), ..NodeArgs::default() }.with_file().unwrap().resolve().unwrap();
            assert_eq!(config.id, i);
            assert!(config.rest_tls.is_some() && config.peer_tls.is_some(), "node {i} runs TLS on both ports");
            assert!(config.bootstrap_admin_key_file.is_some());
        }
    }

    #[test]
    fn tls_is_all_of_a_ports_files_or_an_explicit_insecure() {
        let secure = NodeArgs { insecure: false, ..args(1) };
        assert!(secure.clone().resolve().unwrap_err().to_string().contains("no TLS: give"));
        let file = |name: &str| Some(PathBuf::from(name));
        let rest_only = NodeArgs { tls_cert: file("c"), tls_key: file("k"), ..secure.clone() };
        assert!(rest_only.clone().resolve().unwrap_err().to_string().contains("--peer-cert/--peer-key/--peer-ca"));
        let half_peer = NodeArgs { peer_cert: file("c"), peer_key: file("k"), ..rest_only.clone() };
        assert!(half_peer
            .clone()
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("needs --peer-cert, --peer-key and --peer-ca"));
        let both = NodeArgs { peer_ca: file("ca"), ..half_peer }.resolve().unwrap();
        assert_eq!(both.rest_tls.map(|t| t.ca), Some(None), "no client certificates asked for without --client-ca");
        assert_eq!(both.peer_tls.and_then(|t| t.ca), file("ca"));
        let insecure = args(1).resolve().unwrap();
        assert!(insecure.rest_tls.is_none() && insecure.peer_tls.is_none());
    }

    #[test]
    fn resolves_a_founding_member_with_defaults() {
        let config = args(1).resolve().unwrap();
        assert_eq!(config.initial_cluster.len(), 3);
        assert_eq!(config.advertise_grpc, "127.0.0.1:7101");
        assert_eq!(config.cluster_name, "runtimeai");
        assert_eq!(config.heartbeat, Duration::from_millis(100));
        assert_eq!(config.data_dir, PathBuf::from("runtimeai-1.data"));
        assert!(config.peer_routes.is_empty());
        let routed = NodeArgs { peer_routes: Some("2=127.0.0.1:9102, 3=127.0.0.1:9103".into()), ..args(1) };
        let config = routed.resolve().unwrap();
        assert_eq!(config.peer_routes.get(&3).map(String::as_str), Some("127.0.0.1:9103"));
    }

    #[test]
    fn rejects_malformed_and_conflicting_options() {
        let cases: Vec<(NodeArgs, &str)> = vec![
            (NodeArgs { id: None, ..args(1) }, "--id is required"),
            (NodeArgs { id: Some(0), ..args(1) }, "positive"),
            (NodeArgs { http: Some("127.0.0.1".into()), ..args(1) }, "expected host:port"),
            (NodeArgs { http: Some("127.0.0.1:99999".into()), ..args(1) }, "port"),
            (NodeArgs { http: Some("127.0.0.1:7101".into()), ..args(1) }, "both use"),
            (NodeArgs { initial_cluster: Some("1=127.0.0.1:7101,1=127.0.0.1:7102".into()), ..args(1) }, "listed twice"),
            (NodeArgs { initial_cluster: Some("1=127.0.0.1:7101,2=127.0.0.1:7101".into()), ..args(1) }, "listed twice"),
            (NodeArgs { initial_cluster: Some("one=127.0.0.1:7101".into()), ..args(1) }, "not a node id"),
            (NodeArgs { initial_cluster: Some("1:127.0.0.1:7101".into()), ..args(1) }, "not id=host:port"),
            (NodeArgs { initial_cluster: Some("2=127.0.0.1:7102".into()), ..args(1) }, "does not list"),
            (NodeArgs { grpc: Some("127.0.0.1:7109".into()), ..args(1) }, "gRPC address is"),
            (NodeArgs { peer_routes: Some("2=127.0.0.1".into()), ..args(1) }, "--peer-routes"),
            (NodeArgs { peer_routes: Some("2=127.0.0.1:1,2=127.0.0.1:2".into()), ..args(1) }, "listed twice"),
            (NodeArgs { election_timeout_ms: Some(100), ..args(1) }, "three heartbeats"),
            (NodeArgs { snapshot_chunk_bytes: Some(1 << 30), ..args(1) }, "snapshot-chunk-bytes must be at most"),
        ];
        for (args, expected) in cases {
            let err = args.clone().resolve().expect_err(&format!("{args:?} must be refused"));
            assert!(err.to_string().contains(expected), "{err} should mention {expected:?}");
        }
    }

    #[test]
    fn flags_override_the_file_and_paths_in_the_file_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "id = 2\nhttp = \"127.0.0.1:8082\"\ngrpc = \"127.0.0.1:7102\"\ndata-dir = \"n2\"\n")
            .unwrap();
        let cli =
            NodeArgs { config: Some(file), http: Some("127.0.0.1:9000".into()), insecure: true, ..NodeArgs::default() };
        let config = cli.with_file().unwrap().resolve().unwrap();
        assert_eq!(config.id, 2);
        assert_eq!(config.http.to_string(), "127.0.0.1:9000");
        assert_eq!(config.grpc.to_string(), "127.0.0.1:7102");
        assert_eq!(config.data_dir, dir.path().join("n2"));
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "id = 2\ndatadir = \"x\"\n").unwrap();
        let err = NodeArgs { config: Some(file), ..NodeArgs::default() }.with_file().unwrap_err();
        assert!(err.to_string().contains("datadir"), "{err}");
    }
}
