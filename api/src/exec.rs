//! Running a command in a sandbox: `POST /v1/runtimes/{id}/exec`, answered with the command's
//! output as it comes, one JSON object per line (`application/x-ndjson`): `{"stdout": "..."}`,
//! `{"stderr": "..."}`, and last `{"exit": {"exit_code": 0, "duration_ms": 12, "timed_out":
//! false}}`. Output is text: bytes that are not UTF-8 arrive as U+FFFD.
//!
//! The policies judge an exec as the action `exec`: denied, 403 `policy-denied`; needing
//! approval, it is not run now but waits as an operation (202, as a lifecycle call), and once
//! someone else approves it the executor of the sandbox's node runs it to its end: the
//! operation succeeds with what it printed (up to 16 KiB of each output) or fails with its exit
//! code. Any node takes the call: the node that hosts the sandbox runs it (the call goes there
//! over the members' channel, as a write goes to the leader), and records a `runtime.exec` event
//! with who ran what and how it ended.

use axum::extract::State;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use runtimeai_model::{LifecycleAction, Runtime, Verdict};

use crate::auth::Caller;
use crate::doc_types::{ProblemResponses, TenantId};
use crate::extract::{Body, PathParam};
use crate::on_host::{self, streamed, ExecRun, Host, HostCall};
use crate::problem::Problem;
use crate::sandbox_io::{check_exec, ExecOutput, ExecRequest};
use crate::views::OperationView;
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(exec))
}

/// Run a command in a running sandbox; its output streams back as it comes.
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/exec", tag = "Runtimes",
    params(("runtime_id" = String, Path), TenantId), request_body = ExecRequest,
    responses((status = 200, description = "The command's output, one JSON object per line, ending with how it ended",
        content_type = "application/x-ndjson", body = ExecOutput),
        (status = 202, description = "A policy wants it approved first: it waits as this operation, and runs once approved",
        body = OperationView), ProblemResponses))]
pub(crate) async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    Body(request): Body<ExecRequest>,
) -> Result<Response, Problem> {
    check_exec(&request)?;
    let runtime = on_host::sandbox(&state, &caller, &runtime_id, true, "commands").await?;
    let action = LifecycleAction::Exec { request: request.clone() };
    if judge(&state, &caller, &runtime, action.clone())? == Verdict::RequireApproval {
        return crate::runtimes::begin(&state, &caller, &runtime_id, action, &request).await;
    }
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

/// The policies' verdict on an exec: allowed or needing approval, or a 403 naming the rule
/// that denies it.
fn judge(state: &AppState, caller: &Caller, runtime: &Runtime, action: LifecycleAction) -> Result<Verdict, Problem> {
    let mode = caller.policy_mode(None)?;
    let decisions = crate::planning::preview_decisions(state, caller, runtime, &[action], mode)?;
    let Some(decision) = runtimeai_engine::policy::deciding(&decisions).cloned() else { return Ok(Verdict::Allow) };
    match decision.verdict {
        Verdict::Deny => Err(runtimeai_raft::Rejection::PolicyDenied { decision }.into()),
        verdict => Ok(verdict),
    }
}
