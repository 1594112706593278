//! Moving a runtime of a node-local backend (a sandbox, a VM) to another node.
//!
//! A migration is an operation its destination's executor carries out (the scheduler assigns
//! it there). Cold: the destination asks the runtime's node for an export over the members'
//! channel ([`runtimeai_api::on_host::export_call`]); that node checks the operation and the
//! token, stops the runtime, packs what only it holds ([`RuntimeBackend::export`]) and streams
//! it back in frames ending with the export's length and SHA-256; the destination checks both,
//! makes the runtime from it ([`RuntimeBackend::import`]) and starts it if it ran. Rebuilt (its
//! node lost, on an operator's request): the destination makes it afresh from its spec. The
//! operation's success moves the runtime's placement (in apply); each node then removes what it
//! still holds of runtimes placed elsewhere ([`remove_left_behind`]), so a node that comes back
//! after an evacuation does not run a second copy.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use runtimeai_model::{Runtime, RuntimeState};
use runtimeai_raft::Replica;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::backend::{BackendError, Backends, CallContext, Resources, RuntimeBackend};

/// Bytes per frame of an export (well below gRPC's message limit).
const CHUNK_BYTES: usize = 256 << 10;
/// How long the runtime's node waits for it to stop cleanly before it kills it.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One frame of an export stream: its first byte says what it is.
mod frame {
    /// Bytes of the export, in order.
    pub const DATA: u8 = b'D';
    /// The end: JSON `{"bytes": n, "sha256": "<hex>", "message": "..."}`.
    pub const END: u8 = b'E';
    /// The export failed: the reason, as text.
    pub const FAILED: u8 = b'F';
}

#[derive(serde::Serialize, serde::Deserialize)]
struct End {
    bytes: u64,
    sha256: String,
    message: String,
}

/// The context of the source's calls: the operation's, set apart from the destination's steps
/// (drivers that share a ledger between nodes would take the export for the import).
fn export_context(operation_id: &str, token: u64) -> CallContext {
    CallContext { operation_id: format!("{operation_id}:export"), step: 0, token }
}

/// The runtime's node's side: packs runtimes for their destinations.
pub struct Exports {
    backends: Backends,
    staging: PathBuf,
}

impl Exports {
    pub fn new(backends: Backends, staging: PathBuf) -> Exports {
        Exports { backends, staging }
    }
}

#[async_trait::async_trait]
impl runtimeai_api::RuntimeExports for Exports {
    async fn export(
        &self,
        runtime: &Runtime,
        operation_id: &str,
        token: u64,
    ) -> Result<mpsc::Receiver<Vec<u8>>, String> {
        let backend = self
            .backends
            .get(runtime.runtime_type)
            .ok_or_else(|| format!("this node has no backend for {} runtimes", runtime.runtime_type.as_str()))?
            .clone();
        std::fs::create_dir_all(&self.staging).map_err(|e| format!("cannot make {}: {e}", self.staging.display()))?;
        let file = self.staging.join(format!("{operation_id}.out"));
        let cx = export_context(operation_id, token);
        let message = backend.export(&cx, runtime, STOP_TIMEOUT, &file).await.map_err(|e| e.to_string())?;
        tracing::info!(runtime = %runtime.id, operation = operation_id, %message, "exported for its migration");
        let (frames, answer) = mpsc::channel(4);
        tokio::spawn(async move {
            if let Err(e) = send(&file, message, &frames).await {
                let _ = frames.send([&[frame::FAILED][..], e.to_string().as_bytes()].concat()).await;
            }
            let _ = tokio::fs::remove_file(&file).await;
        });
        Ok(answer)
    }
}

/// Streams `file` as frames, then its end.
async fn send(file: &Path, message: String, frames: &mpsc::Sender<Vec<u8>>) -> std::io::Result<()> {
    let mut reader = tokio::fs::File::open(file).await?;
    let (mut digest, mut bytes) = (Sha256::new(), 0u64);
    loop {
        let mut chunk = vec![frame::DATA];
        let read = (&mut reader).take(CHUNK_BYTES as u64).read_to_end(&mut chunk).await?;
        if read == 0 {
            break;
        }
        digest.update(&chunk[1..]);
        bytes += read as u64;
        if frames.send(chunk).await.is_err() {
            return Ok(()); // the destination left; it will ask again
        }
    }
    let end = End { bytes, sha256: hex::encode(digest.finalize()), message };
    let _ = frames.send([&[frame::END][..], &serde_json::to_vec(&end).unwrap_or_default()].concat()).await;
    Ok(())
}

/// Writes the export stream into `file`; the source's message once its length and digest
/// check out.
async fn receive(mut frames: mpsc::Receiver<Vec<u8>>, file: &Path) -> Result<String, BackendError> {
    let mut out = tokio::fs::File::create(file).await?;
    let (mut digest, mut bytes) = (Sha256::new(), 0u64);
    while let Some(chunk) = frames.recv().await {
        let Some((&kind, body)) = chunk.split_first() else { continue };
        match kind {
            frame::DATA => {
                digest.update(body);
                bytes += body.len() as u64;
                out.write_all(body).await?;
            }
            frame::END => {
                let end: End = serde_json::from_slice(body)
                    .map_err(|e| BackendError::Retryable(format!("a malformed end of the export: {e}")))?;
                let sha256 = hex::encode(digest.finalize());
                if end.bytes != bytes || end.sha256 != sha256 {
                    return Err(BackendError::Retryable(format!(
                        "the export arrived damaged ({bytes} bytes, SHA-256 {sha256}; sent {} bytes, {})",
                        end.bytes, end.sha256
                    )));
                }
                out.sync_all().await?;
                return Ok(end.message);
            }
            frame::FAILED => {
                return Err(BackendError::Retryable(format!("the export failed: {}", String::from_utf8_lossy(body))))
            }
            other => return Err(BackendError::Retryable(format!("an export frame of unknown kind {other}"))),
        }
    }
    Err(BackendError::Retryable(format!("the export was cut off after {bytes} bytes")))
}

/// What the destination's executor needs to carry a migration out.
pub struct Arrival<'a> {
    pub replica: &'a Replica,
    pub backend: &'a dyn RuntimeBackend,
    pub staging: &'a Path,
    pub resources: Resources,
}

impl Arrival<'_> {
    /// Makes `runtime` here, from its node's export or (`rebuild`) afresh, and starts it unless
    /// it was stopped.
    pub async fn arrive(&self, cx: &CallContext, runtime: &Runtime, rebuild: bool) -> Result<String, BackendError> {
        let run = runtime.state != RuntimeState::Stopped;
        if rebuild {
            let made = self.backend.import(cx, runtime, &self.resources, None, run).await?;
            return Ok(format!("rebuilt on node {} ({made}); what only its old node held is lost", self.replica.id));
        }
        let from = runtime
            .placement
            .as_ref()
            .map(|p| p.node_id)
            .ok_or_else(|| BackendError::Permanent(format!("runtime {} is placed nowhere", runtime.id)))?;
        let payload = runtimeai_api::on_host::export_call(&runtime.id, &cx.operation_id, cx.token);
        let frames = self.replica.call_on_host(from, payload).await.map_err(|e| {
            BackendError::Retryable(format!(
                "cannot get runtime {}'s export from node {from}: {e} (if that node is lost, evacuate it)",
                runtime.id
            ))
        })?;
        std::fs::create_dir_all(self.staging)?;
        let file = self.staging.join(format!("{}.in", cx.operation_id));
        let received = receive(frames, &file).await;
        let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let made = match received {
            Ok(exported) => {
                self.backend.import(cx, runtime, &self.resources, Some(&file), run).await.map(|m| (exported, m))
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&file);
        let (exported, made) = made?;
        Ok(format!("moved from node {from} to node {} ({bytes} bytes): {exported}; {made}", self.replica.id))
    }
}

/// Removes what this node's backends hold of runtimes placed on another node (a migration's
/// source after it succeeded, a node back after its runtimes were evacuated, a destination
/// whose migration failed), except a runtime whose migration to this node is under way.
/// Runtimes this node does not know (yet) are left alone.
pub async fn remove_left_behind(replica: &Replica, backends: &Backends, node_id: u64) {
    for backend in backends.distinct() {
        for id in backend.held().await {
            let Ok(Some(runtime)) = replica.state().get_runtime(&id) else { continue };
            if runtime.placement.as_ref().is_none_or(|p| p.node_id == node_id) || arriving(replica, &runtime, node_id) {
                continue;
            }
            let cx = CallContext {
                operation_id: format!("left-behind-{id}-{}", chrono::Utc::now().timestamp_millis()),
                step: 0,
                token: 1,
            };
            match backend.release(&cx, &runtime).await {
                Ok(_) => {
                    tracing::info!(runtime = %id, placed = ?runtime.placement, "removed what this node still held of a runtime placed elsewhere")
                }
                Err(e) => {
                    tracing::warn!(runtime = %id, error = %e, "cannot remove a runtime placed elsewhere; next round will")
                }
            }
        }
    }
}

/// Whether `runtime` is on its way to this node (its active operation migrates it here).
fn arriving(replica: &Replica, runtime: &Runtime, node_id: u64) -> bool {
    let operation = runtime.active_operation.as_deref().and_then(|id| replica.state().active_operation(id));
    operation.is_some_and(|op| op.action.migration_destination().is_some_and(|to| to.node_id == node_id))
}

/// The staging directory of a node's migrations.
pub fn staging_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("migrations")
}

/// Shared for the host-call server.
pub fn exports(backends: &Backends, data_dir: &Path) -> Arc<dyn runtimeai_api::RuntimeExports> {
    Arc::new(Exports::new(backends.clone(), staging_dir(data_dir)))
}
