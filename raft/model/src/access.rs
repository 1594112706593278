//! Who may act, and as what: principals, their roles and tenants, and the API keys that
//! authenticate them. Keys live in the replicated state (only a hash of each secret), so every
//! node authenticates them and a revocation holds on every node once applied.

use serde::{Deserialize, Serialize};

use crate::{Actor, PolicyMode};

/// What kind of caller a principal is. Agents are bound by their mode and never approve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    Human,
    Agent,
    Service,
}

/// Built-in roles; what each allows is `runtimeai_api::auth`'s table (and the README's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads runtimes, operations, intents, events and policies.
    Viewer,
    /// A viewer that also creates, changes and drives runtimes, plans and submits intents.
    Operator,
    /// A viewer that also approves or rejects operations parked for approval.
    Approver,
    /// A viewer that also creates and deletes policies.
    PolicyAdmin,
    /// Everything: members, settings, API keys, the audit feed.
    ClusterAdmin,
    /// What an agent principal may do at most (its mode narrows it): an operator's work, no
    /// approvals, policies, keys, settings or members.
    Agent,
}

/// How far an agent principal may go, from its key (not from what it sends).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentMode {
    /// Reads only.
    ReadOnly,
    /// Reads, plans and dry runs; nothing that changes state.
    #[default]
    SuggestOnly,
    /// Acts, subject to policies.
    Act,
}

/// The tenant wildcard: a principal granted `*` acts in every tenant (and on objects of none).
pub const ALL_TENANTS: &str = "*";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Principal {
    /// Unique among principals by convention; recorded as the actor of what it does.
    pub name: String,
    pub kind: PrincipalKind,
    /// The tenants it acts in; `*` for all.
    pub tenants: Vec<String>,
    pub roles: Vec<Role>,
    /// For agents: how far it may go (default `suggest_only`). Ignored for other kinds.
    /// (Always serialized: the binary codec of the replicated state has no optional fields.)
    #[serde(default)]
    pub agent_mode: Option<AgentMode>,
}

impl Principal {
    /// The actor its actions are recorded under.
    pub fn actor(&self) -> Actor {
        match self.kind {
            PrincipalKind::Human => Actor::Human(self.name.clone()),
            PrincipalKind::Agent => Actor::Agent(self.name.clone()),
            PrincipalKind::Service => Actor::Service(self.name.clone()),
        }
    }

    /// Whether it acts in every tenant.
    pub fn all_tenants(&self) -> bool {
        self.tenants.iter().any(|t| t == ALL_TENANTS)
    }

    /// Whether it may act on an object of `tenant` (`None`: an object of no tenant, which only
    /// principals of every tenant reach).
    pub fn may_see(&self, tenant: Option<&str>) -> bool {
        self.all_tenants() || tenant.is_some_and(|t| self.tenants.iter().any(|mine| mine == t))
    }

    /// An agent's mode (`suggest_only` unless its key says otherwise); `None` for others.
    pub fn mode(&self) -> Option<AgentMode> {
        (self.kind == PrincipalKind::Agent).then(|| self.agent_mode.unwrap_or_default())
    }

    /// The loosest policy mode its requests may ask for: `safe_first` for agents, `balanced`
    /// for humans and services. A request may ask for a stricter one, never a looser one.
    pub fn loosest_policy_mode(&self) -> PolicyMode {
        match self.kind {
            PrincipalKind::Agent => PolicyMode::SafeFirst,
            _ => PolicyMode::Aggressive,
        }
    }

    /// The mode a request that names none is evaluated in.
    pub fn default_policy_mode(&self) -> PolicyMode {
        match self.kind {
            PrincipalKind::Agent => PolicyMode::SafeFirst,
            _ => PolicyMode::Balanced,
        }
    }
}

/// How strict a policy mode is: `safe_first` (2) > `balanced` (1) > `aggressive` (0).
pub fn strictness(mode: PolicyMode) -> u8 {
    match mode {
        PolicyMode::SafeFirst => 2,
        PolicyMode::Balanced => 1,
        PolicyMode::Aggressive => 0,
    }
}

/// An API key as the replicated state keeps it: the principal it authenticates and the SHA-256
/// of its secret (the secret itself is shown once, at creation, and stored nowhere).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public part of the token (`rai_<id>_<secret>`).
    pub id: String,
    pub principal: Principal,
    /// Lower-case hex SHA-256 of the secret.
    pub secret_sha256: String,
    #[serde(with = "crate::timestamp")]
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// The actor that created it.
    pub created_by: String,
    #[serde(default, with = "crate::timestamp::option")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default, with = "crate::timestamp::option")]
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl ApiKey {
    /// Whether it authenticates at `now`.
    pub fn is_valid_at(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|expiry| now < expiry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(tenants: &[&str], kind: PrincipalKind) -> Principal {
        Principal {
            name: "p".into(),
            kind,
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            roles: vec![Role::Viewer],
            agent_mode: None,
        }
    }

    #[test]
    fn a_principal_sees_its_tenants_only_and_objects_of_no_tenant_need_every_tenant() {
        let acme = principal(&["acme"], PrincipalKind::Human);
        assert!(acme.may_see(Some("acme")));
        assert!(!acme.may_see(Some("globex")));
        assert!(!acme.may_see(None));
        let all = principal(&[ALL_TENANTS], PrincipalKind::Human);
        assert!(all.may_see(Some("globex")) && all.may_see(None));
    }

    #[test]
    fn an_agent_is_suggest_only_and_safe_first_unless_its_key_says_otherwise() {
        let mut agent = principal(&["acme"], PrincipalKind::Agent);
        assert_eq!(agent.mode(), Some(AgentMode::SuggestOnly));
        agent.agent_mode = Some(AgentMode::Act);
        assert_eq!(agent.mode(), Some(AgentMode::Act));
        assert_eq!(agent.loosest_policy_mode(), PolicyMode::SafeFirst);
        assert_eq!(principal(&["acme"], PrincipalKind::Human).mode(), None);
        assert_eq!(agent.actor(), Actor::Agent("p".into()));
    }

    #[test]
    fn a_revoked_or_expired_key_is_not_valid() {
        let now = chrono::Utc::now();
        let mut key = ApiKey {
            id: "k".into(),
            principal: principal(&["acme"], PrincipalKind::Human),
            secret_sha256: String::new(),
            created_at: now,
            created_by: "human:root".into(),
            expires_at: Some(now + chrono::Duration::seconds(10)),
            revoked_at: None,
        };
        assert!(key.is_valid_at(now));
        assert!(!key.is_valid_at(now + chrono::Duration::seconds(10)));
        key.revoked_at = Some(now);
        assert!(!key.is_valid_at(now));
    }
}
