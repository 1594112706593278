//! A sandbox's logs: `GET /v1/runtimes/{id}/logs`, what its command wrote to its standard
//! output or error, as `kubectl logs` gives a container's: the last `tail` lines (or all
//! it keeps), and with `follow` what it writes next, until it ends or the client leaves. Any
//! node takes the call; the node that hosts the sandbox reads them.

use axum::extract::State;
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::doc_types::{ProblemResponses, TenantId};
use crate::extract::{PathParam, QueryParams};
use crate::on_host::{self, logs_here, streamed, Host, HostCall};
use crate::problem::Problem;
use crate::sandbox_io::LogsRequest;
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(logs))
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
        Host::Here => logs_here(&state, &runtime, request).await.map_err(on_host::refused)?,
        Host::Member(node) => on_host::pass_to(&state, node, &HostCall::Logs { runtime_id, request }).await?,
    };
    Ok(streamed(chunks, "text/plain; charset=utf-8", |chunk| chunk))
}
