//! A stand-in executor until real backends land: on the leader, it walks every active
//! operation through `queued → running → succeeded`, one step per tick, through raft like any
//! other change. It touches no infrastructure; it exists so the API's asynchronous contract can
//! be used and tested end to end, and it is replaced, not kept, by the scheduler and backends.

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use runtimeai_model::{Actor, OperationProgress, OperationStatus};
use runtimeai_raft::{Command, Op, Replica};

/// Runs until `stop` turns true.
pub async fn run_simulated(replica: Arc<Replica>, step: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(step) => {}
        }
        if replica.metrics().state != ServerState::Leader {
            continue;
        }
        let operations = match replica.state.active_operations() {
            Ok(operations) => operations,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the operation queue");
                continue;
            }
        };
        for operation in operations {
            let (status, percent, message) = match operation.status {
                OperationStatus::Queued => (OperationStatus::Running, 50, "simulated backend: working"),
                OperationStatus::Running => (OperationStatus::Succeeded, 100, "simulated backend: done"),
                _ => continue,
            };
            let command = Command {
                at: chrono::Utc::now(),
                actor: Actor::System,
                idempotency: None,
                op: Op::AdvanceOperation {
                    operation_id: operation.id.clone(),
                    status,
                    progress: Some(OperationProgress { percent, message: Some(message.into()) }),
                    error: None,
                },
            };
            // A rejection here means the operation moved on meanwhile (e.g. it was cancelled).
            if let Err(e) = replica.propose(command).await {
                tracing::debug!(operation = %operation.id, error = %e, "cannot advance operation");
            }
        }
    }
}
