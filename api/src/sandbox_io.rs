//! What the API asks of the node that hosts a sandbox, and what it gets back: a command
//! ([`ExecRequest`], [`ExecOutput`]), its logs ([`LogsRequest`]), its files ([`FileError`]), and
//! the backend that serves them ([`SandboxShell`]). Plain types, shared by the handlers
//! (`exec`, `logs`, `files`), the calls passed between members (`on_host`) and the node.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};

use runtimeai_model::Runtime;

use crate::problem::Problem;

pub use runtimeai_model::ExecRequest;

/// Checks what serde cannot of an exec: a 400 naming the field.
pub(crate) fn check_exec(request: &ExecRequest) -> Result<(), Problem> {
    request.check().map_err(|(path, message)| Problem::invalid_field(path, message))
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
    async fn logs(&self, runtime: &Runtime, request: LogsRequest) -> Result<mpsc::Receiver<Vec<u8>>, String>;

    /// A file of `runtime` (hosted here), read as its own user, up to
    /// [`MAX_FILE_BYTES`].
    async fn read_file(&self, runtime: &Runtime, path: &str) -> Result<Vec<u8>, FileError>;

    /// Writes a file of `runtime` (hosted here) as its own user, making its parent directories.
    async fn write_file(&self, runtime: &Runtime, path: &str, content: Vec<u8>) -> Result<(), FileError>;
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

/// The largest file read back.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

/// Why a file could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    NotFound(String),
    #[error("the file holds more than {MAX_FILE_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Failed(String),
    /// The sandbox is not running where the call went (stopped, or being restarted).
    #[error("{0}")]
    NotRunning(String),
}

impl From<FileError> for Problem {
    fn from(error: FileError) -> Problem {
        match error {
            FileError::NotFound(detail) => Problem::not_found(detail),
            FileError::TooLarge => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "file-too-large", error.to_string()),
            FileError::Failed(detail) => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "file-refused", detail),
            FileError::NotRunning(detail) => Problem::new(StatusCode::CONFLICT, "not-running", detail),
        }
    }
}
