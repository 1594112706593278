//! What an executor calls to change infrastructure. Every call carries the operation id, the
//! step (the action's index in the operation) and the fencing token of the assignment, so a
//! backend can make retries converge (invariant 5) and refuse a superseded executor
//! (invariant 4).
//!
//! The one driver today is [`SimulatedBackend`]: it changes no real infrastructure, but it
//! behaves like a fenced, idempotent backend should, with its state in a directory that several
//! nodes may share (as they would share a hypervisor or an API server): the highest token seen
//! per operation, a marker per applied step, and a journal with one line per applied step. The
//! libvirt, Kubernetes and sandbox drivers replace it per runtime type.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use runtimeai_engine::Catalogue;
use runtimeai_model::{LifecycleAction, Runtime, RuntimeSignals, RuntimeState, SizeEntry};

/// One backend call.
#[derive(Debug, Clone)]
pub struct BackendCall {
    pub operation_id: String,
    /// The action's index within its operation.
    pub step: u32,
    /// The fencing token of the executor's assignment.
    pub token: u64,
    pub runtime: Runtime,
    pub action: LifecycleAction,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A newer assignment of the operation has reached the backend: this executor must stop.
    #[error("fenced: token {token} is older than {newer}, held by a newer executor")]
    Fenced { token: u64, newer: u64 },
    /// The action failed; the operation fails with this message.
    #[error("{0}")]
    Failed(String),
    #[error("backend I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The backends a node drives.
#[derive(Debug, Clone)]
pub enum Backend {
    Simulated(SimulatedBackend),
}

impl Backend {
    /// Carries out one action; `Ok` holds a message for the operation's progress.
    pub async fn execute(&self, call: BackendCall) -> Result<String, BackendError> {
        match self {
            Backend::Simulated(backend) => backend.execute(call).await,
        }
    }

    /// What the backend observes of a runtime now.
    pub async fn observe(&self, runtime: &Runtime, sizes: &[SizeEntry], node_id: u64) -> RuntimeSignals {
        match self {
            Backend::Simulated(backend) => backend.observe(runtime, sizes, node_id),
        }
    }
}

/// A stand-in driver with the contract of a real one (see the module docs).
#[derive(Debug, Clone)]
pub struct SimulatedBackend {
    pub dir: PathBuf,
    /// How long one call takes.
    pub step: Duration,
    pub node_id: u64,
}

impl SimulatedBackend {
    pub fn new(dir: PathBuf, step: Duration, node_id: u64) -> std::io::Result<SimulatedBackend> {
        std::fs::create_dir_all(dir.join("fence"))?;
        std::fs::create_dir_all(dir.join("done"))?;
        Ok(SimulatedBackend { dir, step, node_id })
    }

    /// The journal: one line per step applied, across every node sharing the directory.
    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    async fn execute(&self, call: BackendCall) -> Result<String, BackendError> {
        // The work itself: an executor killed now leaves nothing behind.
        tokio::time::sleep(self.step).await;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.commit(&call))
            .await
            .map_err(|e| BackendError::Failed(format!("backend task: {e}")))?
    }

    /// Under a lock shared by every process using the directory: check the fence, then apply
    /// the step once.
    fn commit(&self, call: &BackendCall) -> Result<String, BackendError> {
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(self.dir.join("lock"))?;
        lock.lock()?;
        let fence = self.dir.join("fence").join(&call.operation_id);
        let newest: u64 = std::fs::read_to_string(&fence).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        if call.token < newest {
            return Err(BackendError::Fenced { token: call.token, newer: newest });
        }
        if call.token > newest {
            std::fs::write(&fence, call.token.to_string())?;
        }
        let marker = self.dir.join("done").join(format!("{}.{}", call.operation_id, call.step));
        if marker.exists() {
            return Ok(format!("{} already applied (a retry converges)", call.action.kind()));
        }
        let mut journal = std::fs::OpenOptions::new().create(true).append(true).open(self.journal_path())?;
        writeln!(
            journal,
            "applied operation={} step={} action={} runtime={} token={} node={}",
            call.operation_id,
            call.step,
            call.action.kind(),
            call.runtime.id,
            call.token,
            self.node_id
        )?;
        journal.sync_data()?;
        std::fs::write(&marker, b"")?;
        Ok(format!("{} done by the simulated driver on node {}", call.action.kind(), self.node_id))
    }

    /// The simulated driver knows what it was asked for, not how the workload behaves: cpu
    /// and memory are the allocation, there is no latency figure.
    fn observe(&self, runtime: &Runtime, sizes: &[SizeEntry], node_id: u64) -> RuntimeSignals {
        let catalogue = Catalogue::new(sizes);
        let size = sizes.get(catalogue.effective_index(&runtime.spec));
        let replicas = catalogue.replicas(&runtime.spec) as f64;
        let running = matches!(runtime.state, RuntimeState::Running | RuntimeState::Degraded);
        let resources = runtime.spec.resources.as_ref();
        let cpu = resources.and_then(|r| r.cpu).or(size.map(|s| s.cpu)).unwrap_or(0.0) * replicas;
        let memory = resources.and_then(|r| r.memory.clone()).or(size.map(|s| s.memory.clone())).unwrap_or_default();
        let health = match runtime.state {
            RuntimeState::Running => "healthy",
            RuntimeState::Degraded => "degraded",
            RuntimeState::Error => "unhealthy",
            _ => "stopped",
        };
        RuntimeSignals {
            cpu: if running { cpu } else { 0.0 },
            memory,
            health: health.to_string(),
            cost_per_hour: catalogue.cost(runtime),
            latency_ms: None,
            observed_at: chrono::Utc::now(),
            node_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(token: u64, step: u32) -> BackendCall {
        BackendCall {
            operation_id: "op_1".into(),
            step,
            token,
            runtime: Runtime {
                state: RuntimeState::Running,
                ..Runtime::new("rt_1", "r", runtimeai_model::RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH)
            },
            action: LifecycleAction::Restart,
        }
    }

    #[tokio::test]
    async fn steps_apply_once_and_older_tokens_are_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SimulatedBackend::new(dir.path().to_path_buf(), Duration::from_millis(1), 1).unwrap();
        backend.execute(call(5, 0)).await.unwrap();
        let again = backend.execute(call(5, 0)).await.unwrap();
        assert!(again.contains("already applied"), "{again}");
        backend.execute(call(9, 1)).await.unwrap();
        let fenced = backend.execute(call(5, 2)).await.unwrap_err();
        assert!(matches!(fenced, BackendError::Fenced { token: 5, newer: 9 }), "{fenced}");
        let journal = std::fs::read_to_string(backend.journal_path()).unwrap();
        assert_eq!(journal.lines().count(), 2, "{journal}");
    }
}
