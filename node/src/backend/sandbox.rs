//! Agent sandboxes as isolated local processes (driver `process`), for runtimes of type
//! `sandbox` (isolated, usually short-lived) and `agent_runtime` (a long-running agent,
//! restarted with backoff when it fails).
//!
//! A sandbox runs its spec's `command` in a private work directory under util-linux's
//! `unshare`: its own PID, mount, IPC and UTS namespaces (it sees only its own processes), and
//! its own network namespace — nothing but a down loopback, so no egress — unless the spec's
//! `egress_policy` is `open`. CPU and memory are limited by a cgroup of its own — cgroup v2
//! where the host has it, else the v1 `memory` and `cpu` controllers (`/sys/fs/cgroup/…/runtimeai/
//! <runtime id>`) — and, on a host with neither, memory by `RLIMIT_AS` (cpu then unlimited; the
//! start message says which). Its environment is only `PATH`, `HOME` (the work directory) and
//! the spec's `env`.
//!
//! Each sandbox has a directory `<root>/<runtime id>/` with `work/`, `pid` (pid and start time,
//! so a reused pid is not mistaken for it), `exit` (how it ended), `stdout.log`, `stderr.log`,
//! `snapshots/<id>.tar`. start → spawn (idempotent: a live process is kept), stop → SIGTERM to
//! its process group, SIGKILL after the timeout, restart = stop + start, scale → new limits from
//! the next start (the message says a restart is needed), snapshot → a tar of the work
//! directory, restore → the work directory replaced by the archive (restarted if it ran).
//!
//! A stop is over only when nothing of the sandbox can write to its directory any more: its
//! watcher (the task that reaps it and, for an agent, restarts it) is told first, so it starts
//! nothing new; then the process group is signalled; then every process left in its cgroup or
//! working below its directory is killed and waited for; last, the watcher is waited for, so
//! that its record of how the process ended is written. Delete and restore touch the directory
//! only after that.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use runtimeai_model::{EgressPolicy, Runtime, RuntimeType};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{BackendError, CallContext, Observed, Resources, RuntimeBackend, Step, StepLedger};

/// The command of a sandbox whose spec names none: an idle process.
const IDLE: &[&str] = &["sleep", "infinity"];

/// How long a stop waits for SIGKILLed processes to be gone (and their watcher to record it)
/// before it reports a retryable error: only a process stuck in the kernel takes longer.
const KILL_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct SandboxBackend {
    root: PathBuf,
    ledger: StepLedger,
    cgroups: Option<Cgroups>,
    /// Pauses between restarts of a failing agent: doubling from `backoff_min` to `backoff_max`.
    backoff_min: Duration,
    backoff_max: Duration,
    watchers: Watchers,
}

/// The task watching each sandbox this node started, by runtime id.
#[derive(Debug, Clone, Default)]
struct Watchers(Arc<Mutex<HashMap<String, Watcher>>>);

/// The task that reaps a sandbox's process and records how it ended (for an agent runtime, a
/// [`Supervisor`] that also starts it again), and the switch that tells it the sandbox is
/// being stopped.
#[derive(Debug)]
struct Watcher {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Watchers {
    /// Watches a newly started sandbox; a watcher it replaces is told to stop.
    fn insert(&self, id: &str, stop: watch::Sender<bool>, task: tokio::task::JoinHandle<()>) {
        let replaced = self.lock().insert(id.to_string(), Watcher { stop, task });
        if let Some(old) = replaced {
            old.stop.send_replace(true);
        }
    }

    /// Tells the sandbox's watcher that it is being stopped and hands it over, to be waited
    /// for. Once this returns the watcher starts no new process: a [`Supervisor`] launches
    /// only while it holds the switch's read guard and sees it unset.
    fn stop(&self, id: &str) -> Option<Watcher> {
        let watcher = self.lock().remove(id)?;
        watcher.stop.send_replace(true);
        Some(watcher)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watcher>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How a sandbox was launched: what its limits and isolation are, recorded for status.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Launch {
    pid: i32,
    /// The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat).
    start_ticks: u64,
    memory_bytes: u64,
    #[serde(default = "one_cpu")]
    cpu: f64,
    network_isolated: bool,
}

fn one_cpu() -> f64 {
    1.0
}

/// The cgroups sandboxes run in: cgroup v2 where the host has it, else cgroup v1's `memory`
/// and `cpu` controllers.
#[derive(Debug, Clone)]
enum Cgroups {
    V2 { root: PathBuf },
    V1 { memory: PathBuf, cpu: PathBuf },
}

/// The CFS period the cpu quota is a share of, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

impl Cgroups {
    fn detect() -> Option<Cgroups> {
        let fs = Path::new("/sys/fs/cgroup");
        if let Ok(controllers) = std::fs::read_to_string(fs.join("cgroup.controllers")) {
            if controllers.split_whitespace().any(|c| c == "memory")
                && controllers.split_whitespace().any(|c| c == "cpu")
            {
                return Some(Cgroups::V2 { root: fs.join("runtimeai") });
            }
        }
        let (memory, cpu) = (fs.join("memory"), fs.join("cpu"));
        (memory.join("memory.limit_in_bytes").exists() && cpu.join("cpu.cfs_quota_us").exists())
            .then(|| Cgroups::V1 { memory: memory.join("runtimeai"), cpu: cpu.join("runtimeai") })
    }

    fn name(&self) -> &'static str {
        match self {
            Cgroups::V2 { .. } => "cgroup v2",
            Cgroups::V1 { .. } => "cgroup v1",
        }
    }

    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { root } => vec![root.join(id)],
            Cgroups::V1 { memory, cpu } => vec![memory.join(id), cpu.join(id)],
        }
    }

    /// Creates the sandbox's groups and sets their limits; returns the `cgroup.procs` files a
    /// process joins them through.
    fn prepare(&self, id: &str, cpu: f64, memory_bytes: u64) -> std::io::Result<Vec<PathBuf>> {
        if let Cgroups::V2 { root } = self {
            std::fs::create_dir_all(root)?;
            let enable = "+cpu +memory";
            let _ = std::fs::write(root.parent().unwrap_or(root).join("cgroup.subtree_control"), enable);
            std::fs::write(root.join("cgroup.subtree_control"), enable)?;
        }
        for dir in self.dirs(id) {
            std::fs::create_dir_all(&dir)?;
        }
        self.set_limits(id, cpu, memory_bytes)?;
        Ok(self.dirs(id).into_iter().map(|d| d.join("cgroup.procs")).collect())
    }

    /// Sets the limits (also while the sandbox runs: cgroups apply them live).
    fn set_limits(&self, id: &str, cpu: f64, memory_bytes: u64) -> std::io::Result<()> {
        let quota = ((cpu * CPU_PERIOD_US as f64) as u64).max(1_000);
        match self {
            Cgroups::V2 { root } => {
                std::fs::write(root.join(id).join("memory.max"), memory_bytes.to_string())?;
                // No swapping past the limit, where the host has swap accounting.
                let _ = std::fs::write(root.join(id).join("memory.swap.max"), "0");
                std::fs::write(root.join(id).join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))
            }
            Cgroups::V1 { memory, cpu: cpu_root } => {
                let group = memory.join(id);
                // No swapping past the limit. memory+swap may never be below memory, so it is
                // set both before (when growing) and after (when shrinking) the memory limit.
                let memsw = group.join("memory.memsw.limit_in_bytes");
                let _ = std::fs::write(&memsw, memory_bytes.to_string());
                std::fs::write(group.join("memory.limit_in_bytes"), memory_bytes.to_string())?;
                let _ = std::fs::write(&memsw, memory_bytes.to_string());
                std::fs::write(cpu_root.join(id).join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                std::fs::write(cpu_root.join(id).join("cpu.cfs_quota_us"), quota.to_string())
            }
        }
    }

    /// Memory in use by the sandbox's processes, as the cgroup counts it.
    fn memory_usage(&self, id: &str) -> Option<u64> {
        let file = match self {
            Cgroups::V2 { root } => root.join(id).join("memory.current"),
            Cgroups::V1 { memory, .. } => memory.join(id).join("memory.usage_in_bytes"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// The processes in the sandbox's groups.
    fn processes(&self, id: &str) -> Vec<i32> {
        let procs = self.dirs(id).into_iter().filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok());
        procs.flat_map(|text| text.lines().filter_map(|line| line.trim().parse().ok()).collect::<Vec<_>>()).collect()
    }

    fn remove(&self, id: &str) {
        for dir in self.dirs(id) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl SandboxBackend {
    pub fn new(root: PathBuf) -> std::io::Result<SandboxBackend> {
        std::fs::create_dir_all(&root)?;
        let ledger = StepLedger::open(root.join(".ledger"))?;
        Ok(SandboxBackend {
            root,
            ledger,
            cgroups: Cgroups::detect(),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            watchers: Watchers::default(),
        })
    }

    /// Shorter restart pauses (tests).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> SandboxBackend {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    fn dir(&self, runtime: &Runtime) -> PathBuf {
        self.root.join(&runtime.id)
    }

    /// Runs one fenced, remembered step.
    async fn step<F, Fut>(&self, cx: &CallContext, work: F) -> Result<String, BackendError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<String, BackendError>>,
    {
        // The ledger's check is synchronous and cheap; the work is async (it waits on processes).
        match self.ledger.run(cx, || Ok(()))? {
            (Step::AlreadyApplied, _) => Ok("already applied (a retry converges)".to_string()),
            (Step::Fresh, _) => work().await,
        }
    }

    /// The limits the sandbox last ran (or was scaled) with.
    fn last_resources(&self, runtime: &Runtime) -> Resources {
        let launch = self.launched(runtime);
        Resources {
            cpu: launch.as_ref().map_or(1.0, |l| l.cpu),
            memory_bytes: launch.as_ref().map_or(1 << 30, |l| l.memory_bytes),
            replicas: 1,
        }
    }

    fn launched(&self, runtime: &Runtime) -> Option<Launch> {
        let text = std::fs::read_to_string(self.dir(runtime).join("pid")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The launch record, if that process is still alive (and is the same process).
    fn alive(&self, runtime: &Runtime) -> Option<Launch> {
        self.launched(runtime).filter(|launch| start_ticks(launch.pid) == Some(launch.start_ticks))
    }

    /// Starts the sandbox unless it runs; a supervisor task reaps it and, for an agent runtime,
    /// restarts it with backoff when it fails.
    fn spawn(&self, runtime: &Runtime, resources: &Resources) -> Result<String, BackendError> {
        if self.alive(runtime).is_some() {
            return Ok("already running".to_string());
        }
        let dir = self.dir(runtime);
        std::fs::create_dir_all(dir.join("work"))?;
        let _ = std::fs::remove_file(dir.join("exit"));
        let _ = std::fs::remove_file(dir.join("stopping"));
        let launch = launch(runtime, &dir, resources, self.cgroups.as_ref())?;
        let isolated = launch.network_isolated;
        std::fs::write(dir.join("pid"), serde_json::to_vec(&launch).unwrap_or_default())?;
        let (stop, stopped) = watch::channel(false);
        let task = if runtime.runtime_type == RuntimeType::AgentRuntime {
            let supervisor = Supervisor {
                backend: self.clone(),
                runtime: Arc::new(runtime.clone()),
                resources: resources.clone(),
                stopped,
            };
            tokio::spawn(supervisor.run(launch.clone()))
        } else {
            let (dir, launch) = (dir.clone(), launch.clone());
            tokio::spawn(async move {
                reap(dir, launch).await;
            })
        };
        self.watchers.insert(&runtime.id, stop, task);
        let egress = if isolated { "no network egress" } else { "open egress" };
        let limits = match &self.cgroups {
            Some(cgroups) => {
                format!("memory ≤ {} MiB and cpu ≤ {} by {}", launch.memory_bytes >> 20, launch.cpu, cgroups.name())
            }
            None => {
                format!("memory ≤ {} MiB by RLIMIT_AS; cpu not limited (no cgroups here)", launch.memory_bytes >> 20)
            }
        };
        Ok(format!("sandbox started (pid {}; own pid/mount/ipc/uts namespaces, {egress}, {limits})", launch.pid))
    }

    /// Stops the sandbox: SIGTERM to its process group, SIGKILL after `timeout`; returns once
    /// nothing of it runs and its watcher has recorded how it ended (see the module's doc).
    async fn terminate(&self, runtime: &Runtime, timeout: Duration) -> Result<String, BackendError> {
        let dir = self.dir(runtime);
        let watcher = self.watchers.stop(&runtime.id);
        if dir.exists() {
            // Also when it is not running: an agent waiting to be restarted stays stopped.
            std::fs::write(dir.join("stopping"), b"")?;
        }
        let outcome = match self.alive(runtime) {
            Some(launch) => end_process_group(&launch, timeout).await,
            None => "not running".to_string(),
        };
        self.end_remaining(&runtime.id, &dir).await?;
        if let Some(watcher) = watcher {
            tokio::time::timeout(KILL_WAIT, watcher.task)
                .await
                .map_err(|_| BackendError::Retryable("the sandbox's watcher did not see its process end".to_string()))?
                .map_err(|e| BackendError::Retryable(format!("the sandbox's watcher failed: {e}")))?;
        }
        Ok(outcome)
    }

    /// Archives the work directory to `archive`; a running sandbox is archived live, and the
    /// answer says so (a file it writes meanwhile may be archived half-written).
    async fn archive_work(&self, runtime: &Runtime, archive: &Path) -> Result<&'static str, BackendError> {
        let running = self.alive(runtime).is_some();
        let work = self.dir(runtime).join("work");
        tar(&["-cf".as_ref(), archive.as_os_str(), "-C".as_ref(), work.as_os_str(), ".".as_ref()], running).await?;
        Ok(if running { " (archived while it ran: a file written meanwhile may be torn)" } else { "" })
    }

    /// The live processes of the sandbox: those in its cgroups and any working below its
    /// directory (what left its process group; with no cgroups, the only other trace).
    fn remaining_processes(&self, id: &str, dir: &Path) -> Vec<i32> {
        let mut pids = self.cgroups.as_ref().map(|c| c.processes(id)).unwrap_or_default();
        pids.extend(processes_working_below(dir));
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|&pid| start_ticks(pid).is_some());
        pids
    }

    /// SIGKILLs whatever is left of the sandbox and waits until none of it runs.
    async fn end_remaining(&self, id: &str, dir: &Path) -> Result<(), BackendError> {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let pids = self.remaining_processes(id, dir);
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(BackendError::Retryable(format!("processes {pids:?} of the sandbox outlived SIGKILL")));
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// SIGTERM to the process group led by `launch`, SIGKILL if it has not ended after `timeout`;
/// returns once its leader has ended, saying how.
async fn end_process_group(launch: &Launch, timeout: Duration) -> String {
    let ended = || start_ticks(launch.pid) != Some(launch.start_ticks);
    let group = Pid::from_raw(launch.pid);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ended() {
            return format!("pid {} ended on SIGTERM", launch.pid);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = killpg(group, Signal::SIGKILL);
    let deadline = Instant::now() + KILL_WAIT;
    while !ended() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    format!("pid {} killed after {}s without ending on SIGTERM", launch.pid, timeout.as_secs())
}

/// Spawns the command under `unshare`, in its own session and cgroup, with its limits.
fn launch(
    runtime: &Runtime,
    dir: &Path,
    resources: &Resources,
    cgroups: Option<&Cgroups>,
) -> Result<Launch, BackendError> {
    let memory_bytes = resources.memory_bytes;
    let command: Vec<String> = match &runtime.spec.command {
        Some(command) if !command.is_empty() => command.clone(),
        _ => IDLE.iter().map(|s| s.to_string()).collect(),
    };
    let open_egress = runtime.spec.networking.as_ref().is_some_and(|n| n.egress_policy == EgressPolicy::Open);
    let mut unshare = std::process::Command::new("unshare");
    unshare.args(["--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--ipc", "--uts"]);
    if !open_egress {
        unshare.arg("--net");
    }
    unshare.arg("--").args(&command);
    let work = dir.join("work");
    unshare
        .current_dir(&work)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &work)
        .envs(runtime.spec.env.clone().unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stdout.log"))?)
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stderr.log"))?);
    // The bounds cover unshare and everything it starts (cgroups and limits are inherited).
    let limit = memory_bytes.max(64 << 20);
    let cpu = resources.cpu.max(0.01);
    let join: Vec<std::ffi::CString> = match cgroups {
        Some(cgroups) => cgroups
            .prepare(&runtime.id, cpu, limit)
            .map_err(|e| BackendError::Retryable(format!("cannot set up the sandbox's cgroup: {e}")))?
            .into_iter()
            .filter_map(|p| std::ffi::CString::new(p.into_os_string().into_encoded_bytes()).ok())
            .collect(),
        None => Vec::new(),
    };
    let rlimit = cgroups.is_none();
    // SAFETY: only async-signal-safe calls between fork and exec: setsid, open/write/close of
    // paths prepared before the fork, setrlimit.
    unsafe {
        use std::os::unix::process::CommandExt;
        unshare.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            for procs in &join {
                // "0" moves the writing process: the child joins before it execs anything.
                let fd = nix::fcntl::open(procs.as_c_str(), nix::fcntl::OFlag::O_WRONLY, nix::sys::stat::Mode::empty())
                    .map_err(std::io::Error::from)?;
                nix::unistd::write(&fd, b"0").map_err(std::io::Error::from)?;
            }
            if rlimit {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, limit, limit)
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let child = unshare.spawn().map_err(|e| BackendError::Permanent(format!("cannot start unshare: {e}")))?;
    // A task reaps the child by its pid (`reap`); the handle itself is not needed.
    let pid = child.id() as i32;
    drop(child);
    // Our child is not reaped before `reap` waits for it: its entry is there even if it has
    // already ended (a command that exits at once has still started).
    let start_ticks = process_stat(pid)
        .ok_or_else(|| BackendError::Retryable(format!("pid {pid} of the sandbox vanished before it was reaped")))?
        .start_ticks;
    Ok(Launch { pid, start_ticks, memory_bytes: limit, cpu, network_isolated: !open_egress })
}

/// The processes whose working directory is below `dir`.
fn processes_working_below(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else { continue };
        // A deleted directory reads back as "<path> (deleted)".
        let cwd = PathBuf::from(cwd.to_string_lossy().trim_end_matches(" (deleted)"));
        if cwd.starts_with(dir) {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILLs every process working below `dir`: whatever of a sandbox escaped its process group.
fn kill_strays(dir: &Path) {
    for pid in processes_working_below(dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Field 22 of /proc/<pid>/stat: when the process started, which tells a reused pid apart;
/// `None` once it has ended (a zombie has ended: it only waits to be reaped).
fn start_ticks(pid: i32) -> Option<u64> {
    process_stat(pid).filter(|stat| !stat.ended).map(|stat| stat.start_ticks)
}

/// What /proc/<pid>/stat says of a process that exists, ended or not.
struct ProcessStat {
    start_ticks: u64,
    ended: bool,
}

fn process_stat(pid: i32) -> Option<ProcessStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow the last ')'.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(ProcessStat { start_ticks: fields.get(19)?.parse().ok()?, ended: fields.first() == Some(&"Z") })
}

/// Waits for the sandbox's process and records how it ended in `exit`.
async fn reap(dir: PathBuf, launch: Launch) -> Option<i32> {
    let pid = Pid::from_raw(launch.pid);
    let status = tokio::task::spawn_blocking(move || nix::sys::wait::waitpid(pid, None)).await.ok()?.ok()?;
    let (code, text) = match status {
        nix::sys::wait::WaitStatus::Exited(_, code) => (code, format!("exited with status {code}")),
        nix::sys::wait::WaitStatus::Signaled(_, signal, _) => (128 + signal as i32, format!("killed by {signal}")),
        other => (-1, format!("{other:?}")),
    };
    let _ = std::fs::write(dir.join("exit"), &text);
    Some(code)
}

/// Keeps an agent runtime running: when it ends without being asked to, it is started again
/// after a pause that doubles with each failure in a row.
struct Supervisor {
    backend: SandboxBackend,
    runtime: Arc<Runtime>,
    resources: Resources,
    /// Set when the agent is being stopped (or another watcher took over).
    stopped: watch::Receiver<bool>,
}

impl Supervisor {
    async fn run(mut self, mut launch: Launch) {
        let dir = self.backend.dir(&self.runtime);
        let mut pause = self.backend.backoff_min;
        loop {
            let code = reap(dir.clone(), launch.clone()).await;
            if *self.stopped.borrow() {
                return;
            }
            let restarts = std::fs::read_to_string(dir.join("restarts")).ok().and_then(|t| t.trim().parse().ok());
            let restarts: u64 = restarts.unwrap_or(0) + 1;
            let _ = std::fs::write(dir.join("restarts"), restarts.to_string());
            tracing::warn!(runtime = %self.runtime.id, ?code, restarts, pause_ms = pause.as_millis() as u64, "agent ended; restarting");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // Stopped, or the switch's owner is gone: either way no restart.
                _ = self.stopped.changed() => return,
            }
            pause = (pause * 2).min(self.backend.backoff_max);
            // Held while launching: a stop waits until the new process is on record, then ends it.
            let stopped = self.stopped.borrow();
            if *stopped || self.backend.alive(&self.runtime).is_some() {
                return;
            }
            match launch_again(&self.runtime, &dir, &self.resources, self.backend.cgroups.as_ref()) {
                Ok(next) => launch = next,
                Err(e) => {
                    tracing::warn!(runtime = %self.runtime.id, error = %e, "cannot restart the agent");
                    return;
                }
            }
        }
    }
}

fn launch_again(
    runtime: &Runtime,
    dir: &Path,
    resources: &Resources,
    cgroups: Option<&Cgroups>,
) -> Result<Launch, BackendError> {
    let launch = launch(runtime, dir, resources, cgroups)?;
    let _ = std::fs::remove_file(dir.join("exit"));
    std::fs::write(dir.join("pid"), serde_json::to_vec(&launch).unwrap_or_default())?;
    Ok(launch)
}

/// Runs `tar` with `args`, as a permanent error when it fails. With `files_may_change`, its
/// exit status 1 (GNU tar: a file changed while it was read; the archive is complete) is not
/// a failure.
async fn tar(args: &[&std::ffi::OsStr], files_may_change: bool) -> Result<(), BackendError> {
    let output = tokio::process::Command::new("tar")
        .args(args)
        .output()
        .await
        .map_err(|e| BackendError::Permanent(format!("cannot run tar: {e}")))?;
    if output.status.success() || (files_may_change && output.status.code() == Some(1)) {
        Ok(())
    } else {
        Err(BackendError::Permanent(format!("tar failed: {}", String::from_utf8_lossy(&output.stderr).trim())))
    }
}

#[async_trait::async_trait]
impl RuntimeBackend for SandboxBackend {
    fn driver(&self) -> &'static str {
        "process"
    }

    fn shared(&self) -> bool {
        false
    }

    fn capabilities(&self) -> &'static [runtimeai_model::ActionKind] {
        super::LIFECYCLE
    }

    async fn create(&self, cx: &CallContext, runtime: &Runtime, resources: &Resources) -> Result<String, BackendError> {
        self.step(cx, || async { self.spawn(runtime, resources) }).await
    }

    async fn delete(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.step(cx, || async {
            self.terminate(runtime, Duration::from_secs(10)).await?;
            let dir = self.dir(runtime);
            if dir.exists() {
                tokio::fs::remove_dir_all(&dir).await?;
            }
            if let Some(cgroups) = &self.cgroups {
                cgroups.remove(&runtime.id);
            }
            Ok("sandbox removed".to_string())
        })
        .await
    }

    async fn start(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let resources = self.last_resources(runtime);
        self.step(cx, || async { self.spawn(runtime, &resources) }).await
    }

    async fn stop(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        _force: bool,
        timeout: Duration,
    ) -> Result<String, BackendError> {
        self.step(cx, || self.terminate(runtime, timeout)).await
    }

    async fn restart(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let resources = self.last_resources(runtime);
        self.step(cx, || async {
            let stopped = self.terminate(runtime, Duration::from_secs(10)).await?;
            let started = self.spawn(runtime, &resources)?;
            Ok(format!("{stopped}; {started}"))
        })
        .await
    }

    async fn scale(&self, cx: &CallContext, runtime: &Runtime, target: &Resources) -> Result<String, BackendError> {
        self.step(cx, || async {
            let path = self.dir(runtime).join("pid");
            let limits = format!("memory ≤ {} MiB, cpu ≤ {}", target.memory_bytes >> 20, target.cpu);
            let Some(mut launch) = self.launched(runtime) else {
                return Ok(format!("{limits} from its next start"));
            };
            launch.memory_bytes = target.memory_bytes;
            launch.cpu = target.cpu;
            std::fs::write(&path, serde_json::to_vec(&launch).unwrap_or_default())?;
            match (&self.cgroups, self.alive(runtime).is_some()) {
                (Some(cgroups), true) => {
                    cgroups
                        .set_limits(&runtime.id, target.cpu, target.memory_bytes)
                        .map_err(|e| BackendError::Retryable(format!("cannot change the cgroup's limits: {e}")))?;
                    Ok(format!("{limits}, applied live ({})", cgroups.name()))
                }
                (Some(_), false) => Ok(format!("{limits} from its next start")),
                (None, _) => Ok(format!("{limits} recorded; restart required to take effect")),
            }
        })
        .await
    }

    async fn snapshot(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        snapshot_id: &str,
        _: &str,
    ) -> Result<String, BackendError> {
        self.step(cx, || async {
            let dir = self.dir(runtime);
            let snapshots = dir.join("snapshots");
            std::fs::create_dir_all(&snapshots)?;
            let archive = snapshots.join(format!("{snapshot_id}.tar"));
            let how = self.archive_work(runtime, &archive).await?;
            Ok(format!("work directory archived as {snapshot_id}{how}"))
        })
        .await
    }

    async fn restore(&self, cx: &CallContext, runtime: &Runtime, snapshot_id: &str) -> Result<String, BackendError> {
        let resources = self.last_resources(runtime);
        self.step(cx, || async {
            let dir = self.dir(runtime);
            let archive = dir.join("snapshots").join(format!("{snapshot_id}.tar"));
            if !archive.exists() {
                return Err(BackendError::Permanent(format!("no archive for snapshot {snapshot_id}")));
            }
            let was_running = self.alive(runtime).is_some();
            self.terminate(runtime, Duration::from_secs(10)).await?;
            let work = dir.join("work");
            if work.exists() {
                tokio::fs::remove_dir_all(&work).await?;
            }
            std::fs::create_dir_all(&work)?;
            tar(&["-xf".as_ref(), archive.as_os_str(), "-C".as_ref(), work.as_os_str()], false).await?;
            if was_running {
                self.spawn(runtime, &resources)?;
                return Ok(format!("work directory restored from {snapshot_id}; restarted"));
            }
            Ok(format!("work directory restored from {snapshot_id}"))
        })
        .await
    }

    async fn list_snapshots(&self, runtime: &Runtime) -> Result<Vec<String>, BackendError> {
        let mut ids = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.dir(runtime).join("snapshots")) {
            for entry in entries.flatten() {
                if let Some(id) = entry.file_name().to_str().and_then(|n| n.strip_suffix(".tar")) {
                    ids.push(id.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Sandboxes are the node's children: a clean shutdown ends them (as systemd's default
    /// `KillMode=control-group` would), SIGTERM then SIGKILL after two seconds. After a SIGKILL
    /// of the node they keep running and the restarted node finds them by their pid files.
    async fn shutdown(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        let mut ended = 0;
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("pid")) else { continue };
            let Ok(launch) = serde_json::from_str::<Launch>(&text) else { continue };
            if start_ticks(launch.pid) != Some(launch.start_ticks) {
                continue;
            }
            end_process_group(&launch, Duration::from_secs(2)).await;
            // What is left of its group once the leader has ended.
            let _ = killpg(Pid::from_raw(launch.pid), Signal::SIGKILL);
            ended += 1;
        }
        kill_strays(&self.root);
        if ended > 0 {
            tracing::info!(sandboxes = ended, "ended this node's sandboxes on shutdown");
        }
    }

    async fn status(&self, runtime: &Runtime) -> Result<Observed, BackendError> {
        let dir = self.dir(runtime);
        if !dir.exists() {
            return Ok(Observed::Missing);
        }
        if let Some(launch) = self.alive(runtime) {
            if let Some(used) = self.cgroups.as_ref().and_then(|c| c.memory_usage(&runtime.id)) {
                return Ok(Observed::Running { cpu: 0.0, memory_bytes: used, latency_ms: None });
            }
            let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", launch.pid))
                .ok()
                .and_then(|s| {
                    s.lines().find_map(|l| {
                        l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches("kB").trim().to_string())
                    })
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return Ok(Observed::Running { cpu: 0.0, memory_bytes: rss_kib * 1024, latency_ms: None });
        }
        match std::fs::read_to_string(dir.join("exit")) {
            Ok(how) if how.contains("status 0") || dir.join("stopping").exists() => Ok(Observed::Stopped),
            Ok(how) => Ok(Observed::Failed(how)),
            Err(_) if self.launched(runtime).is_some() => Ok(Observed::Failed("ended while the node was down".into())),
            Err(_) => Ok(Observed::Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtimeai_model::NetworkingProfile;

    /// Whether this kernel lets us make the namespaces; the tests say so when it does not.
    fn namespaces_allowed() -> bool {
        let probe = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--mount", "--ipc", "--uts", "--net", "true"])
            .status();
        match probe {
            Ok(status) if status.success() => true,
            other => {
                eprintln!("skipped: this kernel or user cannot create namespaces with unshare ({other:?})");
                false
            }
        }
    }

    fn sandbox(id: &str, command: &str) -> Runtime {
        let mut runtime = Runtime::new(id, id, RuntimeType::Sandbox, chrono::DateTime::UNIX_EPOCH);
        runtime.spec.command = Some(vec!["sh".into(), "-c".into(), command.into()]);
        runtime
    }

    fn cx(operation: &str) -> CallContext {
        CallContext { operation_id: operation.into(), step: 0, token: 1 }
    }

    const ONE_GIB: Resources = Resources { cpu: 1.0, memory_bytes: 1 << 30, replicas: 1 };

    /// A sandbox root that kills whatever still runs in it when the test ends, passed or failed:
    /// a failed test must not hang on the reaper of a process that never ends.
    struct TestRoot(tempfile::TempDir);

    impl TestRoot {
        fn new() -> TestRoot {
            TestRoot(tempfile::tempdir().unwrap())
        }
    }

    impl std::ops::Deref for TestRoot {
        type Target = tempfile::TempDir;
        fn deref(&self) -> &tempfile::TempDir {
            &self.0
        }
    }

    impl Drop for TestRoot {
        fn drop(&mut self) {
            kill_strays(self.0.path());
        }
    }

    /// How long a test waits for something it expects: long, because a loaded 2-core machine
    /// can be slow to start a process; a wait that succeeds ends as soon as it does.
    const PATIENCE: Duration = Duration::from_secs(60);

    /// Polls `probe` until it yields a value; panics, saying `what`, after [`PATIENCE`].
    async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for a file the sandbox writes in its work directory.
    async fn read_when_there(path: PathBuf) -> String {
        let what = format!("{} appears", path.display());
        eventually(&what, async || std::fs::read_to_string(&path).ok().filter(|text| !text.is_empty())).await
    }

    async fn wait_status(backend: &SandboxBackend, runtime: &Runtime, done: impl Fn(&Observed) -> bool) -> Observed {
        eventually("the status settles", async || Some(backend.status(runtime).await.unwrap()).filter(&done)).await
    }

    fn lines(path: &Path) -> usize {
        std::fs::read_to_string(path).unwrap_or_default().lines().count()
    }

    #[tokio::test]
    async fn a_sandbox_sees_only_itself_and_its_own_directory() {
        if !namespaces_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = SandboxBackend::new(root.path().to_path_buf()).unwrap();
        let mut runtime = sandbox(
            "rt_ps",
            "ls /proc | grep -c '^[0-9]' > pids; echo \"$HOME\" > home; echo \"$SECRET\" > secret; sleep 30",
        );
        runtime.spec.env = Some([("SECRET".to_string(), "only-mine".to_string())].into());
        let message = backend.create(&cx("op_create"), &runtime, &ONE_GIB).await.unwrap();
        assert!(message.contains("no network egress"), "{message}");
        let work = root.path().join("rt_ps").join("work");
        let pids: u32 = read_when_there(work.join("pids")).await.trim().parse().unwrap();
        let host_pids = std::fs::read_dir("/proc")
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().parse::<u32>().is_ok())
            .count();
        assert!(pids <= 4 && host_pids > pids as usize, "the sandbox sees {pids} processes, the host {host_pids}");
        assert_eq!(read_when_there(work.join("home")).await.trim(), work.display().to_string());
        assert_eq!(read_when_there(work.join("secret")).await.trim(), "only-mine");
        assert!(matches!(backend.status(&runtime).await.unwrap(), Observed::Running { .. }));
        let again = backend.create(&cx("op_create_retry"), &runtime, &ONE_GIB).await.unwrap();
        assert!(again.contains("already running"), "a retry keeps the live process: {again}");

        let stopped = backend.stop(&cx("op_stop"), &runtime, false, Duration::from_secs(5)).await.unwrap();
        assert!(stopped.contains("SIGTERM"), "{stopped}");
        // A stop returns once the sandbox's end is on record: stopped at once, not after a while.
        assert!(root.path().join("rt_ps/exit").exists(), "how it ended is recorded before the stop returns");
        assert_eq!(backend.status(&runtime).await.unwrap(), Observed::Stopped);
        backend.delete(&cx("op_delete"), &runtime).await.unwrap();
        assert_eq!(backend.status(&runtime).await.unwrap(), Observed::Missing);
    }

    #[tokio::test]
    async fn memory_beyond_the_limit_is_refused() {
        if !namespaces_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = SandboxBackend::new(root.path().to_path_buf()).unwrap();
        let grab = "python3 -c \"b = b'x' * (700 * 1024 * 1024); open('grabbed', 'w').write('yes')\"";
        let small = Resources { cpu: 1.0, memory_bytes: 256 << 20, replicas: 1 };
        let capped = sandbox("rt_small", grab);
        backend.create(&cx("op_small"), &capped, &small).await.unwrap();
        let observed = wait_status(&backend, &capped, |o| !matches!(o, Observed::Running { .. })).await;
        assert!(matches!(observed, Observed::Failed(_)), "{observed:?}");
        assert!(!root.path().join("rt_small/work/grabbed").exists(), "700 MiB fit under a 256 MiB limit");
        let roomy = sandbox("rt_big", grab);
        backend.create(&cx("op_big"), &roomy, &Resources { memory_bytes: 2 << 30, ..small }).await.unwrap();
        assert_eq!(read_when_there(root.path().join("rt_big/work/grabbed")).await, "yes");
    }

    #[tokio::test]
    async fn cpu_is_limited_by_the_sandboxes_cgroup() {
        if !namespaces_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = SandboxBackend::new(root.path().to_path_buf()).unwrap();
        let Some(cgroups) = backend.cgroups.clone() else {
            eprintln!("skipped: this host has neither cgroup v2 nor the cgroup v1 cpu and memory controllers");
            return;
        };
        let spin = "python3 -c \"import os, time\nt = time.time()\nwhile time.time() - t < 2: pass\nc = os.times()\nopen('cpu', 'w').write(str(c.user + c.system))\"";
        let runtime = sandbox("rt_spin", spin);
        let message = backend
            .create(&cx("op_spin"), &runtime, &Resources { cpu: 0.2, memory_bytes: 256 << 20, replicas: 1 })
            .await
            .unwrap();
        assert!(message.contains(cgroups.name()) && message.contains("cpu ≤ 0.2"), "{message}");
        let used: f64 = read_when_there(root.path().join("rt_spin/work/cpu")).await.parse().unwrap();
        assert!(used < 0.8, "2 s of spinning at 0.2 cpu used {used:.2} s of cpu");
        backend.delete(&cx("op_spin_delete"), &runtime).await.unwrap();
        assert!(cgroups.dirs("rt_spin").iter().all(|d| !d.exists()), "its cgroups are removed with it");
    }

    #[tokio::test]
    async fn egress_is_closed_unless_the_spec_opens_it() {
        if !namespaces_allowed() {
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let probe = format!(
            "python3 -c \"import socket\ntry:\n socket.create_connection(('127.0.0.1', {port}), timeout=2); r = 'connected'\nexcept OSError as e:\n r = 'refused'\nopen('egress', 'w').write(r)\""
        );
        let root = TestRoot::new();
        let backend = SandboxBackend::new(root.path().to_path_buf()).unwrap();
        backend.create(&cx("op_closed"), &sandbox("rt_closed", &probe), &ONE_GIB).await.unwrap();
        assert_eq!(read_when_there(root.path().join("rt_closed/work/egress")).await, "refused");
        let mut open = sandbox("rt_open", &probe);
        open.spec.networking = Some(NetworkingProfile { egress_policy: EgressPolicy::Open, ..Default::default() });
        backend.create(&cx("op_open"), &open, &ONE_GIB).await.unwrap();
        assert_eq!(read_when_there(root.path().join("rt_open/work/egress")).await, "connected");
    }

    #[tokio::test]
    async fn work_survives_snapshot_and_restore_and_agents_are_restarted() {
        if !namespaces_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = SandboxBackend::new(root.path().to_path_buf())
            .unwrap()
            .with_backoff(Duration::from_millis(50), Duration::from_millis(200));
        let runtime = sandbox("rt_files", "[ -e data ] || echo one > data; echo started >> starts; sleep 30");
        backend.create(&cx("op_create"), &runtime, &ONE_GIB).await.unwrap();
        let work = root.path().join("rt_files/work");
        assert_eq!(read_when_there(work.join("data")).await, "one\n");
        backend.snapshot(&cx("op_snap"), &runtime, "snap_1", "first").await.unwrap();
        std::fs::write(work.join("data"), "two\n").unwrap();
        std::fs::write(work.join("later"), "made after the snapshot").unwrap();
        backend.restore(&cx("op_restore"), &runtime, "snap_1").await.unwrap();
        assert_eq!(std::fs::read_to_string(work.join("data")).unwrap(), "one\n");
        assert!(!work.join("later").exists(), "a restore brings back the archive, not a merge");
        // The archive holds one start; the restored sandbox, started again, adds its own.
        eventually("the restored sandbox runs again", async || (lines(&work.join("starts")) == 2).then_some(())).await;
        assert_eq!(backend.list_snapshots(&runtime).await.unwrap(), ["snap_1"]);
        backend.delete(&cx("op_delete"), &runtime).await.unwrap();
        assert_eq!(backend.status(&runtime).await.unwrap(), Observed::Missing);

        let mut agent = sandbox("rt_agent", "echo run >> runs; exit 3");
        agent.runtime_type = RuntimeType::AgentRuntime;
        backend.create(&cx("op_agent"), &agent, &ONE_GIB).await.unwrap();
        let runs = root.path().join("rt_agent/work/runs");
        eventually("a failing agent is restarted twice", async || (lines(&runs) >= 3).then_some(())).await;
        backend.stop(&cx("op_agent_stop"), &agent, false, Duration::from_secs(2)).await.unwrap();
        let restarts: u64 =
            std::fs::read_to_string(root.path().join("rt_agent/restarts")).unwrap().trim().parse().unwrap();
        assert!(restarts >= 2, "{restarts}");
    }

    /// The processes of a sandbox still alive: none may be left once a delete returns.
    fn left_behind(backend: &SandboxBackend, root: &Path, id: &str) -> Vec<i32> {
        backend.remaining_processes(id, &root.join(id))
    }

    /// The race behind a flaky delete: a sandbox that was just (re)started writes to its
    /// directory (its log, its files, its watcher's record of how it ended) while the delete
    /// removes it. Repeated, because the window is small.
    #[tokio::test]
    async fn a_delete_right_after_a_restore_or_restart_leaves_nothing_behind() {
        if !namespaces_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = SandboxBackend::new(root.path().to_path_buf()).unwrap();
        let writer = "trap 'date >> ticks; exit' TERM; while :; do echo tick; date >> ticks; mkdir -p d/$$; done";
        for round in 0..8 {
            let id = format!("rt_race_{round}");
            let mut runtime = sandbox(&id, writer);
            if round % 2 == 1 {
                runtime.runtime_type = RuntimeType::AgentRuntime;
            }
            backend.create(&cx(&format!("op_c{round}")), &runtime, &ONE_GIB).await.unwrap();
            read_when_there(root.path().join(&id).join("work/ticks")).await;
            // Many files make a delete take long enough for a late writer to land in it.
            let many = root.path().join(&id).join("work/many");
            std::fs::create_dir_all(&many).unwrap();
            for file in 0..3000 {
                std::fs::write(many.join(file.to_string()), b"x").unwrap();
            }
            // It writes all the time: the snapshot is taken live, and says so.
            let archived = backend.snapshot(&cx(&format!("op_s{round}")), &runtime, "s", "").await.unwrap();
            assert!(archived.contains("archived while it ran"), "{archived}");
            if round % 4 < 2 {
                backend.restore(&cx(&format!("op_r{round}")), &runtime, "s").await.unwrap();
            } else {
                backend.restart(&cx(&format!("op_r{round}")), &runtime).await.unwrap();
            }
            let stopped = backend.stop(&cx(&format!("op_st{round}")), &runtime, false, Duration::from_secs(5)).await;
            assert!(root.path().join(&id).join("exit").exists(), "round {round}: {stopped:?}, its end not on record");
            backend.start(&cx(&format!("op_st{round}_again")), &runtime).await.unwrap();
            backend.delete(&cx(&format!("op_d{round}")), &runtime).await.unwrap();
            assert!(!root.path().join(&id).exists(), "round {round}: the directory is gone");
            assert_eq!(left_behind(&backend, root.path(), &id), Vec::<i32>::new(), "round {round}");
            assert_eq!(backend.status(&runtime).await.unwrap(), Observed::Missing);
        }
    }

    #[tokio::test]
    async fn an_agent_stopped_while_it_waits_to_be_restarted_stays_stopped() {
        if !namespaces_allowed() {
            return;
        }
        let root = TestRoot::new();
        let pause = Duration::from_millis(400);
        let backend = SandboxBackend::new(root.path().to_path_buf()).unwrap().with_backoff(pause, pause);
        let mut agent = sandbox("rt_pausing", "echo run >> runs; exit 3");
        agent.runtime_type = RuntimeType::AgentRuntime;
        backend.create(&cx("op_create"), &agent, &ONE_GIB).await.unwrap();
        let dir = root.path().join("rt_pausing");
        // It has failed and its supervisor waits out the pause before starting it again.
        eventually("the agent fails once", async || dir.join("restarts").exists().then_some(())).await;
        let message = backend.stop(&cx("op_stop"), &agent, false, Duration::from_secs(2)).await.unwrap();
        let runs = lines(&dir.join("work/runs"));
        // Three pauses: a supervisor that missed the stop would have started it again by now.
        tokio::time::sleep(pause * 3).await;
        assert_eq!(lines(&dir.join("work/runs")), runs, "stopped ({message}), yet started again");
        assert_eq!(backend.status(&agent).await.unwrap(), Observed::Stopped);
        backend.start(&cx("op_start"), &agent).await.unwrap();
        eventually("a start runs it again", async || (lines(&dir.join("work/runs")) > runs).then_some(())).await;
        backend.delete(&cx("op_delete"), &agent).await.unwrap();
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn a_clean_shutdown_ends_every_sandbox_of_the_node() {
        if !namespaces_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = SandboxBackend::new(root.path().to_path_buf()).unwrap();
        let quiet = sandbox("rt_quiet", "sleep 300");
        // Ignores SIGTERM: the shutdown must SIGKILL it after its grace period.
        let stubborn = sandbox("rt_stubborn", "trap '' TERM; echo up > up; while :; do sleep 1; done");
        for runtime in [&quiet, &stubborn] {
            backend.create(&cx(&format!("op_{}", runtime.id)), runtime, &ONE_GIB).await.unwrap();
        }
        read_when_there(root.path().join("rt_stubborn/work/up")).await;
        backend.shutdown().await;
        for runtime in [&quiet, &stubborn] {
            let left = eventually("the sandbox's processes end", async || {
                let left = left_behind(&backend, root.path(), &runtime.id);
                left.is_empty().then_some(left)
            })
            .await;
            assert_eq!(left, Vec::<i32>::new(), "{}", runtime.id);
            assert!(backend.alive(runtime).is_none(), "{} still runs", runtime.id);
        }
    }
}
