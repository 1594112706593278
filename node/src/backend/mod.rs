//! The adapter contract between the engine and the infrastructure, and the drivers that
//! implement it.
//!
//! # Correctness requirements of a driver
//! - **Idempotent, keyed by the call**: every call carries the operation id, the action's index
//!   in its operation (the step) and the fencing token ([`CallContext`]). A call retried after a
//!   crash — the executor's or the backend's — must converge to the same end state: create
//!   something that exists already → success; stop something stopped → success.
//! - **Fenced**: a driver must refuse a call whose token is older than one it has already seen
//!   for the operation ([`BackendError::Fenced`]): that executor was superseded. [`StepLedger`]
//!   does this (and remembers applied steps) for drivers without a place of their own to keep it.
//! - **Classified errors**: [`BackendError::Retryable`] (the executor retries with backoff while
//!   it holds the lease), [`BackendError::Permanent`] (the operation fails with the message),
//!   [`BackendError::Unsupported`] (the runtime cannot do this; capabilities should have said so).
//! - **Capabilities are the truth**: a runtime gets its backend's [`RuntimeBackend::capabilities`]
//!   when it is created; the API refuses any other action with 422 before anything is queued.
//! - **Status never lies**: [`RuntimeBackend::status`] reports what the infrastructure has,
//!   including that it has nothing ([`Observed::Missing`]); the executor compares it with the
//!   replicated state (drift).

mod ledger;
pub mod libvirt;
pub mod sandbox;
pub mod simulated;
pub mod vcluster;
pub mod vm_boot;
pub mod vm_export;

pub use ledger::{LockedLedger, Step, StepLedger};

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use runtimeai_engine::catalogue::quantity_bytes;
use runtimeai_engine::Catalogue;
use runtimeai_model::{ActionKind, BackendInfo, ExecRequest, LifecycleAction, Runtime, RuntimeType, SizeEntry};

/// The lifecycle actions every driver supports (besides create and delete, which every driver
/// does), and those a driver adds to them.
macro_rules! lifecycle_and {
    ($($extra:ident),*) => {
        &[
            ActionKind::Start,
            ActionKind::Stop,
            ActionKind::Restart,
            ActionKind::Scale,
            ActionKind::Snapshot,
            ActionKind::Restore,
            $(ActionKind::$extra,)*
        ]
    };
}

/// The lifecycle, and pause and resume: what drivers that can freeze a runtime with its memory
/// do (libvirt suspends a domain; the simulated driver pretends to).
pub const LIFECYCLE_AND_PAUSE: &[ActionKind] = lifecycle_and!(Pause, Resume);

/// The lifecycle, pause and resume, and migration to another node: what libvirt's VMs do (and
/// the simulated driver in place of a node-local one; its export is a file naming the runtime).
pub const PAUSE_AND_MIGRATE: &[ActionKind] = lifecycle_and!(Pause, Resume, Migrate);

/// What a vcluster does: the lifecycle, and a rolling restart of its control plane.
pub const VCLUSTER: &[ActionKind] = lifecycle_and!(RolloutRestart);

/// What a sandbox (or agent runtime) under crun does: the lifecycle, pause and resume (its
/// cgroup frozen), `exec` (with logs and files), which the node that hosts it carries out
/// at once, not as an operation, and migration to another node.
pub const SANDBOX: &[ActionKind] = lifecycle_and!(Pause, Resume, Exec, Migrate);

/// Measures the vCPUs runtimes use from their cumulative CPU time (a cgroup's, a domain's): the
/// time used between two looks over the time between them.
#[derive(Debug, Clone, Default)]
pub struct CpuMeter {
    samples: Arc<std::sync::Mutex<HashMap<String, (u64, std::time::Instant)>>>,
}

impl CpuMeter {
    /// Records `used_ns` for runtime `id` and returns its use since the previous look; none at
    /// the first look (or when the counter went back, as a restarted process's does).
    pub fn look(&self, id: &str, used_ns: u64) -> Option<f64> {
        let now = std::time::Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (before, then) = samples.insert(id.to_string(), (used_ns, now))?;
        let wall = now.duration_since(then).as_nanos() as f64;
        (wall > 0.0 && used_ns >= before).then(|| (used_ns - before) as f64 / wall)
    }

    /// Forgets a runtime that is gone.
    pub fn forget(&self, id: &str) {
        self.samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(id);
    }
}

/// What every backend call carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    pub operation_id: String,
    /// The action's index within its operation.
    pub step: u32,
    /// The fencing token of the executor's assignment.
    pub token: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A newer assignment of the operation has reached the backend: this executor must stop.
    #[error("fenced: token {token} is older than {newer}, held by a newer executor")]
    Fenced { token: u64, newer: u64 },
    /// Worth trying again (a daemon restarting, a timeout).
    #[error("{0}")]
    Retryable(String),
    /// Will not work however often it is tried.
    #[error("{0}")]
    Permanent(String),
    /// The backend cannot do this at all.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl From<std::io::Error> for BackendError {
    fn from(error: std::io::Error) -> Self {
        BackendError::Retryable(format!("backend I/O: {error}"))
    }
}

/// Resources a runtime runs with, resolved from its spec and the size catalogue.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    pub cpu: f64,
    pub memory_bytes: u64,
    pub replicas: i64,
}

impl Resources {
    /// The spec's own resources where it names them, else its size's.
    pub fn of(runtime: &Runtime, sizes: &[SizeEntry]) -> Resources {
        let catalogue = Catalogue::new(sizes);
        let size = sizes.get(catalogue.effective_index(&runtime.spec));
        let own = runtime.spec.resources.as_ref();
        let memory = own.and_then(|r| r.memory.clone()).or(size.map(|s| s.memory.clone())).unwrap_or_default();
        Resources {
            cpu: own.and_then(|r| r.cpu).or(size.map(|s| s.cpu)).unwrap_or(1.0),
            memory_bytes: quantity_bytes(&memory).unwrap_or(1 << 30),
            replicas: catalogue.replicas(&runtime.spec),
        }
    }
}

/// What a backend has of a runtime.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Running {
        /// vCPUs in use, where the backend measures them.
        cpu: Option<f64>,
        /// Bytes of its own storage in use, where the backend measures them.
        disk_bytes: Option<u64>,
        memory_bytes: u64,
        latency_ms: Option<f64>,
    },
    Stopped,
    /// Frozen, its memory kept.
    Paused,
    /// Exists but failed (a crashed process, a domain in a crashed state).
    Failed(String),
    /// The backend has nothing for this runtime.
    Missing,
}

/// The adapter contract (see the module docs for what each call must guarantee). `Ok` carries a
/// message for the operation's progress.
#[async_trait::async_trait]
pub trait RuntimeBackend: Send + Sync + std::fmt::Debug {
    /// The driver's name: `libvirt`, `kubernetes`, `process`, `simulated`.
    fn driver(&self) -> &'static str;
    /// Whether other nodes can reach the same infrastructure.
    fn shared(&self) -> bool;
    /// The actions runtimes on this backend support.
    fn capabilities(&self) -> &'static [runtimeai_model::ActionKind];
    async fn create(&self, cx: &CallContext, runtime: &Runtime, resources: &Resources) -> Result<String, BackendError>;
    async fn delete(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError>;
    async fn start(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError>;
    async fn stop(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        force: bool,
        timeout: std::time::Duration,
    ) -> Result<String, BackendError>;
    async fn restart(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError>;
    async fn scale(&self, cx: &CallContext, runtime: &Runtime, target: &Resources) -> Result<String, BackendError>;
    async fn snapshot(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        snapshot_id: &str,
        name: &str,
    ) -> Result<String, BackendError>;
    async fn restore(&self, cx: &CallContext, runtime: &Runtime, snapshot_id: &str) -> Result<String, BackendError>;
    /// Runs an approved command in the runtime to its end, at most once; `Ok` with what it
    /// printed when it exits 0, a permanent error with its exit code otherwise (only drivers
    /// whose capabilities include `exec`).
    async fn run_command(&self, _: &CallContext, _: &Runtime, _: &ExecRequest) -> Result<String, BackendError> {
        Err(BackendError::Unsupported(format!("{} runtimes take no commands", self.driver())))
    }
    /// Replaces the runtime's pods one at a time (only drivers whose capabilities say so).
    async fn rollout_restart(&self, _: &CallContext, _: &Runtime) -> Result<String, BackendError> {
        Err(BackendError::Unsupported(format!("{} runtimes have no rollout", self.driver())))
    }
    /// Freezes a running runtime, keeping its memory (only drivers whose capabilities say so).
    async fn pause(&self, _: &CallContext, _: &Runtime) -> Result<String, BackendError> {
        Err(BackendError::Unsupported(format!("{} runtimes cannot pause", self.driver())))
    }
    /// Thaws a paused runtime.
    async fn resume(&self, _: &CallContext, _: &Runtime) -> Result<String, BackendError> {
        Err(BackendError::Unsupported(format!("{} runtimes cannot resume", self.driver())))
    }
    /// Cold migration, on the runtime's node: stops it (SIGKILL or power-off after `timeout`)
    /// and packs what only this node holds of it (its writable data, its snapshots) into the
    /// file `into`. Repeatable: a transfer cut off asks again. Only drivers whose capabilities
    /// include `migrate`.
    async fn export(
        &self,
        _: &CallContext,
        _: &Runtime,
        _: std::time::Duration,
        _: &Path,
    ) -> Result<String, BackendError> {
        Err(BackendError::Unsupported(format!("{} runtimes cannot migrate", self.driver())))
    }
    /// On a migration's destination: makes the runtime from an [`RuntimeBackend::export`]
    /// (`from`), or afresh from its spec (`None`: rebuilt, its node lost), and starts it if
    /// `run`.
    async fn import(
        &self,
        _: &CallContext,
        _: &Runtime,
        _: &Resources,
        _: Option<&Path>,
        _run: bool,
    ) -> Result<String, BackendError> {
        Err(BackendError::Unsupported(format!("{} runtimes cannot migrate", self.driver())))
    }
    /// The runtimes this node holds something of (the executor removes what a migration left
    /// behind); none for a shared backend.
    async fn held(&self) -> Vec<String> {
        Vec::new()
    }
    /// Removes what this node holds of a runtime that is placed on another node now, touching
    /// nothing of that node's (which may share this host).
    async fn release(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.delete(cx, runtime).await
    }
    /// The snapshot ids the backend holds for the runtime.
    async fn list_snapshots(&self, runtime: &Runtime) -> Result<Vec<String>, BackendError>;
    /// What the backend has of the runtime now.
    async fn status(&self, runtime: &Runtime) -> Result<Observed, BackendError>;
    /// The node is shutting down cleanly: release what must not outlive it.
    async fn shutdown(&self) {}
}

/// Carries out one action through the contract. `runtime` is the record before the action;
/// the target of a scale is resolved against the catalogue here.
pub async fn execute(
    backend: &dyn RuntimeBackend,
    cx: &CallContext,
    runtime: &Runtime,
    action: &LifecycleAction,
    sizes: &[SizeEntry],
) -> Result<String, BackendError> {
    if !matches!(action, LifecycleAction::Create | LifecycleAction::Delete)
        && !action.kind().record_only()
        && !backend.capabilities().contains(&action.kind())
    {
        return Err(BackendError::Unsupported(format!("{} runtimes cannot {}", backend.driver(), action.kind())));
    }
    match action {
        LifecycleAction::Create => backend.create(cx, runtime, &Resources::of(runtime, sizes)).await,
        LifecycleAction::Delete => backend.delete(cx, runtime).await,
        LifecycleAction::Start => backend.start(cx, runtime).await,
        LifecycleAction::Stop { force, timeout_seconds } => {
            let timeout = std::time::Duration::from_secs(timeout_seconds.unwrap_or(30));
            backend.stop(cx, runtime, *force, timeout).await
        }
        LifecycleAction::Restart => backend.restart(cx, runtime).await,
        LifecycleAction::Scale { .. } => {
            let mut target = runtime.clone();
            action.apply_to_spec(&mut target.spec);
            backend.scale(cx, runtime, &Resources::of(&target, sizes)).await
        }
        LifecycleAction::Snapshot { snapshot_id, name, .. } => backend.snapshot(cx, runtime, snapshot_id, name).await,
        LifecycleAction::Restore { snapshot_id } => backend.restore(cx, runtime, snapshot_id).await,
        LifecycleAction::RolloutRestart => backend.rollout_restart(cx, runtime).await,
        LifecycleAction::Pause => backend.pause(cx, runtime).await,
        LifecycleAction::Resume => backend.resume(cx, runtime).await,
        LifecycleAction::Sequence { .. } => {
            Err(BackendError::Permanent("a sequence reaches the backend one action at a time".into()))
        }
        LifecycleAction::Relabel { .. } => {
            Err(BackendError::Permanent("a relabel changes only the record; no backend carries it out".into()))
        }
        LifecycleAction::Exec { request } => backend.run_command(cx, runtime, request).await,
        // Applied to the record when the operation succeeds.
        LifecycleAction::Migrate { .. } => {
            Err(BackendError::Permanent("a migration is carried out by its destination's executor".into()))
        }
        // Applied to the record when the operation succeeds.
        LifecycleAction::AttachObserver { webhook } => Ok(format!("observer {} subscribed", webhook.id)),
        LifecycleAction::DetachObserver { webhook_id } => Ok(format!("observer {webhook_id} unsubscribed")),
        LifecycleAction::TunePolicy { policy } => {
            let mode = policy.mode.map_or("none", |m| m.as_str());
            let budget = policy.max_cost_per_hour.map_or("none".to_string(), |b| format!("{b:.2}/h"));
            Ok(format!("its own policy: mode {mode}, budget {budget}"))
        }
    }
}

/// The backends of one node, by runtime type.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    by_type: HashMap<RuntimeType, Arc<dyn RuntimeBackend>>,
}

impl Backends {
    pub fn insert(&mut self, runtime_type: RuntimeType, backend: Arc<dyn RuntimeBackend>) {
        self.by_type.insert(runtime_type, backend);
    }

    pub fn get(&self, runtime_type: RuntimeType) -> Option<&Arc<dyn RuntimeBackend>> {
        self.by_type.get(&runtime_type)
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// Each driver once, though it may serve several types.
    pub fn distinct(&self) -> Vec<Arc<dyn RuntimeBackend>> {
        let mut seen: Vec<*const ()> = Vec::new();
        let mut drivers = Vec::new();
        for backend in self.by_type.values() {
            let key = Arc::as_ptr(backend) as *const ();
            if !seen.contains(&key) {
                seen.push(key);
                drivers.push(backend.clone());
            }
        }
        drivers
    }

    /// Tells every driver the node is shutting down.
    pub async fn shutdown(&self) {
        for backend in self.distinct() {
            backend.shutdown().await;
        }
    }

    /// What this node announces to the cluster.
    pub fn info(&self) -> Vec<BackendInfo> {
        let mut info: Vec<BackendInfo> = self
            .by_type
            .iter()
            .map(|(runtime_type, backend)| BackendInfo {
                runtime_type: runtime_type.as_str().to_string(),
                driver: backend.driver().to_string(),
                shared: backend.shared(),
                capabilities: backend.capabilities().iter().map(|c| c.to_string()).collect(),
            })
            .collect();
        info.sort_by(|a, b| a.runtime_type.cmp(&b.runtime_type));
        info
    }
}

/// Checks drivers' tests share.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;

    /// Exports `runtime` for a migration with fencing token `token` into `into` and checks what
    /// every driver must do: the runtime is stopped, and an executor with an older token is
    /// refused. Returns what the export said.
    pub(crate) async fn export_fenced(
        backend: &dyn RuntimeBackend,
        runtime: &Runtime,
        into: &Path,
        token: u64,
    ) -> String {
        let exporting = CallContext { operation_id: "op_move:export".into(), step: 0, token };
        let said = backend.export(&exporting, runtime, std::time::Duration::from_secs(5), into).await.unwrap();
        assert_eq!(backend.status(runtime).await.unwrap(), Observed::Stopped, "stopped for the export");
        let stale = CallContext { token: token - 1, ..exporting };
        let fenced = backend.export(&stale, runtime, std::time::Duration::from_secs(5), into).await.unwrap_err();
        assert!(matches!(fenced, BackendError::Fenced { .. }), "{fenced}");
        said
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_come_from_the_spec_or_its_size() {
        let sizes = runtimeai_model::default_sizes();
        let mut runtime = Runtime::new("rt", "r", RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH);
        runtime.spec.size = Some("large".into());
        assert_eq!(Resources::of(&runtime, &sizes), Resources { cpu: 4.0, memory_bytes: 8 << 30, replicas: 2 });
        runtime.spec.resources =
            Some(runtimeai_model::ResourceProfile { memory: Some("512Mi".into()), ..Default::default() });
        assert_eq!(Resources::of(&runtime, &sizes).memory_bytes, 512 << 20);
    }
}
