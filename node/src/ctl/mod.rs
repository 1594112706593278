//! The CLI for people: `runtimeai runtimes|operations|events|policies|cluster|settings ...`,
//! every call one request of the client crate to a cluster a context names (see [`config`]),
//! printed as a table, JSON or YAML. `--wait` follows the operation a call began with a progress
//! bar. Exit codes say what happened (see [`ExitStatus`]), so scripts can branch on them.

pub mod config;
pub mod output;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use runtimeai_client::{Client, ClientError, EventQuery, Lifecycle, Operation, RuntimeQuery};

use output::{Columns, Format};

/// How the CLI ended, as its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: done (an operation waited for succeeded).
    Done = 0,
    /// 1: anything else (a bad file, a bug).
    Failed = 1,
    /// 3: what was named does not exist (404).
    NotFound = 3,
    /// 4: refused as it stands: invalid (400, 422), in conflict (409, 412), too large (413).
    Refused = 4,
    /// 5: not authenticated or not permitted (401, 403; a policy's denial too).
    Forbidden = 5,
    /// 6: the cluster could not be reached or could not answer (503, 504, no connection).
    Unavailable = 6,
    /// 7: the operation waited for failed or was cancelled or rejected.
    OperationFailed = 7,
    /// 8: `--wait` ran out before the operation ended (it goes on).
    Pending = 8,
}

/// An error that says which exit status it ends the CLI with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CtlError {
    pub status: ExitStatus,
    pub message: String,
}

impl From<ClientError> for CtlError {
    fn from(error: ClientError) -> Self {
        let status = match &error {
            ClientError::Api { problem } => match problem.status {
                404 => ExitStatus::NotFound,
                401 | 403 => ExitStatus::Forbidden,
                400 | 409 | 412 | 413 | 415 | 422 => ExitStatus::Refused,
                429 | 503 | 504 => ExitStatus::Unavailable,
                _ => ExitStatus::Failed,
            },
            ClientError::Unreachable(_) | ClientError::Transport(_) => ExitStatus::Unavailable,
            ClientError::Decode(_) | ClientError::Config(_) => ExitStatus::Failed,
        };
        CtlError { status, message: error.to_string() }
    }
}

/// Which cluster, as whom, printed how: every command of the CLI takes these.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The context to use (from the config file); its `current_context` by default.
    #[arg(long, global = true, env = "RUNTIMEAI_CONTEXT")]
    pub context: Option<String>,
    /// The config file of contexts.
    #[arg(long, global = true, env = "RUNTIMEAI_CONFIG")]
    pub config: Option<PathBuf>,
    /// A member's REST address, instead of a context (repeat it: each is tried in turn).
    #[arg(long = "server", global = true)]
    pub servers: Vec<String>,
    /// The CA certificate of the servers (with --server).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// A file holding the API key (with --server; else RUNTIMEAI_TOKEN).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// The tenant to act in.
    #[arg(long, global = true)]
    pub tenant: Option<String>,
    /// How to print: table, json or yaml.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

impl Target {
    fn client(&self) -> anyhow::Result<Client> {
        let path = self.config.clone().unwrap_or_else(config::ConfigFile::default_path);
        let mut context = if self.servers.is_empty() {
            config::ConfigFile::load(&path)?.context(self.context.as_deref(), &path)?
        } else {
            config::ContextConfig { servers: self.servers.clone(), ..Default::default() }
        };
        if self.ca.is_some() {
            context.ca = self.ca.clone();
        }
        if self.token_file.is_some() {
            context.token_file = self.token_file.clone();
            context.token = None;
        }
        if self.tenant.is_some() {
            context.tenant = self.tenant.clone();
        }
        context.client()
    }
}

#[derive(Debug, Subcommand)]
pub enum RuntimesCommand {
    /// List runtimes (every page).
    List {
        #[arg(long = "type")]
        runtime_type: Option<String>,
        #[arg(long)]
        state: Option<String>,
        /// `key=value,key!=value,key in (a,b)`.
        #[arg(short = 'l', long)]
        selector: Option<String>,
    },
    Get {
        id: String,
    },
    /// Create a runtime: a name and a type, or a whole request from a JSON or YAML file.
    Create {
        name: Option<String>,
        #[arg(long = "type")]
        runtime_type: Option<String>,
        /// A size of the catalogue (small, medium, ...).
        #[arg(long)]
        size: Option<String>,
        /// A RuntimeCreateRequest (`-` for standard input).
        #[arg(short, long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        wait: Wait,
    },
    Delete {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// A lifecycle call: start, stop, restart, pause, resume (scale, snapshot, restore and
    /// migrate take their parameters with --set key=value).
    #[command(name = "do")]
    Lifecycle {
        #[arg(value_parser = ["start", "stop", "restart", "pause", "resume", "scale", "snapshot", "restore", "migrate"])]
        action: String,
        id: String,
        /// A parameter of the call (`size=medium`, `snapshot_id=...`, `force=true`).
        #[arg(long = "set")]
        params: Vec<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Submit an intent: a goal with constraints (`--constraint latency=<50ms`).
    Intent {
        id: String,
        goal: String,
        #[arg(long = "constraint")]
        constraints: Vec<String>,
        /// Plan and check only; nothing runs.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Plan a goal's actions (nothing runs).
    Plan {
        id: String,
        goal: String,
        #[arg(long = "constraint")]
        constraints: Vec<String>,
    },
    /// Run a list of actions from a JSON or YAML file (`{"actions": [...]}`).
    Execute {
        id: String,
        #[arg(short, long)]
        file: PathBuf,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Debug, Clone, Copy, Args)]
pub struct Wait {
    /// Wait until the operation ends, showing its progress (exit 7 if it fails, 8 if it
    /// has not ended within --timeout).
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait at most.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum OperationsCommand {
    Get {
        id: String,
    },
    /// Follow an operation until it ends, with a progress bar.
    Watch {
        id: String,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    Cancel {
        id: String,
    },
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Operations not finished yet (`--status pending_approval`: what waits for a decision).
    List {
        #[arg(long, value_parser = ["queued", "pending_approval", "running"])]
        status: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct EventsCommand {
    #[arg(long)]
    runtime: Option<String>,
    #[arg(long = "type")]
    event_type: Option<String>,
    #[arg(long)]
    severity: Option<String>,
    /// Only events after this id.
    #[arg(long)]
    after: Option<String>,
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Keep printing events as they happen (until --timeout seconds, or Ctrl-C).
    #[arg(short, long)]
    follow: bool,
    #[arg(long, default_value_t = 86_400)]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum PoliciesCommand {
    List,
    /// Create the policy a JSON or YAML file describes.
    Apply {
        #[arg(short, long)]
        file: PathBuf,
    },
    Delete {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Leader, term and how far this member has applied.
    Status,
    /// The members, their roles and whether the leader reaches them.
    Members,
}

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    Get,
    /// Replace the settings with a JSON or YAML file's.
    Set {
        #[arg(short, long)]
        file: PathBuf,
    },
}

/// The CLI's commands that talk to a cluster.
#[derive(Debug)]
pub enum CtlCommand {
    Runtimes(RuntimesCommand),
    Operations(OperationsCommand),
    Events(EventsCommand),
    Policies(PoliciesCommand),
    Cluster(ClusterCommand),
    Settings(SettingsCommand),
}

/// A group of commands with the [`Target`] they act on.
macro_rules! group {
    ($name:ident, $command:ty) => {
        #[derive(Debug, Args)]
        pub struct $name {
            #[command(flatten)]
            pub target: Target,
            #[command(subcommand)]
            pub command: $command,
        }
    };
}
group!(RuntimesArgs, RuntimesCommand);
group!(OperationsArgs, OperationsCommand);
group!(PoliciesArgs, PoliciesCommand);
group!(ClusterArgs, ClusterCommand);
group!(SettingsArgs, SettingsCommand);

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub command: EventsCommand,
}

/// Runs `command` against the cluster `target` names.
pub fn run(target: &Target, command: CtlCommand) -> Result<(), CtlError> {
    let failed = |e: anyhow::Error| CtlError { status: ExitStatus::Failed, message: format!("{e:#}") };
    let client = target.client().map_err(failed)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| failed(e.into()))?;
    runtime.block_on(async {
        match command {
            CtlCommand::Runtimes(command) => runtimes(&client, target.output, command).await,
            CtlCommand::Operations(command) => operations(&client, target.output, command).await,
            CtlCommand::Events(command) => events(&client, target.output, command).await,
            CtlCommand::Policies(command) => policies(&client, target.output, command).await,
            CtlCommand::Cluster(command) => cluster(&client, target.output, command).await,
            CtlCommand::Settings(command) => settings(&client, target.output, command).await,
        }
    })
}

fn show(value: &impl serde::Serialize, format: Format, columns: Columns) -> Result<(), CtlError> {
    let value =
        serde_json::to_value(value).map_err(|e| CtlError { status: ExitStatus::Failed, message: e.to_string() })?;
    output::print(&value, format, columns).map_err(|e| CtlError { status: ExitStatus::Failed, message: e.to_string() })
}

/// A JSON or YAML file (`-`: standard input) as JSON.
fn read_document(path: &PathBuf) -> Result<Value, CtlError> {
    let bad = |message: String| CtlError { status: ExitStatus::Failed, message };
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| bad(format!("standard input: {e}")))?
    } else {
        std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?
    };
    serde_json::from_str(&text)
        .or_else(|_| serde_yaml_ng::from_str(&text))
        .map_err(|e| bad(format!("{} is neither JSON nor YAML: {e}", path.display())))
}

/// `key=value` pairs as a JSON object (values that parse as JSON are taken as such).
fn pairs(items: &[String]) -> Result<serde_json::Map<String, Value>, CtlError> {
    let mut map = serde_json::Map::new();
    for item in items {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| CtlError { status: ExitStatus::Failed, message: format!("{item:?} is not key=value") })?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        map.insert(key.to_string(), value);
    }
    Ok(map)
}

async fn runtimes(client: &Client, format: Format, command: RuntimesCommand) -> Result<(), CtlError> {
    match command {
        RuntimesCommand::List { runtime_type, state, selector } => {
            let mut query =
                RuntimeQuery { runtime_type, state, label_selector: selector, page_size: Some(200), page_token: None };
            let mut items = Vec::new();
            loop {
                let page = client.list_runtimes(&query).await?;
                items.extend(page.items);
                match page.next_page_token {
                    Some(token) => query.page_token = Some(token),
                    None => break,
                }
            }
            show(&json!({ "items": items }), format, output::RUNTIMES)
        }
        RuntimesCommand::Get { id } => show(&client.get_runtime(&id).await?, format, output::RUNTIMES),
        RuntimesCommand::Create { name, runtime_type, size, file, wait } => {
            let request = match file {
                Some(file) => read_document(&file)?,
                None => {
                    let (Some(name), Some(runtime_type)) = (name, runtime_type) else {
                        return Err(CtlError {
                            status: ExitStatus::Failed,
                            message: "give a name and --type, or --file".into(),
                        });
                    };
                    let mut request = json!({"name": name, "type": runtime_type});
                    if let Some(size) = size {
                        request["spec"] = json!({"resources": {"size": size}});
                    }
                    request
                }
            };
            let runtime = client.create_runtime(&request).await?;
            match (wait.wait, runtime.active_operation.clone()) {
                (true, Some(operation)) => follow(client, format, &operation, wait.timeout).await,
                _ => show(&runtime, format, output::RUNTIMES),
            }
        }
        RuntimesCommand::Delete { id, wait } => begun(client, format, client.delete_runtime(&id).await?, wait).await,
        RuntimesCommand::Lifecycle { action, id, params, wait } => {
            let call = lifecycle_call(&action)?;
            let body = if params.is_empty() { None } else { Some(Value::Object(pairs(&params)?)) };
            begun(client, format, client.lifecycle(&id, call, body.as_ref()).await?, wait).await
        }
        RuntimesCommand::Intent { id, goal, constraints, dry_run, wait } => {
            let request = json!({"goal": goal, "constraints": pairs(&constraints)?, "dry_run": dry_run});
            let answer = client.submit_intent(&id, &request).await?;
            // A dry run (or an empty plan) begins none: the seed's shape says "".
            match answer["operation_id"].as_str().filter(|id| !id.is_empty()) {
                Some(operation) if wait.wait => follow(client, format, operation, wait.timeout).await,
                _ => show(
                    &answer,
                    format,
                    &[("INTENT", "/intent_id"), ("STATUS", "/status"), ("OPERATION", "/operation_id")],
                ),
            }
        }
        RuntimesCommand::Plan { id, goal, constraints } => {
            let plan = client.plan_actions(&id, &json!({"goal": goal, "constraints": pairs(&constraints)?})).await?;
            let rows = json!({"items": plan["actions"]});
            match format {
                Format::Table => {
                    show(&rows, format, &[("ACTION", "/type"), ("PARAMS", "/params"), ("TARGET", "/target")])
                }
                _ => show(&plan, format, &[]),
            }
        }
        RuntimesCommand::Execute { id, file, wait } => {
            let request = read_document(&file)?;
            begun(client, format, client.execute_actions(&id, &request).await?, wait).await
        }
    }
}

fn lifecycle_call(action: &str) -> Result<Lifecycle, CtlError> {
    Ok(match action {
        "start" => Lifecycle::Start,
        "stop" => Lifecycle::Stop,
        "restart" => Lifecycle::Restart,
        "pause" => Lifecycle::Pause,
        "resume" => Lifecycle::Resume,
        "scale" => Lifecycle::Scale,
        "snapshot" => Lifecycle::Snapshot,
        "restore" => Lifecycle::Restore,
        "migrate" => Lifecycle::Migrate,
        other => return Err(CtlError { status: ExitStatus::Failed, message: format!("no lifecycle call {other}") }),
    })
}

/// An operation a call began: shown, or followed to its end with `--wait`.
async fn begun(client: &Client, format: Format, operation: Operation, wait: Wait) -> Result<(), CtlError> {
    if wait.wait {
        return follow(client, format, &operation.id, wait.timeout).await;
    }
    show(&operation, format, output::OPERATIONS)
}

/// Follows an operation with a progress bar (on a terminal) until it ends; the exit status
/// says how it ended.
async fn follow(client: &Client, format: Format, id: &str, timeout: u64) -> Result<(), CtlError> {
    let bar = indicatif::ProgressBar::new(100);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let ended = client
        .wait_operation(id, Duration::from_secs(timeout), |operation| {
            let progress = operation.progress.as_ref();
            bar.set_position(progress.map_or(0, |p| u64::from(p.percent)));
            let said = progress.and_then(|p| p.message.clone()).unwrap_or_default();
            bar.set_message(format!("{} {said}", operation.status));
        })
        .await?;
    bar.finish_and_clear();
    show(&ended, format, output::OPERATIONS)?;
    match ended.status.as_str() {
        "succeeded" => Ok(()),
        "failed" | "cancelled" => Err(CtlError {
            status: ExitStatus::OperationFailed,
            message: format!(
                "operation {id} {}: {}",
                ended.status,
                ended.error.as_ref().map_or("", |e| e.message.as_str())
            ),
        }),
        status => Err(CtlError {
            status: ExitStatus::Pending,
            message: format!("operation {id} is still {status} after {timeout} s"),
        }),
    }
}

async fn operations(client: &Client, format: Format, command: OperationsCommand) -> Result<(), CtlError> {
    let operation = match command {
        OperationsCommand::Get { id } => client.get_operation(&id).await?,
        OperationsCommand::Watch { id, timeout } => return follow(client, format, &id, timeout).await,
        OperationsCommand::Cancel { id } => client.cancel_operation(&id).await?,
        OperationsCommand::Approve { id, reason } => client.decide(&id, true, reason.as_deref()).await?,
        OperationsCommand::Reject { id, reason } => client.decide(&id, false, Some(&reason)).await?,
        OperationsCommand::List { status } => {
            return show(&client.unfinished_operations(status.as_deref()).await?, format, output::OPERATIONS)
        }
    };
    show(&operation, format, output::OPERATIONS)
}

async fn events(client: &Client, format: Format, command: EventsCommand) -> Result<(), CtlError> {
    let query = EventQuery {
        after: command.after,
        limit: Some(command.limit),
        runtime_id: command.runtime,
        event_type: command.event_type,
        severity: command.severity,
    };
    if !command.follow {
        return show(&client.events(&query).await?, format, output::EVENTS);
    }
    // Followed: one event per line as it comes (a table's header once).
    if format == Format::Table {
        print!("{}", output::table(&[], output::EVENTS));
    }
    client
        .follow_events(&query, Duration::from_secs(command.timeout), |event| {
            let value = serde_json::to_value(event).unwrap_or_default();
            let line = match format {
                Format::Table => output::table(&[&value], output::EVENTS).lines().nth(1).unwrap_or("").to_string(),
                _ => value.to_string(),
            };
            use std::io::Write;
            // A closed pipe (`| head`) ends it quietly.
            writeln!(std::io::stdout(), "{line}").and_then(|()| std::io::stdout().flush()).is_ok()
        })
        .await?;
    Ok(())
}

async fn policies(client: &Client, format: Format, command: PoliciesCommand) -> Result<(), CtlError> {
    let (method, path, body) = match command {
        PoliciesCommand::List => (reqwest::Method::GET, "/v1/policies".to_string(), None),
        PoliciesCommand::Apply { file } => {
            (reqwest::Method::POST, "/v1/policies".to_string(), Some(read_document(&file)?))
        }
        PoliciesCommand::Delete { id } => (reqwest::Method::DELETE, format!("/v1/policies/{id}"), None),
    };
    let answer = checked(client.request_raw(method, &path, body.as_ref()).await?)?;
    show(&answer, format, output::POLICIES)
}

async fn cluster(client: &Client, format: Format, command: ClusterCommand) -> Result<(), CtlError> {
    let view = client.cluster().await?;
    match command {
        ClusterCommand::Status => show(&view, format, output::CLUSTER),
        ClusterCommand::Members => show(&json!({"items": view["members"]}), format, output::MEMBERS),
    }
}

async fn settings(client: &Client, format: Format, command: SettingsCommand) -> Result<(), CtlError> {
    let (method, body) = match command {
        SettingsCommand::Get => (reqwest::Method::GET, None),
        SettingsCommand::Set { file } => (reqwest::Method::PUT, Some(read_document(&file)?)),
    };
    let answer = checked(client.request_raw(method, "/v1/cluster/settings", body.as_ref()).await?)?;
    let format = if format == Format::Table { Format::Yaml } else { format };
    show(&answer, format, &[])
}

/// A raw answer, or its problem as the matching exit status.
fn checked((status, body): (u16, Value)) -> Result<Value, CtlError> {
    if (200..300).contains(&status) {
        return Ok(body);
    }
    Err(ClientError::refusal(status, &body).into())
}
