//! A VM's serial console: `GET /v1/runtimes/{id}/console`, the last bytes its console printed
//! (kept across its boots by the hypervisor, in a file on the VM's node), as `virsh console`
//! would have shown them. Any node takes the call; the node that hosts the VM reads it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use runtimeai_model::RuntimeType;

use crate::auth::Caller;
use crate::doc_types::{ProblemResponses, TenantId};
use crate::extract::{Consistency, PathParam, QueryParams};
use crate::on_host::{self, streamed, Host, HostCall};
use crate::problem::Problem;
use crate::runtimes::read_runtime;
use crate::AppState;

/// The most of a console one call returns.
const MAX_CONSOLE_BYTES: u64 = 1 << 20;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(console))
}

/// How much of the console to read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConsoleRequest {
    /// The last so many bytes (64 KiB by default, at most 1 MiB).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1048576)]
    pub bytes: Option<u64>,
}

/// What the VM's serial console printed, its last bytes, as plain text.
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/console", tag = "Runtimes",
    params(("runtime_id" = String, Path), ConsoleRequest, TenantId),
    responses((status = 200, description = "The console's output, as the guest wrote it", content_type = "text/plain",
        body = String), ProblemResponses))]
pub(crate) async fn console(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(request): QueryParams<ConsoleRequest>,
) -> Result<Response, Problem> {
    let bytes = request.bytes.unwrap_or(64 << 10);
    if !(1..=MAX_CONSOLE_BYTES).contains(&bytes) {
        return Err(Problem::invalid_field("$.bytes", format!("1 to {MAX_CONSOLE_BYTES}")));
    }
    let runtime = read_runtime(&state, &caller, &runtime_id, Consistency::Linearizable).await?;
    if runtime.runtime_type != RuntimeType::Vm {
        let message = format!("{} runtimes have no serial console: only VMs", runtime.runtime_type.as_str());
        return Err(Problem::new(StatusCode::CONFLICT, "not-a-vm", message));
    }
    let chunks = match Host::of(&state, &runtime)? {
        Host::Here => on_host::console_here(&state, &runtime, bytes).await.map_err(on_host::refused)?,
        Host::Member(node) => on_host::pass_to(&state, node, &HostCall::Console { runtime_id, bytes }).await?,
    };
    Ok(streamed(chunks, "text/plain; charset=utf-8", |chunk| chunk))
}
