//! Who is asking, and may they. Every request but `/healthz` and `/readyz` is authenticated by
//! an API key checked against the replicated state (in memory: no disk read, no write), or by
//! a client certificate of `--client-ca` whose common name a valid key's principal bears, or by
//! an OIDC token ([`crate::oidc`]), then
//! authorized: [`ROUTES`] names what each route needs, [`grants`] what each role allows, and an
//! agent's mode narrows that further. The outcome reaches handlers as a [`Caller`], the only
//! source of the actor and the tenants a request acts in (no header says who acts).
//!
//! | permission | viewer | operator | approver | policy_admin | cluster_admin | agent |
//! |---|---|---|---|---|---|---|
//! | `read`: runtimes, operations, intents, events, policies, cluster | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ |
//! | `plan`: plans and dry runs | | ✓ | | | ✓ | suggest_only, act |
//! | `operate`: create, change, drive, cancel; kubeconfigs | | ✓ | | | ✓ | act |
//! | `approve`: approve or reject parked operations | | | ✓ | | ✓ | never |
//! | `manage_policies` | | | | ✓ | ✓ | never |
//! | `manage_cluster`: members, settings, API keys, audit feed | | | | | ✓ | never |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use runtimeai_model::{strictness, Actor, AgentMode, ApiKey, PolicyMode, Principal, PrincipalKind, Role};

use crate::problem::Problem;
use crate::AppState;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: liveness and readiness probes.
    Public,
    /// Any authenticated principal (e.g. asking who it is).
    Authenticated,
    Needs(Permission),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Read,
    Plan,
    Operate,
    Approve,
    ManagePolicies,
    ManageCluster,
}

/// Every route of the API and what it needs. A route missing here is refused to everyone
/// (a test fails when a route of the served OpenAPI document has no entry).
pub const ROUTES: &[(&str, &str, Access)] = {
    use Access::*;
    use Permission::*;
    &[
        ("GET", "/healthz", Public),
        ("GET", "/readyz", Public),
        ("GET", "/v1/health", Needs(Read)),
        ("GET", "/metrics", Needs(Read)),
        ("GET", "/v1/openapi.json", Authenticated),
        // The MCP server: each tool call is checked again as the REST call it makes.
        ("POST", "/mcp", Authenticated),
        ("GET", "/mcp", Authenticated),
        ("DELETE", "/mcp", Authenticated),
        ("GET", "/v1/auth/whoami", Authenticated),
        ("GET", "/v1/cluster", Needs(Read)),
        ("GET", "/v1/events", Needs(Read)),
        ("GET", "/v1/events/stream", Needs(Read)),
        ("GET", "/v1/webhooks", Needs(Read)),
        ("POST", "/v1/webhooks", Needs(Operate)),
        ("GET", "/v1/webhooks/{webhook_id}", Needs(Read)),
        ("DELETE", "/v1/webhooks/{webhook_id}", Needs(Operate)),
        ("GET", "/v1/webhooks/{webhook_id}/deliveries", Needs(Read)),
        ("GET", "/v1/webhooks/{webhook_id}/secret", Needs(Operate)),
        ("POST", "/v1/cluster/members", Needs(ManageCluster)),
        ("DELETE", "/v1/cluster/members/{node_id}", Needs(ManageCluster)),
        ("POST", "/v1/cluster/members/{node_id}/evacuate", Needs(ManageCluster)),
        ("GET", "/v1/cluster/settings", Needs(Read)),
        ("PUT", "/v1/cluster/settings", Needs(ManageCluster)),
        ("GET", "/v1/audit", Needs(ManageCluster)),
        ("GET", "/v1/keys", Needs(ManageCluster)),
        ("POST", "/v1/keys", Needs(ManageCluster)),
        ("GET", "/v1/keys/{key_id}", Needs(ManageCluster)),
        ("DELETE", "/v1/keys/{key_id}", Needs(ManageCluster)),
        ("POST", "/v1/keys/{key_id}/rotate", Needs(ManageCluster)),
        ("GET", "/v1/policies", Needs(Read)),
        ("POST", "/v1/policies", Needs(ManagePolicies)),
        ("GET", "/v1/policies/{policy_id}", Needs(Read)),
        ("DELETE", "/v1/policies/{policy_id}", Needs(ManagePolicies)),
        ("GET", "/v1/runtimes", Needs(Read)),
        ("POST", "/v1/runtimes", Needs(Operate)),
        ("GET", "/v1/runtimes/{runtime_id}", Needs(Read)),
        ("PATCH", "/v1/runtimes/{runtime_id}", Needs(Operate)),
        ("DELETE", "/v1/runtimes/{runtime_id}", Needs(Operate)),
        ("GET", "/v1/runtimes/{runtime_id}/status", Needs(Read)),
        ("GET", "/v1/runtimes/{runtime_id}/operations", Needs(Read)),
        ("GET", "/v1/runtimes/{runtime_id}/snapshots", Needs(Read)),
        ("GET", "/v1/runtimes/{runtime_id}/events", Needs(Read)),
        ("GET", "/v1/runtimes/{runtime_id}/events/stream", Needs(Read)),
        // The virtual cluster's admin credentials: whoever may drive the runtime.
        ("GET", "/v1/runtimes/{runtime_id}/kubeconfig", Needs(Operate)),
        // A command in a sandbox: whoever may drive the runtime (and the policies say yes).
        ("POST", "/v1/runtimes/{runtime_id}/exec", Needs(Operate)),
        // What its command printed, as `kubectl logs` lets a viewer read.
        ("GET", "/v1/runtimes/{runtime_id}/logs", Needs(Read)),
        ("GET", "/v1/runtimes/{runtime_id}/console", Needs(Read)),
        // A sandbox's files, read or written from inside it: whoever may drive it.
        ("GET", "/v1/runtimes/{runtime_id}/files/{path}", Needs(Operate)),
        ("PUT", "/v1/runtimes/{runtime_id}/files/{path}", Needs(Operate)),
        ("POST", "/v1/runtimes/{runtime_id}/lifecycle/start", Needs(Operate)),
        ("POST", "/v1/runtimes/{runtime_id}/lifecycle/stop", Needs(Operate)),
        ("POST", "/v1/runtimes/{runtime_id}/lifecycle/restart", Needs(Operate)),
        ("POST", "/v1/runtimes/{runtime_id}/lifecycle/scale", Needs(Operate)),
        ("POST", "/v1/runtimes/{runtime_id}/lifecycle/snapshot", Needs(Operate)),
        ("POST", "/v1/runtimes/{runtime_id}/lifecycle/restore", Needs(Operate)),
        ("POST", "/v1/runtimes/{runtime_id}/lifecycle/pause", Needs(Operate)),
        ("POST", "/v1/runtimes/{runtime_id}/lifecycle/resume", Needs(Operate)),
        ("POST", "/v1/runtimes/{runtime_id}/lifecycle/migrate", Needs(Operate)),
        // A dry run plans; the handler asks for `operate` when the intent is to be carried out.
        ("POST", "/v1/runtimes/{runtime_id}/intent", Needs(Plan)),
        ("GET", "/v1/runtimes/{runtime_id}/intent/{intent_id}", Needs(Read)),
        ("POST", "/v1/runtimes/{runtime_id}/actions/plan", Needs(Plan)),
        ("POST", "/v1/runtimes/{runtime_id}/actions/execute", Needs(Operate)),
        ("GET", "/v1/operations", Needs(Read)),
        ("GET", "/v1/operations/{operation_id}", Needs(Read)),
        ("GET", "/v1/operations/{operation_id}/stream", Needs(Read)),
        ("POST", "/v1/operations/{operation_id}/cancel", Needs(Operate)),
        ("POST", "/v1/operations/{operation_id}/approve", Needs(Approve)),
        ("POST", "/v1/operations/{operation_id}/reject", Needs(Approve)),
    ]
};

/// What a route (method and path template, as routed) needs; `None` when it has no entry.
pub fn route_access(method: &Method, path: &str) -> Option<Access> {
    ROUTES.iter().find(|(m, p, _)| *m == method.as_str() && *p == path).map(|(_, _, access)| *access)
}

/// Whether `role` grants `permission`.
pub fn grants(role: Role, permission: Permission) -> bool {
    use Permission::*;
    match role {
        Role::Viewer => permission == Read,
        Role::Operator | Role::Agent => matches!(permission, Read | Plan | Operate),
        Role::Approver => matches!(permission, Read | Approve),
        Role::PolicyAdmin => matches!(permission, Read | ManagePolicies),
        Role::ClusterAdmin => true,
    }
}

/// Whether `principal` may do what `permission` covers: one of its roles grants it and, for an
/// agent, its mode allows it (an agent never approves, manages policies or the cluster,
/// whatever roles its key names).
pub fn may(principal: &Principal, permission: Permission) -> bool {
    use Permission::*;
    let by_mode = match principal.mode() {
        None => true,
        Some(AgentMode::ReadOnly) => permission == Read,
        Some(AgentMode::SuggestOnly) => matches!(permission, Read | Plan),
        Some(AgentMode::Act) => matches!(permission, Read | Plan | Operate),
    };
    by_mode && principal.roles.iter().any(|role| grants(*role, permission))
}

/// The bearer token of an API key: `rai_<id>_<secret>`.
pub struct Token<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

/// Parses a token; `None` when it is not of our form.
pub fn parse_token(token: &str) -> Option<Token<'_>> {
    let (id, secret) = token.strip_prefix("rai_")?.split_once('_')?;
    let id_ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (id_ok && secret.len() >= 32).then_some(Token { id, secret })
}

/// Lower-case hex SHA-256 of a secret, as keys store it. A plain hash suffices: secrets are
/// 256 random bits (or, for a bootstrap key an operator chose, at least 32 characters).
pub fn secret_digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random secret: 32 bytes from the OS, in hex.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS gives random bytes");
    hex::encode(bytes)
}

/// A new key for `principal`, and its bearer token (shown once, stored nowhere).
pub fn new_key(
    principal: Principal,
    created_by: &Actor,
    expires_at: Option<runtimeai_model::Timestamp>,
) -> (ApiKey, String) {
    let id = ulid::Ulid::new().to_string().to_lowercase();
    let secret = new_secret();
    let token = format!("rai_{id}_{secret}");
    let key = ApiKey {
        id,
        principal,
        secret_sha256: secret_digest(&secret),
        created_at: chrono::Utc::now(),
        created_by: created_by.to_string(),
        expires_at,
        revoked_at: None,
    };
    (key, token)
}

/// Why a request was not authenticated (logged; the client learns only that it was not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    NoCredentials,
    Malformed,
    UnknownKey,
    WrongSecret,
    Revoked,
    Expired,
}

/// Checks a bearer token against the keys in the replicated state.
pub fn authenticate_key(state: &runtimeai_raft::StateReader, token: &str) -> Result<Principal, AuthFailure> {
    let token = parse_token(token).ok_or(AuthFailure::Malformed)?;
    let digest = secret_digest(token.secret);
    let key = state.api_key(token.id).ok_or(AuthFailure::UnknownKey)?;
    if !bool::from(digest.as_bytes().ct_eq(key.secret_sha256.as_bytes())) {
        return Err(AuthFailure::WrongSecret);
    }
    if key.revoked_at.is_some() {
        return Err(AuthFailure::Revoked);
    }
    if !key.is_valid_at(chrono::Utc::now()) {
        return Err(AuthFailure::Expired);
    }
    Ok(key.principal)
}

/// Failed authentications: a counter, and a log line at most every [`FAILURE_LOG_EVERY`] that
/// says how many it stands for (a client hammering with bad keys cannot flood the log).
#[derive(Default)]
pub struct AuthFailures {
    total: AtomicU64,
    unlogged: AtomicU64,
    last_logged: Mutex<Option<Instant>>,
}

const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

impl AuthFailures {
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn record(&self, failure: AuthFailure, path: &str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let unlogged = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_logged.lock().expect("auth failure log lock");
        if last.is_none_or(|at| at.elapsed() >= FAILURE_LOG_EVERY) {
            *last = Some(Instant::now());
            self.unlogged.store(0, Ordering::Relaxed);
            tracing::warn!(reason = ?failure, path, failures = unlogged, "request not authenticated");
        }
    }
}

/// Authenticates and authorizes every routed request, and hands the handler its [`Caller`].
pub async fn guard(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = matched.as_ref().map(|m| m.as_str()).unwrap_or("");
    // Unlisted routes are refused to everyone: fail closed.
    let access = route_access(request.method(), path).unwrap_or(Access::Needs(Permission::ManageCluster));
    if access == Access::Public {
        if let Err(problem) = by_address(&state, &request) {
            return problem.into_response();
        }
        return next.run(request).await;
    }
    let mut outcome = credentials(&state, &request);
    if !matches!(outcome, Some(Ok(_))) {
        // No valid credentials: the client's address pays, before a read barrier is spent.
        if let Err(problem) = by_address(&state, &request) {
            return problem.into_response();
        }
    }
    if matches!(outcome, Some(Err(AuthFailure::UnknownKey))) {
        // A key made through another node a moment ago may not be applied here yet: catch up
        // with the leader once (a linearizable read) before refusing it.
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), state.replica.read_barrier()).await {
            outcome = credentials(&state, &request);
        }
    }
    let principal = match outcome {
        Some(Ok(principal)) => principal,
        Some(Err(failure)) => return unauthorized(&state, failure, path),
        None => return unauthorized(&state, AuthFailure::NoCredentials, path),
    };
    if let Err(problem) = state.rate_limits.principal(|| principal.actor().to_string()) {
        return problem.into_response();
    }
    if let Access::Needs(permission) = access {
        if !may(&principal, permission) {
            return forbidden(&principal, permission).into_response();
        }
    }
    match Caller::new(principal, request.headers()) {
        Ok(mut caller) => {
            caller.request = format!("{} {}", request.method(), request.uri().path());
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(problem) => problem.into_response(),
    }
}

/// One request from the client's address (when the connection's is known) against its rate.
fn by_address(state: &AppState, request: &Request) -> Result<(), Problem> {
    match request.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>() {
        Some(axum::extract::ConnectInfo(remote)) => state.rate_limits.address(remote.ip()),
        None => Ok(()),
    }
}

/// The certificate the client presented on the request's TLS connection (checked against
/// `--client-ca` in the handshake), if any.
#[derive(Clone, Debug)]
pub struct ClientCertificate(pub Option<rustls_pki_types::CertificateDer<'static>>);

/// The principal of a client certificate: the principal of a valid API key named as the
/// certificate's common name (the key gives the roles and tenants; revoking it ends both).
fn certificate_principal(state: &AppState, request: &Request) -> Option<Result<Principal, AuthFailure>> {
    let axum::extract::ConnectInfo(ClientCertificate(cert)) =
        request.extensions().get::<axum::extract::ConnectInfo<ClientCertificate>>()?;
    let name = runtimeai_raft::tls::common_name_of(cert.as_ref()?)?;
    let now = chrono::Utc::now();
    let keys = state.replica.state().api_keys();
    let key = keys.values().find(|k| k.principal.name == name && k.is_valid_at(now));
    Some(key.map(|k| k.principal.clone()).ok_or(AuthFailure::UnknownKey))
}

/// The principal the request's credentials name: its bearer token (an API key, or an OIDC
/// token when configured), else its client certificate; `None` without credentials.
fn credentials(state: &AppState, request: &Request) -> Option<Result<Principal, AuthFailure>> {
    let by_token = bearer(request.headers()).map(|token| match (&state.oidc, token.starts_with("rai_")) {
        (Some(oidc), false) => oidc.authenticate(token),
        _ => authenticate_key(state.replica.state(), token),
    });
    by_token.or_else(|| certificate_principal(state, request))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(state: &AppState, failure: AuthFailure, path: &str) -> Response {
    state.auth_failures.record(failure, path);
    let detail = match failure {
        AuthFailure::NoCredentials => "authentication required: send Authorization: Bearer <API key>",
        _ => "the credentials are not valid",
    };
    let mut response = Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", detail).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"runtimeai\""));
    response
}

fn forbidden(principal: &Principal, permission: Permission) -> Problem {
    let detail = match principal.mode() {
        Some(mode) => format!("{} (an agent in mode {mode:?}) may not {permission:?}", principal.actor()),
        None => format!("{} has no role that grants {permission:?}", principal.actor()),
    };
    Problem::new(StatusCode::FORBIDDEN, "forbidden", detail)
}

/// The authenticated principal of a request, the tenant it chose (`tenant_id` header, among
/// its own), and the request's headers.
#[derive(Clone)]
pub struct Caller {
    pub principal: Arc<Principal>,
    /// The tenant the `tenant_id` header chose; `None`: all of the principal's.
    pub tenant: Option<String>,
    pub headers: HeaderMap,
    /// The request's method and path as the client sent them (`DELETE /v1/runtimes/rt_…`):
    /// with its body, what an idempotency key's fingerprint covers.
    pub request: String,
}

impl Caller {
    /// Checks the `tenant_id` header against the principal's tenants (403 if not granted).
    pub fn new(principal: Principal, headers: &HeaderMap) -> Result<Caller, Problem> {
        let tenant = crate::extract::tenant(headers)?;
        if let Some(tenant) = &tenant {
            if !principal.may_see(Some(tenant)) {
                return Err(Problem::new(
                    StatusCode::FORBIDDEN,
                    "tenant-not-granted",
                    format!("{} is not granted tenant {tenant:?}", principal.actor()),
                ));
            }
        }
        Ok(Caller { principal: Arc::new(principal), tenant, headers: headers.clone(), request: String::new() })
    }

    pub fn actor(&self) -> Actor {
        self.principal.actor()
    }

    /// Whether the request may see an object of `tenant`: one of the principal's tenants, and
    /// the chosen one if the request chose.
    pub fn sees(&self, tenant: Option<&str>) -> bool {
        self.principal.may_see(tenant) && self.tenant.as_deref().is_none_or(|chosen| Some(chosen) == tenant)
    }

    /// The one tenant whose objects are all the caller sees, if it sees one tenant's only (the
    /// header chose it, or the principal has no other).
    pub fn only_tenant(&self) -> Option<String> {
        match (&self.tenant, self.principal.all_tenants(), self.principal.tenants.as_slice()) {
            (Some(chosen), _, _) => Some(chosen.clone()),
            (None, false, [only]) => Some(only.clone()),
            _ => None,
        }
    }

    /// 403 unless the principal may.
    pub fn require(&self, permission: Permission) -> Result<(), Problem> {
        if may(&self.principal, permission) {
            Ok(())
        } else {
            Err(forbidden(&self.principal, permission))
        }
    }

    /// The tenant a new object belongs to: the one the body names, else the header's, else the
    /// principal's only tenant; none for a principal of every tenant that names none.
    pub fn tenant_for_new(&self, named: Option<&str>, field: &str) -> Result<Option<String>, Problem> {
        let tenant = match (named, self.tenant.as_deref()) {
            (Some(named), Some(chosen)) if named != chosen => {
                return Err(Problem::invalid_field(field, "differs from the tenant_id header"))
            }
            (Some(named), _) => Some(named.to_string()),
            (None, Some(chosen)) => Some(chosen.to_string()),
            (None, None) if self.principal.all_tenants() => None,
            (None, None) => match self.principal.tenants.as_slice() {
                [only] => Some(only.clone()),
                _ => return Err(Problem::invalid_field(field, "name the tenant (this principal has several)")),
            },
        };
        if !self.principal.may_see(tenant.as_deref()) {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "tenant-not-granted",
                format!("{} is not granted tenant {:?}", self.actor(), tenant.unwrap_or_default()),
            ));
        }
        Ok(tenant)
    }

    /// The policy mode a request is evaluated in: the one it asks for if that is not looser
    /// than the principal's loosest (403 otherwise), else the principal's default.
    pub fn policy_mode(&self, asked: Option<PolicyMode>) -> Result<PolicyMode, Problem> {
        let Some(asked) = asked else { return Ok(self.principal.default_policy_mode()) };
        let loosest = self.principal.loosest_policy_mode();
        if strictness(asked) < strictness(loosest) {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "policy-mode-not-granted",
                format!(
                    "{} may ask for policy mode {} or stricter, not {}",
                    self.actor(),
                    loosest.as_str(),
                    asked.as_str()
                ),
            ));
        }
        Ok(asked)
    }

    /// Idempotency keys are the principal's own: another principal reusing one gets its own
    /// reply, never this one's.
    pub fn idempotency_scope(&self) -> String {
        format!("{}/{}", self.actor(), self.tenant.as_deref().unwrap_or(""))
    }

    pub fn is_agent(&self) -> bool {
        self.principal.kind == PrincipalKind::Agent
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        // Only `guard` puts one there; a handler reached without it refuses.
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Problem::new(StatusCode::UNAUTHORIZED, "unauthenticated", "authentication required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(kind: PrincipalKind, roles: &[Role], mode: Option<AgentMode>) -> Principal {
        Principal { name: "p".into(), kind, tenants: vec!["acme".into()], roles: roles.to_vec(), agent_mode: mode }
    }

    #[test]
    fn an_agent_is_bound_by_its_mode_and_never_approves_or_administers_whatever_its_roles() {
        use Permission::*;
        let admin_roles = [Role::ClusterAdmin, Role::Approver, Role::PolicyAdmin];
        for mode in [AgentMode::ReadOnly, AgentMode::SuggestOnly, AgentMode::Act] {
            let agent = principal(PrincipalKind::Agent, &admin_roles, Some(mode));
            for permission in [Approve, ManagePolicies, ManageCluster] {
                assert!(!may(&agent, permission), "{mode:?} {permission:?}");
            }
            assert!(may(&agent, Read));
            assert_eq!(may(&agent, Plan), mode != AgentMode::ReadOnly, "{mode:?}");
            assert_eq!(may(&agent, Operate), mode == AgentMode::Act, "{mode:?}");
        }
        let human = principal(PrincipalKind::Human, &[Role::Viewer], None);
        assert!(may(&human, Read) && !may(&human, Plan) && !may(&human, Operate));
        let approver = principal(PrincipalKind::Human, &[Role::Approver], None);
        assert!(may(&approver, Approve) && !may(&approver, Operate) && !may(&approver, ManagePolicies));
    }

    #[test]
    fn a_token_is_ours_only_in_our_form_and_only_its_secret_matches() {
        let (key, token) = new_key(principal(PrincipalKind::Human, &[Role::Viewer], None), &Actor::System, None);
        let parsed = parse_token(&token).expect("ours");
        assert_eq!(parsed.id, key.id);
        assert_eq!(secret_digest(parsed.secret), key.secret_sha256);
        assert_ne!(secret_digest(&new_secret()), key.secret_sha256);
        // The form stored keys hold: lower-case hex SHA-256 (FIPS 180-2's "abc" vector).
        assert_eq!(secret_digest("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(new_secret().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(new_secret().len(), 64);
        for bad in [
            "",
            "rai_",
            "rai_x_short",
            "Bearer x",
            "rai__0123456789abcdef0123456789abcdef",
            "xyz_a_0123456789abcdef0123456789abcdef",
        ] {
            assert!(parse_token(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_request_may_ask_for_a_stricter_policy_mode_never_a_looser_one() {
        let agent = principal(PrincipalKind::Agent, &[Role::Agent], Some(AgentMode::Act));
        let caller = Caller::new(agent, &HeaderMap::new()).unwrap();
        assert_eq!(caller.policy_mode(None).unwrap(), PolicyMode::SafeFirst);
        assert_eq!(caller.policy_mode(Some(PolicyMode::SafeFirst)).unwrap(), PolicyMode::SafeFirst);
        assert_eq!(caller.policy_mode(Some(PolicyMode::Aggressive)).unwrap_err().status, 403);
        assert_eq!(caller.policy_mode(Some(PolicyMode::Balanced)).unwrap_err().status, 403);
        let human = Caller::new(principal(PrincipalKind::Human, &[Role::Operator], None), &HeaderMap::new()).unwrap();
        assert_eq!(human.policy_mode(None).unwrap(), PolicyMode::Balanced);
        assert_eq!(human.policy_mode(Some(PolicyMode::Aggressive)).unwrap(), PolicyMode::Aggressive);
    }

    #[test]
    fn the_tenant_header_chooses_among_the_principals_tenants_only() {
        let mut headers = HeaderMap::new();
        headers.insert("tenant_id", HeaderValue::from_static("globex"));
        let acme = principal(PrincipalKind::Human, &[Role::Viewer], None);
        assert_eq!(Caller::new(acme.clone(), &headers).err().map(|p| p.status), Some(403));
        let caller = Caller::new(acme, &HeaderMap::new()).unwrap();
        assert!(caller.sees(Some("acme")) && !caller.sees(Some("globex")) && !caller.sees(None));
        assert_eq!(caller.tenant_for_new(None, "$.tenant_id").unwrap().as_deref(), Some("acme"));
        assert_eq!(caller.tenant_for_new(Some("globex"), "$.tenant_id").unwrap_err().status, 403);
    }
}
