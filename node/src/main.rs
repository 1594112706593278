//! `runtimeai`: the RuntimeAI daemon (`runtimeai node`), a local cluster for trying it
//! (`runtimeai dev`), and an MCP server on stdio for local agents (`runtimeai mcp`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use runtimeai_node::config::{LogFormat, NodeArgs};
use runtimeai_node::{ctl, dev, server};

/// mimalloc: glibc's malloc spent about a quarter of a loaded node's CPU allocating, freeing and
/// consolidating. It runs with its defaults, which return freed memory to the OS after a second
/// (`MIMALLOC_PURGE_DELAY`, in ms, changes that). Measured against 100 ms: each create cost ~4 %
/// more CPU at 100 ms (memory given back is faulted in and zeroed again soon after), and the
/// peak resident memory while creating 100 000 runtimes was not lower (540 MiB against 419).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "runtimeai", version, about = "RuntimeAI: an AI-native runtime control plane")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

// Parsed once at start; the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Commands {
    /// Run one member of a RuntimeAI cluster.
    Node(NodeArgs),
    /// Start a local three-node cluster on loopback; Ctrl-C stops it.
    Dev(dev::DevArgs),
    /// Print the REST API's OpenAPI 3.1 document (as served at /v1/openapi.json).
    Openapi,
    /// Make the TLS certificates of a cluster: a CA, members' and clients' certificates.
    Certs(runtimeai_node::certs::CertsArgs),
    /// An MCP server on stdio for a local agent, whose tools act on a cluster with the agent's key.
    Mcp(runtimeai_node::mcp_stdio::McpArgs),
    /// Runtimes: list, get, create, delete, lifecycle calls (`do stop <id>`), intents, plans, actions.
    Runtimes(ctl::RuntimesArgs),
    /// Operations: get, watch, cancel, approve, reject, list what waits for approval.
    Operations(ctl::OperationsArgs),
    /// The cluster's event feed (`--follow` to keep reading).
    Events(ctl::EventsArgs),
    /// Policies: list, apply from a JSON or YAML file, delete.
    Policies(ctl::PoliciesArgs),
    /// The cluster's status and members.
    Cluster(ctl::ClusterArgs),
    /// The cluster-wide settings: get, set from a file.
    Settings(ctl::SettingsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
    /// A node's VM images: what a VM's `spec.image` names.
    #[command(subcommand)]
    VmImage(VmImageCommand),
}

#[derive(Subcommand)]
enum VmImageCommand {
    /// Import a disk image (any format qemu-img reads), or a directory holding `disk.qcow2`
    /// and/or `kernel`, `initrd` and `cmdline`, into the node's store (`<data-dir>/vm-images`).
    Import {
        /// The image's name: 1-63 of [a-z0-9._-].
        name: String,
        /// The disk image (a path, or an http(s) URL) or the directory to import.
        source: String,
        /// The node's data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (target, command) = match cli.command {
        Commands::Runtimes(a) => (a.target, ctl::CtlCommand::Runtimes(a.command)),
        Commands::Operations(a) => (a.target, ctl::CtlCommand::Operations(a.command)),
        Commands::Events(a) => (a.target, ctl::CtlCommand::Events(a.command)),
        Commands::Policies(a) => (a.target, ctl::CtlCommand::Policies(a.command)),
        Commands::Cluster(a) => (a.target, ctl::CtlCommand::Cluster(a.command)),
        Commands::Settings(a) => (a.target, ctl::CtlCommand::Settings(a.command)),
        command => return run_command(command),
    };
    match ctl::run(&target, command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.status as u8)
        }
    }
}

fn run_command(command: Commands) -> ExitCode {
    let result = match command {
        Commands::Node(args) => run_node(args),
        Commands::Dev(args) => dev::run(args),
        Commands::Certs(args) => runtimeai_node::certs::run(args),
        Commands::Mcp(args) => runtimeai_node::mcp_stdio::run(args),
        Commands::VmImage(VmImageCommand::Import { name, source, data_dir }) => {
            let store = runtimeai_node::backend::vm_boot::VmImageStore::in_data_dir(&data_dir);
            store.import(&name, &source).map(|said| println!("{said}")).map_err(anyhow::Error::msg)
        }
        Commands::Openapi => {
            use std::io::Write;
            std::io::stdout().write_all(runtimeai_api::openapi::document().as_bytes()).map_err(anyhow::Error::from)
        }
        Commands::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "runtimeai",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        _ => unreachable!("the cluster's commands are run by ctl::run"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, as an operator reads it.
fn one_line(error: &anyhow::Error) -> String {
    error.chain().map(|e| e.to_string()).collect::<Vec<_>>().join(": ")
}

fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let config = args.with_file()?.resolve()?;
    init_tracing(config.log_format);
    runtimeai_node::http::raise_open_files_limit(config.http_limits.max_connections);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(server::run(config, runtimeai_node::shutdown_signal()))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
