//! A typed client of RuntimeAI's REST API: the Rust SDK for agents and tools (the MCP server's
//! stdio mode uses it). Other languages generate theirs from the OpenAPI document the cluster
//! serves (`/v1/openapi.json`, committed as `api/openapi.json`), which stays the contract; the
//! types here are checked against it by a test.
//!
//! A [`Client`] knows several members of a cluster and passes over one it cannot reach (any
//! member serves the API). Writes carry an idempotency key, so a write retried after a broken
//! connection is applied once. A refusal is [`ClientError::Api`] with the problem+json.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use runtimeai_model::{
    ActionKind, Approval, Assignment, EventSeverity, OperationError, OperationProgress, OperationStatus,
    PolicyDecision, PolicyMode, Runtime, RuntimeState, RuntimeType,
};

/// What a call can end in besides its answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cluster refused the request (4xx, 5xx): its problem+json.
    #[error("{} {}: {}", .problem.status, .problem.title, .problem.detail)]
    Api { problem: Box<Problem> },
    /// No member could be reached.
    #[error("no server could be reached: {0}")]
    Unreachable(String),
    /// The request was sent, but the connection broke or timed out before an answer.
    #[error("no answer: {0}")]
    Transport(String),
    /// The answer was not what the API documents.
    #[error("an answer that does not parse: {0}")]
    Decode(String),
    /// The client's own set-up (a CA file, a URL).
    #[error("{0}")]
    Config(String),
}

impl ClientError {
    /// The refusal an answer of `status` with `body` (its problem+json, else its text) is.
    pub fn refusal(status: u16, body: &Value) -> ClientError {
        let problem = serde_json::from_value(body.clone()).unwrap_or_else(|_| Problem {
            status,
            title: "Error".into(),
            detail: body.to_string(),
            ..Problem::default()
        });
        ClientError::Api { problem: Box::new(problem) }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { problem } => Some(problem.status),
            _ => None,
        }
    }
}

/// A refusal, as RFC 9457 problem+json.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// For validation errors: each offending field's JSON path and what is wrong.
    #[serde(default)]
    pub errors: Vec<FieldError>,
    /// For a policy denial: the decision, naming the policy and rule.
    #[serde(default)]
    pub decision: Option<Value>,
    /// For a request over a limit: which setting, its value, what the request needed.
    #[serde(default)]
    pub limit: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// An asynchronous piece of work on a runtime, as `GET /v1/operations/{id}` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    pub runtime_id: String,
    /// `create`, `start`, `stop`, ..., or `execute` (a list of actions).
    pub kind: String,
    pub params: Value,
    #[serde(default)]
    pub results: Option<Vec<ActionResult>>,
    /// `queued`, `pending_approval`, `running`, `succeeded`, `failed`, `cancelled`.
    pub status: String,
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub progress: Option<OperationProgress>,
    pub error: Option<OperationError>,
    pub requested_by: String,
    pub policy_mode: Option<PolicyMode>,
    #[serde(default)]
    pub decisions: Vec<PolicyDecision>,
    pub approval: Option<Approval>,
    pub assignment: Option<Assignment>,
    pub attempts: u32,
    pub version: u64,
}

impl Operation {
    /// Whether it has ended (succeeded, failed or cancelled).
    pub fn ended(&self) -> bool {
        self.finished_at.is_some()
    }
}

/// How one action of an operation went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActionResult {
    pub action: Value,
    pub status: String,
    pub message: Option<String>,
}

/// An event of a runtime or of the audit stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub runtime_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub severity: EventSeverity,
    pub ts: Option<chrono::DateTime<chrono::Utc>>,
    /// `human`, `agent`, `service` or `system`.
    pub actor: String,
    pub actor_name: Option<String>,
    pub data: serde_json::Map<String, Value>,
    pub seq: u64,
}

/// A page of runtimes; `next_page_token` goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeList {
    pub items: Vec<Runtime>,
    pub next_page_token: Option<String>,
}

/// A page of the event feed; `next_after` goes on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventFeedPage {
    pub items: Vec<Event>,
    pub next_after: Option<String>,
}

/// Unfinished operations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UnfinishedOperations {
    pub items: Vec<Operation>,
}

/// A lifecycle call (`POST /v1/runtimes/{id}/lifecycle/<verb>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Start,
    Stop,
    Restart,
    Scale,
    Snapshot,
    Restore,
    Pause,
    Resume,
    Migrate,
}

impl Lifecycle {
    pub fn verb(self) -> &'static str {
        match self {
            Lifecycle::Start => "start",
            Lifecycle::Stop => "stop",
            Lifecycle::Restart => "restart",
            Lifecycle::Scale => "scale",
            Lifecycle::Snapshot => "snapshot",
            Lifecycle::Restore => "restore",
            Lifecycle::Pause => "pause",
            Lifecycle::Resume => "resume",
            Lifecycle::Migrate => "migrate",
        }
    }
}

/// How fresh a read must be: `Linearizable` (the default) reflects every write acknowledged
/// before it; `Stale` is the serving member's replica as it is, without asking the leader.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Consistency {
    #[default]
    Linearizable,
    Stale,
}

/// What a relabel came to: done, or parked until a human approves it (a policy asked for it).
#[derive(Debug, Clone, PartialEq)]
pub enum Relabel {
    Done(Box<Runtime>),
    PendingApproval(Box<Operation>),
}

/// Which runtimes to list.
#[derive(Debug, Clone, Default)]
pub struct RuntimeQuery {
    pub runtime_type: Option<String>,
    pub state: Option<String>,
    pub label_selector: Option<String>,
    pub page_size: Option<u32>,
    pub page_token: Option<String>,
}

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub after: Option<String>,
    pub limit: Option<u32>,
    pub runtime_id: Option<String>,
    pub event_type: Option<String>,
    pub severity: Option<String>,
}

impl EventQuery {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = Vec::new();
        push(&mut pairs, "after", self.after.clone());
        push(&mut pairs, "limit", self.limit.map(|l| l.to_string()));
        push(&mut pairs, "runtime_id", self.runtime_id.clone());
        push(&mut pairs, "type", self.event_type.clone());
        push(&mut pairs, "severity", self.severity.clone());
        pairs
    }
}

/// A 2xx answer to `path` as a `T`; any other, the refusal it is.
fn decode<T: DeserializeOwned>(path: &str, status: u16, value: Value) -> Result<T, ClientError> {
    if !(200..300).contains(&status) {
        return Err(ClientError::refusal(status, &value));
    }
    serde_json::from_value(value).map_err(|e| ClientError::Decode(format!("{path}: {e}")))
}

fn push(pairs: &mut Vec<(&'static str, String)>, name: &'static str, value: Option<String>) {
    if let Some(value) = value {
        pairs.push((name, value));
    }
}

/// `name=value&...`, each part percent-encoded.
fn query(pairs: &[(&str, String)]) -> String {
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let joined: Vec<String> = pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect();
    if joined.is_empty() {
        String::new()
    } else {
        format!("?{}", joined.join("&"))
    }
}

/// A path segment (an id), percent-encoded so that it stays one segment.
fn segment(id: &str) -> String {
    query(&[("", id.to_string())]).trim_start_matches("?=").to_string()
}

/// How to reach a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClientConfig {
    /// Members' REST addresses (`https://10.0.0.1:8081`), tried in order.
    pub servers: Vec<String>,
    /// An API key (`rai_...`) or an OIDC bearer token.
    pub token: Option<String>,
    /// The CA (PEM) the servers' certificates are checked against; the system's roots if none.
    pub ca_pem: Option<Vec<u8>>,
    /// The tenant to act in (the `tenant_id` header).
    pub tenant: Option<String>,
    /// How long one request may take (default 60 s).
    pub timeout: Option<Duration>,
}

/// A client of one cluster.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    config: ClientConfig,
    /// The key every write carries ([`Client::with_idempotency_key`]); a fresh one per write if none.
    idempotency_key: Option<String>,
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        if config.servers.is_empty() {
            return Err(ClientError::Config("name at least one server".into()));
        }
        let mut http = reqwest::Client::builder().timeout(config.timeout.unwrap_or(Duration::from_secs(60)));
        if let Some(pem) = &config.ca_pem {
            let ca = reqwest::Certificate::from_pem(pem).map_err(|e| ClientError::Config(format!("the CA: {e}")))?;
            http = http.add_root_certificate(ca);
        }
        let http = http.build().map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Client { http, config, idempotency_key: None })
    }

    /// This client, with every write it sends carrying `key` as its `Idempotency-Key`: a write
    /// retried with the same key, even by another process, is applied once and answered as the
    /// first time. Without it each write gets a fresh key (retried within one call only).
    pub fn with_idempotency_key(&self, key: impl Into<String>) -> Client {
        Client { idempotency_key: Some(key.into()), ..self.clone() }
    }

    /// `method path_and_query` with `body` on the first member that can be reached: the status
    /// and the answer (JSON, or the text as a JSON string). Writes carry an idempotency key.
    pub async fn request_raw(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ClientError> {
        self.send(method, path_and_query, body, &[]).await
    }

    /// [`Client::request_raw`] with extra `headers`.
    async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<(u16, Value), ClientError> {
        let key = (method != reqwest::Method::GET)
            .then(|| self.idempotency_key.clone().unwrap_or_else(|| format!("sdk-{}", ulid::Ulid::new())));
        let mut unreachable = Vec::new();
        for server in &self.config.servers {
            let url = format!("{}{path_and_query}", server.trim_end_matches('/'));
            let mut request = self.http.request(method.clone(), &url);
            if let Some(token) = &self.config.token {
                request = request.bearer_auth(token);
            }
            if let Some(tenant) = &self.config.tenant {
                request = request.header("tenant_id", tenant);
            }
            if let Some(key) = &key {
                request = request.header("idempotency-key", key);
            }
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let bytes = response.bytes().await.map_err(|e| ClientError::Transport(e.to_string()))?;
                    let value = serde_json::from_slice(&bytes)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
                    return Ok((status, value));
                }
                // Never reached that member: the next one may answer.
                Err(e) if e.is_connect() => unreachable.push(format!("{server}: {e}")),
                Err(e) => return Err(ClientError::Transport(format!("{server}: {e}"))),
            }
        }
        Err(ClientError::Unreachable(unreachable.join("; ")))
    }

    /// A call whose 2xx answer is a `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let (status, value) = self.request_raw(method, path_and_query, body).await?;
        decode(path_and_query, status, value)
    }

    pub async fn list_runtimes(&self, filter: &RuntimeQuery) -> Result<RuntimeList, ClientError> {
        let mut pairs = Vec::new();
        push(&mut pairs, "type", filter.runtime_type.clone());
        push(&mut pairs, "state", filter.state.clone());
        push(&mut pairs, "label_selector", filter.label_selector.clone());
        push(&mut pairs, "page_size", filter.page_size.map(|s| s.to_string()));
        push(&mut pairs, "page_token", filter.page_token.clone());
        self.call(reqwest::Method::GET, &format!("/v1/runtimes{}", query(&pairs)), None).await
    }

    pub async fn get_runtime(&self, id: &str) -> Result<Runtime, ClientError> {
        self.get_runtime_at(id, Consistency::Linearizable).await
    }

    /// [`Client::get_runtime`] as fresh as `consistency` asks.
    pub async fn get_runtime_at(&self, id: &str, consistency: Consistency) -> Result<Runtime, ClientError> {
        let query = if consistency == Consistency::Stale { "?consistency=stale" } else { "" };
        self.call(reqwest::Method::GET, &format!("/v1/runtimes/{}{query}", segment(id)), None).await
    }

    /// Changes a runtime's labels (a value sets one, `None` removes it); with `if_match`, only
    /// if the runtime is still at that version (else a 412 refusal). Policies judge it as the
    /// action `relabel`.
    pub async fn relabel_runtime(
        &self,
        id: &str,
        labels: &BTreeMap<String, Option<String>>,
        if_match: Option<u64>,
    ) -> Result<Relabel, ClientError> {
        let path = format!("/v1/runtimes/{}", segment(id));
        let headers: Vec<(&str, String)> = if_match.map(|v| ("if-match", format!("\"{v}\""))).into_iter().collect();
        let body = serde_json::json!({ "labels": labels });
        let (status, value) = self.send(reqwest::Method::PATCH, &path, Some(&body), &headers).await?;
        if status == 202 {
            decode(&path, status, value).map(|operation| Relabel::PendingApproval(Box::new(operation)))
        } else {
            decode(&path, status, value).map(|runtime| Relabel::Done(Box::new(runtime)))
        }
    }

    /// Creates a runtime from a `RuntimeCreateRequest` (`{"name", "type", "spec", ...}`).
    pub async fn create_runtime(&self, request: &Value) -> Result<Runtime, ClientError> {
        self.call(reqwest::Method::POST, "/v1/runtimes", Some(request)).await
    }

    /// Begins a runtime's delete.
    pub async fn delete_runtime(&self, id: &str) -> Result<Operation, ClientError> {
        self.call(reqwest::Method::DELETE, &format!("/v1/runtimes/{}", segment(id)), None).await
    }

    /// Begins a lifecycle operation with its request body, if it takes one.
    pub async fn lifecycle(&self, id: &str, call: Lifecycle, body: Option<&Value>) -> Result<Operation, ClientError> {
        let path = format!("/v1/runtimes/{}/lifecycle/{}", segment(id), call.verb());
        self.call(reqwest::Method::POST, &path, body).await
    }

    /// Submits an intent (`{"goal", "constraints", "dry_run"}`): the intent and its plan.
    pub async fn submit_intent(&self, id: &str, request: &Value) -> Result<Value, ClientError> {
        self.call(reqwest::Method::POST, &format!("/v1/runtimes/{}/intent", segment(id)), Some(request)).await
    }

    /// Plans a goal's actions without running them.
    pub async fn plan_actions(&self, id: &str, request: &Value) -> Result<Value, ClientError> {
        self.call(reqwest::Method::POST, &format!("/v1/runtimes/{}/actions/plan", segment(id)), Some(request)).await
    }

    /// Runs a list of actions (`{"actions": [...]}`) as one operation.
    pub async fn execute_actions(&self, id: &str, request: &Value) -> Result<Operation, ClientError> {
        let path = format!("/v1/runtimes/{}/actions/execute", segment(id));
        self.call(reqwest::Method::POST, &path, Some(request)).await
    }

    pub async fn get_operation(&self, id: &str) -> Result<Operation, ClientError> {
        self.call(reqwest::Method::GET, &format!("/v1/operations/{}", segment(id)), None).await
    }

    /// Polls an operation until it ends or `timeout` passes (then it is returned as it is),
    /// telling `seen` each version it sees.
    pub async fn wait_operation(
        &self,
        id: &str,
        timeout: Duration,
        mut seen: impl FnMut(&Operation),
    ) -> Result<Operation, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut version = None;
        loop {
            let operation = self.get_operation(id).await?;
            if version != Some(operation.version) {
                version = Some(operation.version);
                seen(&operation);
            }
            if operation.ended() || tokio::time::Instant::now() >= deadline {
                return Ok(operation);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Decides on an operation waiting for approval (`approve`: true) or rejects it.
    pub async fn decide(&self, id: &str, approve: bool, reason: Option<&str>) -> Result<Operation, ClientError> {
        let verb = if approve { "approve" } else { "reject" };
        let body = serde_json::json!({ "reason": reason.unwrap_or(if approve { "approved" } else { "rejected" }) });
        self.call(reqwest::Method::POST, &format!("/v1/operations/{}/{verb}", segment(id)), Some(&body)).await
    }

    pub async fn cancel_operation(&self, id: &str) -> Result<Operation, ClientError> {
        self.call(reqwest::Method::POST, &format!("/v1/operations/{}/cancel", segment(id)), None).await
    }

    /// Operations not finished yet (`status`: `pending_approval` for what waits for a decision).
    pub async fn unfinished_operations(&self, status: Option<&str>) -> Result<UnfinishedOperations, ClientError> {
        let pairs: Vec<(&str, String)> = status.map(|s| ("status", s.to_string())).into_iter().collect();
        self.call(reqwest::Method::GET, &format!("/v1/operations{}", query(&pairs)), None).await
    }

    /// A page of the cluster's event feed.
    pub async fn events(&self, filter: &EventQuery) -> Result<EventFeedPage, ClientError> {
        self.call(reqwest::Method::GET, &format!("/v1/events{}", query(&filter.pairs())), None).await
    }

    /// Follows the event feed after `filter.after`, calling `each` for every event as it comes,
    /// until `each` returns false or `timeout` passes; resumes through another member, from the
    /// last event seen, when its connection breaks. Returns the last event's id.
    pub async fn follow_events(
        &self,
        filter: &EventQuery,
        timeout: Duration,
        mut each: impl FnMut(&Event) -> bool,
    ) -> Result<Option<String>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = filter.after.clone();
        while tokio::time::Instant::now() < deadline {
            let page = self.events(&EventQuery { after: last.clone(), limit: Some(1000), ..filter.clone() }).await?;
            for event in &page.items {
                last = Some(event.id.clone());
                if !each(event) {
                    return Ok(last);
                }
            }
            if page.next_after.is_none() && page.items.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            } else if let Some(next) = page.next_after {
                last = Some(next);
            }
        }
        Ok(last)
    }

    /// The cluster: leader, members, their roles (`GET /v1/cluster`).
    pub async fn cluster(&self) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, "/v1/cluster", None).await
    }

    /// Who the credentials are.
    pub async fn whoami(&self) -> Result<Value, ClientError> {
        self.call(reqwest::Method::GET, "/v1/auth/whoami", None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The properties of component `name` in the committed OpenAPI document.
    fn properties(name: &str) -> Vec<String> {
        let text = include_str!("../../openapi.json");
        let document: Value = serde_json::from_str(text).unwrap();
        let schema = &document["components"]["schemas"][name];
        assert!(schema.is_object(), "the document has no schema {name}");
        let mut names: Vec<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
        names.sort();
        names
    }

    /// The fields `T` reads and writes.
    fn fields<T: Serialize + Default>() -> Vec<String> {
        let mut names: Vec<String> =
            serde_json::to_value(T::default()).unwrap().as_object().unwrap().keys().cloned().collect();
        names.sort();
        names
    }

    #[test]
    fn the_types_have_the_fields_the_openapi_document_says() {
        assert_eq!(fields::<Operation>(), properties("OperationView"));
        assert_eq!(fields::<ActionResult>(), properties("ActionResultView"));
        assert_eq!(fields::<Event>(), properties("EventView"));
        assert_eq!(fields::<EventFeedPage>(), properties("EventFeedPage"));
        assert_eq!(fields::<UnfinishedOperations>(), properties("UnfinishedOperations"));
        assert_eq!(fields::<Problem>(), properties("Problem"));
        assert_eq!(fields::<FieldError>(), properties("FieldError"));
        let mut list = vec!["items".to_string(), "next_page_token".to_string()];
        list.sort();
        assert_eq!(list, properties("RuntimeList"));
    }

    #[test]
    fn ids_stay_one_path_segment_and_queries_are_encoded() {
        assert_eq!(segment("rt_1"), "rt_1");
        assert_eq!(segment("../keys"), "..%2Fkeys");
        assert_eq!(
            query(&[("label_selector", "env=prod,team in (a)".into())]),
            "?label_selector=env%3Dprod%2Cteam%20in%20%28a%29"
        );
        assert_eq!(query(&[]), "");
    }
}
