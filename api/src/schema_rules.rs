//! What validation enforces that the schemas derived from the types cannot say, written into the
//! OpenAPI document: rules across fields (a rule's parameters follow its kind, an agent's roles,
//! an image only for sandboxes), patterns of map keys and list items, and what the cluster's
//! settings allow (its sizes, how long labels may be). A client that follows the document sends
//! what the API accepts; schemathesis checks that it does, in CI.
//!
//! Only schemas that describe requests are changed here, so a value the cluster holds from before
//! (a size since taken out of the catalogue) never makes an answer disagree with the document.

use serde_json::{json, Value};

use runtimeai_model::{ActionKind, ClusterSettings, RuleKind};

/// Label keys and values as `validate::labels` accepts them.
const LABEL_KEY: &str = "^[A-Za-z0-9._/-]+$";
const LABEL_VALUE: &str = "^[A-Za-z0-9._-]*$";

/// Words that make a goal one the planner understands (`runtimeai_engine::planner::Goal`),
/// lower case, between characters that are not ASCII letters or digits.
const GOAL_WORDS: &str = "availability|available|ha|redundancy|redundant|cost|costs|cheaper|save|spend|performance|\
latency|faster|speed|perf|throughput|recover|heal|fix|repair|prepare|snapshot|backup|stop|shutdown|restart|reboot|\
start|boot";

/// Writes the rules into `api`, with `settings` for what the cluster's settings decide; with
/// `any_goal` (an external planner takes the goals this one does not know) goals are free text.
pub(crate) fn write(api: &mut Value, settings: &ClusterSettings, any_goal: bool) {
    let sizes: Vec<Value> = settings.sizes.iter().map(|size| Value::from(size.name.clone())).collect();
    let schemas = &mut api["components"]["schemas"];
    let limits = &settings.limits;
    let label_map = |nullable: bool| {
        let value = json!({"type": if nullable { json!(["string", "null"]) } else { json!("string") },
            "pattern": LABEL_VALUE, "maxLength": limits.label_value_bytes});
        json!({"type": "object", "maxProperties": limits.labels_per_runtime, "additionalProperties": value,
            "propertyNames": {"type": "string", "pattern": LABEL_KEY, "maxLength": limits.label_key_bytes}})
    };
    let size_of = |sizes: &[Value]| {
        let names: Vec<Value> = sizes.iter().cloned().chain([Value::Null]).collect();
        json!({"properties": {"size": {"enum": names}}})
    };

    schemas["RuntimeCreateRequest"]["properties"]["labels"] = label_map(false);
    let none = json!({"type": "null"});
    let by_type = conditions(
        "type",
        json!([
            {"properties": {"type": {"enum": ["sandbox", "agent_runtime"]},
                "spec": {"properties": {"user_data": none, "ssh_authorized_keys": none}}}},
            {"properties": {"type": {"const": "vm"}, "spec": {"properties": {"idle_timeout_seconds": none,
                "image": {"type": ["string", "null"], "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"},
                "ssh_authorized_keys": {"type": ["array", "null"],
                    "items": {"type": "string", "pattern": "^(ssh-|ecdsa-|sk-)[^\\n\\r\\u0000]{0,8188}$"}}}}}},
            {"properties": {"type": {"const": "vcluster"}, "spec": {"properties": {"image": none,
                "idle_timeout_seconds": none, "user_data": none, "ssh_authorized_keys": none}}}},
        ]),
    );
    let mut rules = vec![json!({"properties": {"spec": size_of(&sizes)}})];
    rules.extend(by_type);
    schemas["RuntimeCreateRequest"]["allOf"] = Value::Array(rules);
    schemas["RuntimePatch"]["properties"]["labels"] = label_map(true);
    let networks = &mut schemas["ClusterSettings"]["properties"]["webhook_allowed_destinations"];
    networks["maxItems"] = 64.into();
    networks["items"] = json!({"type": "string", "pattern": "^[0-9A-Fa-f:.]{2,39}/[0-9]{1,3}$",
        "description": "A network in CIDR notation (127.0.0.1/32, fd00::/8)."});

    let scale = &mut schemas["LifecycleScaleRequest"];
    scale["allOf"] = json!([size_of(&sizes)]);
    // A size, else resources (as an `anyOf` of the two would say).
    scale["if"] = json!({"required": ["size"], "properties": {"size": {"type": "string"}}});
    scale["else"] = json!({"required": ["resources"], "properties": {"resources": {"type": "object"}}});
    write_action(schemas);
    write_key(schemas);
    write_policy_rule(schemas);

    let exec = &mut schemas["ExecRequest"]["properties"];
    exec["command"]["prefixItems"] = json!([{"type": "string", "minLength": 1}]);
    exec["env"]["propertyNames"] = json!({"type": "string", "pattern": "^[^=\\u0000]+$"});

    let mut goal = json!({"type": "string", "pattern": goal_pattern(&sizes),
        "description": "What to achieve, in words the planner knows: scale to <size> or to <n> replicas, \
            improve or lower availability, reduce cost, improve performance, recover, prepare (snapshot), \
            stop, restart, start."});
    if any_goal {
        goal = json!({"type": "string", "minLength": 1,
            "description": "What to achieve: the planner's own words, or anything for the external planner."});
    }
    for request in ["ActionPlanRequest", "IntentRequest"] {
        schemas[request]["properties"]["goal"] = goal.clone();
        schemas[request]["properties"]["constraints"] = constraints();
    }
}

/// A goal the planner understands: one of [`GOAL_WORDS`], or a scale to a size or a count.
fn goal_pattern(sizes: &[Value]) -> String {
    let sizes: Vec<&str> = sizes.iter().filter_map(Value::as_str).collect();
    let word = |words: &str| format!("(^|.*[^A-Za-z0-9])({words})([^A-Za-z0-9].*|$)");
    let targets = format!("{}|([1-9][0-9]{{0,2}}|1000) replicas?", sizes.join("|"));
    let scale = format!("^([^0-9]*[^A-Za-z0-9])?(scale|size|resize) (to )?({targets})([^A-Za-z0-9][^0-9]*)?$");
    format!("^{}$|{scale}", word(GOAL_WORDS))
}

/// The constraints the planner reads (`runtimeai_engine::planner::Constraints`).
fn constraints() -> Value {
    let money = json!({"type": "number", "minimum": 0});
    json!({"type": "object", "additionalProperties": false, "properties": {
        "latency": {"description": "A target such as \"<50ms\" or \"0.2s\", or milliseconds.", "oneOf": [
            {"type": "number", "exclusiveMinimum": 0},
            {"type": "string", "pattern": "^[<= ]*([1-9][0-9]{0,5}(\\.[0-9]{1,3})?|0\\.[0-9]{0,2}[1-9])(ms|s)?$"},
        ]},
        "availability": {"enum": ["high", "normal", "standard", "low"]},
        "cost": {"enum": ["optimize", "minimize", "any", "ignore"]},
        "max_cost_per_hour": money,
        "max_cost_per_month": money,
        "budget": {"type": "object", "minProperties": 1, "additionalProperties": false,
            "properties": {"max_cost_per_hour": money, "max_cost_per_month": money}},
    }})
}

/// An action's parameters are those of its lifecycle call (an observer's, a webhook's); only
/// `migrate` takes a target (its destination node). Written as a `oneOf` of whole action schemas,
/// one per type: code generators make a type of each, fuzzers generate each.
fn write_action(schemas: &mut Value) {
    let params =
        |schema: &str| json!({"oneOf": [{"type": "null"}, {"$ref": format!("#/components/schemas/{schema}")}]});
    let required = |schema: &str| json!({"$ref": format!("#/components/schemas/{schema}")});
    let node = json!({"type": ["object", "null"], "additionalProperties": false,
        "properties": {"node": {"type": "integer", "minimum": 0}}});
    let branch = |types: Value, params: Value, params_required: bool, target: Value| {
        let mut needed = vec!["type"];
        if params_required {
            needed.push("params");
        }
        json!({"type": "object", "additionalProperties": false, "required": needed,
            "properties": {"type": types, "params": params, "target": target}})
    };
    let none = json!({"type": "null"});
    schemas["Action"] = json!({"oneOf": [
        branch(json!({"enum": ["start", "restart", "rollout_restart", "pause", "resume"]}),
            params("LifecycleStartRequest"), false, none.clone()),
        branch(json!({"const": "stop"}), params("LifecycleStopRequest"), false, none.clone()),
        branch(json!({"const": "snapshot"}), params("LifecycleSnapshotRequest"), false, none.clone()),
        branch(json!({"const": "scale"}), required("LifecycleScaleRequest"), true, none.clone()),
        branch(json!({"const": "restore"}), required("LifecycleRestoreRequest"), true, none.clone()),
        branch(json!({"const": "tune_policy"}), params("RuntimePolicy"), false, none.clone()),
        branch(json!({"const": "migrate"}), params("LifecycleMigrateRequest"), false, node),
        branch(json!({"const": "attach_observer"}), required("ObserverAttachRequest"), true, none.clone()),
        branch(json!({"const": "detach_observer"}), required("ObserverDetachRequest"), true, none),
    ]});
}

/// Rules that depend on the value of `key` (a runtime's type, a rule's kind), one branch per
/// value, as conditions: `allOf` of `if` `key` has the branch's value `then` the rest of the
/// branch. Validators apply them as a `oneOf` of the branches would (the values of `key` are
/// all covered); code generators, which read a `oneOf` as a union of whole types and cannot make
/// one of these partial branches, leave conditions alone.
fn conditions(key: &str, branches: Value) -> Vec<Value> {
    let Value::Array(branches) = branches else { return Vec::new() };
    branches
        .into_iter()
        .map(|mut branch| {
            let properties = branch["properties"].as_object_mut();
            let value = properties.and_then(|p| p.remove(key)).unwrap_or(Value::Null);
            if branch["properties"].as_object().is_some_and(|p| p.is_empty()) {
                branch.as_object_mut().map(|b| b.remove("properties"));
            }
            json!({"if": {"properties": {key: value}, "required": [key]}, "then": branch})
        })
        .collect()
}

/// An agent's key takes the roles `agent` and `viewer` only; only an agent has a mode.
fn write_key(schemas: &mut Value) {
    let key = &mut schemas["KeyCreateRequest"];
    key["properties"]["tenants"]["items"] = json!({"type": "string", "pattern": "^(\\*|[^*]{1,63})$"});
    key["allOf"] = Value::Array(conditions(
        "kind",
        json!([
            {"properties": {"kind": {"const": "agent"}, "roles": {"items": {"enum": ["agent", "viewer"]}}}},
            {"properties": {"kind": {"enum": ["human", "service"]}, "agent_mode": {"type": "null"}}},
        ]),
    ));
}

/// A rule's parameters follow its kind (`PolicyRule::check`); a selector names actors by kind or
/// as `<kind>:<name>`, and actions that are judged on their own (not `execute`).
fn write_policy_rule(schemas: &mut Value) {
    let selectable: Vec<&str> =
        ActionKind::ALL.into_iter().filter(|k| k.selectable()).map(ActionKind::as_str).collect();
    let selector = &mut schemas["Selector"]["properties"];
    selector["actions"]["items"] = json!({"enum": selectable});
    selector["actor"]["items"] =
        json!({"type": "string", "pattern": "^(human|agent|service|system|(human|agent|service):.+)$"});
    let every_param: Vec<&str> = RuleKind::ALL.iter().flat_map(|kind| kind.params()).copied().collect();
    let branch = |kind: RuleKind| {
        let others: serde_json::Map<String, Value> = every_param
            .iter()
            .filter(|name| !kind.params().contains(name))
            .map(|name| (name.to_string(), json!({"type": "null"})))
            .collect();
        let mut branch = json!({"properties": {"kind": {"const": kind.as_str()}, "params": {"properties": others}}});
        if kind == RuleKind::BudgetGuardrail {
            // A budget needs one of its limits.
            let limit = |name: &&str| json!({"required": [name], "properties": {*name: {"type": "number"}}});
            branch["required"] = json!(["params"]);
            branch["properties"]["params"]["anyOf"] = kind.params().iter().map(limit).collect();
        }
        branch
    };
    let branches = RuleKind::ALL.into_iter().map(branch).collect();
    schemas["PolicyRule"]["allOf"] = Value::Array(conditions("kind", branches));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document may be stricter than the planner, never looser: every word it names, and each
    /// form of scaling it allows, is a goal the planner understands.
    #[test]
    fn every_goal_the_document_allows_is_one_the_planner_understands() {
        let sizes = runtimeai_model::default_sizes();
        let pattern =
            regex::Regex::new(&goal_pattern(&sizes.iter().map(|s| Value::from(s.name.clone())).collect::<Vec<_>>()))
                .unwrap();
        let mut goals: Vec<String> = GOAL_WORDS.split('|').map(|word| format!("please {word} now")).collect();
        goals.extend(
            ["scale to large", "resize xlarge", "scale to 3 replicas", "scale to 1000 replica"].map(String::from),
        );
        for goal in &goals {
            assert!(pattern.is_match(goal), "the document refuses {goal:?}");
            assert!(runtimeai_engine::planner::understands(goal, &sizes), "the planner does not understand {goal:?}");
        }
        for refused in ["", "make it nice", "scale to 1001 replicas"] {
            assert!(!pattern.is_match(refused), "the document allows {refused:?}");
        }
    }
}
