use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ActionKind;

/// What kind of execution environment a runtime is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeType {
    Vm,
    Vcluster,
    Sandbox,
    AgentRuntime,
}

/// Lifecycle state: `creating → running ⇄ stopped`, `running ⇄ paused`, `degraded`,
/// `deleting → deleted`, `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeState {
    Creating,
    Running,
    Stopped,
    Degraded,
    Deleting,
    Deleted,
    Error,
    /// Frozen with its memory kept (a sandbox's cgroup freezer, a VM suspended): it uses no
    /// CPU until resumed.
    Paused,
}

impl RuntimeState {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeState::Creating => "creating",
            RuntimeState::Running => "running",
            RuntimeState::Stopped => "stopped",
            RuntimeState::Degraded => "degraded",
            RuntimeState::Deleting => "deleting",
            RuntimeState::Deleted => "deleted",
            RuntimeState::Error => "error",
            RuntimeState::Paused => "paused",
        }
    }
}

impl Runtime {
    /// Whether the runtime has a snapshot with this id (what `restore` needs).
    pub fn has_snapshot(&self, snapshot_id: &str) -> bool {
        self.snapshots.iter().any(|s| s.id == snapshot_id)
    }
}

impl RuntimeType {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeType::Vm => "vm",
            RuntimeType::Vcluster => "vcluster",
            RuntimeType::Sandbox => "sandbox",
            RuntimeType::AgentRuntime => "agent_runtime",
        }
    }
}

/// A point-in-time copy of a runtime, to restore later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeSnapshot {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(with = "crate::timestamp")]
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    VmBackend,
    VclusterBackend,
    K8sBackend,
    Custom,
}

/// Where a runtime lives in its backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendRef {
    pub kind: BackendKind,
    /// Backend-specific identifier (opaque).
    #[serde(rename = "ref")]
    pub reference: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResourceProfile {
    /// vCPUs, above 0 and at most 1024.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1024.0)]
    pub cpu: Option<f64>,
    /// A quantity as Kubernetes writes it: `512Mi`, `8Gi`, `1G`, or bytes.
    #[serde(default)]
    #[schema(
        pattern = "^0*([1-9][0-9]{0,17}|[1-9][0-9]{0,14}(Ki|k|K)|[1-9][0-9]{0,11}(Mi|M)|[1-9][0-9]{0,8}(Gi|G)|[1-9][0-9]{0,5}(Ti|T))$"
    )]
    pub memory: Option<String>,
    #[serde(default)]
    pub gpu: Option<String>,
    #[serde(default)]
    /// Signed so that a negative count is refused as invalid (422), not as malformed.
    #[schema(minimum = 0, maximum = 10000)]
    pub replicas: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Exposure {
    #[default]
    Private,
    Internal,
    Public,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EgressPolicy {
    #[default]
    Restricted,
    Open,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkingProfile {
    #[serde(default)]
    pub exposure: Exposure,
    #[serde(default)]
    pub egress_policy: EgressPolicy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    Basic,
    #[default]
    Strong,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecurityProfile {
    #[serde(default)]
    pub isolation: Isolation,
    #[serde(default)]
    pub compliance: Vec<String>,
    #[serde(default = "default_true")]
    pub audit: bool,
}

impl Default for SecurityProfile {
    fn default() -> Self {
        SecurityProfile { isolation: Isolation::Strong, compliance: Vec::new(), audit: true }
    }
}

fn default_true() -> bool {
    true
}

/// The desired shape of a runtime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeSpec {
    /// T-shirt size from the cluster's catalogue (by default small, medium, large or xlarge).
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9-]{1,63}$")]
    pub size: Option<String>,
    #[serde(default)]
    pub resources: Option<ResourceProfile>,
    #[serde(default)]
    pub networking: Option<NetworkingProfile>,
    #[serde(default)]
    pub security: Option<SecurityProfile>,
    /// What it starts from. For `sandbox` and `agent_runtime`: an OCI image, `busybox` (the
    /// default, made on each node), `python` (BusyBox's tools with the node's Python 3, made on
    /// each node) or a registry's image (`registry.example.com/team/tool:1.2`, or
    /// `...@sha256:<digest>`). For `vm`: the name of an image in its node's VM image store
    /// (`runtimeai vm-image import`); its disk is a copy-on-write overlay of the image's (an
    /// empty disk without one).
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9][a-zA-Z0-9._:/@-]{0,254}$")]
    pub image: Option<String>,
    /// For `vm`: cloud-init user data (`#cloud-config` YAML or a script), given to the guest
    /// as a NoCloud seed; at most 64 KiB.
    #[serde(default)]
    #[schema(max_length = 65536)]
    pub user_data: Option<String>,
    /// For `vm`: SSH public keys cloud-init installs for the guest's default user.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub ssh_authorized_keys: Option<Vec<String>>,
    /// For `sandbox` and `agent_runtime`: the program to run and its arguments (default: an
    /// idle process). It runs in the sandbox's working directory, `/work`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Environment variables for `command`, beside `PATH` and `HOME` (nothing of the node's
    /// environment is passed on).
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Seconds the runtime lives: this long after its creation the cluster deletes it (the
    /// deadline is the runtime's `expires_at`). Policies judge the delete as any other.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 31_536_000)]
    pub ttl_seconds: Option<u64>,
    /// For `sandbox` and `agent_runtime`: seconds it may run with nothing done to it (no
    /// command run in it, no lifecycle call) before the cluster stops it.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 31_536_000)]
    pub idle_timeout_seconds: Option<u64>,
}

/// A runtime's own policy, set by the seed's `tune_policy` action: the least strict mode
/// actions on it are judged in, and the most it may cost. Policies apply besides it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuntimePolicy {
    /// Actions on it are judged in this mode, or in a stricter one a request asks for.
    #[serde(default)]
    pub mode: Option<crate::PolicyMode>,
    /// An action that would make it cost more per hour than this is denied.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub max_cost_per_hour: Option<f64>,
}

impl RuntimePolicy {
    /// The mode a request in `asked` is judged in: the stricter of the two.
    pub fn mode_for(&self, asked: crate::PolicyMode) -> crate::PolicyMode {
        match self.mode {
            Some(own) if crate::strictness(own) > crate::strictness(asked) => own,
            _ => asked,
        }
    }

    /// Whether `next` takes a safeguard away: a less strict mode, or a higher (or no) budget.
    pub fn loosened_by(&self, next: &RuntimePolicy) -> bool {
        let strictness = |mode: Option<crate::PolicyMode>| mode.map_or(0, crate::strictness);
        let budget = |policy: &RuntimePolicy| policy.max_cost_per_hour.unwrap_or(f64::INFINITY);
        strictness(next.mode) < strictness(self.mode) || budget(next) > budget(self)
    }
}

/// Why the cluster itself acts on a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryReason {
    /// Its `ttl_seconds` ran out: it is deleted.
    Ttl,
    /// It sat idle for its `idle_timeout_seconds`: it is stopped.
    Idle,
}

/// What a runtime's spec asks the cluster to do to it now (see [`Runtime::due`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Expiry {
    pub reason: ExpiryReason,
    pub action: crate::LifecycleAction,
}

/// Something a runtime's backend can do (`start`, `stop`, ...), by the name the backend gives it;
/// stored and sent as that name.
///
/// A runtime is decoded several times for every create across the cluster (apply on each
/// member, the executor, replication, forwarding), and its capabilities were six of its
/// allocations each time: the names of [`ActionKind::ON_BACKENDS`] decode to the static text
/// instead. (A backend may name an action this build does not know: it is kept as it came.)
pub type Capability = std::borrow::Cow<'static, str>;

/// `name` as a [`Capability`]: the static text if it names one of [`ActionKind::ON_BACKENDS`].
pub fn capability(name: &str) -> Capability {
    match ActionKind::ON_BACKENDS.into_iter().find(|known| known.as_str() == name) {
        Some(known) => Capability::Borrowed(known.as_str()),
        None => Capability::Owned(name.to_string()),
    }
}

mod capabilities {
    use super::{capability, Capability};

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Capability>, D::Error> {
        struct Names;
        impl<'de> serde::de::Visitor<'de> for Names {
            type Value = Vec<Capability>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of capability names")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Capability>, A::Error> {
                let mut names = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(Name(name)) = seq.next_element()? {
                    names.push(name);
                }
                Ok(names)
            }
        }

        /// One name, read without allocating when the input lends it and it is a known one.
        struct Name(Capability);
        impl<'de> serde::Deserialize<'de> for Name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Name, D::Error> {
                struct Text;
                impl serde::de::Visitor<'_> for Text {
                    type Value = Name;

                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a capability name")
                    }

                    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Name, E> {
                        Ok(Name(capability(name)))
                    }
                }
                deserializer.deserialize_str(Text)
            }
        }

        deserializer.deserialize_seq(Names)
    }
}

/// A manageable execution environment with lifecycle, intent and feedback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Runtime {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub runtime_type: RuntimeType,
    pub state: RuntimeState,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "capabilities::deserialize")]
    #[schema(value_type = Vec<String>)]
    pub capabilities: Vec<Capability>,
    #[serde(default)]
    pub backend: Option<BackendRef>,
    #[serde(default)]
    pub spec: RuntimeSpec,
    #[serde(with = "crate::timestamp")]
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(default, with = "crate::timestamp::option")]
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Bumped by every change; the API's `ETag` and `If-Match` are built on it.
    pub version: u64,
    /// The operation currently working on this runtime; one at a time.
    #[serde(default)]
    pub active_operation: Option<String>,
    /// Snapshots taken, oldest first.
    #[serde(default)]
    pub snapshots: Vec<RuntimeSnapshot>,
    /// The node (and site) whose executor serves this runtime.
    #[serde(default)]
    pub placement: Option<crate::Placement>,
    /// What its executor last observed.
    #[serde(default)]
    pub signals: Option<crate::RuntimeSignals>,
    /// Its own policy (`tune_policy`): a floor on the mode its actions are judged in, a budget.
    #[serde(default)]
    pub policy: RuntimePolicy,
    /// When the cluster deletes it (its creation plus `spec.ttl_seconds`); cleared once acted on.
    #[serde(default, with = "crate::timestamp::option")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When someone last did something to it: created it, ran a command in it, began an
    /// operation on it (what `spec.idle_timeout_seconds` counts from).
    #[serde(default, with = "crate::timestamp::option")]
    pub last_activity_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Runtime {
    /// A runtime as it is first recorded: `creating`, version 1, nothing else set yet.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        runtime_type: RuntimeType,
        created_at: crate::Timestamp,
    ) -> Runtime {
        Runtime {
            id: id.into(),
            name: name.into(),
            runtime_type,
            state: RuntimeState::Creating,
            tenant_id: None,
            labels: BTreeMap::new(),
            capabilities: Vec::new(),
            backend: None,
            spec: RuntimeSpec::default(),
            created_at,
            updated_at: None,
            version: 1,
            active_operation: None,
            snapshots: Vec::new(),
            placement: None,
            signals: None,
            policy: RuntimePolicy::default(),
            expires_at: None,
            last_activity_at: None,
        }
    }

    /// What its spec asks the cluster to do to it at `at`, if anything: delete it once
    /// `expires_at` has passed; stop it once it has run idle for `spec.idle_timeout_seconds`.
    pub fn due(&self, at: crate::Timestamp) -> Option<Expiry> {
        use RuntimeState::*;
        if self.expires_at.is_some_and(|deadline| deadline <= at) && !matches!(self.state, Deleting | Deleted) {
            return Some(Expiry { reason: ExpiryReason::Ttl, action: crate::LifecycleAction::Delete });
        }
        let idle_for = chrono::Duration::try_seconds(i64::try_from(self.spec.idle_timeout_seconds?).ok()?)?;
        let idle_until = self.last_activity_at.unwrap_or(self.created_at).checked_add_signed(idle_for)?;
        (self.state == Running && idle_until <= at).then_some(Expiry {
            reason: ExpiryReason::Idle,
            action: crate::LifecycleAction::Stop { force: false, timeout_seconds: None },
        })
    }

    /// The environment policies are scoped by: the `env` label.
    pub fn env(&self) -> Option<&str> {
        self.labels.get("env").map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_is_due_at_its_ttl_or_after_an_idle_timeout_and_never_overflows() {
        let at = |s: i64| chrono::DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap();
        let mut runtime = Runtime::new("rt_a", "web", RuntimeType::Sandbox, at(0));
        runtime.state = RuntimeState::Running;
        assert_eq!(runtime.due(at(1_000_000)), None, "no TTL, no idle timeout: never");
        runtime.expires_at = Some(at(10));
        assert_eq!(runtime.due(at(9)), None);
        assert_eq!(runtime.due(at(10)).map(|e| e.reason), Some(ExpiryReason::Ttl));
        runtime.state = RuntimeState::Deleting;
        assert_eq!(runtime.due(at(10)), None, "already going");
        runtime = Runtime { state: RuntimeState::Running, expires_at: None, ..runtime };
        runtime.spec.idle_timeout_seconds = Some(30);
        runtime.last_activity_at = Some(at(20));
        assert_eq!(runtime.due(at(49)), None);
        assert_eq!(runtime.due(at(50)).map(|e| e.reason), Some(ExpiryReason::Idle));
        runtime.state = RuntimeState::Paused;
        assert_eq!(runtime.due(at(50)), None, "a paused runtime uses nothing: it is not stopped for idling");
        runtime.state = RuntimeState::Running;
        runtime.spec.idle_timeout_seconds = Some(u64::MAX);
        assert_eq!(runtime.due(at(50)), None, "an idle timeout past the calendar is never reached");
    }

    #[test]
    fn capabilities_read_back_as_the_names_sent_known_ones_without_a_copy() {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let mut runtime = Runtime::new("rt_a", "web", RuntimeType::Vm, at);
        runtime.capabilities = vec![capability("start"), capability("hibernate")];
        let json = serde_json::to_value(&runtime).unwrap();
        assert_eq!(json["capabilities"], serde_json::json!(["start", "hibernate"]));
        let back: Runtime = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, runtime);
        assert!(matches!(back.capabilities[0], Capability::Borrowed("start")), "a known name is the static text");
        assert!(matches!(&back.capabilities[1], Capability::Owned(name) if name == "hibernate"));
        let text = serde_json::to_string(&runtime).unwrap();
        assert_eq!(serde_json::from_str::<Runtime>(&text).unwrap(), runtime);
        let mut missing = json;
        missing.as_object_mut().unwrap().remove("capabilities");
        assert!(serde_json::from_value::<Runtime>(missing).unwrap().capabilities.is_empty());
        let wrong = serde_json::json!({"capabilities": [7]});
        assert!(serde_json::from_value::<Runtime>(wrong).is_err());
    }
}
