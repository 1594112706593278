//! `runtimeai-bench`: a 3-node RuntimeAI cluster and a 3-member etcd cluster on this machine,
//! measured side by side (see `runtimeai_chaos::bench`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use runtimeai_chaos::bench::{self, BenchOptions, Mode};
use runtimeai_chaos::interrupt::run_unless_interrupted;

#[derive(Parser)]
#[command(
    name = "runtimeai-bench",
    version,
    about = "Measure a RuntimeAI cluster side by side with etcd on this machine"
)]
struct Cli {
    /// Concurrent clients per level, comma-separated.
    #[arg(long, default_value = "1,16,64,256", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// How long each write level runs per system (reads run half as long).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Runtimes to create for the scale measurements (0: skip them).
    #[arg(long, default_value_t = 100_000)]
    runtimes: usize,
    /// How many times each system's leader is SIGKILLed for the failover gap (0: skip it).
    #[arg(long, default_value_t = 5)]
    failover_rounds: usize,
    /// An extra `runtimeai node` flag for every node, e.g. `--node-arg=--election-timeout-ms=300`
    /// (repeatable): measure a tuning.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// A run of a few seconds with tiny sizes, so the tool never rots (CI runs this).
    #[arg(long)]
    smoke: bool,
    /// How the levels reach the systems: `balanced` (wrk through a haproxy per system, as users
    /// send traffic; the README's table), `direct` (our SDK and the same HTTP stack for etcd,
    /// straight to the members: for profiling) or `both`.
    #[arg(long, value_enum, default_value = "balanced")]
    mode: Mode,
    /// Runs of each level per system through the load balancer, interleaved (etcd, ours, etcd,
    /// ours, ...); the figures are each system's median run.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Both systems without TLS (the baseline for what TLS costs; keys are still checked).
    #[arg(long)]
    plaintext: bool,
    /// Only the scale measurement (`--runtimes` of them): no etcd, no levels, no failover.
    #[arg(long)]
    scale_only: bool,
    /// Where bench-results.json, bench-results.md and bench.png go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = if cli.smoke {
        BenchOptions {
            concurrency: vec![1, 8],
            duration: Duration::from_secs(1),
            runtimes: 300,
            failover_rounds: 1,
            mode: Mode::Both,
            rounds: 1,
            node_args: cli.node_args,
            plaintext: cli.plaintext,
            scale_only: false,
            log_dir: Some(cli.out.clone()),
        }
    } else {
        BenchOptions {
            concurrency: cli.concurrency,
            duration: cli.duration,
            runtimes: cli.runtimes,
            failover_rounds: cli.failover_rounds,
            mode: cli.mode,
            rounds: cli.rounds,
            node_args: cli.node_args,
            plaintext: cli.plaintext,
            scale_only: cli.scale_only,
            log_dir: Some(cli.out.clone()),
        }
    };
    if options.scale_only && options.runtimes == 0 {
        eprintln!("error: --scale-only needs --runtimes above 0");
        return ExitCode::from(2);
    }
    if options.concurrency.is_empty() || options.concurrency.iter().any(|c| !(1..=1024).contains(c)) {
        eprintln!("error: --concurrency takes numbers from 1 to 1024, e.g. 1,16,64,256");
        return ExitCode::from(2);
    }
    if !(1..=9).contains(&options.rounds) {
        eprintln!("error: --rounds takes a number from 1 to 9");
        return ExitCode::from(2);
    }
    if options.duration < Duration::from_millis(500) {
        eprintln!("error: --duration must be at least 500ms");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let progress = |what: &str| eprintln!("[{:>6.1}s] {what}", started.elapsed().as_secs_f64());
    let outcome = match run_unless_interrupted(&runtime, bench::run(options, progress)) {
        Ok(outcome) => outcome,
        Err(signal) => {
            eprintln!("{}: stopped the benchmark and its clusters; nothing written", signal.name());
            return signal.exit_code();
        }
    };
    match outcome {
        Ok(results) => match bench::write(&results, &cli.out) {
            Ok(markdown) => {
                println!("{markdown}");
                println!("written: {}/{{bench-results.json,bench-results.md,bench.png}}", cli.out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
