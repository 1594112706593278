//! RuntimeAI's REST API on axum, served by every node of the cluster.
//!
//! Handlers turn requests into typed commands for [`runtimeai_raft::Replica`], which proposes
//! them through the leader wherever the request arrived; reads are linearizable unless the
//! client asks for `consistency=stale`. Every error leaves as RFC 9457 problem+json
//! ([`problem`]).
//!
//! - [`cluster`]: `/v1/cluster`, membership changes, `/healthz`, `/readyz`; `/metrics`
//!   (Prometheus: request durations and the write stages).
//! - [`runtimes`]: the Runtime resource, its lifecycle, operations, snapshots and events.
//! - [`operations`]: follow or cancel an asynchronous operation.
//! - [`policies`]: safety policies (enforced in apply by `runtimeai_engine`).
//! - [`intents`], [`actions`]: the planner and the agents' action contract.
//! - [`auth`]: authentication (API keys, client certificates, [`oidc`] tokens) and
//!   authorization (roles, tenants, agent modes) of every request; [`keys`]: the keys
//!   themselves, who am I, and the audit feed.

pub mod actions;
pub mod auth;
pub mod cluster;
mod console;
pub mod doc_types;
pub mod events;
mod exec;
pub mod external_planner;
mod extract;
mod files;
pub mod intents;
pub mod keys;
mod logs;
pub mod mcp;
mod metrics;
pub mod migration;
mod mutation;
pub mod oidc;
pub mod on_host;
pub mod openapi;
pub mod operations;
mod planning;
pub mod policies;
pub mod problem;
pub mod runtimes;
pub mod sandbox_io;
mod schema_rules;
pub mod throttle;
mod validate;
mod views;
pub mod webhooks;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::Router;

use runtimeai_raft::Replica;

pub use mutation::new_id;
pub use problem::Problem;

/// What every handler needs: one shared [`AppContext`]. axum clones the state for every
/// request and every middleware on its way, so a clone is one reference count, not one per
/// field (the field-by-field clones and drops were ~1 % of a node's CPU under load).
#[derive(Clone)]
pub struct AppState(Arc<AppContext>);

impl From<AppContext> for AppState {
    fn from(context: AppContext) -> Self {
        AppState(Arc::new(context))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppContext;

    fn deref(&self) -> &AppContext {
        &self.0
    }
}

/// The node's services and settings the API works with (see [`AppState`]).
pub struct AppContext {
    pub replica: Arc<Replica>,
    /// This node's own REST address, as shown in `GET /v1/cluster`.
    pub http_addr: Arc<str>,
    /// Disk work of this node's raft log, shown in `GET /v1/cluster`.
    pub log_stats: Arc<runtimeai_raft::log_store::LogStats>,
    /// Largest request body accepted, in bytes (larger ones get 413).
    pub max_body_bytes: usize,
    /// Asked for goals the deterministic planner does not understand, when configured.
    pub external_planner: Option<Arc<external_planner::ExternalPlanner>>,
    /// This node's Kubernetes backend, which knows the virtual clusters' kubeconfigs.
    pub kubeconfigs: Option<Arc<dyn KubeconfigSource>>,
    /// This node's sandbox backend, which runs commands in the sandboxes it hosts.
    pub sandboxes: Option<Arc<dyn sandbox_io::SandboxShell>>,
    /// This node's VM backend, which keeps the serial console output of the VMs it hosts.
    pub consoles: Option<Arc<dyn ConsoleSource>>,
    /// What packs the runtimes this node hosts for their migration to another node.
    pub exports: Option<Arc<dyn RuntimeExports>>,
    /// Requests this node refused as unauthenticated (shown in `GET /v1/cluster`).
    pub auth_failures: Arc<auth::AuthFailures>,
    /// OIDC bearer tokens, when configured (`--oidc-*`).
    pub oidc: Option<Arc<oidc::Oidc>>,
    /// Per-principal and per-address request rates (`--rate-limit-*`).
    pub rate_limits: Arc<throttle::RateLimits>,
}

/// Where a node finds the kubeconfig a virtual cluster published.
#[async_trait::async_trait]
pub trait KubeconfigSource: Send + Sync {
    /// `Ok(None)`: not published (yet).
    async fn kubeconfig(&self, runtime: &runtimeai_model::Runtime) -> Result<Option<String>, String>;
}

/// Where a node reads what the serial consoles of the VMs it hosts printed.
#[async_trait::async_trait]
pub trait ConsoleSource: Send + Sync {
    /// The last `bytes` bytes the VM's console printed (empty before it printed anything).
    async fn console(&self, runtime: &runtimeai_model::Runtime, bytes: u64) -> Result<Vec<u8>, String>;
}

/// Where a node packs a runtime it hosts for a cold migration (the node's executor and
/// backends; checked by the host-call server first: the operation, its destination, its token).
#[async_trait::async_trait]
pub trait RuntimeExports: Send + Sync {
    /// Stops `runtime` and streams its export for migration `operation_id`, whose destination's
    /// assignment holds `token`.
    async fn export(
        &self,
        runtime: &runtimeai_model::Runtime,
        operation_id: &str,
        token: u64,
    ) -> Result<tokio::sync::mpsc::Receiver<Vec<u8>>, String>;
}

/// Every route with its OpenAPI description, in one place: the router and the document are
/// both made from it ([`router`], [`openapi::document`]).
pub(crate) fn routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa::OpenApi;
    utoipa_axum::router::OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(cluster::routes())
        .merge(runtimes::routes())
        .merge(exec::routes())
        .merge(logs::routes())
        .merge(console::routes())
        .merge(files::routes())
        .merge(actions::routes())
        .merge(migration::routes())
        .merge(events::routes())
        .merge(webhooks::routes())
        .merge(intents::routes())
        .merge(operations::routes())
        .merge(policies::routes())
        .merge(keys::routes())
        .merge(metrics::routes())
        .routes(utoipa_axum::routes!(openapi::openapi_json))
}

/// The whole REST surface of a node, and the MCP server at `/mcp` whose tools call it.
pub fn router(state: AppState) -> Router {
    let max_body_bytes = state.max_body_bytes;
    let guard = axum::middleware::from_fn_with_state(state.clone(), auth::guard);
    let (routes, _) = routes().split_for_parts();
    let rest = routes
        // Every routed request is authenticated and authorized before its handler runs.
        .route_layer(guard.clone())
        .route_layer(axum::middleware::from_fn(metrics::record))
        .fallback(|| async { Problem::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "method not allowed on this endpoint")
        })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(state);
    // The tools' input schemas, from the document with the default settings' rules.
    let document = serde_json::from_str(&openapi::document()).unwrap_or_default();
    let catalogue = std::sync::Arc::new(mcp::Catalogue::from_document(&document));
    let server = mcp::McpServer::new(catalogue, std::sync::Arc::new(mcp::InProcess(rest.clone())));
    Router::new().route_service("/mcp", mcp::http_service(server, max_body_bytes)).route_layer(guard).merge(rest)
}

/// The version this build reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
