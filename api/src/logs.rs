//! A sandbox's logs: `GET /v1/runtimes/{id}/logs`, what its command wrote to its standard
//! output or error, as `kubectl logs` gives a container's: the last `tail` lines (or all
//! it keeps), and with `follow` what it writes next, until it ends or the client leaves. Any
//! node takes the call; the node that hosts the sandbox reads them.

use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use runtimeai_model::Runtime;

use crate::auth::Caller;
use crate::doc_types::{ProblemResponses, TenantId};
use crate::exec::streamed;
use crate::extract::{PathParam, QueryParams};
use crate::on_host::{self, Host, HostCall};
use crate::problem::Problem;
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(logs))
}

/// Which output of the sandbox's command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    #[default]
    Stdout,
    Stderr,
}

/// What to read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsRequest {
    /// `stdout` (default) or `stderr`.
    #[serde(default)]
    #[param(inline)]
    pub stream: LogStream,
    /// Only the last so many lines (all the node keeps when absent).
    #[serde(default)]
    #[param(minimum = 0, maximum = 100000)]
    pub tail: Option<u64>,
    /// Keep the answer open and pass on what is written next, until the sandbox stops or the
    /// client leaves.
    #[serde(default)]
    pub follow: bool,
}

/// What the sandbox's command wrote, as plain text (kept up to a cap, older output rotated
/// out).
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/logs", tag = "Runtimes",
    params(("runtime_id" = String, Path), LogsRequest, TenantId),
    responses((status = 200, description = "The output, as it was written", content_type = "text/plain", body = String),
        ProblemResponses))]
pub(crate) async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(request): QueryParams<LogsRequest>,
) -> Result<Response, Problem> {
    if request.tail.is_some_and(|lines| lines > 100_000) {
        return Err(Problem::invalid_field("$.tail", "at most 100000"));
    }
    let runtime = on_host::sandbox(&state, &caller, &runtime_id, false, "logs").await?;
    let chunks = match Host::of(&state, &runtime)? {
        Host::Here => read_here(&state, &runtime, request).await.map_err(on_host::refused)?,
        Host::Member(node) => on_host::pass_to(&state, node, &HostCall::Logs { runtime_id, request }).await?,
    };
    Ok(streamed(chunks, "text/plain; charset=utf-8", |chunk| chunk))
}

/// The logs of `runtime`, which this node hosts.
pub(crate) async fn read_here(
    state: &AppState,
    runtime: &Runtime,
    request: LogsRequest,
) -> Result<mpsc::Receiver<Vec<u8>>, String> {
    let sandboxes = state.sandboxes.clone().ok_or("this node runs no sandboxes")?;
    sandboxes.logs(runtime, request).await
}
