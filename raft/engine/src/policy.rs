//! The policy engine: which of a request's actions may run, and which rule says so.
//!
//! A policy applies to a runtime when its `tenant_id` is unset or the runtime's, and its
//! `scope_env` is unset or the runtime's `env` label. A rule applies to an action when every
//! key of its selector matches (a missing key matches anything):
//!
//! | selector key | matches |
//! |---|---|
//! | `runtime_type` | a type or list of types (`vm`, `vcluster`, `sandbox`, `agent_runtime`) |
//! | `actions` | an action or list of actions (`create`, `start`, `stop`, `restart`, `scale`, `snapshot`, `restore`, `delete`, `relabel`) |
//! | `labels` | an object of labels the runtime must carry |
//! | `actor` | `human`, `agent`, `service`, `system`, or one actor such as `agent:planner-bot` (or a list) |
//!
//! Rule kinds, and what a matching rule decides:
//! - `deny_action`: deny. `allow_action`: allow. `require_approval`: require approval.
//!   (Each takes an optional `params.reason`, shown in the decision.)
//! - `budget_guardrail` (`params.max_cost_per_hour` or `params.max_cost_per_month`): deny an
//!   action that raises the runtime's cost above the limit, priced by the size catalogue.
//! - `data_egress` (`params.deny_public_exposure`, `params.deny_open_egress`, both default
//!   true): deny bringing up (create, start) a runtime exposed publicly or with open egress.
//!
//! **Precedence**: deny beats require-approval beats allow; among rules of the same verdict the
//! first policy (oldest id) and its first rule name the decision. When no rule matches, the
//! policy mode decides:
//!
//! | mode | no rule matches: non-destructive | no rule matches: destructive | destructive, explicitly allowed |
//! |---|---|---|---|
//! | `safe_first` | require approval | require approval | require approval |
//! | `balanced` | allow | allow; require approval in `env=production` | allow |
//! | `aggressive` | allow | allow | allow |
//!
//! So `safe_first` runs on its own only what an `allow_action` rule allows, and never runs a
//! destructive action without a human. Destructive actions: stop, delete, restore, a scale
//! that lowers cpu, size or replicas, and a relabel that leaves a policy's scope.
//!
//! **Relabels.** Labels decide which policies apply, so a change of labels (`relabel`) is judged
//! by the policies that apply *before* it. A relabel that would take the runtime out of a
//! policy's scope (its `scope_env`) or out of a rule's `labels` selector needs approval in every
//! mode unless a rule decides on `relabel` explicitly: nobody escapes a production policy by
//! calling the runtime `env=dev`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use runtimeai_model::{
    Actor, LifecycleAction, Policy, PolicyDecision, PolicyMode, PolicyRule, RuleKind, Runtime, RuntimeSpec,
    RuntimeState, Selector, SizeEntry, Verdict,
};

use crate::Catalogue;

/// What is asked: actions (in order) on a runtime, by an actor, in a mode.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The runtime before the first action (for a create: the new record, `creating`).
    pub runtime: &'a Runtime,
    pub actions: &'a [LifecycleAction],
    pub actor: &'a Actor,
    pub mode: PolicyMode,
    pub sizes: &'a [SizeEntry],
}

/// One decision per action. Policies are considered oldest first.
pub fn evaluate(policies: &[Policy], request: Request<'_>) -> Vec<PolicyDecision> {
    let catalogue = Catalogue::new(request.sizes);
    // The runtime's own policy sets a floor on the mode.
    let mode = request.runtime.policy.mode_for(request.mode);
    let mut policies: Vec<&Policy> = policies.iter().filter(|p| in_scope(p, request.runtime)).collect();
    policies.sort_by(|a, b| a.id.cmp(&b.id));
    let runtime = request.runtime;
    // Only the state and the spec change along the actions; the spec is copied only by an
    // action that changes it (a scale), not per action (this runs in every create's apply).
    let mut before = Side { state: runtime.state, spec: Cow::Borrowed(&runtime.spec) };
    let mut decisions = Vec::new();
    for (index, action) in request.actions.iter().enumerate() {
        let state = action.transition(before.state).map_or(before.state, |(_, after)| after);
        let spec = match action {
            LifecycleAction::Scale { .. } => {
                let mut spec = before.spec.clone().into_owned();
                action.apply_to_spec(&mut spec);
                Cow::Owned(spec)
            }
            _ => before.spec.clone(),
        };
        let after = Side { state, spec };
        if *action == LifecycleAction::Create {
            // Before a create nothing runs (and nothing costs).
            before.state = RuntimeState::Stopped;
        }
        let step = Step { action, runtime, before: &before, after: &after, catalogue, actor: request.actor };
        decisions.push(own_budget(&step, index as u32).unwrap_or_else(|| decide(&policies, &step, index as u32, mode)));
        before = after;
    }
    decisions
}

/// A runtime's state and spec before or after one action of a request.
struct Side<'a> {
    state: RuntimeState,
    spec: Cow<'a, RuntimeSpec>,
}

impl Side<'_> {
    fn cost(&self, catalogue: Catalogue<'_>) -> f64 {
        catalogue.cost_in(self.state, &self.spec)
    }
}

/// The most restrictive verdict of a set of decisions (allow when there are none).
pub fn overall(decisions: &[PolicyDecision]) -> Verdict {
    decisions.iter().map(|d| d.verdict).max().unwrap_or(Verdict::Allow)
}

/// The decision that sets the overall verdict (the first of the most restrictive ones).
pub fn deciding(decisions: &[PolicyDecision]) -> Option<&PolicyDecision> {
    let verdict = overall(decisions);
    decisions.iter().find(|d| d.verdict == verdict)
}

/// Whether an action takes something away: stop, pause, delete, restore, migrate, or a scale down (a
/// looser own policy is judged destructive too, in `decide`).
pub fn is_destructive(action: &LifecycleAction, before: &Runtime, catalogue: Catalogue<'_>) -> bool {
    destroys(action, &before.spec, catalogue)
}

/// [`is_destructive`] for a runtime whose spec is `before`.
fn destroys(action: &LifecycleAction, before: &RuntimeSpec, catalogue: Catalogue<'_>) -> bool {
    match action {
        LifecycleAction::Stop { .. }
        | LifecycleAction::Pause
        | LifecycleAction::Delete
        | LifecycleAction::Restore { .. }
        // A cold migration stops it; a rebuild loses what only its node held.
        | LifecycleAction::Migrate { .. } => true,
        LifecycleAction::Scale { .. } => {
            let mut after = before.clone();
            action.apply_to_spec(&mut after);
            let cpu = |spec: &runtimeai_model::RuntimeSpec| {
                spec.resources
                    .as_ref()
                    .and_then(|r| r.cpu)
                    .unwrap_or_else(|| catalogue.sizes.get(catalogue.effective_index(spec)).map_or(0.0, |s| s.cpu))
            };
            catalogue.effective_index(&after) < catalogue.effective_index(before)
                || catalogue.replicas(&after) < catalogue.replicas(before)
                || cpu(&after) < cpu(before)
        }
        LifecycleAction::Sequence { actions } => actions.iter().any(|a| destroys(a, before, catalogue)),
        _ => false,
    }
}

/// The runtime's own budget's verdict on a step: a denial when the step would raise its cost
/// above it.
fn own_budget(step: &Step<'_>, index: u32) -> Option<PolicyDecision> {
    let limit = step.runtime.policy.max_cost_per_hour?;
    let (before, after) = (step.before.cost(step.catalogue), step.after.cost(step.catalogue));
    let action = step.action.kind();
    (after > limit + 1e-9 && after > before).then(|| PolicyDecision {
        action,
        action_index: index,
        verdict: Verdict::Deny,
        policy_id: None,
        policy_name: None,
        rule_index: None,
        rule_kind: None,
        reason: format!(
            "{action} would raise the cost to {after:.2}/h, above the runtime's own budget of {limit:.2}/h"
        ),
    })
}

struct Step<'a> {
    action: &'a LifecycleAction,
    /// The runtime as the request found it: its type, labels and tenant do not change.
    runtime: &'a Runtime,
    before: &'a Side<'a>,
    after: &'a Side<'a>,
    catalogue: Catalogue<'a>,
    actor: &'a Actor,
}

fn in_scope(policy: &Policy, runtime: &Runtime) -> bool {
    (policy.tenant_id.is_none() || policy.tenant_id == runtime.tenant_id)
        && (policy.scope_env.is_none() || policy.scope_env.as_deref() == runtime.env())
}

/// The first policy (of those applying now) out of whose scope a relabel would take the
/// runtime: its `scope_env` or a rule's `labels` selector matches now and would not after.
fn scope_left<'p>(policies: &[&'p Policy], step: &Step<'_>) -> Option<&'p Policy> {
    if !matches!(step.action, LifecycleAction::Relabel { .. }) {
        return None;
    }
    let mut after = step.runtime.labels.clone();
    step.action.apply_to_labels(&mut after);
    policies.iter().copied().find(|policy| {
        let env_left = policy.scope_env.as_ref().is_some_and(|env| after.get("env") != Some(env));
        env_left
            || policy.rules.iter().any(|rule| {
                rule.selector
                    .labels
                    .as_ref()
                    .is_some_and(|wanted| carries(&step.runtime.labels, wanted) && !carries(&after, wanted))
            })
    })
}

fn decide(policies: &[&Policy], step: &Step<'_>, index: u32, mode: PolicyMode) -> PolicyDecision {
    let action = step.action.kind();
    let mut winner: Option<PolicyDecision> = None;
    for policy in policies {
        for (rule_index, rule) in policy.rules.iter().enumerate() {
            if !selector_matches(&rule.selector, step) {
                continue;
            }
            let Some((verdict, reason)) = rule_verdict(rule, step) else { continue };
            if winner.as_ref().is_some_and(|w| w.verdict >= verdict) {
                continue;
            }
            winner = Some(PolicyDecision {
                action,
                action_index: index,
                verdict,
                policy_id: Some(policy.id.clone()),
                policy_name: Some(policy.name.clone()),
                rule_index: Some(rule_index as u32),
                rule_kind: Some(rule.kind),
                reason,
            });
        }
    }
    let left = scope_left(policies, step);
    let loosens =
        matches!(step.action, LifecycleAction::TunePolicy { policy } if step.runtime.policy.loosened_by(policy));
    let destructive = left.is_some() || loosens || destroys(step.action, &step.before.spec, step.catalogue);
    match winner {
        Some(mut decision) => {
            if decision.verdict == Verdict::Allow && destructive && mode == PolicyMode::SafeFirst {
                decision.verdict = Verdict::RequireApproval;
                decision.reason = format!(
                    "{}; but safe_first runs destructive actions ({action}) only once approved",
                    decision.reason
                );
            }
            decision
        }
        None => {
            let production = step.runtime.env() == Some("production");
            let (verdict, reason) = match mode {
                _ if left.is_some() => (
                    Verdict::RequireApproval,
                    format!(
                        "relabel would take the runtime out of the scope of policy {:?}, so a human must approve it",
                        left.map_or("", |p| p.name.as_str())
                    ),
                ),
                PolicyMode::SafeFirst if destructive => {
                    (Verdict::RequireApproval, format!("safe_first: {action} is destructive and needs approval"))
                }
                PolicyMode::SafeFirst => (
                    Verdict::RequireApproval,
                    format!("safe_first: no allow_action rule covers {action}, so a human must approve it"),
                ),
                PolicyMode::Balanced if destructive && production => (
                    Verdict::RequireApproval,
                    format!("balanced: {action} is destructive in production and needs approval"),
                ),
                PolicyMode::Balanced => (Verdict::Allow, format!("balanced: no rule matches {action}")),
                PolicyMode::Aggressive => (Verdict::Allow, format!("aggressive: no rule matches {action}")),
            };
            PolicyDecision {
                action,
                action_index: index,
                verdict,
                policy_id: None,
                policy_name: None,
                rule_index: None,
                rule_kind: None,
                reason,
            }
        }
    }
}

/// What a matching rule decides about the step, if it has a say in it.
fn rule_verdict(rule: &PolicyRule, step: &Step<'_>) -> Option<(Verdict, String)> {
    let params = &rule.params;
    let given_reason = params.reason.clone();
    let action = step.action.kind();
    match rule.kind {
        RuleKind::DenyAction => Some((Verdict::Deny, given_reason.unwrap_or_else(|| format!("{action} is denied")))),
        RuleKind::AllowAction => Some((Verdict::Allow, given_reason.unwrap_or_else(|| format!("{action} is allowed")))),
        RuleKind::RequireApproval => {
            Some((Verdict::RequireApproval, given_reason.unwrap_or_else(|| format!("{action} needs approval"))))
        }
        RuleKind::BudgetGuardrail => {
            let limit = params.budget_per_hour(crate::catalogue::HOURS_PER_MONTH)?;
            let before = step.before.cost(step.catalogue);
            let after = step.after.cost(step.catalogue);
            (after > limit + 1e-9 && after > before).then(|| {
                (
                    Verdict::Deny,
                    format!("{action} would raise the cost to {after:.2}/h, above the budget of {limit:.2}/h"),
                )
            })
        }
        RuleKind::DataEgress => {
            let brings_up = matches!(step.action, LifecycleAction::Create | LifecycleAction::Start);
            let networking = step.after.spec.networking.clone().unwrap_or_default();
            let public =
                params.deny_public_exposure.unwrap_or(true) && networking.exposure == runtimeai_model::Exposure::Public;
            let open = params.deny_open_egress.unwrap_or(true)
                && networking.egress_policy == runtimeai_model::EgressPolicy::Open;
            (brings_up && (public || open)).then(|| {
                let what = if public { "public exposure" } else { "open egress" };
                (Verdict::Deny, format!("{action} would bring up a runtime with {what}, which this policy forbids"))
            })
        }
    }
}

/// Whether `labels` carry every label of a selector's `labels`.
fn carries(labels: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn selector_matches(selector: &Selector, step: &Step<'_>) -> bool {
    let Selector { runtime_type, actions, labels, actor } = selector;
    runtime_type.as_ref().is_none_or(|types| types.contains(&step.runtime.runtime_type))
        && actions.as_ref().is_none_or(|actions| actions.contains(&step.action.kind()))
        && labels.as_ref().is_none_or(|wanted| carries(&step.runtime.labels, wanted))
        && actor.as_ref().is_none_or(|patterns| patterns.iter().any(|pattern| pattern.matches(step.actor)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtimeai_model::{
        default_sizes, ActionKind, EgressPolicy, Exposure, NetworkingProfile, RuntimeSpec, RuntimeType,
    };
    use serde_json::json;

    fn runtime(env: Option<&str>, size: &str, state: RuntimeState) -> Runtime {
        Runtime {
            state,
            tenant_id: Some("acme".into()),
            labels: env.map(|e| [("env".to_string(), e.to_string())].into()).unwrap_or_default(),
            spec: RuntimeSpec { size: Some(size.into()), ..Default::default() },
            ..Runtime::new("rt_1", "r", RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH)
        }
    }

    fn rule(kind: &str, selector: serde_json::Value, params: serde_json::Value) -> PolicyRule {
        serde_json::from_value(json!({"kind": kind, "selector": selector, "params": params})).expect("a rule")
    }

    fn policy(id: &str, env: Option<&str>, rules: Vec<PolicyRule>) -> Policy {
        Policy {
            id: id.into(),
            name: format!("{id}-name"),
            tenant_id: None,
            scope_env: env.map(String::from),
            rules,
            created_at: chrono::DateTime::UNIX_EPOCH,
            version: 1,
        }
    }

    fn decide_one(
        policies: &[Policy],
        rt: &Runtime,
        action: LifecycleAction,
        actor: Actor,
        mode: PolicyMode,
    ) -> PolicyDecision {
        let sizes = default_sizes();
        let actions = [action];
        evaluate(policies, Request { runtime: rt, actions: &actions, actor: &actor, mode, sizes: &sizes }).remove(0)
    }

    fn stop() -> LifecycleAction {
        LifecycleAction::Stop { force: false, timeout_seconds: None }
    }

    fn scale(size: &str) -> LifecycleAction {
        LifecycleAction::Scale { size: Some(size.into()), resources: None }
    }

    #[test]
    fn a_runtimes_own_policy_raises_the_mode_caps_the_cost_and_is_loosened_only_with_approval() {
        use runtimeai_model::RuntimePolicy;
        let bot = || Actor::Agent("bot".into());
        let mut rt = runtime(Some("production"), "medium", RuntimeState::Running);
        rt.policy = RuntimePolicy { mode: Some(PolicyMode::SafeFirst), max_cost_per_hour: Some(0.15) };
        // A restart an agent asks for in balanced mode is judged in the runtime's safe_first.
        let d = decide_one(&[], &rt, LifecycleAction::Restart, bot(), PolicyMode::Balanced);
        assert_eq!(d.verdict, Verdict::RequireApproval, "{d:?}");
        assert!(d.reason.starts_with("safe_first"), "{d:?}");
        // Its budget: large (0.40/h) is denied, whoever asks and whatever the mode.
        let d = decide_one(&[], &rt, scale("large"), Actor::Human("ops".into()), PolicyMode::Aggressive);
        assert_eq!(d.verdict, Verdict::Deny, "{d:?}");
        assert!(d.reason.contains("the runtime's own budget of 0.15/h"), "{d:?}");
        // Tightening is allowed where loosening needs a human (it takes a safeguard away).
        let tune =
            |mode, budget| LifecycleAction::TunePolicy { policy: RuntimePolicy { mode, max_cost_per_hour: budget } };
        rt.policy = RuntimePolicy { mode: Some(PolicyMode::Balanced), max_cost_per_hour: Some(0.15) };
        let tighter = decide_one(&[], &rt, tune(Some(PolicyMode::SafeFirst), Some(0.1)), bot(), PolicyMode::Balanced);
        assert_eq!(tighter.verdict, Verdict::Allow, "{tighter:?}");
        for looser in [tune(Some(PolicyMode::Aggressive), Some(0.15)), tune(Some(PolicyMode::Balanced), None)] {
            let d = decide_one(&[], &rt, looser.clone(), bot(), PolicyMode::Balanced);
            assert_eq!(d.verdict, Verdict::RequireApproval, "{looser:?}: {d:?}");
        }
    }

    #[test]
    fn deny_beats_approval_beats_allow_whatever_their_order() {
        let rt = runtime(Some("production"), "medium", RuntimeState::Running);
        let allow = rule("allow_action", json!({"actions": ["restart"]}), json!({}));
        let approve = rule("require_approval", json!({"actions": "restart"}), json!({}));
        let deny = rule("deny_action", json!({"actions": ["restart"]}), json!({"reason": "frozen"}));
        // (rules in policy order, expected verdict, expected deciding policy)
        let table = [
            (vec![allow.clone(), approve.clone(), deny.clone()], Verdict::Deny, 2),
            (vec![deny.clone(), allow.clone()], Verdict::Deny, 0),
            (vec![allow.clone(), approve.clone()], Verdict::RequireApproval, 1),
            (vec![approve.clone(), allow.clone()], Verdict::RequireApproval, 0),
            (vec![allow.clone()], Verdict::Allow, 0),
        ];
        for mode in [PolicyMode::SafeFirst, PolicyMode::Balanced, PolicyMode::Aggressive] {
            for (rules, verdict, deciding) in &table {
                let policies: Vec<Policy> =
                    rules.iter().enumerate().map(|(i, r)| policy(&format!("pol_{i}"), None, vec![r.clone()])).collect();
                let d = decide_one(&policies, &rt, LifecycleAction::Restart, Actor::Agent("bot".into()), mode);
                assert_eq!(d.verdict, *verdict, "{mode:?} {rules:?}");
                assert_eq!(d.policy_id.as_deref(), Some(format!("pol_{deciding}").as_str()), "{d:?}");
                assert_eq!(d.rule_kind, Some(rules[*deciding].kind));
            }
        }
    }

    #[test]
    fn with_no_matching_rule_the_mode_decides() {
        let dev = runtime(Some("dev"), "medium", RuntimeState::Running);
        let prod = runtime(Some("production"), "medium", RuntimeState::Running);
        let bot = || Actor::Agent("bot".into());
        use PolicyMode::*;
        use Verdict::*;
        // (mode, runtime, action, expected)
        let table = [
            (SafeFirst, &dev, LifecycleAction::Restart, RequireApproval),
            (SafeFirst, &dev, stop(), RequireApproval),
            (Balanced, &dev, LifecycleAction::Restart, Allow),
            (Balanced, &dev, stop(), Allow),
            (Balanced, &prod, stop(), RequireApproval),
            (Balanced, &prod, LifecycleAction::Pause, RequireApproval),
            (Balanced, &prod, LifecycleAction::Resume, Allow),
            (Balanced, &prod, scale("small"), RequireApproval),
            (Balanced, &prod, scale("large"), Allow),
            (Aggressive, &prod, stop(), Allow),
            (Aggressive, &prod, LifecycleAction::Delete, Allow),
        ];
        for (mode, rt, action, expected) in table {
            let d = decide_one(&[], rt, action.clone(), bot(), mode);
            assert_eq!(d.verdict, expected, "{mode:?} {action:?} in {:?}", rt.env());
            assert!(d.policy_id.is_none() && d.reason.starts_with(mode.as_str()), "{d:?}");
        }
        // safe_first: an explicit allow runs a non-destructive action, not a destructive one.
        let allow_all = policy("pol_a", None, vec![rule("allow_action", json!({}), json!({}))]);
        let d = decide_one(std::slice::from_ref(&allow_all), &dev, LifecycleAction::Restart, bot(), SafeFirst);
        assert_eq!((d.verdict, d.policy_id.as_deref()), (Allow, Some("pol_a")));
        let d = decide_one(&[allow_all], &dev, scale("small"), bot(), SafeFirst);
        assert_eq!((d.verdict, d.policy_id.as_deref()), (RequireApproval, Some("pol_a")));
    }

    fn relabel(key: &str, value: Option<&str>) -> LifecycleAction {
        LifecycleAction::Relabel { labels: [(key.to_string(), value.map(String::from))].into() }
    }

    #[test]
    fn a_relabel_out_of_a_policys_scope_needs_approval_in_every_mode_unless_a_rule_decides() {
        use PolicyMode::*;
        use Verdict::*;
        let mut prod = runtime(Some("production"), "medium", RuntimeState::Running);
        prod.labels.insert("tier".into(), "db".into());
        let bot = || Actor::Agent("bot".into());
        let scoped =
            policy("pol_p", Some("production"), vec![rule("deny_action", json!({"actions": "stop"}), json!({}))]);
        let by_label = policy(
            "pol_l",
            None,
            vec![rule("require_approval", json!({"labels": {"tier": "db"}, "actions": "delete"}), json!({}))],
        );
        // (policies, change, mode, expected, policy named)
        let table = [
            (vec![scoped.clone()], relabel("env", Some("dev")), Aggressive, RequireApproval, Some("pol_p-name")),
            (vec![scoped.clone()], relabel("env", None), Balanced, RequireApproval, Some("pol_p-name")),
            (vec![scoped.clone()], relabel("team", Some("x")), Aggressive, Allow, None),
            (vec![scoped.clone()], relabel("env", Some("production")), Balanced, Allow, None),
            (vec![by_label.clone()], relabel("tier", Some("web")), Aggressive, RequireApproval, Some("pol_l-name")),
            (vec![by_label.clone()], relabel("env", Some("dev")), Aggressive, Allow, None),
            (vec![], relabel("env", Some("dev")), Aggressive, Allow, None),
            (vec![], relabel("env", Some("dev")), SafeFirst, RequireApproval, None),
        ];
        for (policies, change, mode, expected, named) in table {
            let d = decide_one(&policies, &prod, change.clone(), bot(), mode);
            assert_eq!(d.verdict, expected, "{mode:?} {change:?}: {d:?}");
            assert_eq!(d.action, ActionKind::Relabel);
            if let Some(name) = named {
                assert!(d.reason.contains(name), "the reason names the policy left: {d:?}");
            }
        }
        // A rule on `relabel` decides explicitly: deny is deny, allow lets it through (but
        // safe_first still asks, a scope-leaving relabel being destructive).
        for (kind, mode, expected) in [
            ("deny_action", Aggressive, Deny),
            ("allow_action", Balanced, Allow),
            ("allow_action", SafeFirst, RequireApproval),
        ] {
            let decides = rule(kind, json!({"actions": "relabel"}), json!({}));
            let policies = [policy("pol_p", Some("production"), vec![decides])];
            let d = decide_one(&policies, &prod, relabel("env", Some("dev")), bot(), mode);
            assert_eq!((d.verdict, d.policy_id.as_deref()), (expected, Some("pol_p")), "{kind} {mode:?}");
        }
        assert!(rule("deny_action", json!({"actions": "relabel"}), json!({})).check().is_ok());
    }

    #[test]
    fn scope_and_selectors_narrow_rules() {
        let prod = runtime(Some("production"), "medium", RuntimeState::Running);
        let dev = runtime(Some("dev"), "medium", RuntimeState::Running);
        let deny_agents = policy(
            "pol_1",
            Some("production"),
            vec![rule(
                "deny_action",
                json!({"actions": ["stop"], "actor": "agent", "runtime_type": ["vm"]}),
                json!({}),
            )],
        );
        let policies = [deny_agents];
        let mode = PolicyMode::Aggressive;
        assert_eq!(decide_one(&policies, &prod, stop(), Actor::Agent("a".into()), mode).verdict, Verdict::Deny);
        assert_eq!(decide_one(&policies, &prod, stop(), Actor::Human("h".into()), mode).verdict, Verdict::Allow);
        assert_eq!(decide_one(&policies, &dev, stop(), Actor::Agent("a".into()), mode).verdict, Verdict::Allow);
        let mut other_tenant = policies[0].clone();
        other_tenant.tenant_id = Some("globex".into());
        assert_eq!(decide_one(&[other_tenant], &prod, stop(), Actor::Agent("a".into()), mode).verdict, Verdict::Allow);
        let by_label = policy("pol_2", None, vec![rule("deny_action", json!({"labels": {"tier": "db"}}), json!({}))]);
        let mut db = dev.clone();
        db.labels.insert("tier".into(), "db".into());
        assert_eq!(
            decide_one(std::slice::from_ref(&by_label), &db, stop(), Actor::System, mode).verdict,
            Verdict::Deny
        );
        assert_eq!(decide_one(&[by_label], &dev, stop(), Actor::System, mode).verdict, Verdict::Allow);
    }

    #[test]
    fn budget_guardrail_denies_raising_cost_above_the_limit_only() {
        let rt = runtime(None, "medium", RuntimeState::Running);
        let budget =
            policy("pol_b", None, vec![rule("budget_guardrail", json!({}), json!({"max_cost_per_hour": 0.2}))]);
        let policies = [budget];
        let mode = PolicyMode::Aggressive;
        let d = decide_one(&policies, &rt, scale("large"), Actor::System, mode);
        assert_eq!(d.verdict, Verdict::Deny);
        assert!(d.reason.contains("0.40/h") && d.reason.contains("0.20/h"), "{}", d.reason);
        assert_eq!(decide_one(&policies, &rt, scale("small"), Actor::System, mode).verdict, Verdict::Allow);
        // Already over budget: going down is still allowed, starting is not.
        let big = runtime(None, "xlarge", RuntimeState::Stopped);
        assert_eq!(decide_one(&policies, &big, LifecycleAction::Start, Actor::System, mode).verdict, Verdict::Deny);
        let monthly =
            policy("pol_m", None, vec![rule("budget_guardrail", json!({}), json!({"max_cost_per_month": 100.0}))]);
        // 100/month ≈ 0.137/h: medium (0.10) fits, large (0.40) does not.
        assert_eq!(
            decide_one(std::slice::from_ref(&monthly), &rt, scale("large"), Actor::System, mode).verdict,
            Verdict::Deny
        );
        let mut creating = runtime(None, "medium", RuntimeState::Creating);
        assert_eq!(
            decide_one(std::slice::from_ref(&monthly), &creating, LifecycleAction::Create, Actor::System, mode).verdict,
            Verdict::Allow
        );
        creating.spec.size = Some("large".into());
        assert_eq!(
            decide_one(std::slice::from_ref(&monthly), &creating, LifecycleAction::Create, Actor::System, mode).verdict,
            Verdict::Deny
        );
        // Explicit resources are priced too: a `small` asking for 64 CPUs or 1 TiB is not small.
        for resources in [json!({"cpu": 64.0}), json!({"memory": "1Ti"})] {
            let mut greedy = runtime(None, "small", RuntimeState::Creating);
            greedy.spec.resources = Some(serde_json::from_value(resources.clone()).unwrap());
            let d = decide_one(std::slice::from_ref(&monthly), &greedy, LifecycleAction::Create, Actor::System, mode);
            assert_eq!(d.verdict, Verdict::Deny, "{resources}: {}", d.reason);
            let scaled =
                LifecycleAction::Scale { size: None, resources: Some(serde_json::from_value(resources).unwrap()) };
            let small = runtime(None, "small", RuntimeState::Running);
            assert_eq!(
                decide_one(std::slice::from_ref(&monthly), &small, scaled, Actor::System, mode).verdict,
                Verdict::Deny
            );
        }
    }

    #[test]
    fn data_egress_keeps_public_runtimes_out_of_production() {
        let egress = policy("pol_e", Some("production"), vec![rule("data_egress", json!({}), json!({}))]);
        let mut rt = runtime(Some("production"), "small", RuntimeState::Creating);
        rt.spec.networking =
            Some(NetworkingProfile { exposure: Exposure::Public, egress_policy: EgressPolicy::Restricted });
        let mode = PolicyMode::Aggressive;
        let d = decide_one(std::slice::from_ref(&egress), &rt, LifecycleAction::Create, Actor::System, mode);
        assert_eq!((d.verdict, d.rule_kind), (Verdict::Deny, Some(RuleKind::DataEgress)));
        rt.spec.networking = Some(NetworkingProfile { exposure: Exposure::Private, egress_policy: EgressPolicy::Open });
        assert_eq!(
            decide_one(std::slice::from_ref(&egress), &rt, LifecycleAction::Create, Actor::System, mode).verdict,
            Verdict::Deny
        );
        let lenient = policy(
            "pol_l",
            Some("production"),
            vec![rule("data_egress", json!({}), json!({"deny_open_egress": false}))],
        );
        assert_eq!(decide_one(&[lenient], &rt, LifecycleAction::Create, Actor::System, mode).verdict, Verdict::Allow);
        rt.state = RuntimeState::Running;
        assert_eq!(
            decide_one(&[egress], &rt, stop(), Actor::System, mode).verdict,
            Verdict::Allow,
            "stopping reduces exposure"
        );
    }

    #[test]
    fn a_sequence_is_judged_action_by_action_on_the_projected_runtime() {
        let rt = runtime(None, "medium", RuntimeState::Running);
        let budget =
            policy("pol_b", None, vec![rule("budget_guardrail", json!({}), json!({"max_cost_per_hour": 0.5}))]);
        let sizes = default_sizes();
        let actions = [scale("large"), stop(), LifecycleAction::Start, scale("xlarge")];
        let actor = Actor::System;
        let decisions = evaluate(
            &[budget],
            Request { runtime: &rt, actions: &actions, actor: &actor, mode: PolicyMode::Aggressive, sizes: &sizes },
        );
        let verdicts: Vec<Verdict> = decisions.iter().map(|d| d.verdict).collect();
        assert_eq!(verdicts, [Verdict::Allow, Verdict::Allow, Verdict::Allow, Verdict::Deny]);
        assert_eq!(decisions[3].action_index, 3);
        assert_eq!(overall(&decisions), Verdict::Deny);
        assert_eq!(deciding(&decisions).map(|d| d.action_index), Some(3));
    }
}
