//! A deterministic planner: goal + constraints + the runtime's state → an ordered list of
//! actions with a rationale for each, or the goals it understands (it never guesses), or the
//! constraint that blocked the only option. Pure: the same input always gives the same plan.
//!
//! Understood goals (matched on words of the goal, case-insensitive):
//! - reduce cost (`cost`, `cheaper`, `save`): one size down;
//! - improve performance (`performance`, `latency`, `faster`, `speed`): one size up;
//! - scale to a named size (`scale to large`, `size medium`);
//! - recover (`recover`, `heal`, `fix`, `repair`): restart, or start a stopped runtime;
//! - prepare for a change (`prepare`, `snapshot`, `backup`): a snapshot;
//! - start, stop, restart.
//!
//! Constraints: `latency: "<Nms"` with N ≤ 100 and `availability: "high"` keep the size at
//! medium or above; `cost: "optimize"` rules out upsizing. `policy_mode: safe_first` (the
//! default) snapshots before any downsizing and never stops a production runtime unless the
//! goal says stop.

use runtimeai_model::{LifecycleAction, Runtime, RuntimeState};
use serde_json::{Map, Value};

use crate::validate::SIZES;

/// The goals this planner understands, as listed in its 422 answer.
pub const UNDERSTOOD_GOALS: &[&str] = &[
    "reduce cost",
    "improve performance / reduce latency",
    "scale to <small|medium|large|xlarge>",
    "recover",
    "prepare for a change (snapshot)",
    "start",
    "stop",
    "restart",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<LifecycleAction>,
    pub rationale: Vec<String>,
    pub recommendations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PlanError {
    NotUnderstood,
    /// The only option would violate a constraint; each entry names constraint and option.
    Blocked(Vec<String>),
}

fn size_index(size: &str) -> Option<usize> {
    SIZES.iter().position(|(name, _, _)| *name == size)
}

/// The smallest size the constraints allow, and why.
fn size_floor(constraints: &Map<String, Value>) -> (usize, Vec<String>) {
    let mut floor = 0;
    let mut why = Vec::new();
    if let Some(latency) = constraints.get("latency").and_then(Value::as_str) {
        let ms: Option<u64> =
            latency.trim().trim_start_matches(['<', '=', ' ']).trim_end_matches("ms").trim().parse().ok();
        if ms.is_some_and(|ms| ms <= 100) {
            floor = floor.max(1);
            why.push(format!("latency {latency} keeps the size at medium or above"));
        }
    }
    if constraints.get("availability").and_then(Value::as_str) == Some("high") {
        floor = floor.max(1);
        why.push("availability high keeps the size at medium or above".to_string());
    }
    (floor, why)
}

fn has_word(goal: &str, words: &[&str]) -> bool {
    goal.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| words.contains(&w))
}

/// Plans `goal` for `runtime`.
pub fn plan(
    runtime: &Runtime,
    goal: &str,
    constraints: &Map<String, Value>,
    context: &Map<String, Value>,
    policy_mode: &str,
) -> Result<Plan, PlanError> {
    let goal = goal.to_ascii_lowercase();
    let current = runtime.spec.size.as_deref().and_then(size_index).unwrap_or(1);
    let current_name = SIZES[current].0;
    let safe_first = policy_mode == "safe_first";
    let production = context.get("env").and_then(Value::as_str) == Some("production")
        || runtime.labels.get("env").map(String::as_str) == Some("production");
    let mut rationale = Vec::new();
    let mut recommendations = Vec::new();
    let mut actions = Vec::new();
    let scale_to = |index: usize| LifecycleAction::Scale { size: Some(SIZES[index].0.to_string()), resources: None };
    let snapshot = || LifecycleAction::Snapshot {
        snapshot_id: String::new(),
        name: "before-change".to_string(),
        description: Some("taken by the planner before a change".to_string()),
    };

    let named_size = SIZES.iter().position(|(name, _, _)| has_word(&goal, &[name]));
    if has_word(&goal, &["scale", "size", "resize"]) && named_size.is_some() {
        let target = named_size.unwrap_or(current);
        let (floor, why) = size_floor(constraints);
        if target < floor {
            return Err(PlanError::Blocked(
                why.into_iter().map(|w| format!("{w}: scaling to {} is ruled out", SIZES[target].0)).collect(),
            ));
        }
        if target == current {
            rationale.push(format!("already {current_name}: nothing to do"));
        } else {
            if safe_first && target < current {
                actions.push(snapshot());
                rationale.push("safe_first: snapshot before downsizing".into());
            }
            actions.push(scale_to(target));
            rationale.push(format!("scale from {current_name} to {} as asked", SIZES[target].0));
        }
    } else if has_word(&goal, &["cost", "cheaper", "save", "costs"]) {
        let (floor, why) = size_floor(constraints);
        if current == 0 {
            rationale.push("already the smallest size".into());
            recommendations.push("stop the runtime when it is idle to save more".into());
        } else if current - 1 < floor {
            return Err(PlanError::Blocked(
                why.into_iter().map(|w| format!("{w}: downsizing from {current_name} is ruled out")).collect(),
            ));
        } else {
            if safe_first {
                actions.push(snapshot());
                rationale.push("safe_first: snapshot before downsizing, to roll back if needed".into());
            }
            actions.push(scale_to(current - 1));
            rationale.push(format!("one size down ({current_name} → {}) lowers cost per hour", SIZES[current - 1].0));
            rationale.extend(why.into_iter().map(|w| format!("respected: {w}")));
            recommendations.push("watch latency and error rates after the downsize".into());
        }
    } else if has_word(&goal, &["performance", "latency", "faster", "speed", "perf"]) {
        if constraints.get("cost").and_then(Value::as_str) == Some("optimize") {
            return Err(PlanError::Blocked(vec![format!(
                "cost optimize: upsizing from {current_name} would raise cost"
            )]));
        }
        if current + 1 >= SIZES.len() {
            rationale.push("already the largest size".into());
            recommendations.push("consider more replicas or a different runtime type".into());
        } else {
            actions.push(scale_to(current + 1));
            rationale.push(format!("one size up ({current_name} → {}) adds CPU and memory", SIZES[current + 1].0));
            recommendations.push("compare latency before and after the change".into());
        }
    } else if has_word(&goal, &["recover", "heal", "fix", "repair"]) {
        if runtime.state == RuntimeState::Stopped {
            actions.push(LifecycleAction::Start);
            rationale.push("the runtime is stopped: start it".into());
        } else {
            actions.push(LifecycleAction::Restart);
            rationale.push(format!("the runtime is {}: restart it", runtime.state.as_str()));
        }
        recommendations.push("check the runtime's events for the cause".into());
    } else if has_word(&goal, &["prepare", "snapshot", "backup"]) {
        actions.push(snapshot());
        rationale.push("a snapshot makes the coming change reversible".into());
    } else if has_word(&goal, &["stop", "shutdown"]) {
        actions.push(LifecycleAction::Stop { force: false, timeout_seconds: None });
        rationale.push(if production {
            "stop asked explicitly (production runtime)".into()
        } else {
            "stop as asked".into()
        });
    } else if has_word(&goal, &["restart", "reboot"]) {
        actions.push(LifecycleAction::Restart);
        rationale.push("restart as asked".into());
    } else if has_word(&goal, &["start", "boot"]) {
        actions.push(LifecycleAction::Start);
        rationale.push("start as asked".into());
    } else {
        return Err(PlanError::NotUnderstood);
    }
    Ok(Plan { actions, rationale, recommendations })
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtimeai_model::{RuntimeSpec, RuntimeType};

    fn runtime(size: &str, state: RuntimeState) -> Runtime {
        Runtime {
            id: "rt_1".into(),
            name: "r".into(),
            runtime_type: RuntimeType::Vm,
            state,
            tenant_id: None,
            labels: Default::default(),
            capabilities: vec![],
            backend: None,
            spec: RuntimeSpec { size: Some(size.into()), ..Default::default() },
            created_at: chrono::Utc::now(),
            updated_at: None,
            version: 1,
            active_operation: None,
            snapshots: vec![],
        }
    }

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn reduce_cost_downsizes_after_a_snapshot_in_safe_first() {
        let plan =
            plan(&runtime("large", RuntimeState::Running), "Reduce cost", &Map::new(), &Map::new(), "safe_first")
                .unwrap();
        assert_eq!(plan.actions.len(), 2);
        assert_eq!(plan.actions[0].kind(), "snapshot");
        assert_eq!(plan.actions[1], LifecycleAction::Scale { size: Some("medium".into()), resources: None });
        let aggressive = super::plan(
            &runtime("large", RuntimeState::Running),
            "reduce cost",
            &Map::new(),
            &Map::new(),
            "aggressive",
        )
        .unwrap();
        assert_eq!(aggressive.actions.len(), 1, "no snapshot outside safe_first");
    }

    #[test]
    fn constraints_block_options_and_say_which() {
        let constraints = map(serde_json::json!({"latency": "<50ms"}));
        let err =
            plan(&runtime("medium", RuntimeState::Running), "reduce cost", &constraints, &Map::new(), "safe_first")
                .unwrap_err();
        let PlanError::Blocked(reasons) = err else { panic!("{err:?}") };
        assert!(reasons[0].contains("latency <50ms"), "{reasons:?}");
        let cost = map(serde_json::json!({"cost": "optimize"}));
        assert!(matches!(
            plan(&runtime("small", RuntimeState::Running), "improve latency", &cost, &Map::new(), "balanced"),
            Err(PlanError::Blocked(_))
        ));
    }

    #[test]
    fn it_never_guesses() {
        let err =
            plan(&runtime("small", RuntimeState::Running), "make it web scale", &Map::new(), &Map::new(), "safe_first");
        assert_eq!(err, Err(PlanError::NotUnderstood));
        let recover =
            plan(&runtime("small", RuntimeState::Stopped), "recover please", &Map::new(), &Map::new(), "safe_first")
                .unwrap();
        assert_eq!(recover.actions, vec![LifecycleAction::Start]);
    }
}
