//! The API's own OpenAPI 3.1 document, generated from the handlers and types (utoipa), served
//! at `GET /v1/openapi.json` and committed as `api/openapi.json`. It is a superset of the
//! seed document (`servers: /v1` there, the same absolute paths here).

use axum::extract::State;
use axum::Json;
use utoipa::OpenApi;

use runtimeai_model::ClusterSettings;

use crate::doc_types::ProblemResponses;
use crate::problem::Problem;
use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "RuntimeAI Control Plane API",
        version = "0.1.0",
        description = "AI-native runtime control plane that unifies VM and vCluster lifecycle under a single Runtime \
                       abstraction. Every node of a cluster serves this API; writes are forwarded to the leader, reads \
                       are linearizable unless `consistency=stale`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    servers((url = "/", description = "any node of the cluster")),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(
        Problem,
        crate::problem::FieldError,
        crate::actions::ObserverAttachRequest,
        crate::actions::ObserverDetachRequest
    )),
    tags(
        (name = "Runtimes"), (name = "Lifecycle"), (name = "Intent"), (name = "Actions"), (name = "Events"), (name = "Webhooks"), (name = "Policies"), (name = "Operations"),
        (name = "Cluster"), (name = "Auth"), (name = "Health")
    )
)]
pub struct ApiDoc;

/// Every request but the probes carries an API key: `Authorization: Bearer rai_<id>_<secret>`.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("An API key")).build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// This document, with what this cluster's settings allow now (its sizes, label lengths): read
/// after a read barrier, or as this node knows them while there is no leader to confirm them.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "Health",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object), ProblemResponses))]
pub(crate) async fn openapi_json(State(state): State<AppState>) -> Json<serde_json::Value> {
    if let Err(e) = state.replica.read_barrier().await {
        tracing::debug!(error = %e, "serving the OpenAPI document with this node's settings");
    }
    Json(with_settings(&state.replica.state().settings(), state.external_planner.is_some()))
}

/// The document with the rules validation enforces under `settings` written in (`any_goal`:
/// an external planner takes any goal).
fn with_settings(settings: &ClusterSettings, any_goal: bool) -> serde_json::Value {
    let mut api = api().clone();
    crate::schema_rules::write(&mut api, settings, any_goal);
    api
}

/// The document, made once from the routes.
fn api() -> &'static serde_json::Value {
    static API: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    API.get_or_init(|| {
        let mut api = serde_json::to_value(crate::routes().into_openapi()).unwrap_or_default();
        link_created_ids(&mut api);
        api
    })
}

/// The document as committed in `api/openapi.json`: that of a cluster with the default settings.
pub fn document() -> String {
    serde_json::to_string_pretty(&with_settings(&ClusterSettings::default(), false)).unwrap_or_default() + "\n"
}

/// The answers that make something new, and where its id is: `(path, method, status, the path
/// parameter it fills, where in the answer it is)`.
const PRODUCERS: &[(&str, &str, &str, &str, &str)] = &[
    ("/v1/runtimes", "post", "201", "runtime_id", "$response.body#/id"),
    ("/v1/policies", "post", "201", "policy_id", "$response.body#/id"),
    ("/v1/webhooks", "post", "201", "webhook_id", "$response.body#/webhook/id"),
    ("/v1/runtimes/{runtime_id}/intent", "post", "202", "intent_id", "$response.body#/intent_id"),
    ("/v1/runtimes/{runtime_id}/lifecycle/stop", "post", "202", "operation_id", "$response.body#/id"),
    ("/v1/runtimes/{runtime_id}/lifecycle/snapshot", "post", "202", "operation_id", "$response.body#/id"),
    ("/v1/runtimes/{runtime_id}/actions/execute", "post", "202", "operation_id", "$response.body#/id"),
];

/// OpenAPI links from each answer that makes something (see [`PRODUCERS`]) to every operation
/// that takes its id in its path (the other path parameters taken from the request), so that a
/// client, or schemathesis's stateful phase, can follow a create to what it enables. (Written
/// into the JSON: utoipa 5 serializes a link's `operationId` as `operation_id`.)
fn link_created_ids(api: &mut serde_json::Value) {
    let mut consumers = Vec::new();
    for (path, item) in api["paths"].as_object().into_iter().flatten() {
        for operation in item.as_object().into_iter().flat_map(|item| item.values()) {
            if let Some(id) = operation["operationId"].as_str() {
                consumers.push((path.clone(), id.to_string()));
            }
        }
    }
    for (source, method, status, param, expression) in PRODUCERS {
        let mut links = serde_json::Map::new();
        for (path, operation_id) in &consumers {
            let params: Vec<&str> = path.split('{').skip(1).filter_map(|p| p.split_once('}')).map(|(p, _)| p).collect();
            if !params.contains(param) {
                continue;
            }
            let mut values = serde_json::Map::new();
            for p in &params {
                if p == param {
                    values.insert(p.to_string(), (*expression).into());
                } else if source.contains(&format!("{{{p}}}")) {
                    values.insert(p.to_string(), format!("$request.path.{p}").into());
                }
            }
            if values.len() == params.len() {
                links.insert(
                    operation_id.clone(),
                    serde_json::json!({"operationId": operation_id, "parameters": values}),
                );
            }
        }
        if let Some(response) = api["paths"][*source][*method]["responses"][*status].as_object_mut() {
            response.insert("links".into(), serde_json::Value::Object(links));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Seed paths this build does not serve (none today). An entry here is checked to be
    /// really missing, so the list cannot go stale.
    const NOT_YET_SERVED: &[&str] = &[];

    fn served() -> BTreeSet<String> {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                out.insert(format!("{method} {path}"));
            }
        }
        out
    }

    /// `method /v1<path>` for every operation of the seed document (read without a YAML parser:
    /// paths are the two-space-indented keys under `paths:`, methods the four-space ones).
    fn seed_operations() -> BTreeSet<String> {
        let seed = include_str!("../seed/openapi-seed.yaml");
        let mut out = BTreeSet::new();
        let mut in_paths = false;
        let mut path = String::new();
        for line in seed.lines() {
            if line.starts_with("paths:") {
                in_paths = true;
                continue;
            }
            if in_paths && !line.starts_with(' ') && !line.trim().is_empty() && !line.starts_with('#') {
                break;
            }
            if let Some(p) = line.strip_prefix("  /") {
                path = format!("/v1/{}", p.trim_end_matches(':'));
            } else if let Some(m) = line.strip_prefix("    ") {
                let m = m.trim_end_matches(':');
                if ["get", "post", "put", "patch", "delete"].contains(&m) {
                    out.insert(format!("{m} {path}"));
                }
            }
        }
        out
    }

    #[test]
    fn the_committed_document_is_the_generated_one() {
        let committed = include_str!("../openapi.json");
        assert!(
            committed == document(),
            "api/openapi.json is out of date; regenerate it with `runtimeai openapi > api/openapi.json`"
        );
    }

    #[test]
    fn every_seed_operation_is_served_with_the_same_path() {
        let seed = seed_operations();
        assert!(seed.len() >= 20, "the seed parser found only {seed:?}");
        let served = served();
        let missing: Vec<&String> =
            seed.iter().filter(|op| !served.contains(*op) && !NOT_YET_SERVED.contains(&op.as_str())).collect();
        assert!(missing.is_empty(), "seed operations not served: {missing:?}");
        for op in NOT_YET_SERVED {
            assert!(!served.contains(*op), "{op} is served now: remove it from NOT_YET_SERVED");
        }
    }

    #[test]
    fn every_route_of_the_served_document_says_what_it_needs_and_only_the_probes_are_public() {
        use crate::auth::{route_access, Access, ROUTES};
        let served = served();
        for op in &served {
            let (method, path) = op.split_once(' ').unwrap();
            let method: axum::http::Method = method.to_uppercase().parse().unwrap();
            let access = route_access(&method, path);
            assert!(access.is_some(), "{op} has no entry in auth::ROUTES: it would be refused to everyone");
            let public = matches!(path, "/healthz" | "/readyz");
            assert_eq!(access == Some(Access::Public), public, "{op}");
        }
        for (method, path, _) in ROUTES.iter().filter(|(_, path, _)| *path != "/mcp") {
            let op = format!("{} {path}", method.to_lowercase());
            assert!(served.contains(&op), "auth::ROUTES lists {op}, which the document does not serve");
        }
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        assert_eq!(doc["security"], serde_json::json!([{"bearer": []}]), "bearer keys by default");
        assert_eq!(doc["paths"]["/healthz"]["get"]["security"], serde_json::json!([{}]), "the probes are public");
    }

    #[test]
    fn the_document_is_openapi_3_1() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["components"]["schemas"]["Runtime"].is_object());
        assert!(doc["components"]["schemas"]["Problem"].is_object());
    }
}
