//! A sandbox's files: `PUT /v1/runtimes/{id}/files/{path}` writes one (its body, raw; parent
//! directories made), `GET` reads one back (raw, up to 8 MiB). The path is the file's in the
//! sandbox, percent-encoded as one segment (`%2Fwork%2Fmain.py`; a relative one is under
//! `/work`). The node that hosts the sandbox reads and writes it from inside, as the sandbox's
//! own user: a path cannot leave the sandbox, and what its user may not touch stays untouched.
//! Any node takes the call, as for exec.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::doc_types::{FileBytes, ProblemResponses, TenantId};
use crate::extract::PathParam;
use crate::on_host::{self, read_file_here, write_file_here, Host, HostCall};
use crate::problem::Problem;
use crate::sandbox_io::FileError;
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(read_file, write_file))
}

/// The file's path in the sandbox: absolute, without `..` or NUL (a relative one is under
/// `/work`).
fn sandbox_path(path: &str) -> Result<String, Problem> {
    let path = if path.starts_with('/') { path.to_string() } else { format!("/work/{path}") };
    if path.contains('\0') || path.split('/').any(|part| part == "..") || path.ends_with('/') || path.len() > 4096 {
        return Err(Problem::invalid_field("$.path", "a file's path in the sandbox, without `..`"));
    }
    Ok(path)
}

/// Read a file of a running sandbox.
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/files/{path}", tag = "Runtimes",
    params(("runtime_id" = String, Path), ("path" = String, Path, description = "percent-encoded"), TenantId),
    responses((status = 200, description = "The file", content_type = "application/octet-stream", body = FileBytes),
        ProblemResponses))]
pub(crate) async fn read_file(
    State(state): State<AppState>,
    caller: Caller,
    PathParam((runtime_id, path)): PathParam<(String, String)>,
) -> Result<Response, Problem> {
    let path = sandbox_path(&path)?;
    let runtime = on_host::sandbox(&state, &caller, &runtime_id, true, "files").await?;
    let content = match Host::of(&state, &runtime)? {
        Host::Here => read_file_here(&state, &runtime, &path).await?,
        Host::Member(node) => {
            answer(on_host::pass_to(&state, node, &HostCall::ReadFile { runtime_id, path }).await?).await?
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], content).into_response())
}

/// Write a file of a running sandbox (its parent directories are made).
#[utoipa::path(put, path = "/v1/runtimes/{runtime_id}/files/{path}", tag = "Runtimes",
    params(("runtime_id" = String, Path), ("path" = String, Path, description = "percent-encoded"), TenantId),
    request_body(content = FileBytes, content_type = "application/octet-stream"),
    responses((status = 204, description = "Written"), ProblemResponses))]
pub(crate) async fn write_file(
    State(state): State<AppState>,
    caller: Caller,
    PathParam((runtime_id, path)): PathParam<(String, String)>,
    content: Bytes,
) -> Result<Response, Problem> {
    let path = sandbox_path(&path)?;
    let runtime = on_host::sandbox(&state, &caller, &runtime_id, true, "files").await?;
    match Host::of(&state, &runtime)? {
        Host::Here => write_file_here(&state, &runtime, &path, content.to_vec()).await?,
        Host::Member(node) => {
            let call = HostCall::WriteFile { runtime_id, path, content: content.to_vec() };
            answer(on_host::pass_to(&state, node, &call).await?).await?;
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Reads a [`framed`] answer: the content, or the host's error.
async fn answer(mut chunks: tokio::sync::mpsc::Receiver<Vec<u8>>) -> Result<Vec<u8>, Problem> {
    let head = chunks.recv().await.ok_or_else(|| Problem::unavailable("the sandbox's node did not answer"))?;
    let outcome: Result<(), FileError> =
        serde_json::from_slice(&head).map_err(|e| Problem::unavailable(format!("a malformed answer: {e}")))?;
    outcome?;
    let mut content = Vec::new();
    while let Some(chunk) = chunks.recv().await {
        content.extend(chunk);
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_the_sandboxes_and_cannot_climb_out() {
        assert_eq!(sandbox_path("main.py").unwrap(), "/work/main.py");
        assert_eq!(sandbox_path("/tmp/x").unwrap(), "/tmp/x");
        for bad in ["../etc/passwd", "/work/../../etc/shadow", "/tmp/", "a\0b"] {
            assert_eq!(sandbox_path(bad).unwrap_err().status, 400, "{bad:?}");
        }
    }
}
