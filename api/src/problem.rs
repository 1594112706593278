//! Every error the REST API returns, and the one place that turns errors into HTTP responses:
//! RFC 9457 `application/problem+json`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use runtimeai_raft::{ClusterError, Rejection};

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// For validation errors: the JSON path of each offending field.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For a policy denial: the decision, naming the policy and rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Box<runtimeai_model::PolicyDecision>>,
    /// For a request over a limit: which setting (`limits.<setting>` of the cluster settings),
    /// its value, and what the request needed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<Box<runtimeai_model::LimitExceeded>>,
    #[serde(skip)]
    #[schema(ignore)]
    pub retry_after_secs: Option<u32>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// JSON path of the field, e.g. `$.spec.resources.cpu`.
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Problem {
        Problem {
            type_uri: format!("https://runtimeai.dev/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            decision: None,
            limit: None,
            retry_after_secs: None,
        }
    }

    pub fn invalid_field(path: impl Into<String>, message: impl Into<String>) -> Problem {
        let message = message.into();
        let path = path.into();
        let mut problem = Problem::new(StatusCode::BAD_REQUEST, "validation", format!("{path}: {message}"));
        problem.errors.push(FieldError { path, message });
        problem
    }

    /// 409 `unsupported-action`: the request is well formed, but the runtime's backend cannot
    /// do what `path` names.
    pub fn unsupported_action(path: impl Into<String>, what: impl Into<String>) -> Problem {
        let (path, what) = (path.into(), what.into());
        let mut problem = Problem::new(StatusCode::CONFLICT, "unsupported-action", format!("{path}: {what}"));
        problem.errors.push(FieldError { path, message: what });
        problem
    }

    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// The state machine answered with a reply this endpoint does not expect: a bug, said so.
    pub fn unexpected_reply(reply: impl std::fmt::Debug) -> Problem {
        tracing::error!(?reply, "unexpected reply from the state machine");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("unexpected reply {reply:?}"))
    }

    pub fn unavailable(detail: impl Into<String>) -> Problem {
        let mut problem = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail);
        problem.retry_after_secs = Some(1);
        problem
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<ClusterError> for Problem {
    fn from(error: ClusterError) -> Problem {
        match &error {
            ClusterError::NoLeader(_)
            | ClusterError::NoQuorum(_)
            | ClusterError::TooManyHops
            | ClusterError::LeaderUnreachable { .. }
            | ClusterError::Stopped(_)
            | ClusterError::Timeout(_)
            | ClusterError::ConnectionLost { .. }
            | ClusterError::Overloaded { .. } => Problem::unavailable(error.to_string()),
            ClusterError::Invalid(_) => Problem::new(StatusCode::CONFLICT, "cluster-conflict", error.to_string()),
            ClusterError::NotFound(_) => Problem::not_found(error.to_string()),
            ClusterError::TooLarge { .. } => {
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "command-too-large", error.to_string())
            }
            ClusterError::Internal(_) => {
                tracing::error!(%error, "internal error serving a request");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string())
            }
        }
    }
}

impl From<Rejection> for Problem {
    fn from(rejection: Rejection) -> Problem {
        let (status, kind) = match &rejection {
            Rejection::NotFound { .. } => (StatusCode::NOT_FOUND, "not-found"),
            Rejection::NameTaken { .. } => (StatusCode::CONFLICT, "name-taken"),
            Rejection::AlreadyExists { .. } => (StatusCode::CONFLICT, "already-exists"),
            Rejection::VersionMismatch { .. } => (StatusCode::PRECONDITION_FAILED, "version-mismatch"),
            Rejection::IdempotencyKeyReused { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused"),
            Rejection::IllegalTransition { .. } => (StatusCode::CONFLICT, "illegal-transition"),
            Rejection::OperationInProgress { .. } => (StatusCode::CONFLICT, "operation-in-progress"),
            Rejection::IllegalOperationStatus { .. } => (StatusCode::CONFLICT, "illegal-operation-status"),
            Rejection::PolicyDenied { .. } => (StatusCode::FORBIDDEN, "policy-denied"),
            Rejection::SelfApproval { .. } => (StatusCode::FORBIDDEN, "self-approval"),
            Rejection::NotPermitted { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            Rejection::StaleToken { .. } => (StatusCode::CONFLICT, "stale-fencing-token"),
            Rejection::LeaseLost { .. } => (StatusCode::CONFLICT, "lease-lost"),
            Rejection::LimitExceeded(exceeded) => return exceeded.clone().into(),
        };
        let mut problem = Problem::new(status, kind, rejection.to_string());
        if let Rejection::PolicyDenied { decision } = rejection {
            let named = match (&decision.policy_name, decision.rule_index) {
                (Some(name), Some(rule)) => {
                    format!(" (policy {name}, rule {rule}: {})", decision.rule_kind.map_or("?", |kind| kind.as_str()))
                }
                _ => String::new(),
            };
            problem.detail =
                format!("action {} ({}) denied: {}{named}", decision.action_index, decision.action, decision.reason);
            problem.decision = Some(Box::new(decision));
        }
        problem
    }
}

/// 422 `limit-exceeded`, naming the setting.
impl From<runtimeai_model::LimitExceeded> for Problem {
    fn from(exceeded: runtimeai_model::LimitExceeded) -> Problem {
        let mut problem = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "limit-exceeded", exceeded.to_string());
        problem.limit = Some(Box::new(exceeded));
        problem
    }
}

impl From<runtimeai_raft::types::StorageError> for Problem {
    fn from(error: runtimeai_raft::types::StorageError) -> Problem {
        tracing::error!(%error, "store error serving a request");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("store error: {error}"))
    }
}
