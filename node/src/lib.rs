//! The `runtimeai` node: configuration, wiring of the replicated core and the REST API into
//! one process ([`server::run`]), the leader's [`scheduler`], the [`executor`] every node runs
//! with its [`backend`] drivers and the [`migration`] of runtimes between nodes, and the `dev`
//! command that starts a local cluster.

pub mod admin_key;
pub mod backend;
pub mod certs;
pub mod config;
pub mod ctl;
pub mod dev;
pub mod executor;
pub mod http;
pub mod mcp_stdio;
pub mod migration;
pub mod scheduler;
pub mod server;
pub mod transport;
pub mod webhooks;

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
