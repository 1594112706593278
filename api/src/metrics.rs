//! `GET /metrics`: the node's Prometheus metrics, for an operator's Prometheus and for finding
//! where a request's time goes: every request's duration by route, method and status (measured
//! from the router to the answer's head, authentication included), and the replicated core's
//! write stages ([`runtimeai_raft::metrics`]).

use std::sync::LazyLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::doc_types::ProblemResponses;
use crate::problem::Problem;
use crate::AppState;

/// A request's labels: the route's pattern (never the raw path, so that ids do not multiply
/// series), its method and the answer's status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

type RequestHistograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

static REQUESTS: LazyLock<RequestHistograms> =
    LazyLock::new(|| Family::new_with_constructor(|| Histogram::new(runtimeai_raft::metrics::latency_buckets())));

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let mut registry = Registry::default();
    registry.register_with_unit(
        "runtimeai_http_request_duration",
        "REST requests by route, method and status, from routing to the answer's head",
        Unit::Seconds,
        REQUESTS.clone(),
    );
    runtimeai_raft::metrics::register(&mut registry);
    registry
});

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// The node's metrics in the Prometheus text format (OpenMetrics 1.0).
#[utoipa::path(get, path = "/metrics", tag = "Health",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String),
        ProblemResponses))]
pub(crate) async fn metrics() -> Result<Response, Problem> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &REGISTRY).map_err(|e| {
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("encoding the metrics: {e}"))
    })?;
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// Middleware: records each routed request's duration.
pub(crate) async fn record(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_default();
    let response = next.run(request).await;
    let labels = RequestLabels { method, route, status: response.status().as_u16() };
    REQUESTS.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    response
}
