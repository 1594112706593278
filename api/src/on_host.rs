//! Calls about a runtime that only the node hosting it can serve (a command in a sandbox, its
//! logs). Any node takes them from clients, authorizes and judges them, and — when the runtime
//! lives elsewhere — passes them to the host over the members' channel
//! (`Replica::call_on_host`), as a write goes to the leader. The host serves what members pass
//! it here ([`HostCallsServer`]), with the same functions that serve a call taken on the host
//! itself ([`ExecRun`], [`logs_here`], [`read_file_here`], [`write_file_here`]).

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use axum::body::Body as HttpBody;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use runtimeai_model::{Actor, LifecycleAction, Runtime, RuntimeType};
use runtimeai_raft::command::RecordExec;
use runtimeai_raft::{Command, Op};

use crate::auth::Caller;
use crate::extract::Consistency;
use crate::problem::Problem;
use crate::runtimes::read_runtime;
use crate::sandbox_io::{ExecOutput, ExecRequest, FileError, LogsRequest};
use crate::AppState;

/// What one member asks the member that hosts a runtime to do.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HostCall {
    /// Run a command, for `actor` (who the event names).
    Exec { runtime_id: String, actor: Actor, request: ExecRequest },
    /// Read its logs.
    Logs { runtime_id: String, request: LogsRequest },
    /// Read the last `bytes` of a VM's serial console.
    Console { runtime_id: String, bytes: u64 },
    /// Read one of its files.
    ReadFile { runtime_id: String, path: String },
    /// Write one of its files.
    WriteFile {
        runtime_id: String,
        path: String,
        #[serde(with = "base64_bytes")]
        content: Vec<u8>,
    },
    /// Stop it and hand over what this node holds of it, for migration `operation_id`, whose
    /// destination asks with its assignment's fencing `token`.
    Export { runtime_id: String, operation_id: String, token: u64 },
}

/// What a migration's destination sends the runtime's node to have the runtime exported.
pub fn export_call(runtime_id: &str, operation_id: &str, token: u64) -> Vec<u8> {
    let call = HostCall::Export { runtime_id: runtime_id.into(), operation_id: operation_id.into(), token };
    serde_json::to_vec(&call).unwrap_or_default()
}

/// Bytes as base64 text in the call's JSON (a third larger, not four times).
mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

impl HostCall {
    fn runtime_id(&self) -> &str {
        match self {
            HostCall::Exec { runtime_id, .. }
            | HostCall::Logs { runtime_id, .. }
            | HostCall::Console { runtime_id, .. }
            | HostCall::ReadFile { runtime_id, .. }
            | HostCall::WriteFile { runtime_id, .. }
            | HostCall::Export { runtime_id, .. } => runtime_id,
        }
    }
}

/// The sandbox (or agent runtime) `runtime_id` as `caller` may see it, read linearizably; with
/// `running`, only if it is running (409 otherwise). A runtime of another type is 409
/// `not-a-sandbox`: the request is well formed, the runtime it names has no such thing. `what`
/// names the call in a refusal.
pub(crate) async fn sandbox(
    state: &AppState,
    caller: &Caller,
    runtime_id: &str,
    running: bool,
    what: &str,
) -> Result<Runtime, Problem> {
    let runtime = read_runtime(state, caller, runtime_id, Consistency::Linearizable).await?;
    if !matches!(runtime.runtime_type, RuntimeType::Sandbox | RuntimeType::AgentRuntime) {
        let message =
            format!("{} runtimes have no {what}: only sandboxes and agent runtimes", runtime.runtime_type.as_str());
        return Err(Problem::new(StatusCode::CONFLICT, "not-a-sandbox", message));
    }
    if running {
        let exec = LifecycleAction::Exec { request: ExecRequest::default() };
        exec.transition(runtime.state)
            .map_err(|e| Problem::new(StatusCode::CONFLICT, "illegal-transition", e.to_string()))?;
    }
    Ok(runtime)
}

/// Where a call about `runtime` is served.
pub(crate) enum Host {
    /// This node hosts it.
    Here,
    /// Member `node` does.
    Member(u64),
}

impl Host {
    pub(crate) fn of(state: &AppState, runtime: &Runtime) -> Result<Host, Problem> {
        let node = runtime.placement.as_ref().map(|p| p.node_id).ok_or_else(|| {
            Problem::new(StatusCode::CONFLICT, "not-placed", format!("runtime {} runs nowhere yet", runtime.id))
        })?;
        Ok(if node == state.replica.id { Host::Here } else { Host::Member(node) })
    }
}

/// The host's refusal of a call (the sandbox is not running there, say): 409, as when a member
/// passes it on (`ClusterError::Invalid`).
pub(crate) fn refused(why: String) -> Problem {
    Problem::new(StatusCode::CONFLICT, "cluster-conflict", why)
}

/// Passes `call` to member `node` (the runtime's host); its answer, chunk by chunk.
pub(crate) async fn pass_to(state: &AppState, node: u64, call: &HostCall) -> Result<mpsc::Receiver<Vec<u8>>, Problem> {
    let payload = serde_json::to_vec(call).map_err(|e| Problem::unavailable(e.to_string()))?;
    Ok(state.replica.call_on_host(node, payload).await?)
}

/// Serves the calls other members pass to this node about the runtimes it hosts.
pub struct HostCallsServer {
    state: AppState,
}

impl HostCallsServer {
    pub fn new(state: AppState) -> HostCallsServer {
        HostCallsServer { state }
    }

    /// The runtime a call is about, if this node hosts it.
    fn hosted(&self, runtime_id: &str) -> Result<Runtime, String> {
        let runtime = self.state.replica.state().get_runtime(runtime_id).map_err(|e| e.to_string())?;
        let runtime = runtime.ok_or_else(|| format!("runtime {runtime_id} not found"))?;
        if runtime.placement.as_ref().map(|p| p.node_id) != Some(self.state.replica.id) {
            return Err(format!("runtime {runtime_id} is not hosted on node {}", self.state.replica.id));
        }
        Ok(runtime)
    }
}

#[async_trait::async_trait]
impl runtimeai_raft::replica::HostCalls for HostCallsServer {
    async fn call(&self, payload: Vec<u8>) -> Result<mpsc::Receiver<Vec<u8>>, String> {
        let call: HostCall = serde_json::from_slice(&payload).map_err(|e| format!("a malformed host call: {e}"))?;
        let runtime = self.hosted(call.runtime_id())?;
        match call {
            HostCall::Exec { actor, request, .. } => {
                let run = ExecRun::new(&self.state, actor, &runtime.id, &request.command);
                run.start_here(&self.state, &runtime, request).await
            }
            HostCall::Logs { request, .. } => logs_here(&self.state, &runtime, request).await,
            HostCall::Console { bytes, .. } => console_here(&self.state, &runtime, bytes).await,
            HostCall::ReadFile { path, .. } => Ok(framed(read_file_here(&self.state, &runtime, &path).await)),
            HostCall::WriteFile { path, content, .. } => {
                let written = write_file_here(&self.state, &runtime, &path, content).await;
                Ok(framed(written.map(|()| Vec::new())))
            }
            HostCall::Export { operation_id, token, .. } => {
                self.migrating(&runtime, &operation_id, token).await?;
                let exports = self.state.exports.as_ref().ok_or("this node exports no runtimes")?;
                exports.export(&runtime, &operation_id, token).await
            }
        }
    }
}

impl HostCallsServer {
    /// Checks that `operation_id` migrates `runtime` away from this node and that `token` is
    /// its current assignment's, waiting a little for this node to apply that assignment.
    async fn migrating(&self, runtime: &Runtime, operation_id: &str, token: u64) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let operation = self.state.replica.state().active_operation(operation_id);
            let current = operation.as_ref().and_then(|op| op.assignment.as_ref()).map(|a| a.token);
            if let Some(operation) = operation.as_ref().filter(|_| current == Some(token)) {
                let away =
                    operation.action.migration_destination().is_some_and(|to| to.node_id != self.state.replica.id);
                if operation.runtime_id != runtime.id || !away {
                    return Err(format!("operation {operation_id} does not migrate runtime {} away", runtime.id));
                }
                return Ok(());
            }
            if current.is_some_and(|current| current > token) || tokio::time::Instant::now() >= deadline {
                return Err(format!("operation {operation_id} is not assigned with token {token} (a stale executor?)"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// An answer whose body is what `chunks` yields (each made into bytes by `frame`), as it comes.
pub(crate) fn streamed(
    mut chunks: mpsc::Receiver<Vec<u8>>,
    content_type: &'static str,
    frame: fn(Vec<u8>) -> Vec<u8>,
) -> Response {
    let (body, stream) = mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::spawn(async move {
        while let Some(chunk) = chunks.recv().await {
            if body.send(Ok(frame(chunk))).await.is_err() {
                return; // the client left: dropping `chunks` ends what produces them
            }
        }
    });
    let stream = HttpBody::from_stream(tokio_stream::wrappers::ReceiverStream::new(stream));
    ([(header::CONTENT_TYPE, content_type)], stream).into_response()
}

/// One exec on the node that hosts the sandbox: runs it, passes its output on as JSON lines,
/// and records the `runtime.exec` event once it has ended.
pub(crate) struct ExecRun {
    state: AppState,
    actor: Actor,
    runtime_id: String,
    command: Vec<String>,
    started: std::time::Instant,
}

impl ExecRun {
    pub(crate) fn new(state: &AppState, actor: Actor, runtime_id: &str, command: &[String]) -> ExecRun {
        let started = std::time::Instant::now();
        ExecRun { state: state.clone(), actor, runtime_id: runtime_id.to_string(), command: command.to_vec(), started }
    }

    /// Starts `request` in `runtime` (hosted here); its output lines, JSON without newlines.
    pub(crate) async fn start_here(
        self,
        state: &AppState,
        runtime: &Runtime,
        request: ExecRequest,
    ) -> Result<mpsc::Receiver<Vec<u8>>, String> {
        let shell = state.sandboxes.clone().ok_or("this node runs no sandboxes")?;
        let output = shell.exec(runtime, request).await?;
        let (lines, answer) = mpsc::channel(16);
        tokio::spawn(self.relay(output, lines));
        Ok(answer)
    }

    /// Passes `output` on until it ends or nobody listens (which ends the command), then
    /// records the exec.
    async fn relay(self, mut output: mpsc::Receiver<ExecOutput>, lines: mpsc::Sender<Vec<u8>>) {
        let mut exit_code = None;
        while let Some(line) = output.recv().await {
            if let ExecOutput::Exit { exit_code: code, .. } = &line {
                exit_code = *code;
            }
            if lines.send(serde_json::to_vec(&line).unwrap_or_default()).await.is_err() {
                break;
            }
        }
        drop(output);
        self.record(exit_code).await;
    }

    async fn record(self, exit_code: Option<i32>) {
        let exec = RecordExec {
            runtime_id: self.runtime_id,
            command: self.command,
            exit_code,
            duration_ms: self.started.elapsed().as_millis() as u64,
            node_id: self.state.replica.id,
        };
        let command =
            Command { at: chrono::Utc::now(), actor: self.actor, idempotency: None, op: Op::RecordExec(exec) };
        if let Err(e) = self.state.replica.propose(command).await {
            tracing::warn!(error = %e, "cannot record an exec's event");
        }
    }
}

/// The last `bytes` of a VM's serial console, read on this node (its host).
pub(crate) async fn console_here(
    state: &AppState,
    runtime: &Runtime,
    bytes: u64,
) -> Result<mpsc::Receiver<Vec<u8>>, String> {
    let consoles = state
        .consoles
        .as_ref()
        .ok_or_else(|| format!("node {} keeps no VM consoles: its VMs are not run by libvirt", state.replica.id))?;
    let output = consoles.console(runtime, bytes).await?;
    let (chunks, answer) = mpsc::channel(1);
    let _ = chunks.try_send(output);
    Ok(answer)
}

/// The logs of `runtime`, which this node hosts.
pub(crate) async fn logs_here(
    state: &AppState,
    runtime: &Runtime,
    request: LogsRequest,
) -> Result<mpsc::Receiver<Vec<u8>>, String> {
    let sandboxes = state.sandboxes.clone().ok_or("this node runs no sandboxes")?;
    sandboxes.logs(runtime, request).await
}

pub(crate) async fn read_file_here(state: &AppState, runtime: &Runtime, path: &str) -> Result<Vec<u8>, FileError> {
    let sandboxes =
        state.sandboxes.clone().ok_or_else(|| FileError::NotRunning("this node runs no sandboxes".into()))?;
    sandboxes.read_file(runtime, path).await
}

pub(crate) async fn write_file_here(
    state: &AppState,
    runtime: &Runtime,
    path: &str,
    content: Vec<u8>,
) -> Result<(), FileError> {
    let sandboxes =
        state.sandboxes.clone().ok_or_else(|| FileError::NotRunning("this node runs no sandboxes".into()))?;
    sandboxes.write_file(runtime, path, content).await
}

/// A file call's answer as the host sends it: the outcome (JSON), then the content in pieces
/// of 1 MiB, if any.
pub(crate) fn framed(outcome: Result<Vec<u8>, FileError>) -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (head, body) = match outcome {
        Ok(content) => (Ok::<(), FileError>(()), content),
        Err(error) => (Err(error), Vec::new()),
    };
    let pieces: Vec<Vec<u8>> = body.chunks(1 << 20).map(<[u8]>::to_vec).collect();
    let (chunks, answer) = tokio::sync::mpsc::channel(pieces.len() + 1);
    let _ = chunks.try_send(serde_json::to_vec(&head).unwrap_or_default());
    for piece in pieces {
        let _ = chunks.try_send(piece);
    }
    answer
}
