//! The executor every node runs: it works the operations the leader assigned to this node, and
//! reports its runtimes' signals.
//!
//! For each assignment (operation + fencing token) it starts one worker, which renews the
//! lease, marks the operation `running`, calls the backend for each action not yet completed
//! (checking before each call that the assignment is still its own), reports progress after
//! each, and ends the operation. Every report carries the token, so apply refuses the reports
//! of an executor that was superseded; the backend refuses its calls too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use runtimeai_api::new_id;
use runtimeai_engine::Catalogue;
use runtimeai_model::{
    Actor, ClusterSettings, Expiry, LifecycleAction, Operation, OperationError, OperationProgress, OperationStatus,
    Runtime, RuntimeSignals, RuntimeState, SizeEntry,
};
use runtimeai_raft::command::{AdvanceOperation, ExpireRuntime, RecordDrift, RenewLease, ReportSignals};
use runtimeai_raft::{ClusterError, Command, CommandReply, Op, Rejection, Replica};
use tokio::sync::watch;

use crate::backend::{self, BackendError, Backends, CallContext, Observed, Resources, RuntimeBackend};
use crate::migration::Arrival;

#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    pub node_id: u64,
    /// The lease the leader grants; the worker renews it every third of it.
    pub lease: Duration,
    pub signals_interval: Duration,
    /// Where migrations' exports are kept while they pass through this node.
    pub staging: std::path::PathBuf,
}

/// Runs until `stop` turns true. Signals rounds run beside the operations, in a task of their
/// own: a round over a node's hundreds of thousands of runtimes takes a while, and the
/// operations assigned meanwhile must not wait for it.
pub async fn run(replica: Arc<Replica>, backends: Backends, options: ExecutorOptions, mut stop: watch::Receiver<bool>) {
    let signals =
        tokio::spawn(report_signals_every_interval(replica.clone(), backends.clone(), options.clone(), stop.clone()));
    let mut workers: HashMap<String, (u64, tokio::task::JoinHandle<()>)> = HashMap::new();
    // Woken by every change to the unfinished operations; the tick restarts, now and then,
    // a worker that gave up while the cluster was unreachable.
    let mut changed = replica.state().watch_active_operations();
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            _ = changed.changed() => {}
            _ = retry.tick() => {}
        };
        changed.mark_unchanged();
        workers.retain(|_, (_, handle)| !handle.is_finished());
        // Only the operations this node is not already working on at their current token are
        // copied out (a wake per applied batch must not copy every operation in flight).
        let node_id = options.node_id;
        let new_work = replica.state().active_operations_where(|operation| {
            let Some(assignment) = &operation.assignment else { return false };
            assignment.node_id == node_id
                && matches!(operation.status, OperationStatus::Queued | OperationStatus::Running)
                && workers.get(&operation.id).is_none_or(|(token, _)| *token != assignment.token)
        });
        for operation in new_work {
            let Some(assignment) = &operation.assignment else { continue };
            let token = assignment.token;
            tracing::debug!(operation = %operation.id, token, attempt = operation.attempts, "executing");
            let worker = Worker {
                replica: replica.clone(),
                backends: backends.clone(),
                options: options.clone(),
                operation_id: operation.id.clone(),
                token,
            };
            // Boxed: the task then holds a pointer, not the whole (large) future, which tokio
            // would otherwise copy as the task starts and ends.
            let handle = tokio::spawn(Box::pin(worker.run()));
            if let Some((_, old)) = workers.insert(operation.id.clone(), (token, handle)) {
                old.abort();
            }
        }
    }
    for (_, (_, handle)) in workers {
        handle.abort();
    }
    signals.abort();
}

/// Runtimes looked at per page of a signals round (and at most this many signals per command).
const SIGNALS_PAGE: usize = 512;

/// A signals round every `signals_interval` (from the start of one to the next; a round that
/// takes longer is followed by the next at once), until `stop` turns true (or the executor
/// aborts it, mid-round).
async fn report_signals_every_interval(
    replica: Arc<Replica>,
    backends: Backends,
    options: ExecutorOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut signals = tokio::time::interval(options.signals_interval);
    signals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = signals.tick() => {}
        }
        report_signals(&replica, &backends, &options).await;
    }
}

/// Proposes the signals of this node's runtimes that changed since they were last recorded, the
/// drift it converged, and the expiry of those whose TTL or idle timeout ran out. A page of
/// runtimes at a time: a node holding hundreds of thousands neither reads them all into memory
/// at once nor proposes one command the size of all their signals.
///
/// A round is background work and is paced as such: the runtimes of a page are looked at one
/// poll each, and after a page the round rests as long as the page took. At a million runtimes
/// an unpaced round took the async workers for seconds on every node at once, raft's
/// heartbeats waited behind it, and followers started elections.
async fn report_signals(replica: &Replica, backends: &Backends, options: &ExecutorOptions) {
    crate::migration::remove_left_behind(replica, backends, options.node_id).await;
    let settings = replica.state().settings();
    let round = std::time::Instant::now();
    let (mut looked_at, mut reported) = (0, 0);
    let mut after = String::new();
    loop {
        let started = std::time::Instant::now();
        let Some(page) = read_signals_page(replica, options.node_id, &after) else { break };
        let Some(last) = page.last().map(|r| r.id.clone()) else { break };
        let full = page.len() == SIGNALS_PAGE;
        looked_at += page.len();
        let mut changed = Vec::new();
        for runtime in page {
            if let Some(signals) = look_at(replica, backends, options, &settings, &runtime).await {
                changed.push((runtime.id, signals));
            }
            tokio::task::yield_now().await;
        }
        reported += changed.len();
        propose_signals(replica, changed).await;
        if !full {
            break;
        }
        after = last;
        tokio::time::sleep(started.elapsed()).await;
    }
    let took = round.elapsed();
    if took > options.signals_interval {
        tracing::info!(
            runtimes = looked_at,
            reported,
            seconds = took.as_secs_f64(),
            "a signals round took longer than --signals-interval-ms"
        );
    } else {
        tracing::debug!(runtimes = looked_at, reported, seconds = took.as_secs_f64(), "signals round");
    }
}

/// The page of this node's runtimes after `after` (None if the store cannot be read now; the
/// next round tries again). Read in place: a page is a few milliseconds of reads. On a thread
/// of the blocking pool (or with `block_in_place`, which hands the worker to a new thread),
/// every round ran on threads that came and went, and what the allocator kept of their heaps
/// took the nodes from ~0.5 to ~2 GiB resident during a round over 400 000 runtimes.
fn read_signals_page(replica: &Replica, node_id: u64, after: &str) -> Option<Vec<Runtime>> {
    match replica.state().runtimes_on_page(node_id, after, SIGNALS_PAGE) {
        Ok(page) => Some(page),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read this node's runtimes for their signals; the next round will");
            None
        }
    }
}

/// Observes one of this node's runtimes: converges drift, expires it when due, and returns its
/// signals if they changed since they were recorded.
async fn look_at(
    replica: &Replica,
    backends: &Backends,
    options: &ExecutorOptions,
    settings: &ClusterSettings,
    runtime: &Runtime,
) -> Option<RuntimeSignals> {
    if runtime.placement.as_ref().is_none_or(|p| p.node_id != options.node_id)
        || matches!(runtime.state, RuntimeState::Creating | RuntimeState::Deleting)
    {
        return None;
    }
    let backend = backends.get(runtime.runtime_type)?;
    let observed = match backend.status(runtime).await {
        Ok(observed) => observed,
        Err(e) => {
            tracing::debug!(runtime = %runtime.id, error = %e, "cannot observe the runtime now");
            return None;
        }
    };
    if runtime.active_operation.is_none() {
        if let Some(drift) = converge(backend.as_ref(), runtime, &observed, &settings.sizes).await {
            tracing::warn!(runtime = %runtime.id, observed = %drift.observed, action = %drift.action, "drift");
            let op = Op::RecordDrift(RecordDrift {
                runtime_id: runtime.id.clone(),
                observed: drift.observed,
                action: drift.action,
                state: drift.state,
            });
            if let Err(e) = replica.propose(system_command(op)).await {
                tracing::debug!(runtime = %runtime.id, error = %e, "cannot record drift now; next round will");
            }
            return None;
        }
        if let Some(expiry) = runtime.due(chrono::Utc::now()) {
            expire(replica, runtime, expiry).await;
        }
    }
    let signals = signals(runtime, &observed, &settings.sizes, options.node_id);
    let same = |old: &RuntimeSignals| RuntimeSignals { observed_at: old.observed_at, ..signals.clone() } == *old;
    (!runtime.signals.as_ref().is_some_and(same)).then_some(signals)
}

/// Records a page's changed signals in one command (none if nothing changed or no leader).
async fn propose_signals(replica: &Replica, changed: Vec<(String, RuntimeSignals)>) {
    if changed.is_empty() || replica.metrics().current_leader.is_none() {
        return;
    }
    let count = changed.len();
    let command = system_command(Op::ReportSignals(ReportSignals { signals: changed }));
    match replica.propose(command).await {
        Ok(_) => tracing::debug!(runtimes = count, "reported signals"),
        Err(e) => tracing::debug!(error = %e, "cannot report signals now; next round will"),
    }
}

/// Asks the cluster to act on a runtime whose TTL or idle timeout ran out (apply checks again
/// at the command's time, begins the delete or stop, and records why).
async fn expire(replica: &Replica, runtime: &Runtime, expiry: Expiry) {
    let op = Op::ExpireRuntime(ExpireRuntime { runtime_id: runtime.id.clone(), operation_id: new_id("op") });
    match replica.propose(system_command(op)).await {
        Ok(CommandReply::Operation(operation)) => {
            tracing::info!(runtime = %runtime.id, reason = ?expiry.reason, operation = %operation.id, "expired")
        }
        Ok(reply) => tracing::info!(runtime = %runtime.id, reason = ?expiry.reason, ?reply, "expired; not acted on"),
        Err(e) => tracing::debug!(runtime = %runtime.id, error = %e, "cannot expire the runtime now; next round will"),
    }
}

/// What an executor found and did about a runtime whose backend differs from its record.
struct Drift {
    observed: String,
    action: String,
    state: Option<RuntimeState>,
}

/// Compares what the backend has with what the record says, and converges where it can: a VM
/// or agent that should run is re-created or started, one that should not is stopped; a
/// sandbox whose command ended is recorded as stopped (or in error, if it failed). What cannot
/// be converged marks the runtime `degraded` or `error`. Never silent: every case is an event.
async fn converge(
    backend: &dyn RuntimeBackend,
    runtime: &Runtime,
    observed: &Observed,
    sizes: &[SizeEntry],
) -> Option<Drift> {
    use RuntimeState::*;
    let cx = CallContext {
        operation_id: format!("drift-{}-{}", runtime.id, chrono::Utc::now().timestamp_millis()),
        step: 0,
        token: 1,
    };
    let drift = |observed: &str, action: String, state: Option<RuntimeState>| {
        Some(Drift { observed: observed.into(), action, state })
    };
    let short_lived = runtime.runtime_type == runtimeai_model::RuntimeType::Sandbox;
    match (runtime.state, observed) {
        (Running | Degraded, Observed::Missing) => {
            match backend.create(&cx, runtime, &Resources::of(runtime, sizes)).await {
                Ok(_) => drift("missing from the backend", "re-created from the spec".into(), Some(Running)),
                Err(e) => drift("missing from the backend", format!("could not re-create it: {e}"), Some(Error)),
            }
        }
        (Running | Degraded, Observed::Stopped) if short_lived => {
            drift("its command ended", "recorded as stopped".into(), Some(Stopped))
        }
        (Running | Degraded, Observed::Failed(why)) if short_lived => {
            drift(why, "recorded as failed".into(), Some(Error))
        }
        // Reported once; starting again would not help a crash-looping control plane.
        (Degraded, Observed::Failed(_)) => None,
        (Running, Observed::Failed(why)) if backend.shared() => drift(why, "marked degraded".into(), Some(Degraded)),
        (Running | Degraded, Observed::Stopped | Observed::Failed(_)) => {
            let what = match observed {
                Observed::Failed(why) => why.clone(),
                _ => "not running".to_string(),
            };
            match backend.start(&cx, runtime).await {
                Ok(_) => drift(&what, "started again".into(), Some(Running)),
                Err(e) => drift(&what, format!("could not start it: {e}"), Some(Degraded)),
            }
        }
        (Degraded, Observed::Running { .. }) => drift("running again", "recorded as running".into(), Some(Running)),
        (Running | Degraded, Observed::Paused) => match backend.resume(&cx, runtime).await {
            Ok(_) => drift("paused though running", "resumed".into(), Some(Running)),
            Err(e) => drift("paused though running", format!("could not resume it: {e}"), Some(Degraded)),
        },
        (Paused, Observed::Running { .. }) => match backend.pause(&cx, runtime).await {
            Ok(_) => drift("running though paused", "paused again".into(), None),
            Err(e) => drift("running though paused", format!("could not pause it: {e}"), Some(Degraded)),
        },
        (Paused, Observed::Stopped) => drift("ended while paused", "recorded as stopped".into(), Some(Stopped)),
        (Paused, Observed::Failed(why)) => drift(why, "recorded as failed".into(), Some(Error)),
        (Paused, Observed::Missing) => drift("missing from the backend", "recorded as failed".into(), Some(Error)),
        (Stopped, Observed::Running { .. } | Observed::Paused) => {
            match backend.stop(&cx, runtime, true, Duration::from_secs(30)).await {
                Ok(_) => drift("running though stopped", "stopped again".into(), None),
                Err(e) => drift("running though stopped", format!("could not stop it: {e}"), Some(Degraded)),
            }
        }
        (Stopped, Observed::Missing) if !short_lived => {
            let created = backend.create(&cx, runtime, &Resources::of(runtime, sizes)).await;
            let stopped = match created {
                Ok(_) => backend.stop(&cx, runtime, true, Duration::from_secs(30)).await,
                Err(e) => Err(e),
            };
            match stopped {
                Ok(_) => drift("missing from the backend", "re-created from the spec, stopped".into(), None),
                Err(e) => drift("missing from the backend", format!("could not re-create it: {e}"), Some(Error)),
            }
        }
        _ => None,
    }
}

/// Bytes as a Kubernetes quantity, in the largest unit that keeps it exact enough to read.
fn quantity(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}Gi", b >> 30),
        b if b >= 16 << 20 => format!("{}Mi", b >> 20),
        b => format!("{}Ki", b >> 10),
    }
}

/// What the API shows of an observation: usage where the backend measures it (else the
/// allocation), health, and the cost of what runs.
fn signals(runtime: &Runtime, observed: &Observed, sizes: &[SizeEntry], node_id: u64) -> RuntimeSignals {
    let allocated = Resources::of(runtime, sizes);
    let (measured, disk_bytes, memory_bytes, latency_ms, health) = match observed {
        Observed::Running { cpu, disk_bytes, memory_bytes, latency_ms } => {
            let memory = if *memory_bytes > 0 { *memory_bytes } else { allocated.memory_bytes };
            (*cpu, *disk_bytes, memory, *latency_ms, "healthy")
        }
        Observed::Stopped => (None, None, 0, None, "stopped"),
        Observed::Paused => (None, None, 0, None, "paused"),
        Observed::Failed(_) => (None, None, 0, None, "unhealthy"),
        Observed::Missing => (None, None, 0, None, "missing"),
    };
    let cpu = match (measured, health) {
        // To a hundredth: the noise of a measurement below that would be a new report each round.
        (Some(used), _) => (used * 100.0).round() / 100.0,
        (None, "healthy") => allocated.cpu * allocated.replicas as f64,
        (None, _) => 0.0,
    };
    RuntimeSignals {
        cpu,
        cpu_measured: measured.is_some(),
        // To a MiB, for the same reason.
        disk_bytes: disk_bytes.map(|bytes| bytes >> 20 << 20),
        memory: quantity(memory_bytes),
        health: health.to_string(),
        cost_per_hour: if health == "healthy" { Catalogue::new(sizes).cost(runtime) } else { 0.0 },
        latency_ms,
        observed_at: chrono::Utc::now(),
        node_id,
    }
}

/// A command of this node's own machinery, proposed as the system.
pub(crate) fn system_command(op: Op) -> Command {
    Command { at: chrono::Utc::now(), actor: Actor::System, idempotency: None, op }
}

/// How long a first backend call runs before the operation is reported `running`.
const RUNNING_AFTER: Duration = Duration::from_millis(25);

/// Why a worker stops before the end.
enum Stop {
    /// The assignment is no longer ours (superseded, cancelled, finished): nothing to report.
    Superseded,
    /// The cluster did not take a report within the deadline; the lease will expire and the
    /// leader will hand the operation on.
    Unreachable(ClusterError),
}

struct Worker {
    replica: Arc<Replica>,
    backends: Backends,
    options: ExecutorOptions,
    operation_id: String,
    token: u64,
}

impl Worker {
    async fn run(self) {
        // The lease is renewed beside the work, in the same task: most operations end before
        // the first renewal is due, and a task of its own per operation showed in profiles.
        let work = self.work();
        tokio::pin!(work);
        let outcome = tokio::select! {
            outcome = &mut work => outcome,
            // The assignment was lost: the work finds out at its next check or report.
            () = renew_lease(&self.replica, &self.operation_id, self.token, self.options.lease) => work.await,
        };
        match outcome {
            Ok(status) => {
                tracing::debug!(operation = %self.operation_id, token = self.token, status, "operation ended")
            }
            Err(Stop::Superseded) => {
                tracing::info!(operation = %self.operation_id, token = self.token, "assignment superseded; stopping")
            }
            Err(Stop::Unreachable(e)) => {
                tracing::warn!(operation = %self.operation_id, error = %e, "cannot report; leaving it to the lease")
            }
        }
    }

    /// The operation as this node sees it, if the assignment is still ours.
    fn current(&self) -> Result<Operation, Stop> {
        match self.replica.state().active_operation(&self.operation_id) {
            Some(op) if op.assignment.as_ref().is_some_and(|a| a.token == self.token) => Ok(op),
            _ => Err(Stop::Superseded),
        }
    }

    async fn work(&self) -> Result<&'static str, Stop> {
        let operation = self.current()?;
        let steps = operation.action.steps().to_vec();
        let total = steps.len().max(1) as u32;
        // `running` is reported once the first call outlasts RUNNING_AFTER: a quick step goes
        // from `queued` straight to its outcome, one replicated write fewer.
        let mut running = operation.status != OperationStatus::Queued;
        let start = operation.completed_actions as usize;
        let mut last_message = "done".to_string();
        for (index, action) in steps.iter().enumerate().skip(start) {
            // Fencing, locally: the assignment must still be ours (and the operation not
            // cancelled) before every backend call. The local replica may lag behind our own
            // reports, so `queued` still counts.
            let operation = self.current()?;
            let runtime = match self.replica.state().get_runtime(&operation.runtime_id) {
                Ok(Some(runtime)) => runtime,
                _ => return Err(Stop::Superseded),
            };
            let cx = CallContext { operation_id: self.operation_id.clone(), step: index as u32, token: self.token };
            let call = self.call(&cx, &runtime, action);
            tokio::pin!(call);
            let outcome = if running {
                call.await
            } else {
                match tokio::time::timeout(RUNNING_AFTER, &mut call).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        let message = format!("started on node {}", self.options.node_id);
                        self.report(OperationStatus::Running, 0, message, None, None).await?;
                        call.await
                    }
                }
            };
            running = true;
            match outcome {
                // The last step's outcome goes with the success: one replicated write fewer.
                Ok(message) if index + 1 == steps.len() => last_message = message,
                Ok(message) => {
                    let completed = index as u32 + 1;
                    self.report(OperationStatus::Running, completed * 100 / total, message, Some(completed), None)
                        .await?;
                }
                Err(BackendError::Fenced { .. }) => return Err(Stop::Superseded),
                Err(e) => {
                    let code = match e {
                        BackendError::Unsupported(_) => "unsupported",
                        BackendError::Retryable(_) => "backend_unavailable",
                        _ => "backend_failed",
                    };
                    let error = OperationError { code: code.into(), message: e.to_string() };
                    let progress = format!("{} failed", action.kind());
                    self.report(
                        OperationStatus::Failed,
                        index as u32 * 100 / total,
                        progress,
                        None,
                        Some((index, error)),
                    )
                    .await?;
                    return Ok("failed");
                }
            }
        }
        self.report(OperationStatus::Succeeded, 100, last_message, Some(steps.len() as u32), None).await?;
        Ok("succeeded")
    }

    /// One backend call; retryable errors are retried with backoff (five tries, about 6 s).
    async fn call(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        action: &LifecycleAction,
    ) -> Result<String, BackendError> {
        let Some(backend) = self.backends.get(runtime.runtime_type) else {
            return Err(BackendError::Unsupported(format!(
                "node {} has no backend for {} runtimes",
                self.options.node_id,
                runtime.runtime_type.as_str()
            )));
        };
        let settings = self.replica.state().settings();
        let mut delay = Duration::from_millis(200);
        for attempt in 1.. {
            let outcome = match action {
                LifecycleAction::Migrate { rebuild, .. } => {
                    let arrival = Arrival {
                        replica: &self.replica,
                        backend: backend.as_ref(),
                        staging: &self.options.staging,
                        resources: Resources::of(runtime, &settings.sizes),
                    };
                    arrival.arrive(cx, runtime, *rebuild).await
                }
                action => backend::execute(backend.as_ref(), cx, runtime, action, &settings.sizes).await,
            };
            match outcome {
                Err(BackendError::Retryable(message)) if attempt < 5 => {
                    tracing::warn!(operation = %cx.operation_id, attempt, %message, "backend call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    self.current().map_err(|_| BackendError::Fenced { token: cx.token, newer: cx.token + 1 })?;
                }
                result => return result,
            }
        }
        unreachable!("the loop returns")
    }

    /// Proposes a report with the fencing token, retrying while the cluster is between leaders
    /// (bounded by the lease: past it, the operation is someone else's).
    async fn report(
        &self,
        status: OperationStatus,
        percent: u32,
        message: String,
        completed_actions: Option<u32>,
        failure: Option<(usize, OperationError)>,
    ) -> Result<(), Stop> {
        let (failed_action, error) = match failure {
            Some((index, error)) => (Some(index as u32), Some(error)),
            None => (None, None),
        };
        let op = Op::AdvanceOperation(AdvanceOperation {
            operation_id: self.operation_id.clone(),
            status,
            progress: Some(OperationProgress { percent: percent.min(100) as u8, message: Some(message) }),
            error,
            token: self.token,
            completed_actions,
            failed_action,
        });
        propose_until(&self.replica, op, self.options.lease * 3).await
    }
}

/// Proposes `op` until it is applied, refused (→ [`Stop::Superseded`]), or `deadline` passes.
async fn propose_until(replica: &Replica, op: Op, deadline: Duration) -> Result<(), Stop> {
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match replica.propose(system_command(op.clone())).await {
            Ok(CommandReply::Rejected(rejection)) => {
                tracing::debug!(%rejection, "report refused");
                return Err(Stop::Superseded);
            }
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() >= deadline => return Err(Stop::Unreachable(e)),
            Err(e) => {
                tracing::debug!(error = %e, "report not taken yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// Renews the lease every third of it; returns when the assignment is lost.
async fn renew_lease(replica: &Replica, operation_id: &str, token: u64, lease: Duration) {
    loop {
        tokio::time::sleep(lease / 3).await;
        let op = Op::RenewLease(RenewLease {
            operation_id: operation_id.to_string(),
            token,
            lease_ms: lease.as_millis() as u64,
        });
        match replica.propose(system_command(op)).await {
            Ok(CommandReply::Rejected(Rejection::StaleToken { .. } | Rejection::IllegalOperationStatus { .. })) => {
                return
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(operation = %operation_id, error = %e, "cannot renew the lease now"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_reads_as_a_quantity() {
        assert_eq!(super::quantity(2 << 30), "2Gi");
        assert_eq!(super::quantity(300 << 20), "300Mi");
        assert_eq!(super::quantity(700 << 10), "700Ki");
    }
}
