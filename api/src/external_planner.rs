//! An optional external planner: an OpenAI-compatible chat endpoint asked for a plan when the
//! deterministic planner does not understand a goal.
//!
//! Its answer is parsed into the same action schema as `actions/execute` (each action's
//! parameters checked like an agent's), checked against the same constraints, and then, like
//! any plan, judged by the policies in apply. Nothing it says is trusted: output that does not
//! parse, or names an action or parameter the API would refuse, is a 502 that says what was
//! wrong. The deterministic planner stays the default and is always tried first.

use std::time::Duration;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use runtimeai_model::{Capability, LifecycleAction, Runtime, SizeEntry};

use crate::actions::{lifecycle_action, Action};
use crate::problem::Problem;

/// Where the external planner is and how to call it.
#[derive(Debug, Clone)]
pub struct ExternalPlannerConfig {
    /// Base URL of the OpenAI-compatible API, e.g. `https://api.openai.com/v1`.
    pub url: String,
    pub model: String,
    /// Sent as a bearer token when set.
    pub api_key: Option<String>,
    pub timeout: Duration,
}

/// A client for the external planner.
#[derive(Debug, Clone)]
pub struct ExternalPlanner {
    config: ExternalPlannerConfig,
    client: reqwest::Client,
}

/// What the model is asked to answer.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ModelPlan {
    actions: Vec<Action>,
    #[serde(default)]
    rationale: Vec<String>,
}

/// A plan from the model, checked like an agent's request.
#[derive(Debug)]
pub struct ExternalPlan {
    pub actions: Vec<LifecycleAction>,
    pub rationale: Vec<String>,
}

const INSTRUCTIONS: &str = "You plan operations on one runtime (a VM, a virtual Kubernetes cluster or a sandbox) \
of the RuntimeAI control plane. Answer with one JSON object and nothing else: \
{\"actions\": [{\"type\": ..., \"params\": {...}}], \"rationale\": [\"one reason per action\"]}. \
Action types and their params: start {}; stop {\"force\": bool}; restart {}; \
scale {\"size\": <a size name from the catalogue>} or {\"resources\": {\"cpu\": n, \"memory\": \"4Gi\", \"replicas\": n}}; \
snapshot {\"name\": <dns label>, \"description\": text}; restore {\"snapshot_id\": <an existing snapshot id>}. \
Use at most 20 actions, only legal ones for the runtime's state, and respect the constraints. \
If the goal cannot be met, answer {\"actions\": [], \"rationale\": [\"why\"]}.";

fn bad_gateway(kind: &str, detail: String) -> Problem {
    Problem::new(StatusCode::BAD_GATEWAY, kind, detail)
}

impl ExternalPlanner {
    pub fn new(config: ExternalPlannerConfig) -> Result<ExternalPlanner, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(config.timeout).build()?;
        Ok(ExternalPlanner { config, client })
    }

    pub fn model(&self) -> &str {
        &self.config.model
    }

    /// Asks the model for a plan and checks every action it proposes.
    pub async fn plan(
        &self,
        runtime: &Runtime,
        goal: &str,
        constraints: &serde_json::Map<String, Value>,
        context: &serde_json::Map<String, Value>,
        sizes: &[SizeEntry],
    ) -> Result<ExternalPlan, Problem> {
        let facts = json!({
            "goal": goal,
            "constraints": constraints,
            "context": context,
            "runtime": {
                "type": runtime.runtime_type, "state": runtime.state, "spec": runtime.spec,
                "labels": runtime.labels, "signals": runtime.signals, "capabilities": runtime.capabilities,
                "snapshots": runtime.snapshots,
            },
            "size_catalogue": sizes,
        });
        let request = json!({
            "model": self.config.model,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": INSTRUCTIONS},
                {"role": "user", "content": facts.to_string()},
            ],
        });
        let url = format!("{}/chat/completions", self.config.url.trim_end_matches('/'));
        let mut call = self.client.post(&url).json(&request);
        if let Some(key) = &self.config.api_key {
            call = call.bearer_auth(key);
        }
        let response = call.send().await.map_err(|e| {
            let kind = if e.is_timeout() { "planner-timeout" } else { "planner-unreachable" };
            bad_gateway(kind, format!("the external planner at {url} did not answer: {e}"))
        })?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|e| {
            bad_gateway("planner-output-invalid", format!("the external planner answered {status} without JSON: {e}"))
        })?;
        if !status.is_success() {
            return Err(bad_gateway("planner-error", format!("the external planner answered {status}: {body}")));
        }
        let content = body["choices"][0]["message"]["content"].as_str().ok_or_else(|| {
            bad_gateway(
                "planner-output-invalid",
                "the external planner's answer has no choices[0].message.content".into(),
            )
        })?;
        parse(content, &runtime.capabilities, sizes)
    }
}

/// Parses the model's answer and checks each action as `actions/execute` would.
fn parse(content: &str, capabilities: &[Capability], sizes: &[SizeEntry]) -> Result<ExternalPlan, Problem> {
    let text = content.trim();
    let text = text.strip_prefix("```json").or_else(|| text.strip_prefix("```")).unwrap_or(text);
    let text = text.strip_suffix("```").unwrap_or(text).trim();
    let invalid = |what: String| bad_gateway("planner-output-invalid", format!("the external planner's plan {what}"));
    let plan: ModelPlan = serde_json::from_str(text).map_err(|e| invalid(format!("is not the asked-for JSON: {e}")))?;
    if plan.actions.len() > 20 {
        return Err(invalid(format!("has {} actions; at most 20 are allowed", plan.actions.len())));
    }
    let actions = plan
        .actions
        .iter()
        .enumerate()
        .map(|(i, action)| {
            let no_migration = |_: Option<u64>, path: &str| {
                Err(Problem::invalid_field(path, "a plan does not migrate; ask for it with lifecycle/migrate"))
            };
            let no_observer = |_: crate::actions::ObserverAttachRequest, path: &str| {
                Err(Problem::invalid_field(path, "a plan does not attach observers; ask for it with actions/execute"))
            };
            lifecycle_action(action, i, capabilities, sizes, &no_migration, &no_observer)
                .map_err(|p| invalid(format!("is refused: {}", p.detail)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ExternalPlan { actions, rationale: plan.rationale })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capabilities() -> Vec<Capability> {
        runtimeai_model::ActionKind::ON_BACKENDS.iter().map(|c| runtimeai_model::capability(c.as_str())).collect()
    }

    #[test]
    fn answers_are_checked_like_an_agents_request() {
        let sizes = runtimeai_model::default_sizes();
        let fenced = "```json\n{\"actions\": [{\"type\": \"scale\", \"params\": {\"size\": \"large\"}}], \"rationale\": [\"more cpu\"]}\n```";
        let plan = parse(fenced, &capabilities(), &sizes).unwrap();
        assert_eq!(plan.actions, vec![LifecycleAction::Scale { size: Some("large".into()), resources: None }]);
        assert_eq!(plan.rationale, ["more cpu"]);
        let bad = [
            "reboot it, I think",
            r#"{"actions": [{"type": "explode"}]}"#,
            r#"{"actions": [{"type": "scale", "params": {"size": "huge"}}]}"#,
            r#"{"actions": [], "extra": 1}"#,
        ];
        for answer in bad {
            let problem = parse(answer, &capabilities(), &sizes).unwrap_err();
            assert_eq!(problem.status, 502, "{answer}");
            assert!(problem.type_uri.ends_with("planner-output-invalid"), "{answer}: {problem:?}");
        }
    }
}
