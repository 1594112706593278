//! Running a command in a sandbox: `POST /v1/runtimes/{id}/exec`, answered with the command's
//! output as it comes, one JSON object per line (`application/x-ndjson`): `{"stdout": "..."}`,
//! `{"stderr": "..."}`, and last `{"exit": {"exit_code": 0, "duration_ms": 12, "timed_out":
//! false}}`. Output is text: bytes that are not UTF-8 arrive as U+FFFD.
//!
//! The policies judge an exec as the action `exec` (deny: 403 `policy-denied`; approval: 403
//! `approval-required`, as a command's output cannot wait for a human). Any node takes the call:
//! the node that hosts the sandbox runs it (the call goes there over the members' channel, as a
//! write goes to the leader), and records a `runtime.exec` event with who ran what and how it
//! ended.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use runtimeai_model::{Actor, LifecycleAction, Runtime, Verdict};
use runtimeai_raft::command::RecordExec;
use runtimeai_raft::{Command, Op};

use crate::auth::Caller;
use crate::doc_types::{ProblemResponses, TenantId};
use crate::extract::{Body, PathParam};
use crate::on_host::{self, Host, HostCall};
use crate::problem::Problem;
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(exec))
}

/// Longest an exec may run, and how long when the request does not say.
pub const MAX_EXEC_SECONDS: u64 = 3600;
const DEFAULT_EXEC_SECONDS: u64 = 60;
/// Largest command (its arguments together) and environment.
const MAX_COMMAND_BYTES: usize = 64 << 10;

/// A command to run in a running sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments (the program is looked up in the sandbox's `PATH`).
    #[schema(min_items = 1)]
    pub command: Vec<String>,
    /// Variables added to the sandbox's environment for this command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// An absolute directory in the sandbox (default `/work`).
    #[serde(default)]
    #[schema(pattern = "^/")]
    pub working_dir: Option<String>,
    /// What the command reads on its standard input (nothing by default).
    #[serde(default)]
    pub stdin: Option<String>,
    /// How long it may run before it is killed (default 60, at most 3600).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_seconds: Option<u64>,
}

impl ExecRequest {
    /// How long it may run.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds.unwrap_or(DEFAULT_EXEC_SECONDS))
    }

    fn check(&self) -> Result<(), Problem> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(Problem::invalid_field("$.command", "name the program to run"));
        }
        let bytes: usize = self.command.iter().map(String::len).sum::<usize>()
            + self.env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if bytes > MAX_COMMAND_BYTES {
            return Err(Problem::invalid_field(
                "$.command",
                format!("command and env exceed {MAX_COMMAND_BYTES} bytes"),
            ));
        }
        if let Some((name, _)) = self.env.iter().find(|(name, _)| name.is_empty() || name.contains(['=', '\0'])) {
            return Err(Problem::invalid_field(format!("$.env.{name}"), "not a variable name"));
        }
        if self.working_dir.as_ref().is_some_and(|dir| !dir.starts_with('/')) {
            return Err(Problem::invalid_field("$.working_dir", "an absolute path in the sandbox"));
        }
        if self.timeout_seconds.is_some_and(|s| !(1..=MAX_EXEC_SECONDS).contains(&s)) {
            return Err(Problem::invalid_field("$.timeout_seconds", format!("between 1 and {MAX_EXEC_SECONDS}")));
        }
        Ok(())
    }
}

/// One line of an exec's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecOutput {
    Stdout(String),
    Stderr(String),
    /// The last line: how it ended.
    Exit {
        /// `None` when it was killed (timed out, or the sandbox stopped).
        exit_code: Option<i32>,
        duration_ms: u64,
        timed_out: bool,
    },
}

/// Where a node runs commands in the sandboxes it hosts and reads their logs (its sandbox
/// backend).
#[async_trait::async_trait]
pub trait SandboxShell: Send + Sync {
    /// Starts `request` in `runtime` (hosted here); its output, ending with
    /// [`ExecOutput::Exit`]. `Err`: it could not start (the message says why).
    async fn exec(&self, runtime: &Runtime, request: ExecRequest) -> Result<mpsc::Receiver<ExecOutput>, String>;

    /// The logs `request` asks for of `runtime` (hosted here), chunk by chunk.
    async fn logs(
        &self,
        runtime: &Runtime,
        request: crate::logs::LogsRequest,
    ) -> Result<mpsc::Receiver<Vec<u8>>, String>;

    /// A file of `runtime` (hosted here), read as its own user, up to
    /// [`crate::files::MAX_FILE_BYTES`].
    async fn read_file(&self, runtime: &Runtime, path: &str) -> Result<Vec<u8>, crate::files::FileError>;

    /// Writes a file of `runtime` (hosted here) as its own user, making its parent directories.
    async fn write_file(&self, runtime: &Runtime, path: &str, content: Vec<u8>) -> Result<(), crate::files::FileError>;
}

/// Run a command in a running sandbox; its output streams back as it comes.
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/exec", tag = "Runtimes",
    params(("runtime_id" = String, Path), TenantId), request_body = ExecRequest,
    responses((status = 200, description = "The command's output, one JSON object per line, ending with how it ended",
        content_type = "application/x-ndjson", body = ExecOutput), ProblemResponses))]
pub(crate) async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    Body(request): Body<ExecRequest>,
) -> Result<Response, Problem> {
    request.check()?;
    let runtime = on_host::sandbox(&state, &caller, &runtime_id, true, "commands").await?;
    judge(&state, &caller, &runtime, LifecycleAction::Exec { command: request.command.clone() })?;
    let lines = match Host::of(&state, &runtime)? {
        Host::Here => {
            let run = ExecRun::new(&state, caller.actor(), &runtime_id, &request.command);
            run.start_here(&state, &runtime, request).await.map_err(on_host::refused)?
        }
        Host::Member(node) => {
            let call = HostCall::Exec { runtime_id: runtime_id.clone(), actor: caller.actor(), request };
            on_host::pass_to(&state, node, &call).await?
        }
    };
    Ok(streamed(lines, "application/x-ndjson", |mut line| {
        line.push(b'\n');
        line
    }))
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

/// The policies' verdict on an exec: allowed, or a 403 naming the deciding rule.
fn judge(state: &AppState, caller: &Caller, runtime: &Runtime, action: LifecycleAction) -> Result<(), Problem> {
    let mode = caller.policy_mode(None)?;
    let decisions = crate::planning::preview_decisions(state, caller, runtime, &[action], mode)?;
    let Some(decision) = runtimeai_engine::policy::deciding(&decisions).cloned() else { return Ok(()) };
    match decision.verdict {
        Verdict::Allow => Ok(()),
        Verdict::Deny => Err(runtimeai_raft::Rejection::PolicyDenied { decision }.into()),
        Verdict::RequireApproval => {
            let mut problem = Problem::new(
                StatusCode::FORBIDDEN,
                "approval-required",
                format!("exec needs approval ({}), and a command's output cannot wait for one", decision.reason),
            );
            problem.decision = Some(Box::new(decision));
            Err(problem)
        }
    }
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
