//! The MCP server (Model Context Protocol, on the official Rust SDK `rmcp`): what an agent does
//! with RuntimeAI, as tools. Served over Streamable HTTP at `/mcp` on every node (stateless, so
//! any node answers, as for REST) and over stdio by `runtimeai mcp` for local agents.
//!
//! Each tool is one REST route, called with the caller's own credentials through [`Rest`] (in
//! process for `/mcp`, over HTTPS for stdio): authentication, tenants, agent modes, policies,
//! validation and errors are the API's own, and a refusal comes back as a tool error carrying
//! the problem+json. A tool's input schema is made from the route's parameters and request body
//! in the served OpenAPI document; the tools listed are those the caller's permissions reach
//! (a read-only agent sees read tools, a suggest-only one plans and dry runs too). Approving
//! is not a tool: an agent never decides on an approval.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, Method};
use futures::future::BoxFuture;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, ListToolsResult, PaginatedRequestParams,
    ProgressNotificationParam, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::{ErrorData as McpError, ServerHandler};
use serde_json::{Map, Value};

use runtimeai_model::Principal;

use crate::auth::{may, route_access, Access};

/// Headers of the MCP request that a tool's REST call carries on (who calls, in which tenant).
const PASSED_ON: [&str; 2] = ["authorization", "tenant_id"];

/// The longest `wait_operation` waits.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// How a tool reaches the REST API: `(status, body)` of `method path_and_query` with `body`,
/// on behalf of whoever `credentials` says.
pub trait Rest: Send + Sync + 'static {
    fn call<'a>(
        &'a self,
        credentials: &'a Credentials,
        method: Method,
        path_and_query: String,
        body: Option<Value>,
    ) -> BoxFuture<'a, Result<(u16, Value), String>>;
}

/// Who an MCP request comes from, as its REST calls say it: the request's `Authorization` and
/// `tenant_id` headers and its connection's facts (address, client certificate).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub headers: HeaderMap,
    pub extensions: axum::http::Extensions,
}

impl Credentials {
    fn of(context: &RequestContext<RoleServer>) -> Credentials {
        let Some(parts) = context.extensions.get::<axum::http::request::Parts>() else {
            return Credentials::default();
        };
        let mut headers = HeaderMap::new();
        for name in PASSED_ON {
            if let Some(value) = parts.headers.get(name) {
                headers.insert(name, value.clone());
            }
        }
        let mut extensions = axum::http::Extensions::new();
        if let Some(remote) = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>() {
            extensions.insert(*remote);
        }
        if let Some(cert) = parts.extensions.get::<axum::extract::ConnectInfo<crate::auth::ClientCertificate>>() {
            extensions.insert(cert.clone());
        }
        Credentials { headers, extensions }
    }
}

/// What a tool does to the cluster, as MCP's annotations say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Changes nothing.
    Reads,
    /// Changes something and may stop or remove what runs.
    Destroys { idempotent: bool },
}

/// One tool: the REST route it calls.
struct ToolSpec {
    name: &'static str,
    title: &'static str,
    description: &'static str,
    method: Method,
    path: &'static str,
    effect: Effect,
    /// Query parameters the tool sets itself (not the caller).
    fixed_query: &'static [(&'static str, &'static str)],
}

fn specs() -> Vec<ToolSpec> {
    use Effect::*;
    let spec = |name, title, description, method, path, effect| ToolSpec {
        name,
        title,
        description,
        method,
        path,
        effect,
        fixed_query: &[],
    };
    vec![
        spec("list_runtimes", "List runtimes", "Runtimes (VMs, vclusters, sandboxes) with their state, a page at a time; filters by type, state and labels.", Method::GET, "/v1/runtimes", Reads),
        spec("get_runtime", "Get a runtime", "One runtime: its spec, state, placement, snapshots and active operation.", Method::GET, "/v1/runtimes/{runtime_id}", Reads),
        spec("get_runtime_status", "Runtime status", "A runtime's state, health and measured signals (cpu, memory, disk, cost).", Method::GET, "/v1/runtimes/{runtime_id}/status", Reads),
        spec("list_events", "List events", "The cluster's events in one order (`after` the last id you have), filtered by runtime, type and severity.", Method::GET, "/v1/events", Reads),
        spec("plan_actions", "Plan actions", "The actions a goal (\"reduce cost\", \"restart\") would take on a runtime under constraints, and what the policies would decide; nothing runs.", Method::POST, "/v1/runtimes/{runtime_id}/actions/plan", Reads),
        spec("submit_intent", "Submit an intent", "A goal with constraints becomes a checked plan and, unless dry_run is true, one operation that carries it out (policies may deny it or hold it for a human's approval).", Method::POST, "/v1/runtimes/{runtime_id}/intent", Destroys { idempotent: false }),
        spec("execute_actions", "Execute actions", "Runs a list of actions (start, stop, restart, scale, snapshot, restore, migrate, ...) on a runtime in order, as one operation judged by the policies.", Method::POST, "/v1/runtimes/{runtime_id}/actions/execute", Destroys { idempotent: false }),
        spec("get_operation", "Get an operation", "An operation's status (queued, pending_approval, running, succeeded, failed, cancelled), progress and each action's result.", Method::GET, "/v1/operations/{operation_id}", Reads),
        spec("wait_operation", "Wait for an operation", "Waits until the operation has ended or timeout_seconds (default 60, at most 300) have passed, reporting progress; returns the operation.", Method::GET, "/v1/operations/{operation_id}", Reads),
        spec("cancel_operation", "Cancel an operation", "Cancels a queued, running or waiting operation.", Method::POST, "/v1/operations/{operation_id}/cancel", Destroys { idempotent: true }),
        ToolSpec {
            fixed_query: &[("status", "pending_approval")],
            ..spec("list_pending_approvals", "List pending approvals", "Operations that wait for a human to approve or reject them (agents cannot decide on them).", Method::GET, "/v1/operations", Reads)
        },
    ]
}

/// The tools and their schemas, made once from the OpenAPI document.
pub struct Catalogue {
    tools: Vec<(ToolSpec, Tool)>,
}

impl Catalogue {
    /// From the document `/v1/openapi.json` serves.
    pub fn from_document(document: &Value) -> Catalogue {
        let tools = specs()
            .into_iter()
            .map(|spec| {
                let mut schema = input_schema(document, &spec);
                if spec.name == "wait_operation" {
                    schema["properties"]["timeout_seconds"] = serde_json::json!({
                        "type": "integer", "minimum": 1, "maximum": MAX_WAIT.as_secs(),
                        "description": "How long to wait at most (default 60)."});
                }
                let annotations = match spec.effect {
                    Effect::Reads => ToolAnnotations::with_title(spec.title).read_only(true),
                    Effect::Destroys { idempotent } => ToolAnnotations::with_title(spec.title)
                        .read_only(false)
                        .destructive(true)
                        .idempotent(idempotent),
                }
                .open_world(false);
                let schema = schema.as_object().cloned().unwrap_or_default();
                let tool = Tool::new(spec.name, spec.description, Arc::new(schema))
                    .with_title(spec.title)
                    .with_annotations(annotations);
                (spec, tool)
            })
            .collect();
        Catalogue { tools }
    }

    /// The tools `principal` may call.
    fn for_principal<'a>(&'a self, principal: &'a Principal) -> impl Iterator<Item = &'a (ToolSpec, Tool)> + 'a {
        self.tools.iter().filter(move |(spec, _)| match route_access(&spec.method, spec.path) {
            Some(Access::Needs(permission)) => may(principal, permission),
            Some(Access::Authenticated | Access::Public) => true,
            None => false,
        })
    }
}

/// A tool's input: the route's path and query parameters (not `consistency`) and its JSON
/// body's properties, with the schemas they refer to under `$defs`.
fn input_schema(document: &Value, spec: &ToolSpec) -> Value {
    let operation = &document["paths"][spec.path][spec.method.as_str().to_lowercase()];
    let mut properties = Map::new();
    let mut required = Vec::new();
    for parameter in operation["parameters"].as_array().into_iter().flatten() {
        let name = parameter["name"].as_str().unwrap_or_default();
        let place = parameter["in"].as_str().unwrap_or_default();
        let fixed = spec.fixed_query.iter().any(|(fixed, _)| *fixed == name);
        if !matches!(place, "path" | "query") || name == "consistency" || name == "timeout_seconds" || fixed {
            continue;
        }
        let mut schema = parameter["schema"].clone();
        if let Some(description) = parameter["description"].as_str() {
            schema["description"] = description.into();
        }
        properties.insert(name.to_string(), schema);
        if parameter["required"] == true {
            required.push(Value::from(name));
        }
    }
    let body = &operation["requestBody"]["content"]["application/json"]["schema"];
    if let Some(body) = component(document, body) {
        for (name, schema) in body["properties"].as_object().into_iter().flatten() {
            properties.insert(name.clone(), schema.clone());
        }
        required.extend(body["required"].as_array().into_iter().flatten().cloned());
    }
    let mut schema = serde_json::json!({"type": "object", "properties": properties, "required": required});
    let mut defs = Map::new();
    collect_defs(document, &schema.clone(), &mut defs);
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    rewrite_refs(&mut schema);
    schema
}

/// The component a body schema refers to (directly, or as the non-null choice of an optional
/// body).
fn component<'a>(document: &'a Value, schema: &'a Value) -> Option<&'a Value> {
    let reference = schema["$ref"]
        .as_str()
        .or_else(|| schema["oneOf"].as_array()?.iter().find_map(|choice| choice["$ref"].as_str()))?;
    let name = reference.strip_prefix("#/components/schemas/")?;
    Some(&document["components"]["schemas"][name])
}

/// Every component `value` refers to, directly or through others.
fn collect_defs(document: &Value, value: &Value, defs: &mut Map<String, Value>) {
    match value {
        Value::Object(map) => {
            if let Some(name) =
                map.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/components/schemas/"))
            {
                if !defs.contains_key(name) {
                    let schema = document["components"]["schemas"][name].clone();
                    defs.insert(name.to_string(), schema.clone());
                    collect_defs(document, &schema, defs);
                }
            }
            map.values().for_each(|v| collect_defs(document, v, defs));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_defs(document, v, defs)),
        _ => {}
    }
}

/// `#/components/schemas/X` → `#/$defs/X`.
fn rewrite_refs(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get_mut("$ref") {
                if let Some(name) = reference.strip_prefix("#/components/schemas/") {
                    *reference = format!("#/$defs/{name}");
                }
            }
            map.values_mut().for_each(rewrite_refs);
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

/// The MCP server: the catalogue, and the way to the REST API.
#[derive(Clone)]
pub struct McpServer {
    catalogue: Arc<Catalogue>,
    rest: Arc<dyn Rest>,
}

impl McpServer {
    pub fn new(catalogue: Arc<Catalogue>, rest: Arc<dyn Rest>) -> McpServer {
        McpServer { catalogue, rest }
    }

    /// Who the credentials are (`GET /v1/auth/whoami`).
    async fn principal(&self, credentials: &Credentials) -> Result<Principal, McpError> {
        let (status, body) = self
            .rest
            .call(credentials, Method::GET, "/v1/auth/whoami".into(), None)
            .await
            .map_err(|e| McpError::internal_error(e, None))?;
        if status != 200 {
            return Err(McpError::invalid_request(problem_detail(&body), Some(body)));
        }
        serde_json::from_value(body["principal"].clone()).map_err(|e| McpError::internal_error(e.to_string(), None))
    }

    /// One call of `spec` with `arguments`: the REST call's answer as the tool's result.
    async fn run(
        &self,
        spec: &ToolSpec,
        credentials: &Credentials,
        mut arguments: Map<String, Value>,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, String> {
        let wait = spec.name == "wait_operation";
        let timeout = arguments.remove("timeout_seconds").and_then(|t| t.as_u64()).unwrap_or(60);
        let (path_and_query, body) = request_of(spec, arguments)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout).min(MAX_WAIT);
        let progress = context.meta.get_progress_token();
        loop {
            let (status, answer) =
                self.rest.call(credentials, spec.method.clone(), path_and_query.clone(), body.clone()).await?;
            if !(200..300).contains(&status) {
                return Ok(CallToolResult::structured_error(answer));
            }
            let ended = answer["finished_at"].is_string() || !answer["status"].is_string();
            if !wait || ended || tokio::time::Instant::now() >= deadline {
                return Ok(CallToolResult::structured(answer));
            }
            if let Some(token) = &progress {
                let percent = answer["progress"]["percent"].as_f64().unwrap_or(0.0);
                let message = format!(
                    "{}: {}",
                    answer["status"].as_str().unwrap_or(""),
                    answer["progress"]["message"].as_str().unwrap_or("")
                );
                let note =
                    ProgressNotificationParam::new(token.clone(), percent).with_total(100.0).with_message(message);
                let _ = context.peer.notify_progress(note).await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The REST request a tool call makes: path parameters put in place, the rest of the
/// arguments in the query (for a GET) or the JSON body.
fn request_of(spec: &ToolSpec, mut arguments: Map<String, Value>) -> Result<(String, Option<Value>), String> {
    let mut path = spec.path.to_string();
    while let Some(start) = path.find('{') {
        let end = path[start..].find('}').map(|e| start + e).ok_or("a route without its closing brace")?;
        let name = path[start + 1..end].to_string();
        let value = match arguments.remove(&name) {
            Some(Value::String(value)) if !value.is_empty() => value,
            _ => return Err(format!("{name} is required (a string)")),
        };
        path.replace_range(start..=end, &url_encode(&value));
    }
    if spec.method != Method::GET {
        return Ok((path, Some(Value::Object(arguments))));
    }
    let mut query: Vec<(String, String)> =
        spec.fixed_query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    for (name, value) in arguments {
        let text = match value {
            Value::String(text) => text,
            Value::Null => continue,
            other => other.to_string(),
        };
        query.push((name, text));
    }
    if !query.is_empty() {
        let encoded =
            query.iter().map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v))).collect::<Vec<_>>().join("&");
        path = format!("{path}?{encoded}");
    }
    Ok((path, None))
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn problem_detail(body: &Value) -> String {
    body["detail"].as_str().unwrap_or("refused").to_string()
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("runtimeai", crate::VERSION))
            .with_instructions(
                "RuntimeAI runs VMs, virtual Kubernetes clusters and agent sandboxes. Read with list_runtimes, \
                 get_runtime and list_events; plan with plan_actions or submit_intent (dry_run); act with \
                 execute_actions or submit_intent, then wait_operation. Policies may deny an action or hold it \
                 for a human's approval (list_pending_approvals); you cannot approve.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let principal = self.principal(&Credentials::of(&context)).await?;
        let tools = self.catalogue.for_principal(&principal).map(|(_, tool)| tool.clone()).collect();
        Ok(ListToolsResult { tools, ..Default::default() })
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let credentials = Credentials::of(&context);
        let principal = self.principal(&credentials).await?;
        let Some((spec, _)) = self.catalogue.for_principal(&principal).find(|(spec, _)| spec.name == request.name)
        else {
            let message: Cow<'static, str> = format!("no tool {} for {}", request.name, principal.actor()).into();
            return Err(McpError::invalid_params(message, None));
        };
        let arguments = request.arguments.unwrap_or_default();
        match self.run(spec, &credentials, arguments, &context).await {
            Ok(result) => Ok(result.into()),
            Err(why) => Ok(CallToolResult::structured_error(serde_json::json!({"detail": why})).into()),
        }
    }
}

/// The REST API of this node, called in process: the router's own request path, from the
/// authentication on.
#[derive(Clone)]
pub struct InProcess(pub axum::Router);

impl Rest for InProcess {
    fn call<'a>(
        &'a self,
        credentials: &'a Credentials,
        method: Method,
        path_and_query: String,
        body: Option<Value>,
    ) -> BoxFuture<'a, Result<(u16, Value), String>> {
        Box::pin(async move {
            use tower::ServiceExt;
            let bytes = body.map(|b| b.to_string()).unwrap_or_default();
            let mut request = axum::http::Request::builder().method(method).uri(path_and_query);
            if !bytes.is_empty() {
                request = request.header("content-type", "application/json");
            }
            let mut request = request.body(axum::body::Body::from(bytes)).map_err(|e| e.to_string())?;
            request.headers_mut().extend(credentials.headers.clone());
            request.extensions_mut().extend(credentials.extensions.clone());
            let response = self.0.clone().oneshot(request).await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let bytes = axum::body::to_bytes(response.into_body(), 64 << 20).await.map_err(|e| e.to_string())?;
            let body = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
            Ok((status, body))
        })
    }
}

/// The Streamable HTTP service `/mcp` serves: stateless (no session lives on one node), JSON
/// answers unless a tool reports progress.
pub fn http_service(
    server: McpServer,
    max_body_bytes: usize,
) -> rmcp::transport::streamable_http_server::StreamableHttpService<
    McpServer,
    rmcp::transport::streamable_http_server::session::never::NeverSessionManager,
> {
    use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        // Requests carry bearer credentials, which browsers do not add on their own: no DNS
        // rebinding can borrow them, and a cluster is reached by many names.
        .disable_allowed_hosts()
        .with_max_request_body_bytes(max_body_bytes);
    StreamableHttpService::new(move || Ok(server.clone()), Default::default(), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> Catalogue {
        let document: Value = serde_json::from_str(&crate::openapi::document()).unwrap();
        Catalogue::from_document(&document)
    }

    #[test]
    fn input_schemas_come_from_the_routes_parameters_and_bodies() {
        let catalogue = catalogue();
        let schema = |name: &str| {
            let (_, tool) = catalogue.tools.iter().find(|(spec, _)| spec.name == name).unwrap();
            Value::Object(tool.input_schema.as_ref().clone())
        };
        let execute = schema("execute_actions");
        assert_eq!(execute["required"], serde_json::json!(["runtime_id", "actions"]), "{execute}");
        assert!(execute["$defs"]["Action"].is_object(), "the body's types travel with it: {execute}");
        assert!(!execute.to_string().contains("#/components/"), "every reference resolves inside: {execute}");
        let list = schema("list_runtimes");
        assert!(list["properties"]["page_size"].is_object() && list["properties"].get("consistency").is_none());
        assert!(schema("list_pending_approvals")["properties"].get("status").is_none(), "fixed by the tool");
        assert_eq!(schema("wait_operation")["properties"]["timeout_seconds"]["maximum"], 300);
    }

    #[test]
    fn tools_follow_the_principals_permissions_and_none_approves() {
        let catalogue = catalogue();
        let principal = |roles: Vec<runtimeai_model::Role>, mode: Option<runtimeai_model::AgentMode>| Principal {
            name: "p".into(),
            kind: if mode.is_some() {
                runtimeai_model::PrincipalKind::Agent
            } else {
                runtimeai_model::PrincipalKind::Human
            },
            tenants: vec!["*".into()],
            roles,
            agent_mode: mode,
        };
        use runtimeai_model::{AgentMode, Role};
        let names = |p: &Principal| catalogue.for_principal(p).map(|(s, _)| s.name).collect::<Vec<_>>();
        let reader = names(&principal(vec![Role::Agent], Some(AgentMode::ReadOnly)));
        assert!(reader.contains(&"list_runtimes") && !reader.contains(&"plan_actions"), "{reader:?}");
        let suggester = names(&principal(vec![Role::Agent], Some(AgentMode::SuggestOnly)));
        assert!(suggester.contains(&"submit_intent") && !suggester.contains(&"execute_actions"), "{suggester:?}");
        let admin = names(&principal(vec![Role::ClusterAdmin], None));
        assert_eq!(admin.len(), specs().len(), "{admin:?}");
        assert!(admin.iter().all(|n| !n.contains("approve")), "no tool approves");
        let (_, wait) = catalogue.tools.iter().find(|(s, _)| s.name == "wait_operation").unwrap();
        assert_eq!(wait.annotations.as_ref().and_then(|a| a.read_only_hint), Some(true));
        let (_, execute) = catalogue.tools.iter().find(|(s, _)| s.name == "execute_actions").unwrap();
        assert_eq!(execute.annotations.as_ref().and_then(|a| a.destructive_hint), Some(true));
    }

    #[test]
    fn a_call_puts_path_parameters_in_place_and_the_rest_in_the_query_or_body() {
        let specs = specs();
        let spec = |name: &str| specs.iter().find(|s| s.name == name).unwrap();
        let args = |v: Value| v.as_object().cloned().unwrap();
        let (path, body) = request_of(spec("list_pending_approvals"), args(serde_json::json!({"limit": 5}))).unwrap();
        assert_eq!((path.as_str(), body), ("/v1/operations?status=pending_approval&limit=5", None));
        let (path, body) =
            request_of(spec("execute_actions"), args(serde_json::json!({"runtime_id": "rt/1", "actions": []})))
                .unwrap();
        assert_eq!(path, "/v1/runtimes/rt%2F1/actions/execute", "a path parameter cannot leave its segment");
        assert_eq!(body, Some(serde_json::json!({"actions": []})));
        assert!(request_of(spec("get_runtime"), Map::new()).is_err());
    }
}
