//! `runtimeai-chaos`: runs fault scenarios against real RuntimeAI clusters on loopback and
//! judges what the clients saw.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use runtimeai_chaos::interrupt::run_unless_interrupted;
use runtimeai_chaos::report;
use runtimeai_chaos::scenario::{self, RunOptions, SCENARIOS};

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
    Run {
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::List => {
            let width = SCENARIOS.iter().map(|s| s.name.len()).max().unwrap_or(0);
            for s in SCENARIOS {
                println!("{:<width$}  {}", s.name, s.injects);
            }
            ExitCode::SUCCESS
        }
        Command::Run { scenario, duration, seed, nodes, clients, out } => {
            let chosen: Vec<_> = if scenario == "all" {
                SCENARIOS.iter().collect()
            } else {
                match scenario::find(&scenario) {
                    Some(s) => vec![s],
                    None => {
                        let known: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
                        eprintln!("error: unknown scenario {scenario:?}; known: all, {}", known.join(", "));
                        return ExitCode::from(2);
                    }
                }
            };
            if duration < Duration::from_secs(5) || duration > Duration::from_secs(3600) {
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
                let dir = scenario::run_dir(&out, s.name, seed);
                let options = RunOptions {
                    scenario: s.name.to_string(),
                    duration,
                    seed,
                    nodes,
                    clients: clients as usize,
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
                match outcome {
                    Ok(result) => match report::write(&result, &dir) {
                        Ok(summary) => {
                            println!("{summary}");
                            if !result.passed {
                                let why: Vec<String> = result
                                    .checks
                                    .iter()
                                    .filter(|c| !c.passed)
                                    .map(|c| format!("{}: {}", c.name, c.detail))
                                    .collect();
                                failed.push((s.name, why.join("; ")));
                            }
                        }
                        Err(e) => {
                            eprintln!("error: writing the report of {}: {e}", s.name);
                            failed.push((s.name, format!("writing the report: {e}")));
                        }
                    },
                    Err(e) => {
                        eprintln!("error: scenario {} could not run: {e}", s.name);
                        eprintln!(
                            "reproduce: runtimeai-chaos run --scenario {} --duration {} --seed {seed} --nodes {nodes} --clients {clients}",
                            s.name,
                            humantime::format_duration(duration)
                        );
                        failed.push((s.name, format!("could not run: {e}")));
                    }
                }
            }
            println!(
                "chaos: {} scenarios passed, {} failed{}",
                chosen.len() - failed.len(),
                failed.len(),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(": {}", failed.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", "))
                }
            );
            // Repeated at the end so that a log's tail (all a CI page may show) says why.
            for (name, why) in &failed {
                println!("  {name}: {why}");
            }
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
