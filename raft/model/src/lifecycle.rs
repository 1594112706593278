//! What each lifecycle action may do to a runtime: the one transition table that the API (to
//! answer early) and the state machine (to decide, in apply) both use.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ResourceProfile, RuntimeSpec, RuntimeState};

/// What kind of action an action is: the one list of action names, which operations, events,
/// policy selectors and backends' capabilities all use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Create,
    Start,
    Stop,
    Restart,
    Scale,
    Snapshot,
    Restore,
    Delete,
    /// A sequence of actions run as one operation (`actions/execute`, an intent's plan).
    Execute,
    Relabel,
    /// A command run in a running sandbox (`POST /v1/runtimes/{id}/exec`): judged by the
    /// policies, never an operation.
    Exec,
    /// Freezes a running runtime, keeping its memory.
    Pause,
    Resume,
    /// Replaces a vcluster's control-plane pods one at a time (`kubectl rollout restart`).
    RolloutRestart,
    /// Sets the runtime's own policy mode and budget; a change of the record, as a relabel.
    TunePolicy,
    /// Moves a runtime to another node: cold (stopped, its data moved, started there), or
    /// rebuilt from its spec when its node is lost (evacuation).
    Migrate,
    /// Subscribes an observer (a webhook scoped to the runtime) to the runtime's events; a
    /// change of the record, as a relabel.
    AttachObserver,
    /// Removes an observer of the runtime.
    DetachObserver,
}

impl ActionKind {
    /// Every kind.
    pub const ALL: [ActionKind; 18] = [
        ActionKind::Create,
        ActionKind::Start,
        ActionKind::Stop,
        ActionKind::Restart,
        ActionKind::Scale,
        ActionKind::Snapshot,
        ActionKind::Restore,
        ActionKind::Delete,
        ActionKind::Execute,
        ActionKind::Relabel,
        ActionKind::Exec,
        ActionKind::Pause,
        ActionKind::Resume,
        ActionKind::RolloutRestart,
        ActionKind::TunePolicy,
        ActionKind::Migrate,
        ActionKind::AttachObserver,
        ActionKind::DetachObserver,
    ];

    /// What a backend may support besides create and delete (which every backend does): what a
    /// runtime's capabilities are made of.
    pub const ON_BACKENDS: [ActionKind; 11] = [
        ActionKind::Start,
        ActionKind::Stop,
        ActionKind::Restart,
        ActionKind::Scale,
        ActionKind::Snapshot,
        ActionKind::Restore,
        ActionKind::Exec,
        ActionKind::Pause,
        ActionKind::Resume,
        ActionKind::RolloutRestart,
        ActionKind::Migrate,
    ];

    /// Whether it changes only the runtime's record (no backend carries it out, and every
    /// runtime takes it, whatever its backend's capabilities).
    pub fn record_only(self) -> bool {
        matches!(
            self,
            ActionKind::Relabel | ActionKind::TunePolicy | ActionKind::AttachObserver | ActionKind::DetachObserver
        )
    }

    /// Its name, as operations, events, selectors and capabilities spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Create => "create",
            ActionKind::Start => "start",
            ActionKind::Stop => "stop",
            ActionKind::Restart => "restart",
            ActionKind::Scale => "scale",
            ActionKind::Snapshot => "snapshot",
            ActionKind::Restore => "restore",
            ActionKind::Delete => "delete",
            ActionKind::Execute => "execute",
            ActionKind::Relabel => "relabel",
            ActionKind::Exec => "exec",
            ActionKind::Pause => "pause",
            ActionKind::Resume => "resume",
            ActionKind::RolloutRestart => "rollout_restart",
            ActionKind::TunePolicy => "tune_policy",
            ActionKind::Migrate => "migrate",
            ActionKind::AttachObserver => "attach_observer",
            ActionKind::DetachObserver => "detach_observer",
        }
    }

    /// The kind named `name`.
    pub fn named(name: &str) -> Option<ActionKind> {
        ActionKind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// Whether a policy selector may name it (one action of a sequence is judged by its own
    /// kind, so `execute` is not one).
    pub fn selectable(self) -> bool {
        self != ActionKind::Execute
    }
}

impl std::fmt::Display for ActionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of labels as a JSON merge patch: a value sets a label, `None` removes it.
pub type LabelPatch = BTreeMap<String, Option<String>>;

/// A lifecycle action, with its parameters, as an operation carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleAction {
    Create,
    Start,
    Stop {
        force: bool,
        timeout_seconds: Option<u64>,
    },
    Restart,
    Scale {
        size: Option<String>,
        resources: Option<ResourceProfile>,
    },
    Snapshot {
        snapshot_id: String,
        name: String,
        description: Option<String>,
    },
    Restore {
        snapshot_id: String,
    },
    Delete,
    /// Several actions run in order as one operation (the agents' `actions/execute`).
    Sequence {
        actions: Vec<LifecycleAction>,
    },
    /// A change of the runtime's labels. Labels decide which policies apply to a runtime, so
    /// policies judge a relabel like any action; it needs no backend (see [`Self::needs_backend`]).
    Relabel {
        labels: LabelPatch,
    },
    /// A command run in a running sandbox: the policies judge it like an action. Allowed, the
    /// node that hosts the sandbox runs it at once and streams its output; needing approval, it
    /// waits as an operation, and once approved the host's executor runs it to its end.
    Exec {
        request: crate::ExecRequest,
    },
    Pause,
    Resume,
    /// A rolling restart of a vcluster's control plane: its pods replaced one at a time.
    RolloutRestart,
    /// Sets the runtime's own policy (see [`crate::RuntimePolicy`]) to exactly this; it needs no
    /// backend, and the policies judge it (a looser one is destructive: it takes a safeguard
    /// away).
    TunePolicy {
        policy: crate::RuntimePolicy,
    },
    /// Moves the runtime to node `to.node_id`, whose executor carries it out. Cold: the source
    /// stops the runtime and hands over what it holds (a sandbox's writable layer and
    /// snapshots), the destination makes it from that and starts it if it ran. `rebuild`
    /// (evacuation of a node that is down): the destination makes it afresh from its spec; what
    /// only the lost node held (its data, its snapshots) is gone.
    Migrate {
        to: crate::Placement,
        rebuild: bool,
    },
    /// Subscribes `webhook` (its filter names the runtime) once the operation succeeds.
    AttachObserver {
        webhook: Box<crate::Webhook>,
    },
    /// Removes the runtime's observer `webhook_id` once the operation succeeds.
    DetachObserver {
        webhook_id: String,
    },
}

/// Why an action cannot run on a runtime in its current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a runtime that is {state}")]
pub struct IllegalTransition {
    pub action: &'static str,
    pub state: &'static str,
}

impl LifecycleAction {
    /// What kind of action it is.
    pub fn kind(&self) -> ActionKind {
        match self {
            LifecycleAction::Create => ActionKind::Create,
            LifecycleAction::Start => ActionKind::Start,
            LifecycleAction::Stop { .. } => ActionKind::Stop,
            LifecycleAction::Restart => ActionKind::Restart,
            LifecycleAction::Scale { .. } => ActionKind::Scale,
            LifecycleAction::Snapshot { .. } => ActionKind::Snapshot,
            LifecycleAction::Restore { .. } => ActionKind::Restore,
            LifecycleAction::Delete => ActionKind::Delete,
            LifecycleAction::Sequence { .. } => ActionKind::Execute,
            LifecycleAction::Relabel { .. } => ActionKind::Relabel,
            LifecycleAction::Exec { .. } => ActionKind::Exec,
            LifecycleAction::Pause => ActionKind::Pause,
            LifecycleAction::Resume => ActionKind::Resume,
            LifecycleAction::RolloutRestart => ActionKind::RolloutRestart,
            LifecycleAction::TunePolicy { .. } => ActionKind::TunePolicy,
            LifecycleAction::Migrate { .. } => ActionKind::Migrate,
            LifecycleAction::AttachObserver { .. } => ActionKind::AttachObserver,
            LifecycleAction::DetachObserver { .. } => ActionKind::DetachObserver,
        }
    }

    /// Whether an executor carries the action out. A relabel changes only the record: once
    /// allowed (or approved) it is applied at once.
    pub fn needs_backend(&self) -> bool {
        !self.kind().record_only()
    }

    /// What a succeeded relabel makes of `labels`.
    pub fn apply_to_labels(&self, labels: &mut BTreeMap<String, String>) {
        if let LifecycleAction::Relabel { labels: patch } = self {
            for (key, value) in patch {
                match value {
                    Some(value) => labels.insert(key.clone(), value.clone()),
                    None => labels.remove(key),
                };
            }
        }
    }

    /// The single actions this action consists of: a sequence's actions, or itself.
    pub fn steps(&self) -> &[LifecycleAction] {
        match self {
            LifecycleAction::Sequence { actions } => actions,
            action => std::slice::from_ref(action),
        }
    }

    /// The node a migration takes the runtime to: its executor must be that node.
    pub fn migration_destination(&self) -> Option<&crate::Placement> {
        self.steps().iter().find_map(|action| match action {
            LifecycleAction::Migrate { to, .. } => Some(to),
            _ => None,
        })
    }

    /// What a succeeded action changes in a runtime's spec (a scale's new size or resources).
    pub fn apply_to_spec(&self, spec: &mut RuntimeSpec) {
        if let LifecycleAction::Scale { size, resources } = self {
            if size.is_some() {
                spec.size = size.clone();
            }
            if resources.is_some() {
                spec.resources = resources.clone();
            }
        }
    }

    /// The states a runtime goes through: `(while the action runs, once it succeeded)`, or why
    /// the action is not allowed from `state`.
    ///
    /// | action | allowed from | while running | after success |
    /// |---|---|---|---|
    /// | start | stopped, error | unchanged | running |
    /// | stop | running, degraded, error, paused | unchanged | stopped |
    /// | restart, rollout_restart | running, degraded, error | unchanged | running |
    /// | pause | running, degraded | unchanged | paused |
    /// | resume | paused | unchanged | running |
    /// | scale | running, stopped, degraded | unchanged | unchanged |
    /// | snapshot | running, stopped, degraded, paused | unchanged | unchanged |
    /// | restore | running, stopped, degraded, error | unchanged | unchanged |
    /// | delete | any but deleting, deleted | deleting | deleted (record removed) |
    /// | relabel (once approved), tune_policy | any but deleting, deleted | unchanged | unchanged |
    /// | exec (an operation only while it waits for approval) | running, degraded | unchanged | unchanged |
    /// | migrate | running, stopped, degraded, error | unchanged | stopped if it was, else running |
    ///
    /// `start` on a running runtime (or `stop` on a stopped one) is refused with 409 rather than
    /// treated as a no-op, so that an agent learns the state it assumed was wrong.
    ///
    /// A sequence is legal when each action is legal from the state the previous one leaves;
    /// while it runs the runtime is in its first action's "while running" state.
    pub fn transition(&self, state: RuntimeState) -> Result<(RuntimeState, RuntimeState), IllegalTransition> {
        use RuntimeState::*;
        if let LifecycleAction::Sequence { actions } = self {
            let mut during = None;
            let mut current = state;
            for action in actions {
                let (while_running, after) = action.transition(current)?;
                during.get_or_insert(while_running);
                current = after;
            }
            return Ok((during.unwrap_or(state), current));
        }
        let allowed = match self {
            LifecycleAction::Create => matches!(state, Creating),
            LifecycleAction::Start => matches!(state, Stopped | Error),
            LifecycleAction::Stop { .. } => matches!(state, Running | Degraded | Error | Paused),
            LifecycleAction::Restart | LifecycleAction::RolloutRestart => matches!(state, Running | Degraded | Error),
            LifecycleAction::Scale { .. } => matches!(state, Running | Stopped | Degraded),
            LifecycleAction::Snapshot { .. } => matches!(state, Running | Stopped | Degraded | Paused),
            LifecycleAction::Pause => matches!(state, Running | Degraded),
            LifecycleAction::Resume => matches!(state, Paused),
            LifecycleAction::Restore { .. } => matches!(state, Running | Stopped | Degraded | Error),
            LifecycleAction::Delete
            | LifecycleAction::Relabel { .. }
            | LifecycleAction::TunePolicy { .. }
            | LifecycleAction::AttachObserver { .. }
            | LifecycleAction::DetachObserver { .. } => !matches!(state, Deleting | Deleted),
            LifecycleAction::Exec { .. } => matches!(state, Running | Degraded),
            // Not paused: a cold migration would lose the memory a pause keeps.
            LifecycleAction::Migrate { .. } => matches!(state, Running | Stopped | Degraded | Error),
            LifecycleAction::Sequence { .. } => unreachable!("handled above"),
        };
        if !allowed {
            return Err(IllegalTransition { action: self.kind().as_str(), state: state.as_str() });
        }
        Ok(match self {
            LifecycleAction::Create => (Creating, Running),
            LifecycleAction::Start
            | LifecycleAction::Restart
            | LifecycleAction::RolloutRestart
            | LifecycleAction::Resume => (state, Running),
            LifecycleAction::Pause => (state, Paused),
            LifecycleAction::Stop { .. } => (state, Stopped),
            LifecycleAction::Delete => (Deleting, Deleted),
            LifecycleAction::Migrate { .. } if state != Stopped => (state, Running),
            _ => (state, state),
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn every_action_kind_is_named_one_way_in_rust_in_json_and_on_disk() {
        for kind in ActionKind::ALL {
            assert_eq!(ActionKind::named(kind.as_str()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str(), "{kind:?}");
        }
        assert_eq!(ActionKind::named("hibernate"), None);
        assert!(ActionKind::ON_BACKENDS.iter().all(|kind| kind.selectable()));
    }
    use super::*;
    use RuntimeState::*;

    #[test]
    fn the_transition_table_holds() {
        let stop = LifecycleAction::Stop { force: false, timeout_seconds: None };
        assert_eq!(LifecycleAction::Start.transition(Stopped), Ok((Stopped, Running)));
        assert_eq!(stop.transition(Running), Ok((Running, Stopped)));
        assert_eq!(LifecycleAction::Delete.transition(Running), Ok((Deleting, Deleted)));
        assert_eq!(LifecycleAction::Create.transition(Creating), Ok((Creating, Running)));
        assert_eq!(LifecycleAction::Pause.transition(Running), Ok((Running, Paused)));
        assert_eq!(LifecycleAction::Resume.transition(Paused), Ok((Paused, Running)));
        assert_eq!(stop.transition(Paused), Ok((Paused, Stopped)), "a paused runtime can be stopped");
        let refused = [
            (LifecycleAction::Start, Running),
            (stop.clone(), Stopped),
            (LifecycleAction::Restart, Creating),
            (LifecycleAction::Delete, Deleting),
            (LifecycleAction::Scale { size: None, resources: None }, Deleting),
            (LifecycleAction::Pause, Paused),
            (LifecycleAction::Resume, Running),
            (LifecycleAction::Restart, Paused),
            (
                LifecycleAction::Exec {
                    request: crate::ExecRequest { command: vec!["true".into()], ..Default::default() },
                },
                Paused,
            ),
        ];
        let migrate =
            LifecycleAction::Migrate { to: crate::Placement { node_id: 2, site: None, zone: None }, rebuild: false };
        assert_eq!(migrate.transition(Stopped), Ok((Stopped, Stopped)), "a stopped runtime arrives stopped");
        assert_eq!(migrate.transition(Error), Ok((Error, Running)), "any other arrives running");
        assert!(migrate.transition(Paused).is_err(), "a paused one would lose its memory");
        let sequence = LifecycleAction::Sequence {
            actions: vec![stop.clone(), LifecycleAction::Scale { size: None, resources: None }, LifecycleAction::Start],
        };
        assert_eq!(sequence.transition(Running), Ok((Running, Running)));
        let illegal = LifecycleAction::Sequence { actions: vec![stop.clone(), stop.clone()] };
        assert_eq!(illegal.transition(Running).unwrap_err().state, "stopped");
        for (action, state) in refused {
            let err = action.transition(state).unwrap_err();
            assert_eq!(err.state, state.as_str(), "{err}");
        }
    }
}
