//! A stand-in driver with the contract of a real one: it changes no infrastructure, but it is
//! fenced and idempotent through a [`StepLedger`] in a directory several nodes may share (as they
//! would share a hypervisor or an API server), and it keeps a journal with one line per applied
//! step, which tests count. It knows what it was asked for, not how a workload behaves: its
//! status is the replicated record's, its cpu and memory the allocation, and it has no latency.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use runtimeai_model::{ActionKind, Runtime, RuntimeState, RuntimeType};

use super::{BackendError, CallContext, LockedLedger, Observed, Resources, RuntimeBackend, Step, StepLedger};

#[derive(Debug, Clone)]
pub struct SimulatedBackend {
    ledger: StepLedger,
    /// The journal, open for appending (every step writes a line; reopening it per step showed
    /// in profiles).
    journal: Arc<File>,
    /// How long one call takes.
    step: Duration,
    node_id: u64,
    /// What the real driver of the runtime type it stands in for can do.
    capabilities: &'static [ActionKind],
}

impl SimulatedBackend {
    pub fn new(dir: PathBuf, step: Duration, node_id: u64) -> std::io::Result<SimulatedBackend> {
        let ledger = StepLedger::open(dir)?;
        let journal = Arc::new(OpenOptions::new().create(true).append(true).open(journal_in(ledger.dir()))?);
        Ok(SimulatedBackend { ledger, journal, step, node_id, capabilities: super::LIFECYCLE_AND_PAUSE })
    }

    /// The driver standing in for `runtime_type`'s, with what that one can do (a vcluster rolls
    /// out, a VM or sandbox pauses); the ledger and journal are shared.
    pub fn serving(&self, runtime_type: RuntimeType) -> SimulatedBackend {
        let capabilities = match runtime_type {
            RuntimeType::Vcluster => super::VCLUSTER,
            RuntimeType::Vm | RuntimeType::Sandbox | RuntimeType::AgentRuntime => super::PAUSE_AND_MIGRATE,
        };
        SimulatedBackend { capabilities, ..self.clone() }
    }

    /// The journal: one line per step applied, across every node sharing the directory.
    pub fn journal_path(&self) -> PathBuf {
        journal_in(self.ledger.dir())
    }

    async fn apply(&self, cx: &CallContext, runtime: &Runtime, action: &str) -> Result<String, BackendError> {
        // The work itself: an executor killed now leaves nothing behind.
        tokio::time::sleep(self.step).await;
        // The ledger's part is a few microseconds of page-cache reads and writes under its lock;
        // handing it to a blocking thread cost more than the work (about 5 % of a node's CPU
        // under load). So it runs here, unless another thread or process holds the ledger: only
        // then is the wait moved to a blocking thread.
        if let Some(ledger) = self.ledger.try_lock()? {
            return self.record(ledger, cx, &runtime.id, action);
        }
        let (this, cx, runtime_id, action) = (self.clone(), cx.clone(), runtime.id.clone(), action.to_string());
        tokio::task::spawn_blocking(move || this.record(this.ledger.lock()?, &cx, &runtime_id, &action))
            .await
            .map_err(|e| BackendError::Retryable(format!("backend task: {e}")))?
    }

    /// Applies the step through the ledger: the journal line is the work.
    fn record(
        &self,
        ledger: LockedLedger<'_>,
        cx: &CallContext,
        runtime_id: &str,
        action: &str,
    ) -> Result<String, BackendError> {
        let entry = format!("applied operation={} step={} ", cx.operation_id, cx.step);
        // A step cut off by a crash after its work looks at the journal (the pretend
        // infrastructure), as a real driver would look at its hypervisor.
        let in_journal = || {
            let journal = std::fs::read_to_string(self.journal_path()).unwrap_or_default();
            Ok(journal.lines().any(|line| line.starts_with(&entry)))
        };
        let (step, _) = ledger.run_probed(cx, in_journal, || {
            // Not fsync'd: the journal stands for infrastructure outside this process, and it
            // has to outlive a killed process, not a machine. One write per line, in append
            // mode: lines from nodes sharing the journal do not interleave.
            let line =
                format!("{entry}action={action} runtime={runtime_id} token={} node={}\n", cx.token, self.node_id);
            (&*self.journal).write_all(line.as_bytes())?;
            Ok(())
        })?;
        Ok(match step {
            Step::AlreadyApplied => format!("{action} already applied (a retry converges)"),
            Step::Fresh => format!("{action} done by the simulated driver on node {}", self.node_id),
        })
    }
}

/// What the simulated driver exports of a runtime.
fn export_of(runtime: &Runtime) -> Vec<u8> {
    format!("simulated export of {}\n", runtime.id).into_bytes()
}

/// Where the journal of a ledger directory is.
fn journal_in(dir: &std::path::Path) -> PathBuf {
    dir.join("journal")
}

#[async_trait::async_trait]
impl RuntimeBackend for SimulatedBackend {
    fn driver(&self) -> &'static str {
        "simulated"
    }

    fn shared(&self) -> bool {
        true
    }

    fn capabilities(&self) -> &'static [ActionKind] {
        self.capabilities
    }

    async fn create(&self, cx: &CallContext, runtime: &Runtime, _: &Resources) -> Result<String, BackendError> {
        self.apply(cx, runtime, "create").await
    }

    async fn delete(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.apply(cx, runtime, "delete").await
    }

    async fn start(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.apply(cx, runtime, "start").await
    }

    async fn stop(&self, cx: &CallContext, runtime: &Runtime, _: bool, _: Duration) -> Result<String, BackendError> {
        self.apply(cx, runtime, "stop").await
    }

    async fn restart(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.apply(cx, runtime, "restart").await
    }

    async fn scale(&self, cx: &CallContext, runtime: &Runtime, _: &Resources) -> Result<String, BackendError> {
        self.apply(cx, runtime, "scale").await
    }

    async fn snapshot(&self, cx: &CallContext, runtime: &Runtime, _: &str, _: &str) -> Result<String, BackendError> {
        self.apply(cx, runtime, "snapshot").await
    }

    async fn restore(&self, cx: &CallContext, runtime: &Runtime, _: &str) -> Result<String, BackendError> {
        self.apply(cx, runtime, "restore").await
    }

    async fn pause(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.apply(cx, runtime, "pause").await
    }

    async fn rollout_restart(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.apply(cx, runtime, "rollout_restart").await
    }

    async fn resume(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.apply(cx, runtime, "resume").await
    }

    async fn export(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        _: Duration,
        into: &Path,
    ) -> Result<String, BackendError> {
        std::fs::write(into, export_of(runtime))?;
        self.apply(cx, runtime, "export").await
    }

    async fn import(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        _: &Resources,
        from: Option<&Path>,
        _: bool,
    ) -> Result<String, BackendError> {
        if let Some(from) = from {
            let export = std::fs::read(from)?;
            if export != export_of(runtime) {
                return Err(BackendError::Permanent(format!("the export is not runtime {}'s", runtime.id)));
            }
        }
        self.apply(cx, runtime, if from.is_some() { "import" } else { "rebuild" }).await
    }

    async fn list_snapshots(&self, runtime: &Runtime) -> Result<Vec<String>, BackendError> {
        Ok(runtime.snapshots.iter().map(|s| s.id.clone()).collect())
    }

    async fn status(&self, runtime: &Runtime) -> Result<Observed, BackendError> {
        Ok(match runtime.state {
            RuntimeState::Running | RuntimeState::Degraded => {
                Observed::Running { cpu: None, disk_bytes: None, memory_bytes: 0, latency_ms: None }
            }
            RuntimeState::Error => Observed::Failed("the runtime is in error".into()),
            RuntimeState::Paused => Observed::Paused,
            _ => Observed::Stopped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn steps_apply_once_and_older_tokens_are_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SimulatedBackend::new(dir.path().to_path_buf(), Duration::from_millis(1), 1).unwrap();
        let runtime = Runtime::new("rt_1", "r", runtimeai_model::RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH);
        let cx = |token, step| CallContext { operation_id: "op_1".into(), step, token };
        backend.restart(&cx(5, 0), &runtime).await.unwrap();
        let again = backend.restart(&cx(5, 0), &runtime).await.unwrap();
        assert!(again.contains("already applied"), "{again}");
        backend.restart(&cx(9, 1), &runtime).await.unwrap();
        let fenced = backend.restart(&cx(5, 2), &runtime).await.unwrap_err();
        assert!(matches!(fenced, BackendError::Fenced { token: 5, newer: 9 }), "{fenced}");
        let journal = std::fs::read_to_string(backend.journal_path()).unwrap();
        assert_eq!(journal.lines().count(), 2, "{journal}");
    }

    #[tokio::test]
    async fn a_crash_between_the_work_and_its_record_does_not_apply_the_step_twice() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SimulatedBackend::new(dir.path().to_path_buf(), Duration::from_millis(1), 1).unwrap();
        let runtime = Runtime::new("rt_1", "r", runtimeai_model::RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH);
        let cx = CallContext { operation_id: "op_1".into(), step: 0, token: 5 };
        backend.restart(&cx, &runtime).await.unwrap();
        // What an executor killed right after the journal line leaves: the step pending, not done.
        let ledger = dir.path().join("ledger");
        let records = std::fs::read_to_string(&ledger).unwrap();
        assert!(records.ends_with("done op_1 0\n"), "{records}");
        std::fs::write(&ledger, records.trim_end_matches("done op_1 0\n")).unwrap();
        let backend = SimulatedBackend::new(dir.path().to_path_buf(), Duration::from_millis(1), 1).unwrap();
        backend.restart(&cx, &runtime).await.unwrap();
        let journal = std::fs::read_to_string(backend.journal_path()).unwrap();
        assert_eq!(journal.lines().count(), 1, "{journal}");
        let again = backend.restart(&cx, &runtime).await.unwrap();
        assert!(again.contains("already applied"), "recorded as done now: {again}");
    }
}
