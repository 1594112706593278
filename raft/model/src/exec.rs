//! A command to run in a sandbox: what `POST /v1/runtimes/{id}/exec` takes, and what an exec
//! waiting for approval carries as its operation's action.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest an exec may run, and how long when the request does not say.
pub const MAX_EXEC_SECONDS: u64 = 3600;
const DEFAULT_EXEC_SECONDS: u64 = 60;
/// Largest command (its arguments together) and environment.
const MAX_COMMAND_BYTES: usize = 64 << 10;

/// A command to run in a running sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

    /// Checks what serde cannot: `Err((JSON path, what is wrong))`.
    pub fn check(&self) -> Result<(), (String, String)> {
        let invalid = |path: &str, message: String| Err((path.to_string(), message));
        if self.command.is_empty() || self.command[0].is_empty() {
            return invalid("$.command", "name the program to run".into());
        }
        let bytes: usize = self.command.iter().map(String::len).sum::<usize>()
            + self.env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if bytes > MAX_COMMAND_BYTES {
            return invalid("$.command", format!("command and env exceed {MAX_COMMAND_BYTES} bytes"));
        }
        if let Some((name, _)) = self.env.iter().find(|(name, _)| name.is_empty() || name.contains(['=', '\0'])) {
            return invalid(&format!("$.env.{name}"), "not a variable name".into());
        }
        if self.working_dir.as_ref().is_some_and(|dir| !dir.starts_with('/')) {
            return invalid("$.working_dir", "an absolute path in the sandbox".into());
        }
        if self.timeout_seconds.is_some_and(|s| !(1..=MAX_EXEC_SECONDS).contains(&s)) {
            return invalid("$.timeout_seconds", format!("between 1 and {MAX_EXEC_SECONDS}"));
        }
        Ok(())
    }
}
