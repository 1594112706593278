//! The deterministic planner: goal + constraints + the runtime's signals → an ordered list of
//! actions with a rationale for each, the options the constraints ruled out, and what to
//! consider next. Pure: the same input always gives the same plan. It never guesses: a goal it
//! does not understand, or a constraint it cannot read, is an error naming what it does know.
//!
//! Goals (matched on the goal's words, case-insensitive), and the options tried in order:
//! - **scale** to a named size (`scale to large`) or a replica count (`scale to 3 replicas`);
//! - **raise availability** (`improve availability`, `high availability`): one more replica
//!   (at least 2); **lower availability**: one replica fewer (at least 1);
//! - **reduce cost** (`cost`, `cheaper`, `save`): one size down, else one size down keeping the
//!   replicas it has, else one replica fewer, else, outside production, stop a runtime whose
//!   measured CPU use is at most [`IDLE_CPU`] (any runtime, when `aggressive`);
//! - **improve performance / latency**: one size up, else one more replica;
//! - **recover** (`recover`, `heal`, `fix`, `repair`): start a stopped runtime, restart one that
//!   is in error, degraded or reported unhealthy; nothing for a healthy one;
//! - **prepare for a change** (`prepare`, `snapshot`, `backup`): a snapshot;
//! - **start**, **stop**, **restart**.
//!
//! Constraints: `latency: "<50ms"` (with measured CPU use: an option may not leave less than
//! use ÷ [`CPU_HEADROOM`] vCPUs; with none: keeps the catalogue's second size or above; with a
//! measured latency that already misses the target: takes no capacity away), `availability:
//! "high" | "normal" | "low"` (high: at least 2 replicas and the second size), `cost:
//! "optimize"` (nothing that raises cost), and a budget (`max_cost_per_hour`,
//! `max_cost_per_month`, or `budget: {…}` holding either). An option that would violate one is
//! not planned; `blocked` names the constraint and the option.
//!
//! `policy_mode` shapes plans: `safe_first` takes a snapshot before anything destructive and
//! never stops a runtime unless the goal says stop; `balanced` may stop a non-production runtime
//! measured idle to save cost, `aggressive` any non-production one.

use runtimeai_model::{LifecycleAction, PolicyMode, Runtime, RuntimeSpec, RuntimeState, SizeEntry};
use serde_json::{Map, Value};

use crate::catalogue::{Catalogue, HOURS_PER_MONTH};
use crate::policy::is_destructive;

/// The share of an option's vCPUs that measured use may fill and still meet a latency target.
pub const CPU_HEADROOM: f64 = 0.7;

/// Measured CPU use (vCPUs) at or below which a runtime counts as idle: "reduce cost" may then
/// stop it.
pub const IDLE_CPU: f64 = 0.02;

/// The goals this planner understands, as its 422 answer lists them.
pub const UNDERSTOOD_GOALS: &[&str] = &[
    "scale to <size>",
    "scale to <n> replicas",
    "improve availability",
    "lower availability",
    "reduce cost",
    "improve performance / reduce latency",
    "recover",
    "prepare for a change (snapshot)",
    "start",
    "stop",
    "restart",
];

/// The constraints this planner reads.
pub const KNOWN_CONSTRAINTS: &[&str] =
    &["latency", "availability", "cost", "budget", "max_cost_per_hour", "max_cost_per_month"];

#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub runtime: &'a Runtime,
    pub goal: &'a str,
    pub constraints: &'a Map<String, Value>,
    /// Free-form context; `env` counts like the runtime's `env` label.
    pub context: &'a Map<String, Value>,
    /// Signals the caller observed (`health`, `latency_ms`, `cpu` in vCPUs used); they override
    /// what the runtime's executor last reported.
    pub signals: &'a Map<String, Value>,
    pub mode: PolicyMode,
    pub sizes: &'a [SizeEntry],
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<LifecycleAction>,
    /// Why each action was chosen (and why nothing was, for an empty plan).
    pub rationale: Vec<String>,
    /// Options the constraints ruled out, naming the constraint.
    pub blocked: Vec<String>,
    pub recommendations: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PlanError {
    NotUnderstood,
    /// Every option would violate a constraint; each entry names constraint and option.
    Blocked(Vec<String>),
    /// A constraint the planner cannot read: (field path, message).
    BadConstraint(String, String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Availability {
    High,
    Normal,
    Low,
}

#[derive(Debug, Default)]
struct Constraints {
    latency_ms: Option<f64>,
    availability: Option<Availability>,
    cost_optimize: bool,
    max_cost_per_hour: Option<f64>,
}

fn bad(path: &str, message: impl Into<String>) -> PlanError {
    PlanError::BadConstraint(format!("$.constraints.{path}"), message.into())
}

fn parse_latency(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let s = s.trim().trim_start_matches(['<', '=', ' ']).trim();
            let (number, scale) = match s.strip_suffix("ms") {
                Some(ms) => (ms, 1.0),
                None => (s.strip_suffix('s').unwrap_or(s), if s.ends_with('s') { 1000.0 } else { 1.0 }),
            };
            number.trim().parse::<f64>().ok().map(|n| n * scale)
        }
        _ => None,
    }
    .filter(|ms| ms.is_finite() && *ms > 0.0)
}

fn parse_money(path: &str, value: &Value) -> Result<f64, PlanError> {
    value.as_f64().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| bad(path, "expected a number of at least 0"))
}

impl Constraints {
    fn parse(map: &Map<String, Value>) -> Result<Constraints, PlanError> {
        let mut c = Constraints::default();
        let mut limit = |hourly: Option<f64>| {
            if let Some(h) = hourly {
                c.max_cost_per_hour = Some(c.max_cost_per_hour.map_or(h, |m: f64| m.min(h)));
            }
        };
        for (key, value) in map {
            match key.as_str() {
                "latency" => {}
                "availability" => {}
                "cost" => {}
                "max_cost_per_hour" => limit(Some(parse_money(key, value)?)),
                "max_cost_per_month" => limit(Some(parse_money(key, value)? / HOURS_PER_MONTH)),
                "budget" => {
                    let Some(budget) = value.as_object() else {
                        return Err(bad(key, "expected {max_cost_per_hour: n} or {max_cost_per_month: n}"));
                    };
                    if budget.is_empty() {
                        return Err(bad(key, "expected {max_cost_per_hour: n} or {max_cost_per_month: n}"));
                    }
                    for (inner, v) in budget {
                        let path = format!("budget.{inner}");
                        match inner.as_str() {
                            "max_cost_per_hour" => limit(Some(parse_money(&path, v)?)),
                            "max_cost_per_month" => limit(Some(parse_money(&path, v)? / HOURS_PER_MONTH)),
                            _ => return Err(bad(&path, "a budget takes max_cost_per_hour or max_cost_per_month")),
                        }
                    }
                }
                _ => {
                    return Err(bad(
                        key,
                        format!("unknown constraint; known ones are {}", KNOWN_CONSTRAINTS.join(", ")),
                    ))
                }
            }
        }
        if let Some(value) = map.get("latency") {
            c.latency_ms =
                Some(parse_latency(value).ok_or_else(|| bad("latency", "expected a target like \"<50ms\""))?);
        }
        if let Some(value) = map.get("availability") {
            c.availability = Some(match value.as_str() {
                Some("high") => Availability::High,
                Some("normal" | "standard") => Availability::Normal,
                Some("low") => Availability::Low,
                _ => return Err(bad("availability", "expected high, normal or low")),
            });
        }
        if let Some(value) = map.get("cost") {
            c.cost_optimize = match value.as_str() {
                Some("optimize" | "minimize") => true,
                Some("any" | "ignore") => false,
                _ => return Err(bad("cost", "expected optimize or any")),
            };
        }
        Ok(c)
    }
}

/// One thing the planner might do, and the spec it leads to.
struct Option_ {
    label: String,
    actions: Vec<LifecycleAction>,
    spec: RuntimeSpec,
    /// The runtime runs afterwards (a stop does not).
    running: bool,
    why: String,
}

struct Planner<'a> {
    input: PlanInput<'a>,
    catalogue: Catalogue<'a>,
    constraints: Constraints,
    blocked: Vec<String>,
}

fn has_word(goal: &str, words: &[&str]) -> bool {
    goal.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| words.contains(&w))
}

fn number_in(goal: &str) -> Option<i64> {
    goal.split(|c: char| !c.is_ascii_alphanumeric()).find_map(|w| w.parse().ok())
}

impl Planner<'_> {
    fn current_index(&self) -> usize {
        self.catalogue.effective_index(&self.input.runtime.spec)
    }

    fn size_name(&self, index: usize) -> &str {
        self.catalogue.sizes.get(index).map_or("?", |s| s.name.as_str())
    }

    fn observed_latency(&self) -> Option<f64> {
        self.input
            .signals
            .get("latency_ms")
            .and_then(Value::as_f64)
            .or_else(|| self.input.runtime.signals.as_ref().and_then(|s| s.latency_ms))
    }

    /// vCPUs the runtime uses, measured: what the caller observed (`cpu`), else what its
    /// executor measured (a sandbox's cgroup). None where nothing measures it.
    fn measured_cpu(&self) -> Option<f64> {
        let reported = self.input.runtime.signals.as_ref().filter(|s| s.cpu_measured).map(|s| s.cpu);
        self.input.signals.get("cpu").and_then(Value::as_f64).or(reported)
    }

    /// The vCPUs a spec runs with: its explicit cpu, else its size's, times its replicas.
    fn capacity(&self, spec: &RuntimeSpec) -> f64 {
        let size = self.catalogue.sizes.get(self.catalogue.effective_index(spec));
        let cpu = spec.resources.as_ref().and_then(|r| r.cpu).or(size.map(|s| s.cpu)).unwrap_or(0.0);
        cpu * self.catalogue.replicas(spec) as f64
    }

    /// Why an option breaks a latency target, if it does: measured latency that already misses
    /// it forbids taking capacity away; else measured CPU use must stay within
    /// [`CPU_HEADROOM`] of what the option leaves; with no measurement, a target of 100 ms or
    /// less keeps at least the catalogue's second size.
    fn latency_violation(&self, target: f64, option: &Option_) -> Option<String> {
        let now = &self.input.runtime.spec;
        let (old_index, new_index) =
            (self.catalogue.effective_index(now), self.catalogue.effective_index(&option.spec));
        let takes_capacity = new_index < old_index
            || self.catalogue.replicas(&option.spec) < self.catalogue.replicas(now)
            || !option.running;
        if let Some(observed) = self.observed_latency().filter(|observed| *observed > target) {
            return takes_capacity.then(|| format!("latency <{target}ms (measured {observed}ms already misses it)"));
        }
        if let Some(used) = self.measured_cpu() {
            let capacity = if option.running { self.capacity(&option.spec) } else { 0.0 };
            let overloaded = takes_capacity && used > CPU_HEADROOM * capacity;
            return overloaded.then(|| {
                format!(
                    "latency <{target}ms ({used:.2} vCPU in use, measured, would load {capacity} vCPU past {:.0} %)",
                    CPU_HEADROOM * 100.0
                )
            });
        }
        let floor = 1.min(self.catalogue.sizes.len() - 1);
        (target <= 100.0 && (new_index < floor || !option.running))
            .then(|| format!("latency <{target}ms (no measured CPU use to judge a smaller size by)"))
    }

    fn health(&self) -> Option<String> {
        self.input
            .signals
            .get("health")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| self.input.runtime.signals.as_ref().map(|s| s.health.clone()))
    }

    fn production(&self) -> bool {
        self.input.context.get("env").and_then(Value::as_str) == Some("production")
            || self.input.runtime.env() == Some("production")
    }

    /// The reasons an option breaks the constraints (empty: it is allowed).
    fn violations(&self, option: &Option_) -> Vec<String> {
        let c = &self.constraints;
        let mut why = Vec::new();
        let now = &self.input.runtime.spec;
        let new_index = self.catalogue.effective_index(&option.spec);
        let new_replicas = self.catalogue.replicas(&option.spec);
        let old_cost = self.catalogue.running_cost(now);
        let new_cost = if option.running { self.catalogue.running_cost(&option.spec) } else { 0.0 };
        if let Some(violation) = c.latency_ms.and_then(|target| self.latency_violation(target, option)) {
            why.push(violation);
        }
        if c.availability == Some(Availability::High) {
            let floor = 1.min(self.catalogue.sizes.len() - 1);
            if new_index < floor || new_replicas < 2 || !option.running {
                why.push("availability high (at least 2 replicas and the second size)".to_string());
            }
        }
        if c.cost_optimize && new_cost > old_cost + 1e-9 {
            why.push(format!("cost optimize (cost would rise from {old_cost:.2}/h to {new_cost:.2}/h)"));
        }
        if let Some(limit) = c.max_cost_per_hour {
            if new_cost > limit + 1e-9 && new_cost > old_cost - 1e-9 {
                why.push(format!("budget {limit:.2}/h (cost would be {new_cost:.2}/h)"));
            }
        }
        if self.input.mode == PolicyMode::SafeFirst && !option.running && self.production() {
            why.push("safe_first never stops a production runtime unasked".to_string());
        }
        why
    }

    /// The first option the constraints allow; the others are recorded as blocked.
    fn choose(&mut self, options: Vec<Option_>) -> Result<Option<Option_>, PlanError> {
        let tried = !options.is_empty();
        for option in options {
            let violations = self.violations(&option);
            if violations.is_empty() {
                return Ok(Some(option));
            }
            for v in violations {
                self.blocked.push(format!("{v}: {} ruled out", option.label));
            }
        }
        if tried {
            return Err(PlanError::Blocked(std::mem::take(&mut self.blocked)));
        }
        Ok(None)
    }

    fn resize(&self, index: usize, why: String) -> Option_ {
        let size = self.size_name(index).to_string();
        let action = LifecycleAction::Scale { size: Some(size.clone()), resources: None };
        let mut spec = self.input.runtime.spec.clone();
        action.apply_to_spec(&mut spec);
        Option_ { label: format!("scaling to {size}"), actions: vec![action], spec, running: true, why }
    }

    /// A smaller size with the replica count the runtime has now (a size's own count may be
    /// fewer).
    fn resize_keeping(&self, index: usize, replicas: i64, why: String) -> Option_ {
        let size = self.size_name(index).to_string();
        let resources = Catalogue::with_replicas(&self.input.runtime.spec, replicas);
        let action = LifecycleAction::Scale { size: Some(size.clone()), resources: Some(resources) };
        let mut spec = self.input.runtime.spec.clone();
        action.apply_to_spec(&mut spec);
        Option_ {
            label: format!("scaling to {size} with {replicas} replicas"),
            actions: vec![action],
            spec,
            running: true,
            why,
        }
    }

    fn explicit_replicas(&self) -> Option<i64> {
        self.input.runtime.spec.resources.as_ref().and_then(|r| r.replicas).filter(|r| *r > 0)
    }

    fn replicas(&self, count: i64, why: String) -> Option_ {
        let resources = Catalogue::with_replicas(&self.input.runtime.spec, count);
        let action = LifecycleAction::Scale { size: None, resources: Some(resources) };
        let mut spec = self.input.runtime.spec.clone();
        action.apply_to_spec(&mut spec);
        Option_ { label: format!("scaling to {count} replica(s)"), actions: vec![action], spec, running: true, why }
    }
}

/// Checks a plan made elsewhere (the external planner) against the same constraints: the
/// violations, each naming the constraint; empty when the plan is acceptable.
pub fn check_plan(input: PlanInput<'_>, actions: &[LifecycleAction]) -> Result<Vec<String>, PlanError> {
    let constraints = Constraints::parse(input.constraints)?;
    let p = Planner { input, catalogue: Catalogue::new(input.sizes), constraints, blocked: Vec::new() };
    let mut spec = input.runtime.spec.clone();
    let mut state = input.runtime.state;
    for action in actions {
        action.apply_to_spec(&mut spec);
        if let Ok((_, after)) = action.transition(state) {
            state = after;
        }
    }
    let option = Option_ {
        label: "the external plan".into(),
        actions: actions.to_vec(),
        spec,
        running: !matches!(state, RuntimeState::Stopped | RuntimeState::Paused | RuntimeState::Deleted),
        why: String::new(),
    };
    Ok(p.violations(&option).into_iter().map(|v| format!("{v}: {} ruled out", option.label)).collect())
}

fn snapshot(reason: &str) -> LifecycleAction {
    LifecycleAction::Snapshot {
        snapshot_id: String::new(),
        name: "before-change".to_string(),
        description: Some(reason.to_string()),
    }
}

/// Plans `input.goal` for `input.runtime`.
/// Whether the planner understands `goal` with the size catalogue `sizes` (it may still find
/// nothing to do, or be blocked by constraints).
pub fn understands(goal: &str, sizes: &[SizeEntry]) -> bool {
    Goal::parse(goal, &Catalogue::new(sizes)).is_ok()
}

pub fn plan(input: PlanInput<'_>) -> Result<Plan, PlanError> {
    let constraints = Constraints::parse(input.constraints)?;
    let mut p = Planner { input, catalogue: Catalogue::new(input.sizes), constraints, blocked: Vec::new() };
    let goal = Goal::parse(input.goal, &p.catalogue)?;
    if goal == Goal::Stop {
        // Asked explicitly: the "never stop unasked" rule does not apply.
        let why = if p.production() { "stop asked explicitly (production runtime)" } else { "stop as asked" };
        return Ok(Plan {
            actions: vec![LifecycleAction::Stop { force: false, timeout_seconds: None }],
            rationale: vec![why.to_string()],
            blocked: vec![],
            recommendations: vec!["start it again with the goal \"start\" or POST .../lifecycle/start".to_string()],
        });
    }
    let Options { options, nothing, recommendations } = p.options(goal);
    let Some(chosen) = p.choose(options)? else {
        return Ok(Plan {
            actions: vec![],
            rationale: vec![nothing.unwrap_or_else(|| "nothing to do".into())],
            blocked: p.blocked,
            recommendations,
        });
    };
    let mut actions = Vec::new();
    let mut rationale = Vec::new();
    let destructive = chosen.actions.iter().any(|a| is_destructive(a, input.runtime, p.catalogue));
    if input.mode == PolicyMode::SafeFirst && destructive {
        actions.push(snapshot("taken by the planner before a destructive change"));
        rationale.push("safe_first: snapshot first, to roll back if needed".to_string());
    }
    actions.extend(chosen.actions);
    rationale.push(chosen.why);
    Ok(Plan { actions, rationale, blocked: p.blocked, recommendations })
}

/// What a goal asks for, read from its words (the first reading that fits, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    /// "scale to 3 replicas"
    Replicas(i64),
    /// "resize to large": an index in the catalogue.
    Size(usize),
    /// "lower availability"
    LessAvailability,
    /// "high availability"
    Availability,
    Cost,
    Performance,
    Recover,
    Snapshot,
    Stop,
    Restart,
    Start,
}

impl Goal {
    fn parse(text: &str, catalogue: &Catalogue<'_>) -> Result<Goal, PlanError> {
        let goal = text.to_ascii_lowercase();
        let scale = has_word(&goal, &["scale", "size", "resize"]);
        let named_size = catalogue.sizes.iter().position(|s| has_word(&goal, &[s.name.as_str()]));
        let availability = has_word(&goal, &["availability", "available", "ha", "redundancy", "redundant"]);
        Ok(if scale && has_word(&goal, &["replica", "replicas"]) {
            let count = number_in(&goal).filter(|n| (1..=1000).contains(n)).ok_or(PlanError::NotUnderstood)?;
            Goal::Replicas(count)
        } else if let (true, Some(index)) = (scale, named_size) {
            Goal::Size(index)
        } else if availability && has_word(&goal, &["lower", "reduce", "decrease", "less", "fewer", "drop"]) {
            Goal::LessAvailability
        } else if availability {
            Goal::Availability
        } else if has_word(&goal, &["cost", "costs", "cheaper", "save", "spend"]) {
            Goal::Cost
        } else if has_word(&goal, &["performance", "latency", "faster", "speed", "perf", "throughput"]) {
            Goal::Performance
        } else if has_word(&goal, &["recover", "heal", "fix", "repair"]) {
            Goal::Recover
        } else if has_word(&goal, &["prepare", "snapshot", "backup"]) {
            Goal::Snapshot
        } else if has_word(&goal, &["stop", "shutdown"]) {
            Goal::Stop
        } else if has_word(&goal, &["restart", "reboot"]) {
            Goal::Restart
        } else if has_word(&goal, &["start", "boot"]) {
            Goal::Start
        } else {
            return Err(PlanError::NotUnderstood);
        })
    }
}

/// The ways to a goal the planner weighs, best first; why there is nothing to do when there
/// are none; and what it recommends either way.
#[derive(Default)]
struct Options {
    options: Vec<Option_>,
    nothing: Option<String>,
    recommendations: Vec<String>,
}

impl Options {
    fn nothing(why: impl Into<String>) -> Options {
        Options { nothing: Some(why.into()), ..Default::default() }
    }

    fn of(options: Vec<Option_>) -> Options {
        Options { options, ..Default::default() }
    }

    fn recommending(mut self, recommendation: &str) -> Options {
        self.recommendations.push(recommendation.to_string());
        self
    }
}

impl Planner<'_> {
    /// The options for `goal` (`plan` answers [`Goal::Stop`] itself: asked explicitly, a stop
    /// is neither weighed nor preceded by a snapshot).
    fn options(&self, goal: Goal) -> Options {
        let replicas = self.catalogue.replicas(&self.input.runtime.spec);
        let current = self.current_index();
        let current_name = self.size_name(current).to_string();
        match goal {
            Goal::Replicas(count) if count == replicas => {
                Options::nothing(format!("already {count} replica(s): nothing to do"))
            }
            Goal::Replicas(count) => {
                Options::of(vec![self.replicas(count, format!("scale from {replicas} to {count} replica(s) as asked"))])
            }
            Goal::Size(target) if target == current => {
                Options::nothing(format!("already {current_name}: nothing to do"))
            }
            Goal::Size(target) => {
                let why = format!("scale from {current_name} to {} as asked", self.size_name(target));
                Options::of(vec![self.resize(target, why)])
            }
            Goal::LessAvailability if replicas <= 1 => Options::nothing("already a single replica"),
            Goal::LessAvailability => {
                let why = format!("one replica fewer ({replicas} → {}) lowers availability and cost", replicas - 1);
                Options::of(vec![self.replicas(replicas - 1, why)])
            }
            Goal::Availability => {
                let target = (replicas + 1).max(2);
                let why = format!("more replicas ({replicas} → {target}) survive the loss of one");
                Options::of(vec![self.replicas(target, why)])
                    .recommending("spread replicas across zones where the backend allows it")
            }
            Goal::Cost => self.cheaper(current, &current_name, replicas),
            Goal::Performance => self.faster(current, &current_name, replicas),
            Goal::Recover => self.recovery(),
            Goal::Snapshot => Options::of(vec![Option_ {
                label: "a snapshot".into(),
                actions: vec![snapshot("taken by the planner before a change")],
                spec: self.input.runtime.spec.clone(),
                running: !matches!(self.input.runtime.state, RuntimeState::Stopped | RuntimeState::Paused),
                why: "a snapshot makes the coming change reversible".into(),
            }]),
            Goal::Restart => self.as_asked("restart", LifecycleAction::Restart),
            Goal::Start => self.as_asked("start", LifecycleAction::Start),
            Goal::Stop => self.as_asked("stop", LifecycleAction::Stop { force: false, timeout_seconds: None }),
        }
    }

    /// One size down, one replica fewer, and, outside production and not in `safe_first`,
    /// stopping a runtime measured idle (any, when aggressive): the last resort.
    fn cheaper(&self, current: usize, current_name: &str, replicas: i64) -> Options {
        let runtime = self.input.runtime;
        let mut options = Vec::new();
        if current > 0 {
            let smaller = self.size_name(current - 1).to_string();
            let why = format!("one size down ({current_name} → {smaller}) lowers cost per hour");
            options.push(self.resize(current - 1, why));
            let (smaller_replicas, explicit) = (self.catalogue.sizes[current - 1].replicas, self.explicit_replicas());
            if explicit.is_none() && smaller_replicas < replicas {
                let why = format!("one size down ({current_name} → {smaller}) keeping its {replicas} replicas");
                options.push(self.resize_keeping(current - 1, replicas, why));
            }
        }
        if replicas > 1 {
            let why = format!("one replica fewer ({replicas} → {}) lowers cost", replicas - 1);
            options.push(self.replicas(replicas - 1, why));
        }
        let idle = self.measured_cpu().filter(|used| *used <= IDLE_CPU);
        let (aggressive, safe_first) =
            (self.input.mode == PolicyMode::Aggressive, self.input.mode == PolicyMode::SafeFirst);
        let stoppable = (aggressive || idle.is_some()) && !safe_first;
        if stoppable && !self.production() && runtime.state == RuntimeState::Running {
            let why = match idle {
                Some(used) => {
                    format!("idle ({used:.2} vCPU in use, measured): stopped, it costs nothing until started")
                }
                None => "aggressive: already minimal, stop it while idle (outside production)".into(),
            };
            options.push(Option_ {
                label: "stopping the runtime".into(),
                actions: vec![LifecycleAction::Stop { force: false, timeout_seconds: None }],
                spec: runtime.spec.clone(),
                running: false,
                why,
            });
        }
        if options.is_empty() {
            Options::nothing("already the smallest size with one replica")
                .recommending("stop the runtime when it is idle to save more")
        } else {
            Options::of(options).recommending("watch latency and error rates after the change")
        }
    }

    /// One size up, one more replica.
    fn faster(&self, current: usize, current_name: &str, replicas: i64) -> Options {
        let mut options = Vec::new();
        if current + 1 < self.catalogue.sizes.len() {
            let why = format!("one size up ({current_name} → {}) adds CPU and memory", self.size_name(current + 1));
            options.push(self.resize(current + 1, why));
        }
        let why = format!("one more replica ({replicas} → {}) spreads the load", replicas + 1);
        options.push(self.replicas(replicas + 1, why));
        Options::of(options).recommending("compare latency before and after the change")
    }

    /// Start a stopped runtime, restart a broken or unhealthy one; else nothing.
    fn recovery(&self) -> Options {
        let runtime = self.input.runtime;
        let health = self.health();
        let unhealthy = matches!(health.as_deref(), Some("unhealthy" | "degraded"));
        let (action, why) = match runtime.state {
            RuntimeState::Stopped => (LifecycleAction::Start, "the runtime is stopped: start it".to_string()),
            RuntimeState::Paused => (LifecycleAction::Resume, "the runtime is paused: resume it".to_string()),
            RuntimeState::Error | RuntimeState::Degraded => {
                (LifecycleAction::Restart, format!("the runtime is {}: restart it", runtime.state.as_str()))
            }
            RuntimeState::Running if unhealthy => (
                LifecycleAction::Restart,
                format!("the runtime reports {}: restart it", health.as_deref().unwrap_or_default()),
            ),
            state => {
                let why = format!("the runtime is {} and reports no ill health: nothing to recover", state.as_str());
                return Options::nothing(why).recommending("check the runtime's events for the cause");
            }
        };
        let option = Option_ {
            label: action.kind().as_str().into(),
            actions: vec![action],
            spec: runtime.spec.clone(),
            running: true,
            why,
        };
        Options::of(vec![option]).recommending("check the runtime's events for the cause")
    }

    /// The one action the goal names.
    fn as_asked(&self, label: &str, action: LifecycleAction) -> Options {
        Options::of(vec![Option_ {
            label: label.into(),
            actions: vec![action],
            spec: self.input.runtime.spec.clone(),
            running: true,
            why: format!("{label} as asked"),
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtimeai_model::{default_sizes, ResourceProfile, RuntimeSignals, RuntimeType};
    use serde_json::json;

    fn runtime(size: &str, state: RuntimeState) -> Runtime {
        let spec = RuntimeSpec { size: Some(size.into()), ..Default::default() };
        Runtime { state, spec, ..Runtime::new("rt_1", "r", RuntimeType::Vm, chrono::DateTime::UNIX_EPOCH) }
    }

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    fn run(rt: &Runtime, goal: &str, constraints: Value, mode: PolicyMode) -> Result<Plan, PlanError> {
        let sizes = default_sizes();
        let (constraints, empty) = (map(constraints), Map::new());
        plan(PlanInput {
            runtime: rt,
            goal,
            constraints: &constraints,
            context: &empty,
            signals: &empty,
            mode,
            sizes: &sizes,
        })
    }

    fn kinds(plan: &Plan) -> Vec<&'static str> {
        plan.actions.iter().map(|a| a.kind().as_str()).collect()
    }

    fn scale_size(plan: &Plan) -> Option<String> {
        plan.actions.iter().find_map(|a| match a {
            LifecycleAction::Scale { size, .. } => size.clone(),
            _ => None,
        })
    }

    fn scale_replicas(plan: &Plan) -> Option<i64> {
        plan.actions.iter().find_map(|a| match a {
            LifecycleAction::Scale { resources: Some(r), .. } => r.replicas,
            _ => None,
        })
    }

    use PolicyMode::*;
    use RuntimeState::*;

    #[test]
    fn reduce_cost_downsizes_and_safe_first_snapshots_first() {
        let plan = run(&runtime("large", Running), "Reduce cost", json!({}), SafeFirst).unwrap();
        assert_eq!(kinds(&plan), ["snapshot", "scale"]);
        assert_eq!(scale_size(&plan).as_deref(), Some("medium"));
        assert_eq!(plan.rationale.len(), 2);
        let aggressive = run(&runtime("large", Running), "reduce cost", json!({}), Aggressive).unwrap();
        assert_eq!(kinds(&aggressive), ["scale"], "no snapshot outside safe_first");
        // Smallest size, one replica: nothing in safe_first, a stop when aggressive outside production.
        let small = runtime("small", Running);
        assert!(run(&small, "reduce cost", json!({}), SafeFirst).unwrap().actions.is_empty());
        assert_eq!(kinds(&run(&small, "save money", json!({}), Aggressive).unwrap()), ["stop"]);
        let mut prod = small.clone();
        prod.labels.insert("env".into(), "production".into());
        assert!(run(&prod, "reduce cost", json!({}), Aggressive).unwrap().actions.is_empty());
    }

    /// A runtime of `size` whose executor measured `cpu` vCPUs in use.
    fn measured(size: &str, cpu: f64) -> Runtime {
        let mut rt = runtime(size, Running);
        rt.signals = Some(RuntimeSignals {
            cpu,
            cpu_measured: true,
            disk_bytes: None,
            memory: "1Gi".into(),
            health: "healthy".into(),
            cost_per_hour: 0.1,
            latency_ms: None,
            observed_at: chrono::DateTime::UNIX_EPOCH,
            node_id: 1,
        });
        rt
    }

    #[test]
    fn reduce_cost_stops_a_runtime_measured_idle_when_nothing_smaller_is_left() {
        let plan = run(&measured("small", 0.01), "reduce cost", json!({}), Balanced).unwrap();
        assert_eq!(kinds(&plan), ["stop"], "{plan:?}");
        assert!(plan.rationale[0].contains("0.01 vCPU in use, measured"), "{plan:?}");
        let asked_safely = run(&measured("small", 0.0), "reduce cost", json!({}), SafeFirst).unwrap();
        assert!(asked_safely.actions.is_empty(), "safe_first stops nothing unasked: {asked_safely:?}");
        let busy = run(&measured("small", 0.3), "reduce cost", json!({}), Balanced).unwrap();
        assert!(busy.actions.is_empty(), "a busy one is left running: {busy:?}");
        let larger = run(&measured("medium", 0.0), "reduce cost", json!({}), Balanced).unwrap();
        assert_eq!(kinds(&larger), ["scale"], "a smaller size comes first: {larger:?}");
        let mut production = measured("small", 0.0);
        production.labels.insert("env".into(), "production".into());
        assert!(run(&production, "reduce cost", json!({}), Balanced).unwrap().actions.is_empty());
        let Err(PlanError::Blocked(why)) =
            run(&measured("small", 0.0), "reduce cost", json!({"availability": "high"}), Balanced)
        else {
            panic!("availability high keeps it running")
        };
        assert!(why.iter().any(|w| w.contains("availability high") && w.contains("stopping")), "{why:?}");
    }

    #[test]
    fn measured_cpu_use_decides_what_a_latency_target_allows() {
        let latency = json!({"latency": "<50ms"});
        // Nearly idle: small's 1 vCPU is room enough.
        let plan = run(&measured("medium", 0.1), "reduce cost", latency.clone(), Balanced).unwrap();
        assert_eq!(scale_size(&plan).as_deref(), Some("small"), "{plan:?}");
        // Busy: 1 vCPU in use would fill small; the refusal names the measurement.
        let err = run(&measured("medium", 1.0), "reduce cost", latency.clone(), Balanced).unwrap_err();
        let PlanError::Blocked(reasons) = err else { panic!("{err:?}") };
        assert!(
            reasons[0].contains("1.00 vCPU in use, measured") && reasons[0].contains("scaling to small"),
            "{reasons:?}"
        );
        // An allocation is not a measurement: the cautious rule holds.
        let mut allocated = measured("medium", 0.1);
        allocated.signals.as_mut().unwrap().cpu_measured = false;
        let err = run(&allocated, "reduce cost", latency, Balanced).unwrap_err();
        assert!(matches!(err, PlanError::Blocked(ref r) if r[0].contains("no measured CPU use")), "{err:?}");
        // The seed's headline: on an idle large, medium keeping its 2 replicas meets both
        // constraints; a medium with 1 replica cannot be made cheaper and highly available.
        let headline = json!({"latency": "<50ms", "availability": "high"});
        let plan = run(&measured("large", 0.2), "reduce cost", headline.clone(), SafeFirst).unwrap();
        assert_eq!(kinds(&plan), ["snapshot", "scale"], "{plan:?}");
        assert!(plan.rationale.iter().any(|r| r.contains("keeping its 2 replicas")), "{plan:?}");
        let err = run(&measured("medium", 0.2), "reduce cost", headline, SafeFirst).unwrap_err();
        assert!(
            matches!(err, PlanError::Blocked(ref r) if r.iter().all(|r| r.contains("availability high"))),
            "{err:?}"
        );
    }

    #[test]
    fn constraints_rule_out_options_and_say_which() {
        // latency keeps medium from going small: the fallback (fewer replicas) does not exist → blocked.
        let err = run(&runtime("medium", Running), "reduce cost", json!({"latency": "<50ms"}), SafeFirst).unwrap_err();
        let PlanError::Blocked(reasons) = err else { panic!("{err:?}") };
        assert!(reasons[0].contains("latency <50ms") && reasons[0].contains("scaling to small"), "{reasons:?}");
        // High availability: large's 2 replicas may not become medium's 1, nor 1 of large; medium
        // keeping the 2 replicas is the plan.
        let plan = run(&runtime("large", Running), "reduce cost", json!({"availability": "high"}), Balanced).unwrap();
        assert_eq!(plan.blocked.len(), 1, "{plan:?}");
        let LifecycleAction::Scale { size, resources } = &plan.actions[0] else { panic!("{plan:?}") };
        assert_eq!((size.as_deref(), resources.as_ref().and_then(|r| r.replicas)), (Some("medium"), Some(2)));
        // ...but with 3 explicit replicas, one size down keeps enough of them.
        let mut three = runtime("large", Running);
        three.spec.resources = Some(ResourceProfile { replicas: Some(3), ..Default::default() });
        let plan = run(&three, "reduce cost", json!({"availability": "high"}), Balanced).unwrap();
        assert_eq!(scale_size(&plan).as_deref(), Some("medium"));
        // cost optimize rules out both performance options.
        let err =
            run(&runtime("small", Running), "improve latency", json!({"cost": "optimize"}), Balanced).unwrap_err();
        let PlanError::Blocked(reasons) = err else { panic!("{err:?}") };
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        // A budget of 0.08/h rules out both medium and two replicas of small (0.10/h each).
        let err = run(&runtime("small", Running), "improve performance", json!({"max_cost_per_hour": 0.08}), Balanced)
            .unwrap_err();
        assert!(matches!(err, PlanError::Blocked(ref r) if r.len() == 2 && r[0].contains("budget 0.08/h")), "{err:?}");
        // With a catalogue where medium is dear, the extra replica of small is the plan.
        let mut sizes = default_sizes();
        sizes[1].cost_per_hour = 0.5;
        let (rt, constraints, empty) = (runtime("small", Running), map(json!({"max_cost_per_hour": 0.1})), Map::new());
        let input = PlanInput {
            runtime: &rt,
            goal: "improve performance",
            constraints: &constraints,
            context: &empty,
            signals: &empty,
            mode: Balanced,
            sizes: &sizes,
        };
        let planned = super::plan(input).unwrap();
        assert_eq!(scale_replicas(&planned), Some(2));
        assert!(
            planned.blocked.iter().any(|b| b.contains("budget 0.10/h") && b.contains("scaling to medium")),
            "{:?}",
            planned.blocked
        );
        let monthly = json!({"budget": {"max_cost_per_month": 30.0}});
        assert!(matches!(
            run(&runtime("small", Running), "scale to large", monthly, Balanced),
            Err(PlanError::Blocked(_))
        ));
    }

    #[test]
    fn availability_goals_change_replicas_within_constraints() {
        let plan = run(&runtime("medium", Running), "improve availability", json!({}), Balanced).unwrap();
        assert_eq!(scale_replicas(&plan), Some(2));
        let mut two = runtime("medium", Running);
        two.spec.resources = Some(ResourceProfile { replicas: Some(2), ..Default::default() });
        let lower = run(&two, "lower availability", json!({}), SafeFirst).unwrap();
        assert_eq!(kinds(&lower), ["snapshot", "scale"], "fewer replicas is destructive");
        assert_eq!(scale_replicas(&lower), Some(1));
        assert!(matches!(
            run(&two, "reduce availability", json!({"availability": "high"}), Balanced),
            Err(PlanError::Blocked(_))
        ));
        let scale = run(&runtime("small", Running), "scale to 3 replicas", json!({}), Balanced).unwrap();
        assert_eq!(scale_replicas(&scale), Some(3));
    }

    #[test]
    fn recover_follows_state_and_health() {
        assert_eq!(kinds(&run(&runtime("small", Stopped), "recover", json!({}), SafeFirst).unwrap()), ["start"]);
        assert_eq!(kinds(&run(&runtime("small", Paused), "recover", json!({}), SafeFirst).unwrap()), ["resume"]);
        assert_eq!(kinds(&run(&runtime("small", Error), "heal it", json!({}), SafeFirst).unwrap()), ["restart"]);
        let healthy = run(&runtime("small", Running), "recover", json!({}), SafeFirst).unwrap();
        assert!(healthy.actions.is_empty() && healthy.rationale[0].contains("nothing to recover"));
        let mut sick = runtime("small", Running);
        sick.signals = Some(RuntimeSignals {
            cpu: 1.0,
            cpu_measured: false,
            disk_bytes: None,
            memory: "2Gi".into(),
            health: "unhealthy".into(),
            cost_per_hour: 0.05,
            latency_ms: None,
            observed_at: chrono::DateTime::UNIX_EPOCH,
            node_id: 1,
        });
        assert_eq!(kinds(&run(&sick, "recover", json!({}), SafeFirst).unwrap()), ["restart"]);
    }

    #[test]
    fn other_goals_and_the_ones_it_refuses() {
        let rt = runtime("medium", Running);
        assert_eq!(kinds(&run(&rt, "prepare for an upgrade", json!({}), SafeFirst).unwrap()), ["snapshot"]);
        assert_eq!(kinds(&run(&rt, "stop", json!({}), SafeFirst).unwrap()), ["stop"]);
        assert_eq!(kinds(&run(&rt, "please restart", json!({}), SafeFirst).unwrap()), ["restart"]);
        assert_eq!(kinds(&run(&runtime("small", Stopped), "start", json!({}), SafeFirst).unwrap()), ["start"]);
        assert_eq!(kinds(&run(&rt, "scale to xlarge", json!({}), SafeFirst).unwrap()), ["scale"]);
        assert!(run(&rt, "scale to medium", json!({}), SafeFirst).unwrap().actions.is_empty());
        assert_eq!(run(&rt, "make it web scale", json!({}), SafeFirst), Err(PlanError::NotUnderstood));
        assert_eq!(run(&rt, "scale to many replicas", json!({}), SafeFirst), Err(PlanError::NotUnderstood));
        let err = run(&rt, "reduce cost", json!({"colour": "blue"}), SafeFirst).unwrap_err();
        assert!(matches!(err, PlanError::BadConstraint(ref path, _) if path == "$.constraints.colour"), "{err:?}");
        let err = run(&rt, "reduce cost", json!({"latency": "fast"}), SafeFirst).unwrap_err();
        assert!(matches!(err, PlanError::BadConstraint(ref path, _) if path == "$.constraints.latency"), "{err:?}");
    }

    #[test]
    fn plans_made_elsewhere_meet_the_same_constraints() {
        let sizes = default_sizes();
        let rt = runtime("small", Running);
        let (constraints, empty) = (map(json!({"max_cost_per_hour": 0.2})), Map::new());
        let input = PlanInput {
            runtime: &rt,
            goal: "whatever the model was asked",
            constraints: &constraints,
            context: &empty,
            signals: &empty,
            mode: Balanced,
            sizes: &sizes,
        };
        let to = |size: &str| LifecycleAction::Scale { size: Some(size.into()), resources: None };
        assert!(check_plan(input, &[to("medium")]).unwrap().is_empty());
        let violations = check_plan(input, &[to("large")]).unwrap();
        assert!(violations[0].contains("budget 0.20/h") && violations[0].contains("external plan"), "{violations:?}");
    }

    #[test]
    fn observed_latency_above_target_forbids_any_downsize() {
        let sizes = default_sizes();
        let rt = runtime("xlarge", Running);
        let (constraints, signals, empty) =
            (map(json!({"latency": "<200ms"})), map(json!({"latency_ms": 350.0})), Map::new());
        let input = PlanInput {
            runtime: &rt,
            goal: "reduce cost",
            constraints: &constraints,
            context: &empty,
            signals: &signals,
            mode: Balanced,
            sizes: &sizes,
        };
        // Too slow already: neither one size down (with its replicas or with today's) nor one
        // replica fewer.
        let Err(PlanError::Blocked(reasons)) = plan(input) else { panic!("a downsize was planned") };
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons.iter().all(|r| r.contains("latency <200ms")), "{reasons:?}");
    }
}
