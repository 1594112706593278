//! `runtimeai-chaos`: runs fault scenarios against real RuntimeAI clusters on loopback and
//! judges what the clients saw.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use runtimeai_chaos::interrupt::run_unless_interrupted;
use runtimeai_chaos::report;
use runtimeai_chaos::scenario::{self, RunOptions, RunResult, Scenario, SCENARIOS};

#[derive(Parser)]
#[command(
    name = "runtimeai-chaos",
    version,
    about = "Fault injection and linearizability checking against real RuntimeAI clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The scenarios, and what each injects.
    List,
    /// Runs one scenario (or `all`, one after another) and prints a summary of each.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// A scenario from `runtimeai-chaos list`, or `all`.
    #[arg(long)]
    scenario: String,
    /// How long the clients run (the faults fall in the middle), e.g. `20s`, `2m`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Seeds the clients' choices and the network's losses and delays.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Founding members of the cluster (3 to 7).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=7))]
    nodes: u64,
    /// Concurrent clients (1 to 64).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=64))]
    clients: u64,
    /// Where each run writes report.json, history.json and timeline.png (in a directory
    /// named after the scenario and seed).
    #[arg(long, default_value = "chaos-reports")]
    out: PathBuf,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::List => {
            let width = SCENARIOS.iter().map(|s| s.name.len()).max().unwrap_or(0);
            for s in SCENARIOS {
                println!("{:<width$}  {}", s.name, s.injects);
            }
            ExitCode::SUCCESS
        }
        Command::Run(args) => run(args),
    }
}

/// The scenarios `name` chooses (`all`: every one), or the message that refuses it.
fn chosen(name: &str) -> Result<Vec<&'static Scenario>, String> {
    if name == "all" {
        return Ok(SCENARIOS.iter().collect());
    }
    scenario::find(name).map(|s| vec![s]).ok_or_else(|| {
        let known: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
        format!("unknown scenario {name:?}; known: all, {}", known.join(", "))
    })
}

fn run(args: RunArgs) -> ExitCode {
    let chosen = match chosen(&args.scenario) {
        Ok(chosen) => chosen,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    if args.duration < Duration::from_secs(5) || args.duration > Duration::from_secs(3600) {
        eprintln!("error: --duration must be between 5s and 1h");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = Vec::new();
    for s in &chosen {
        let dir = scenario::run_dir(&args.out, s.name, args.seed);
        let options = RunOptions {
            scenario: s.name.to_string(),
            duration: args.duration,
            seed: args.seed,
            nodes: args.nodes,
            clients: args.clients as usize,
            dir: dir.clone(),
        };
        eprintln!("=== {} — {}", s.name, s.injects);
        let outcome = match run_unless_interrupted(&runtime, scenario::run(s, options)) {
            Ok(outcome) => outcome,
            Err(signal) => {
                eprintln!("{}: stopped scenario {} and its cluster", signal.name(), s.name);
                return signal.exit_code();
            }
        };
        if let Some(why) = judged(s, outcome, &dir, &args) {
            failed.push((s.name, why));
        }
    }
    summary(chosen.len(), &failed)
}

/// Writes and prints the report of one scenario's run; why it failed, if it did.
fn judged(
    s: &Scenario,
    outcome: runtimeai_chaos::error::Result<RunResult>,
    dir: &Path,
    args: &RunArgs,
) -> Option<String> {
    match outcome {
        Ok(result) => match report::write(&result, dir) {
            Ok(summary) => {
                println!("{summary}");
                let why: Vec<String> =
                    result.checks.iter().filter(|c| !c.passed).map(|c| format!("{}: {}", c.name, c.detail)).collect();
                (!result.passed).then(|| why.join("; "))
            }
            Err(e) => {
                eprintln!("error: writing the report of {}: {e}", s.name);
                Some(format!("writing the report: {e}"))
            }
        },
        Err(e) => {
            eprintln!("error: scenario {} could not run: {e}", s.name);
            eprintln!(
                "reproduce: runtimeai-chaos run --scenario {} --duration {} --seed {} --nodes {} --clients {}",
                s.name,
                humantime::format_duration(args.duration),
                args.seed,
                args.nodes,
                args.clients
            );
            Some(format!("could not run: {e}"))
        }
    }
}

/// Prints how many of `ran` scenarios passed, and why each of `failed` failed.
fn summary(ran: usize, failed: &[(&str, String)]) -> ExitCode {
    let names: Vec<&str> = failed.iter().map(|(name, _)| *name).collect();
    let listed = if failed.is_empty() { String::new() } else { format!(": {}", names.join(", ")) };
    println!("chaos: {} scenarios passed, {} failed{listed}", ran - failed.len(), failed.len());
    // Repeated at the end so that a log's tail (all a CI page may show) says why.
    for (name, why) in failed {
        println!("  {name}: {why}");
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
