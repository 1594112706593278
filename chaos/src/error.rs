//! The errors of the chaos harness.

/// What went wrong driving a cluster or a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A cluster that did not get where it was asked to (not ready, no leader, a refused call).
    #[error("{0}")]
    Cluster(String),
    /// A fault the harness could not inject on this machine, and why.
    #[error("cannot inject {fault}: {reason}")]
    Unsupported { fault: String, reason: String },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
