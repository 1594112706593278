//! A policy rule as the engine reads it: its kind, which actions it selects, and its parameters,
//! all typed. Serde refuses what no rule can mean (an unknown kind, selector key, action, runtime
//! type or parameter, a value of the wrong type, an actor that is no actor) and says where; what
//! depends on the kind (which parameters it takes, that a budget has a limit) is
//! [`PolicyRule::check`]'s. The kind and its parameters stay apart rather than one tagged enum:
//! serde reads a tagged enum from a buffer, and the JSON path of an error inside it is lost.
//!
//! In JSON a selector's lists may be one string (`"actions": "delete"`), and unset fields are
//! left out; in the binary codec every field is written in order.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, IntoDeserializer, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{ActionKind, Actor, RuntimeType};

/// What a policy rule does to the actions its selector matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    DenyAction,
    AllowAction,
    RequireApproval,
    /// Denies what would take the cost per hour (or month) past `params.max_cost_per_hour`
    /// (or `max_cost_per_month`).
    BudgetGuardrail,
    /// Denies public exposure or open egress when bringing a runtime up.
    DataEgress,
}

impl RuleKind {
    /// Every kind.
    pub const ALL: [RuleKind; 5] = [
        RuleKind::DenyAction,
        RuleKind::AllowAction,
        RuleKind::RequireApproval,
        RuleKind::BudgetGuardrail,
        RuleKind::DataEgress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::DenyAction => "deny_action",
            RuleKind::AllowAction => "allow_action",
            RuleKind::RequireApproval => "require_approval",
            RuleKind::BudgetGuardrail => "budget_guardrail",
            RuleKind::DataEgress => "data_egress",
        }
    }

    /// The parameters a rule of this kind takes.
    pub fn params(self) -> &'static [&'static str] {
        match self {
            RuleKind::BudgetGuardrail => &["max_cost_per_hour", "max_cost_per_month"],
            RuleKind::DataEgress => &["deny_public_exposure", "deny_open_egress"],
            RuleKind::DenyAction | RuleKind::AllowAction | RuleKind::RequireApproval => &["reason"],
        }
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule of a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    pub kind: RuleKind,
    #[serde(default)]
    pub selector: Selector,
    #[serde(default)]
    pub params: RuleParams,
}

impl PolicyRule {
    /// What the types cannot say: a rule takes only its kind's parameters, a budget needs a
    /// limit, limits are finite and not negative, and `execute` is no action a selector names
    /// (each action of a sequence is judged by its own kind). `Err((path below the rule,
    /// message))`.
    pub fn check(&self) -> Result<(), (String, String)> {
        if let Some(actions) = &self.selector.actions {
            if let Some(kind) = actions.iter().find(|kind| !kind.selectable()) {
                return Err(("selector.actions".into(), format!("{kind} is judged by the kinds of its actions")));
            }
        }
        let allowed = self.kind.params();
        if let Some(given) = self.params.given().into_iter().find(|name| !allowed.contains(name)) {
            return Err((format!("params.{given}"), format!("{} takes only {}", self.kind, allowed.join(", "))));
        }
        for (name, limit) in [
            ("max_cost_per_hour", self.params.max_cost_per_hour),
            ("max_cost_per_month", self.params.max_cost_per_month),
        ] {
            if limit.is_some_and(|limit| !limit.is_finite() || limit < 0.0) {
                return Err((format!("params.{name}"), "a limit is a number ≥ 0".into()));
            }
        }
        if self.kind == RuleKind::BudgetGuardrail && self.params.budget_per_hour(1.0).is_none() {
            return Err(("params".into(), "budget_guardrail needs max_cost_per_hour or max_cost_per_month".into()));
        }
        Ok(())
    }
}

/// Which actions a rule applies to: every key given must match (none given: every action).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Selector {
    /// A type or list of types.
    #[serde(deserialize_with = "one_or_many")]
    #[schema(value_type = Option<Vec<RuntimeType>>, min_items = 1)]
    pub runtime_type: Option<Vec<RuntimeType>>,
    /// An action or list of actions (not `execute`).
    #[serde(deserialize_with = "one_or_many")]
    #[schema(value_type = Option<Vec<ActionKind>>, min_items = 1)]
    pub actions: Option<Vec<ActionKind>>,
    /// Labels the runtime must carry.
    pub labels: Option<BTreeMap<String, String>>,
    /// `human`, `agent`, `service`, `system`, or one actor such as `agent:planner-bot` (or a
    /// list).
    #[serde(deserialize_with = "one_or_many")]
    #[schema(value_type = Option<Vec<String>>, min_items = 1)]
    pub actor: Option<Vec<ActorPattern>>,
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !serializer.is_human_readable() {
            return (&self.runtime_type, &self.actions, &self.labels, &self.actor).serialize(serializer);
        }
        let mut map = serializer.serialize_map(None)?;
        entry(&mut map, "runtime_type", &self.runtime_type)?;
        entry(&mut map, "actions", &self.actions)?;
        entry(&mut map, "labels", &self.labels)?;
        entry(&mut map, "actor", &self.actor)?;
        map.end()
    }
}

/// A rule's parameters; which ones a kind takes is [`RuleKind::params`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RuleParams {
    /// Shown in the decision (deny, allow, require approval).
    pub reason: Option<String>,
    /// A budget's limit per hour.
    #[schema(minimum = 0.0)]
    pub max_cost_per_hour: Option<f64>,
    /// A budget's limit per month (730 hours).
    #[schema(minimum = 0.0)]
    pub max_cost_per_month: Option<f64>,
    /// A data-egress rule denies public exposure (default true).
    pub deny_public_exposure: Option<bool>,
    /// A data-egress rule denies open egress (default true).
    pub deny_open_egress: Option<bool>,
}

impl RuleParams {
    /// The names of the parameters given.
    fn given(&self) -> Vec<&'static str> {
        let set = [
            ("reason", self.reason.is_some()),
            ("max_cost_per_hour", self.max_cost_per_hour.is_some()),
            ("max_cost_per_month", self.max_cost_per_month.is_some()),
            ("deny_public_exposure", self.deny_public_exposure.is_some()),
            ("deny_open_egress", self.deny_open_egress.is_some()),
        ];
        set.into_iter().filter(|(_, given)| *given).map(|(name, _)| name).collect()
    }

    /// A budget's limit per hour (the lower of the two if both are given), with
    /// `hours_per_month` hours to a month.
    pub fn budget_per_hour(&self, hours_per_month: f64) -> Option<f64> {
        let monthly = self.max_cost_per_month.map(|m| m / hours_per_month);
        match (self.max_cost_per_hour, monthly) {
            (Some(h), Some(m)) => Some(h.min(m)),
            (h, m) => h.or(m),
        }
    }
}

impl Serialize for RuleParams {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let RuleParams { reason, max_cost_per_hour, max_cost_per_month, deny_public_exposure, deny_open_egress } = self;
        if !serializer.is_human_readable() {
            return (reason, max_cost_per_hour, max_cost_per_month, deny_public_exposure, deny_open_egress)
                .serialize(serializer);
        }
        let mut map = serializer.serialize_map(None)?;
        entry(&mut map, "reason", reason)?;
        entry(&mut map, "max_cost_per_hour", max_cost_per_hour)?;
        entry(&mut map, "max_cost_per_month", max_cost_per_month)?;
        entry(&mut map, "deny_public_exposure", deny_public_exposure)?;
        entry(&mut map, "deny_open_egress", deny_open_egress)?;
        map.end()
    }
}

/// A JSON map's entry for a field that is set.
fn entry<M: SerializeMap, T: Serialize>(map: &mut M, key: &str, value: &Option<T>) -> Result<(), M::Error> {
    match value {
        Some(value) => map.serialize_entry(key, value),
        None => Ok(()),
    }
}

/// Whom a selector's `actor` names: a kind (`human`, `agent`, `service`, `system`) or one
/// principal (`<kind>:<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ActorPattern(String);

impl ActorPattern {
    pub fn matches(&self, actor: &Actor) -> bool {
        self.0 == actor.kind() || self.0 == actor.to_string()
    }
}

impl TryFrom<String> for ActorPattern {
    type Error = String;

    fn try_from(pattern: String) -> Result<ActorPattern, String> {
        let kinds = ["human", "agent", "service"];
        let valid = pattern == "system"
            || kinds.contains(&pattern.as_str())
            || pattern.split_once(':').is_some_and(|(kind, name)| kinds.contains(&kind) && !name.is_empty());
        if valid {
            Ok(ActorPattern(pattern))
        } else {
            Err(format!("{pattern:?} is not human, agent, service, system or <kind>:<name>"))
        }
    }
}

impl From<ActorPattern> for String {
    fn from(pattern: ActorPattern) -> String {
        pattern.0
    }
}

/// In JSON, one value or a non-empty list of them (`null`: none); in the binary codec, the
/// list as written.
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    if !deserializer.is_human_readable() {
        return Option::<Vec<T>>::deserialize(deserializer);
    }
    struct OneOrMany<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for OneOrMany<T> {
        type Value = Option<Vec<T>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or a non-empty list of strings")
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
            T::deserialize(value.into_deserializer()).map(|one| Some(vec![one]))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            let many = Vec::<T>::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
            if many.is_empty() {
                return Err(de::Error::invalid_length(0, &self));
            }
            Ok(Some(many))
        }
    }
    deserializer.deserialize_any(OneOrMany(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(value: serde_json::Value) -> Result<PolicyRule, String> {
        let rule: PolicyRule = serde_path_to_error::deserialize(value).map_err(|e| e.path().to_string())?;
        rule.check().map_err(|(path, _)| path)?;
        Ok(rule)
    }

    #[test]
    fn what_no_rule_can_mean_is_refused_where_it_is() {
        let bad = [
            (json!({"kind": "deny_everything"}), "kind"),
            (json!({"kind": "deny_action", "colour": "red"}), "colour"),
            (json!({"kind": "deny_action", "selector": {"actions": ["explode"]}}), "selector.actions[0]"),
            (json!({"kind": "deny_action", "selector": {"actions": "explode"}}), "selector.actions"),
            (json!({"kind": "deny_action", "selector": {"actions": []}}), "selector.actions"),
            (json!({"kind": "deny_action", "selector": {"actions": ["execute"]}}), "selector.actions"),
            (json!({"kind": "deny_action", "selector": {"colour": "red"}}), "selector.colour"),
            (json!({"kind": "deny_action", "selector": {"actor": "robot"}}), "selector.actor"),
            (json!({"kind": "deny_action", "selector": {"labels": {"env": 1}}}), "selector.labels.env"),
            (json!({"kind": "deny_action", "params": {"max_cost_per_hour": 1}}), "params.max_cost_per_hour"),
            (json!({"kind": "budget_guardrail"}), "params"),
            (json!({"kind": "budget_guardrail", "params": {"max_cost_per_hour": "cheap"}}), "params.max_cost_per_hour"),
            (json!({"kind": "budget_guardrail", "params": {"max_cost_per_hour": -1}}), "params.max_cost_per_hour"),
            (json!({"kind": "data_egress", "params": {"deny_public_exposure": "yes"}}), "params.deny_public_exposure"),
            (json!({"kind": "data_egress", "params": {"deny_everything": true}}), "params.deny_everything"),
        ];
        for (value, path) in bad {
            assert_eq!(rule(value.clone()).unwrap_err(), path, "{value}");
        }
    }

    #[test]
    fn a_rule_reads_back_as_written_in_json_and_in_the_codec() {
        let written = json!({"kind": "allow_action", "selector": {"actor": ["agent:x", "human"], "actions": ["start"],
            "runtime_type": ["vm"], "labels": {"env": "dev"}}, "params": {"reason": "fine"}});
        let rule = rule(written.clone()).unwrap();
        assert_eq!(serde_json::to_value(&rule).unwrap(), written);
        let one = rule_from(json!({"kind": "deny_action", "selector": {"actions": "delete"}}));
        assert_eq!(
            serde_json::to_value(&one).unwrap(),
            json!({"kind": "deny_action", "selector": {"actions": ["delete"]}, "params": {}})
        );
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&rule, config).unwrap();
        let (back, _): (PolicyRule, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, rule);
    }

    fn rule_from(value: serde_json::Value) -> PolicyRule {
        rule(value).unwrap()
    }

    #[test]
    fn an_actor_pattern_matches_a_kind_or_one_principal() {
        let agent = Actor::Agent("planner".into());
        let pattern = |p: &str| ActorPattern::try_from(p.to_string()).unwrap();
        assert!(pattern("agent").matches(&agent));
        assert!(pattern("agent:planner").matches(&agent));
        assert!(!pattern("agent:other").matches(&agent));
        assert!(!pattern("human").matches(&agent));
        assert!(ActorPattern::try_from("agent:".to_string()).is_err());
    }
}
