//! Agent sandboxes (driver `process`), for runtimes of type `sandbox` (isolated, usually
//! short-lived) and `agent_runtime` (a long-running agent, restarted with backoff when it
//! fails): OCI containers run by `crun`, one per runtime.
//!
//! A sandbox starts from an image ([`image`]) under a writable layer of its own ([`layer`]),
//! as an unprivileged user of the node's id range with few capabilities, a seccomp filter, its
//! own namespaces and cgroup limits ([`bundle`] says exactly what). The node's helper programs
//! (`crun`, `tini`, `mount`, ...) are found by absolute path when the node starts ([`Tools`]),
//! never through a sandbox's environment. Sandboxes need root on the node (to map their ids).
//!
//! Each sandbox has a directory `<sandbox-dir>/<runtime id>/` with its layer, `bundle/` (the
//! OCI configuration), `pid` (the `crun run` process: pid and start time, so a reused pid is not
//! mistaken for it), `exit` (how it ended), `stdout.log`, `stderr.log`,
//! `snapshots/<id>.tar` (its layer). start → `crun run` (idempotent: a live one is kept), stop
//! → SIGTERM to the sandbox (its `tini` passes it on), SIGKILL to all of it after the timeout,
//! restart = stop + start, scale → new cgroup limits, live, snapshot → a tar of its layer,
//! restore → its layer replaced by the archive (restarted if it ran).
//!
//! A stop is over only when nothing of the sandbox runs any more: its watcher (the task that
//! reaps it and, for an agent, restarts it) is told first, so it starts nothing new; then the
//! sandbox is signalled; then every process left in its cgroup or working below its directory
//! is killed and waited for; last, the watcher is waited for, so that its record of how the
//! process ended is written. Delete and restore touch the directory only after that.

mod bundle;
mod cgroups;
mod image;
mod layer;
mod shell;

pub use bundle::IdRange;
pub use image::DEFAULT_IMAGE;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runtimeai_model::{EgressPolicy, ExecRequest, Runtime, RuntimeType};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{BackendError, CallContext, CpuMeter, Observed, Resources, RuntimeBackend, Step, StepLedger};
use bundle::Launching;
use cgroups::Cgroups;
use image::ImageStore;
use layer::Layer;

/// How long a stop waits for SIGKILLed processes to be gone (and their watcher to record it)
/// before it reports a retryable error: only a process stuck in the kernel takes longer.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// How long a pause waits for the kernel to stop every process of the sandbox: a process in
/// an uninterruptible sleep (a slow disk, a hung NFS mount) delays its freeze.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// The host programs sandboxes need, by absolute path.
#[derive(Debug, Clone)]
pub struct Tools {
    pub crun: PathBuf,
    /// A statically linked `tini`: the sandbox's PID 1, whatever its image holds.
    pub init: PathBuf,
    /// A statically linked BusyBox: the default image.
    pub busybox: PathBuf,
    pub mount: PathBuf,
    pub mkfs_ext4: PathBuf,
    pub tar: PathBuf,
    /// Pulls images from registries.
    pub skopeo: PathBuf,
    /// Unpacks them.
    pub umoci: PathBuf,
    /// The node's Python and the loader's list of what a program links: the `python` image is
    /// made from them (absent: that image is refused).
    pub python3: Option<PathBuf>,
    pub ldd: Option<PathBuf>,
}

impl Tools {
    /// Finds each program in the system's directories (not through `PATH`).
    pub fn find() -> Result<Tools, String> {
        let find = |name: &str| -> Result<PathBuf, String> {
            ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .map(|dir| Path::new(dir).join(name))
                .find(|path| path.is_file())
                .ok_or_else(|| {
                    format!("{name} is not in /usr/bin, /usr/sbin, /bin or /sbin (deploy/setup-debian.sh installs it)")
                })
        };
        Ok(Tools {
            crun: find("crun")?,
            init: find("tini-static")?,
            busybox: find("busybox")?,
            mount: find("mount")?,
            mkfs_ext4: find("mkfs.ext4")?,
            tar: find("tar")?,
            skopeo: find("skopeo")?,
            umoci: find("umoci")?,
            python3: find("python3").ok(),
            ldd: find("ldd").ok(),
        })
    }
}

/// Why this node cannot run sandboxes, if it cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("sandboxes need the node to run as root (to map their users to the node's id range)".into());
    }
    if let Err(missing) = Tools::find() {
        return Some(missing);
    }
    let unified = std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers").unwrap_or_default();
    if !unified.trim().is_empty() {
        return Some(format!(
            "crun cannot use this host's cgroups: the unified hierarchy holds controllers ({}) beside cgroup v1's; \
             deploy/setup-debian.sh moves them to v1",
            unified.trim()
        ));
    }
    None
}

/// Why the sandboxes' users (host uids from `ids.base`, neither owner nor group of the node's
/// directories) could not reach `dir`: crun makes each sandbox's root private as the sandbox's
/// own root, so every directory on the way must let others pass (`o+x`), as a home directory
/// made `0700` does not. `None` when they can.
pub fn unreachable(dir: &Path, ids: IdRange) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let existing = dir.ancestors().find(|d| d.exists())?;
    let existing = existing.canonicalize().ok()?;
    let closed = existing.ancestors().find_map(|d| {
        let meta = std::fs::metadata(d).ok()?;
        (meta.mode() & 0o001 == 0 && meta.uid() != ids.base).then_some((d.to_path_buf(), meta.mode() & 0o7777))
    })?;
    let (blocking, mode) = closed;
    Some(format!(
        "the sandboxes' users (host uid {} and up) cannot reach {}: {} is mode {mode:o}, which others may not pass \
         through; `chmod o+x {}`, or choose a --sandbox-dir they can reach",
        ids.base,
        dir.display(),
        blocking.display(),
        blocking.display()
    ))
}

#[derive(Debug, Clone)]
pub struct SandboxBackend {
    root: PathBuf,
    ledger: StepLedger,
    /// Where its sandboxes' cgroups are, below each hierarchy's root ([`cgroups::group_of`]).
    group: String,
    cgroups: Option<Cgroups>,
    tools: Arc<Tools>,
    images: Arc<ImageStore>,
    ids: IdRange,
    /// Pauses between restarts of a failing agent: doubling from `backoff_min` to `backoff_max`.
    backoff_min: Duration,
    backoff_max: Duration,
    watchers: Watchers,
    /// Each sandbox's CPU time at its last status look: what its use is measured from.
    cpu: CpuMeter,
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

impl SandboxBackend {
    /// A backend keeping its sandboxes in `root`, their users mapped to `ids`; an error says
    /// why this node cannot run sandboxes ([`unavailable`]).
    pub fn new(root: PathBuf, ids: IdRange, insecure_registries: Vec<String>) -> std::io::Result<SandboxBackend> {
        if let Some(why) = unavailable() {
            return Err(std::io::Error::other(why));
        }
        let tools = Tools::find().map_err(std::io::Error::other)?;
        std::fs::create_dir_all(&root)?;
        if let Some(why) = unreachable(&root, ids) {
            return Err(std::io::Error::other(why));
        }
        let ledger = StepLedger::open(root.join(".ledger"))?;
        let group = cgroups::group_of(&root);
        Ok(SandboxBackend {
            images: Arc::new(ImageStore::new(root.join(".images"), ids, insecure_registries)),
            root,
            ledger,
            cgroups: Cgroups::detect(group.clone()),
            group,
            tools: Arc::new(tools),
            ids,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            watchers: Watchers::default(),
            cpu: CpuMeter::default(),
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

    /// The marker a pause leaves: a frozen cgroup alone does not say paused, since crun also
    /// freezes a container's group for a moment while it kills or deletes it.
    fn pause_marker(&self, id: &str) -> PathBuf {
        self.root.join(id).join("paused")
    }

    /// Runs one fenced, remembered step.
    async fn step<F, Fut>(&self, cx: &CallContext, work: F) -> Result<String, BackendError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<String, BackendError>>,
    {
        // The work is async (it waits on processes): the step is on record as done only once
        // it has happened, so a step cut off by a crash is done again (each converges).
        match self.ledger.begin(cx)? {
            Step::AlreadyApplied => Ok("already applied (a retry converges)".to_string()),
            Step::Fresh => {
                let done = work().await?;
                self.ledger.finish(cx)?;
                Ok(done)
            }
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
    async fn spawn(&self, runtime: &Runtime, resources: &Resources) -> Result<String, BackendError> {
        if self.alive(runtime).is_some() {
            return Ok("already running".to_string());
        }
        // Pulling an image blocks (and may take a while): not on the runtime's threads.
        let (images, tools, reference) = (self.images.clone(), self.tools.clone(), runtime.spec.image.clone());
        let image = tokio::task::spawn_blocking(move || images.rootfs(&tools, reference.as_deref()))
            .await
            .map_err(|e| BackendError::Retryable(format!("the image pull failed: {e}")))??;
        let dir = self.dir(runtime);
        std::fs::create_dir_all(&dir)?;
        let _ = std::fs::remove_file(dir.join("exit"));
        let _ = std::fs::remove_file(dir.join("stopping"));
        let _ = std::fs::remove_file(self.pause_marker(&runtime.id));
        let launch = self.launch(runtime, &dir, resources, &image)?;
        let isolated = launch.network_isolated;
        std::fs::write(dir.join("pid"), serde_json::to_vec(&launch).unwrap_or_default())?;
        self.until_created(&runtime.id, &launch).await;
        let (stop, stopped) = watch::channel(false);
        let task = if runtime.runtime_type == RuntimeType::AgentRuntime {
            let supervisor = Supervisor {
                backend: self.clone(),
                image: image.clone(),
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
        let cgroups = self.cgroups.as_ref().map_or("cgroups", Cgroups::name);
        let limits = format!(
            "memory ≤ {} MiB, cpu ≤ {}, ≤ {} processes by {cgroups}",
            launch.memory_bytes >> 20,
            launch.cpu,
            bundle::PIDS_MAX
        );
        let user = format!("root mapped to host uid {}", self.ids.base);
        Ok(format!("sandbox started (crun pid {}; {user}, own namespaces, {egress}, {limits})", launch.pid))
    }

    /// Waits (a few seconds at most) until `crun run` has made the container (its state is on
    /// disk) or has ended: a start that succeeded means a sandbox that takes commands.
    async fn until_created(&self, id: &str, launch: &Launch) {
        let state = self.root.join(".crun").join(id).join("status");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !state.exists() && start_ticks(launch.pid) == Some(launch.start_ticks) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the sandbox: SIGTERM to it, SIGKILL to all of it after `timeout`; returns once
    /// nothing of it runs and its watcher has recorded how it ended (see the module's doc).
    async fn terminate(&self, runtime: &Runtime, timeout: Duration) -> Result<String, BackendError> {
        let dir = self.dir(runtime);
        let watcher = self.watchers.stop(&runtime.id);
        if dir.exists() {
            // Also when it is not running: an agent waiting to be restarted stays stopped.
            std::fs::write(dir.join("stopping"), b"")?;
        }
        let outcome = match self.alive(runtime) {
            Some(launch) => self.end_container(&runtime.id, &launch, timeout).await,
            None => "not running".to_string(),
        };
        self.end_remaining(&runtime.id, &dir).await?;
        self.crun(&["delete", "--force", &runtime.id]).await;
        if let Some(watcher) = watcher {
            tokio::time::timeout(KILL_WAIT, watcher.task)
                .await
                .map_err(|_| BackendError::Retryable("the sandbox's watcher did not see its process end".to_string()))?
                .map_err(|e| BackendError::Retryable(format!("the sandbox's watcher failed: {e}")))?;
        }
        Ok(outcome)
    }

    /// `crun` on this backend's containers (their state in `<sandbox-dir>/.crun`), with an
    /// empty environment.
    fn crun_command(&self) -> std::process::Command {
        let mut crun = std::process::Command::new(&self.tools.crun);
        crun.arg("--root").arg(self.root.join(".crun")).env_clear();
        crun
    }

    /// Runs `crun` on this backend's containers; what it says is logged, not returned (a
    /// container already gone is what a retried stop expects).
    async fn crun(&self, args: &[&str]) {
        let output = tokio::process::Command::from(self.crun_command()).args(args).output().await;
        match output {
            Ok(output) if output.status.success() => {}
            Ok(output) => tracing::debug!(?args, stderr = %String::from_utf8_lossy(&output.stderr).trim(), "crun"),
            Err(e) => tracing::warn!(?args, error = %e, "cannot run crun"),
        }
    }

    /// Runs `crun` on a container and says why when it fails.
    async fn crun_checked(&self, args: &[&str]) -> Result<(), BackendError> {
        let output = tokio::process::Command::from(self.crun_command())
            .args(args)
            .output()
            .await
            .map_err(|e| BackendError::Retryable(format!("cannot run crun: {e}")))?;
        if output.status.success() {
            return Ok(());
        }
        let why = String::from_utf8_lossy(&output.stderr).trim().to_string();
        Err(BackendError::Retryable(format!("crun {}: {why}", args.join(" "))))
    }

    /// The vCPUs the sandbox used since the previous look (its cgroup's CPU time over the time
    /// between); none at the first look, or without cgroups.
    fn cpu_in_use(&self, id: &str) -> Option<f64> {
        self.cpu.look(id, self.cgroups.as_ref()?.cpu_usage_ns(id)?)
    }

    /// Waits until the freeze asked for has stopped every process of the sandbox: a pause
    /// reports done only when nothing of it runs (a retry then finds it frozen).
    async fn until_fully_frozen(&self, id: &str) -> Result<(), BackendError> {
        let Some(cgroups) = &self.cgroups else { return Ok(()) };
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        while cgroups.fully_frozen(id) == Some(false) {
            if Instant::now() > deadline {
                return Err(BackendError::Retryable(format!(
                    "the sandbox's processes were not all frozen {FREEZE_TIMEOUT:?} after the pause"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Whether the sandbox's processes are frozen.
    fn frozen(&self, id: &str) -> bool {
        self.cgroups.as_ref().and_then(|c| c.frozen(id)).unwrap_or(false)
    }

    /// SIGTERM to the sandbox's init (which passes it on), SIGKILL to every process of it if
    /// `launch` has not ended after `timeout`; returns once it has, saying how.
    async fn end_container(&self, id: &str, launch: &Launch, timeout: Duration) -> String {
        let ended = || start_ticks(launch.pid) != Some(launch.start_ticks);
        // A frozen sandbox would hear its SIGTERM only once thawed.
        if self.frozen(id) {
            self.crun(&["resume", id]).await;
        }
        let _ = std::fs::remove_file(self.pause_marker(id));
        self.crun(&["kill", id, "TERM"]).await;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ended() {
                return format!("pid {} ended on SIGTERM", launch.pid);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.crun(&["kill", "--all", id, "KILL"]).await;
        // `crun run` itself, should the container be gone already.
        let _ = kill(Pid::from_raw(launch.pid), Signal::SIGKILL);
        let deadline = Instant::now() + KILL_WAIT;
        while !ended() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        format!("pid {} killed after {}s without ending on SIGTERM", launch.pid, timeout.as_secs())
    }

    /// Archives the sandbox's layer to `archive`; a running sandbox is archived live, and the
    /// answer says so (a file it writes meanwhile may be archived half-written).
    async fn archive_layer(&self, runtime: &Runtime, archive: &Path) -> Result<&'static str, BackendError> {
        // A paused sandbox writes nothing: its archive is consistent.
        let running = self.alive(runtime).is_some() && !self.frozen(&runtime.id);
        let layer = Layer::of(&self.dir(runtime));
        layer.mount_layer(&self.tools, self.ids)?;
        let upper = layer.upper();
        let args = ["--numeric-owner", "-cf"].map(std::ffi::OsStr::new);
        let args = [&args[..], &[archive.as_os_str(), "-C".as_ref(), upper.as_os_str(), ".".as_ref()]].concat();
        tar(&self.tools.tar, &args, running).await?;
        Ok(if running { " (archived while it ran: a file written meanwhile may be torn)" } else { "" })
    }

    /// Replaces what the sandbox wrote with the contents of `archive` (a tar of a layer); the
    /// sandbox does not run.
    async fn load_layer(&self, dir: &Path, archive: &Path) -> Result<(), BackendError> {
        let layer = Layer::of(dir);
        layer.unmount()?;
        layer.mount_layer(&self.tools, self.ids)?;
        let upper = layer.clear(self.ids)?;
        let args = ["--numeric-owner", "-xf"].map(std::ffi::OsStr::new);
        let args = [&args[..], &[archive.as_os_str(), "-C".as_ref(), upper.as_os_str()]].concat();
        tar(&self.tools.tar, &args, false).await
    }

    /// Ends the sandbox and removes everything of it from this node.
    async fn remove(&self, runtime: &Runtime) -> Result<(), BackendError> {
        self.terminate(runtime, Duration::from_secs(10)).await?;
        let dir = self.dir(runtime);
        Layer::of(&dir).unmount()?;
        if dir.exists() {
            tokio::fs::remove_dir_all(&dir).await?;
        }
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove(&runtime.id);
        }
        self.cpu.forget(&runtime.id);
        Ok(())
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

impl SandboxBackend {
    /// Mounts the sandbox's root, writes its OCI configuration and runs it with `crun run`, in
    /// a session of its own, its output appended to its logs.
    fn launch(
        &self,
        runtime: &Runtime,
        dir: &Path,
        resources: &Resources,
        image: &Path,
    ) -> Result<Launch, BackendError> {
        let rootfs = Layer::of(dir).mount(&self.tools, image, self.ids)?;
        let open_egress = runtime.spec.networking.as_ref().is_some_and(|n| n.egress_policy == EgressPolicy::Open);
        let (cpu, memory_bytes) = (resources.cpu.max(0.01), resources.memory_bytes.max(64 << 20));
        let cgroups_path = format!("/{}/{}", self.group, runtime.id);
        let config = bundle::config(&Launching {
            id: &runtime.id,
            cgroups_path: &cgroups_path,
            command: runtime.spec.command.as_deref(),
            env: runtime.spec.env.as_ref(),
            open_egress,
            cpu,
            memory_bytes,
            rootfs: &rootfs,
            init: &self.tools.init,
            ids: self.ids,
        });
        let bundle = dir.join("bundle");
        std::fs::create_dir_all(&bundle)?;
        std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config).unwrap_or_default())?;
        // A container of this id that a crash left behind would refuse the new one.
        let _ = self.crun_command().args(["delete", "--force", &runtime.id]).output();
        let mut crun = self.crun_command();
        crun.arg("run").arg("--bundle").arg(&bundle).arg(&runtime.id);
        crun.stdin(Stdio::null())
            .stdout(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stdout.log"))?)
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stderr.log"))?);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            crun.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
        }
        let child = crun.spawn().map_err(|e| BackendError::Permanent(format!("cannot start crun: {e}")))?;
        // A task reaps the child by its pid (`reap`); the handle itself is not needed.
        let pid = child.id() as i32;
        drop(child);
        // Our child is not reaped before `reap` waits for it: its entry is there even if it has
        // already ended (a command that exits at once has still started).
        let start_ticks = process_stat(pid)
            .ok_or_else(|| BackendError::Retryable(format!("pid {pid} of the sandbox vanished before it was reaped")))?
            .start_ticks;
        Ok(Launch { pid, start_ticks, memory_bytes, cpu, network_isolated: !open_egress })
    }
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
    /// The image's root file system it was started from.
    image: PathBuf,
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
            match launch_again(&self.backend, &self.runtime, &dir, &self.resources, &self.image) {
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
    backend: &SandboxBackend,
    runtime: &Runtime,
    dir: &Path,
    resources: &Resources,
    image: &Path,
) -> Result<Launch, BackendError> {
    let launch = backend.launch(runtime, dir, resources, image)?;
    let _ = std::fs::remove_file(dir.join("exit"));
    std::fs::write(dir.join("pid"), serde_json::to_vec(&launch).unwrap_or_default())?;
    Ok(launch)
}

/// How much of each output a sandbox keeps: past it, the log moves to `<name>.1` (replacing the
/// one there) and starts again, so a chatty sandbox holds at most twice this per output.
const LOG_CAP_BYTES: u64 = 8 << 20;

/// Rotates a sandbox's logs that are past [`LOG_CAP_BYTES`] (on each status look: every few
/// seconds). Copy, then truncate: the sandbox appends to the same open file, from its new end.
fn rotate_logs(dir: &Path) {
    for name in ["stdout.log", "stderr.log"] {
        let log = dir.join(name);
        if std::fs::metadata(&log).is_ok_and(|m| m.len() > LOG_CAP_BYTES) {
            let rotated = dir.join(format!("{name}.1"));
            let copied = std::fs::copy(&log, &rotated);
            if let Err(e) = copied.and_then(|_| std::fs::OpenOptions::new().write(true).open(&log)?.set_len(0)) {
                tracing::warn!(log = %log.display(), error = %e, "cannot rotate a sandbox's log");
            }
        }
    }
}

/// Runs `tar` with `args`, as a permanent error when it fails. With `files_may_change`, its
/// exit status 1 (GNU tar: a file changed while it was read; the archive is complete) is not
/// a failure.
async fn tar(program: &Path, args: &[&std::ffi::OsStr], files_may_change: bool) -> Result<(), BackendError> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
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
        super::SANDBOX
    }

    async fn create(&self, cx: &CallContext, runtime: &Runtime, resources: &Resources) -> Result<String, BackendError> {
        self.step(cx, || self.spawn(runtime, resources)).await
    }

    async fn delete(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.step(cx, || async {
            self.remove(runtime).await?;
            Ok("sandbox removed".to_string())
        })
        .await
    }

    async fn start(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        let resources = self.last_resources(runtime);
        self.step(cx, || self.spawn(runtime, &resources)).await
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
            let started = self.spawn(runtime, &resources).await?;
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
            let how = self.archive_layer(runtime, &archive).await?;
            Ok(format!("its layer archived as {snapshot_id}{how}"))
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
            self.load_layer(&dir, &archive).await?;
            if was_running {
                self.spawn(runtime, &resources).await?;
                return Ok(format!("its layer restored from {snapshot_id}; restarted"));
            }
            Ok(format!("its layer restored from {snapshot_id}"))
        })
        .await
    }

    async fn export(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        timeout: Duration,
        into: &Path,
    ) -> Result<String, BackendError> {
        // Fenced like any call, but done again when asked again (a transfer cut off asks
        // for the export anew), so not skipped once on record.
        self.ledger.begin(cx)?;
        let stopped = self.terminate(runtime, timeout).await?;
        let dir = self.dir(runtime);
        let parts = into.with_extension("parts");
        if parts.exists() {
            std::fs::remove_dir_all(&parts)?;
        }
        std::fs::create_dir_all(&parts)?;
        // Stopped: the archive is consistent.
        self.archive_layer(runtime, &parts.join("layer.tar")).await?;
        let mut args: Vec<&std::ffi::OsStr> = vec!["-cf".as_ref(), into.as_os_str()];
        args.extend(["-C".as_ref(), parts.as_os_str(), "layer.tar".as_ref()]);
        let snapshots = self.list_snapshots(runtime).await?;
        if !snapshots.is_empty() {
            args.extend(["-C".as_ref(), dir.as_os_str(), "snapshots".as_ref()]);
        }
        let packed = tar(&self.tools.tar, &args, false).await;
        std::fs::remove_dir_all(&parts)?;
        packed?;
        Ok(format!("{stopped}; its layer and {} snapshots packed", snapshots.len()))
    }

    async fn import(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        resources: &Resources,
        from: Option<&Path>,
        run: bool,
    ) -> Result<String, BackendError> {
        self.step(cx, || async {
            // What an attempt cut off, or an earlier stay on this node, left is replaced.
            self.remove(runtime).await?;
            let dir = self.dir(runtime);
            std::fs::create_dir_all(&dir)?;
            let mut done = "made afresh from its spec".to_string();
            if let Some(from) = from {
                let parts = dir.join("imported");
                std::fs::create_dir_all(&parts)?;
                let args = ["--numeric-owner", "-xf"].map(std::ffi::OsStr::new);
                tar(
                    &self.tools.tar,
                    &[&args[..], &[from.as_os_str(), "-C".as_ref(), parts.as_os_str()]].concat(),
                    false,
                )
                .await?;
                self.load_layer(&dir, &parts.join("layer.tar")).await?;
                if parts.join("snapshots").exists() {
                    std::fs::rename(parts.join("snapshots"), dir.join("snapshots"))?;
                }
                std::fs::remove_dir_all(&parts)?;
                done = "its layer and snapshots unpacked".to_string();
            }
            if run {
                let started = self.spawn(runtime, resources).await?;
                return Ok(format!("{done}; {started}"));
            }
            Ok(done)
        })
        .await
    }

    async fn held(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        entries
            .flatten()
            .filter(|entry| entry.path().is_dir())
            .filter_map(|entry| entry.file_name().to_str().map(String::from))
            .filter(|name| !name.starts_with('.'))
            .collect()
    }

    async fn run_command(
        &self,
        cx: &CallContext,
        runtime: &Runtime,
        request: &ExecRequest,
    ) -> Result<String, BackendError> {
        // At most once: a command a crash cut off may have done its part; it is not run again.
        if self.ledger.begin_at_most_once(cx)? == Step::AlreadyApplied {
            return Ok("already run, or cut off by a crash (a command runs at most once)".to_string());
        }
        let outcome = self.run_to_end(runtime, request.clone()).await;
        self.ledger.finish(cx)?;
        outcome.map_err(BackendError::Permanent)
    }

    async fn pause(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.step(cx, || async {
            if self.alive(runtime).is_none() {
                return Err(BackendError::Permanent("the sandbox does not run: nothing to pause".into()));
            }
            if !self.frozen(&runtime.id) {
                self.crun_checked(&["pause", &runtime.id]).await?;
            }
            self.until_fully_frozen(&runtime.id).await?;
            std::fs::write(self.pause_marker(&runtime.id), b"")?;
            Ok("its processes frozen, their memory kept".to_string())
        })
        .await
    }

    async fn resume(&self, cx: &CallContext, runtime: &Runtime) -> Result<String, BackendError> {
        self.step(cx, || async {
            if self.alive(runtime).is_none() {
                return Err(BackendError::Permanent("the sandbox ended while it was paused".into()));
            }
            if self.frozen(&runtime.id) {
                self.crun_checked(&["resume", &runtime.id]).await?;
            }
            let _ = std::fs::remove_file(self.pause_marker(&runtime.id));
            Ok("its processes thawed".to_string())
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
    /// `KillMode=control-group` would), SIGTERM then SIGKILL after two seconds, and unmounts
    /// their roots. After a SIGKILL of the node they keep running and the restarted node finds
    /// them by their pid files.
    async fn shutdown(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        let mut ended = 0;
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("pid")) else { continue };
            let Ok(launch) = serde_json::from_str::<Launch>(&text) else { continue };
            if start_ticks(launch.pid) != Some(launch.start_ticks) {
                continue;
            }
            let id = entry.file_name().to_string_lossy().into_owned();
            self.end_container(&id, &launch, Duration::from_secs(2)).await;
            self.crun(&["delete", "--force", &id]).await;
            ended += 1;
        }
        kill_strays(&self.root);
        // Nothing of this node's sandboxes is left mounted: a restart mounts what it starts.
        for entry in std::fs::read_dir(&self.root).into_iter().flatten().flatten() {
            if let Err(e) = Layer::of(&entry.path()).unmount() {
                tracing::warn!(sandbox = %entry.path().display(), error = %e, "cannot unmount a sandbox's root");
            }
        }
        if ended > 0 {
            tracing::info!(sandboxes = ended, "ended this node's sandboxes on shutdown");
        }
    }

    async fn status(&self, runtime: &Runtime) -> Result<Observed, BackendError> {
        let dir = self.dir(runtime);
        if !dir.exists() {
            return Ok(Observed::Missing);
        }
        rotate_logs(&dir);
        if let Some(launch) = self.alive(runtime) {
            if self.frozen(&runtime.id) && self.pause_marker(&runtime.id).exists() {
                return Ok(Observed::Paused);
            }
            let (cpu, disk_bytes) = (self.cpu_in_use(&runtime.id), Layer::of(&dir).used_bytes());
            if let Some(used) = self.cgroups.as_ref().and_then(|c| c.memory_usage(&runtime.id)) {
                return Ok(Observed::Running { cpu, disk_bytes, memory_bytes: used, latency_ms: None });
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
            return Ok(Observed::Running { cpu, disk_bytes, memory_bytes: rss_kib * 1024, latency_ms: None });
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

    /// Whether this node can run sandboxes (root, crun and the rest, usable cgroups); the tests
    /// say so when it cannot, and fail instead where `RUNTIMEAI_REQUIRE_SANDBOXES` is set (CI).
    fn sandboxes_allowed() -> bool {
        let Some(why) = unavailable() else { return true };
        assert!(std::env::var_os("RUNTIMEAI_REQUIRE_SANDBOXES").is_none(), "sandboxes are required here: {why}");
        eprintln!("skipped: {why}");
        false
    }

    #[test]
    fn a_sandbox_dir_its_users_cannot_reach_is_named_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("data/node-1.sandboxes");
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let why = unreachable(&dir, IdRange::default()).expect("a 0700 directory on the way");
        assert!(why.contains(&format!("{} is mode 700", home.path().display())), "{why}");
        assert!(why.contains("chmod o+x"), "{why}");
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(unreachable(&dir, IdRange::default()), None);
        if nix::unistd::geteuid().is_root() && unavailable().is_none() {
            std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
            let refused = SandboxBackend::new(dir, IdRange::default(), vec![]).unwrap_err();
            assert!(refused.to_string().contains("chmod o+x"), "{refused}");
        }
    }

    fn backend_in(root: &TestRoot) -> SandboxBackend {
        SandboxBackend::new(root.path().to_path_buf(), IdRange::default(), vec![]).unwrap()
    }

    /// The sandbox's working directory, as the host sees it (in its layer).
    fn work(root: &TestRoot, id: &str) -> PathBuf {
        root.path().join(id).join("layer/upper/work")
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

    /// Ends whatever of the test's sandboxes still runs and unmounts their roots, so that the
    /// directory can go.
    impl Drop for TestRoot {
        fn drop(&mut self) {
            let Ok(tools) = Tools::find() else { return };
            let Ok(entries) = std::fs::read_dir(self.0.path()) else { return };
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                let state = self.0.path().join(".crun");
                let crun = |args: &[&str]| {
                    let _ = std::process::Command::new(&tools.crun).arg("--root").arg(&state).args(args).output();
                };
                crun(&["kill", "--all", &id, "KILL"]);
                crun(&["delete", "--force", &id]);
                let _ = Layer::of(&entry.path()).unmount();
            }
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

    /// The count a sandbox's counting loop has written to `count` in its work directory.
    fn count(root: &TestRoot, id: &str) -> u64 {
        std::fs::read_to_string(work(root, id).join("count")).unwrap_or_default().trim().parse().unwrap_or(0)
    }

    #[tokio::test]
    async fn an_approved_command_runs_once_even_when_a_crash_cut_it_off() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let runtime = sandbox("rt_once", "sleep 600");
        backend.create(&cx("op_create"), &runtime, &ONE_GIB).await.unwrap();
        let append = |line: &str| ExecRequest {
            command: vec!["sh".into(), "-c".into(), format!("echo {line} >> /work/ran; echo {line}")],
            ..Default::default()
        };
        let said = backend.run_command(&cx("op_exec"), &runtime, &append("first")).await.unwrap();
        assert!(said.starts_with("exit code 0") && said.contains("--- stdout ---\nfirst\n"), "{said}");
        let again = backend.run_command(&cx("op_exec"), &runtime, &append("first")).await.unwrap();
        assert!(again.contains("at most once"), "a retried step: {again}");
        // Begun by an executor that died before it finished: not run again by the next.
        backend.ledger.begin_at_most_once(&cx("op_cut")).unwrap();
        backend.run_command(&cx("op_cut"), &runtime, &append("second")).await.unwrap();
        assert_eq!(std::fs::read_to_string(work(&root, "rt_once").join("ran")).unwrap(), "first\n");
        let exit = ExecRequest { command: vec!["sh".into(), "-c".into(), "exit 7".into()], ..Default::default() };
        let failed = backend.run_command(&cx("op_fail"), &runtime, &exit).await.unwrap_err();
        assert!(matches!(&failed, BackendError::Permanent(m) if m.starts_with("exit code 7")), "{failed}");
        backend.delete(&cx("op_delete"), &runtime).await.unwrap();
    }

    #[tokio::test]
    async fn an_export_carries_a_sandboxs_layer_and_snapshots_to_another_node() {
        if !sandboxes_allowed() {
            return;
        }
        let (here, there) = (TestRoot::new(), TestRoot::new());
        let (source, destination) = (backend_in(&here), backend_in(&there));
        assert_ne!(source.group, destination.group, "two nodes on one host never share cgroups");
        let runtime = sandbox("rt_move", "echo $$ > pid-seen; exec sleep 1000");
        source.create(&cx("op_create"), &runtime, &ONE_GIB).await.unwrap();
        read_when_there(work(&here, "rt_move").join("pid-seen")).await;
        std::fs::write(work(&here, "rt_move").join("kept"), "before the snapshot").unwrap();
        source.snapshot(&cx("op_snap"), &runtime, "snap_1", "s").await.unwrap();
        std::fs::write(work(&here, "rt_move").join("kept"), "after the snapshot").unwrap();

        let export = here.path().join("rt_move.export");
        let said = crate::backend::contract::export_fenced(&source, &runtime, &export, 7).await;
        assert!(said.contains("1 snapshots packed"), "exported stopped: consistent: {said}");

        let arriving = CallContext { operation_id: "op_move".into(), step: 0, token: 7 };
        destination.import(&arriving, &runtime, &ONE_GIB, Some(&export), true).await.unwrap();
        wait_status(&destination, &runtime, |o| matches!(o, Observed::Running { .. })).await;
        let kept = std::fs::read_to_string(work(&there, "rt_move").join("kept")).unwrap();
        assert_eq!(kept, "after the snapshot", "what it wrote came along");
        assert_eq!(destination.list_snapshots(&runtime).await.unwrap(), ["snap_1"]);
        destination.restore(&cx("op_restore"), &runtime, "snap_1").await.unwrap();
        let kept = std::fs::read_to_string(work(&there, "rt_move").join("kept")).unwrap();
        assert_eq!(kept, "before the snapshot", "and so did its snapshot");
        assert_eq!(source.held().await, ["rt_move"], "the source holds its copy until told otherwise");
        source.delete(&cx("op_left_behind"), &runtime).await.unwrap();
        assert!(source.held().await.is_empty());
        assert!(matches!(destination.status(&runtime).await.unwrap(), Observed::Running { .. }), "untouched");
        destination.delete(&cx("op_delete"), &runtime).await.unwrap();
    }

    #[tokio::test]
    async fn a_paused_sandbox_uses_no_cpu_and_resumes_where_it_was() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        // The count lives in the shell's memory: a restart would begin again from 1.
        let counter = sandbox("rt_pause", "i=0; while :; do i=$((i+1)); echo $i > count; sleep 0.02; done");
        backend.create(&cx("op_create"), &counter, &ONE_GIB).await.unwrap();
        let pid = backend.launched(&counter).unwrap().pid;
        eventually("it counts", async || (count(&root, "rt_pause") > 5).then_some(())).await;

        for attempt in ["op_pause", "op_pause_retry"] {
            backend.pause(&cx(attempt), &counter).await.unwrap();
        }
        assert_eq!(backend.status(&counter).await.unwrap(), Observed::Paused);
        // The kernel freezes a group asynchronously; the pause reports done only once it has.
        let cgroups = backend.cgroups.as_ref();
        assert_ne!(cgroups.and_then(|c| c.fully_frozen("rt_pause")), Some(false), "every process stopped");
        let frozen_at = count(&root, "rt_pause");
        let cpu_before = cgroups.and_then(|c| c.cpu_usage_ns("rt_pause"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(count(&root, "rt_pause"), frozen_at, "a paused sandbox does not run");
        let cpu_after = cgroups.and_then(|c| c.cpu_usage_ns("rt_pause"));
        assert_eq!(cpu_before, cpu_after, "nor uses any CPU");

        backend.resume(&cx("op_resume"), &counter).await.unwrap();
        eventually("it counts again", async || (count(&root, "rt_pause") > frozen_at).then_some(())).await;
        let resumed_at = count(&root, "rt_pause");
        assert!(resumed_at > frozen_at && resumed_at < frozen_at + 50, "on from {frozen_at}, not from 1: {resumed_at}");
        assert_eq!(backend.launched(&counter).unwrap().pid, pid, "the same process, its memory kept");

        backend.pause(&cx("op_pause_again"), &counter).await.unwrap();
        let started = Instant::now();
        backend.stop(&cx("op_stop"), &counter, false, Duration::from_secs(10)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "a paused sandbox stops at once: {:?}", started.elapsed());
        assert_eq!(backend.status(&counter).await.unwrap(), Observed::Stopped);
        let refused = backend.pause(&cx("op_pause_stopped"), &counter).await.unwrap_err();
        assert!(matches!(refused, BackendError::Permanent(_)), "{refused}");
        backend.delete(&cx("op_delete"), &counter).await.unwrap();
    }

    #[tokio::test]
    async fn a_sandbox_sees_only_itself_and_its_own_directory() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let mut runtime = sandbox(
            "rt_ps",
            "ls /proc | grep -c '^[0-9]' > pids; echo \"$HOME\" > home; echo \"$SECRET\" > secret; sleep 30",
        );
        runtime.spec.env = Some([("SECRET".to_string(), "only-mine".to_string())].into());
        let message = backend.create(&cx("op_create"), &runtime, &ONE_GIB).await.unwrap();
        assert!(message.contains("no network egress"), "{message}");
        let work = work(&root, "rt_ps");
        let pids: u32 = read_when_there(work.join("pids")).await.trim().parse().unwrap();
        let host_pids = std::fs::read_dir("/proc")
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().parse::<u32>().is_ok())
            .count();
        assert!(pids <= 4 && host_pids > pids as usize, "the sandbox sees {pids} processes, the host {host_pids}");
        assert_eq!(read_when_there(work.join("home")).await.trim(), "/work");
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

    /// The attacks a sandbox's code might try, each shown to fail from inside.
    #[tokio::test]
    async fn a_sandbox_cannot_reach_the_host_the_kernel_or_other_sandboxes() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        // What must stay out of reach: a file of the host and another sandbox's.
        let host_secret = root.path().join("host-secret");
        std::fs::write(&host_secret, "the host's").unwrap();
        let other = sandbox("rt_other", "echo theirs > mine; sleep 60");
        backend.create(&cx("op_other"), &other, &ONE_GIB).await.unwrap();
        read_when_there(work(&root, "rt_other").join("mine")).await;
        let attacks = [
            format!("cat {} > host_secret 2>&1", host_secret.display()),
            format!("cat {}/rt_other/layer/upper/work/mine > other_secret 2>&1", root.path().display()),
            "cat /etc/shadow > shadow 2>&1".to_string(),
            "id -u > uid".to_string(),
            "mount -t tmpfs none /tmp > mount 2>&1; echo $? >> mount".to_string(),
            "echo x > /tmp/m.ko; insmod /tmp/m.ko > module 2>&1; echo $? >> module".to_string(),
            "ping -c 1 -W 1 127.0.0.1 > raw 2>&1; echo $? >> raw".to_string(),
            "nsenter -t 1 -m true > nsenter 2>&1; echo $? >> nsenter".to_string(),
            "(for i in $(seq 1 1000); do sleep 60 & done) 2> forks; echo done > forked".to_string(),
            "dd if=/dev/zero of=big bs=1M count=1500 2> fill; echo $? > filled".to_string(),
        ];
        let runtime = sandbox("rt_attacker", &format!("{}; sleep 60", attacks.join("; ")));
        backend.create(&cx("op_attack"), &runtime, &ONE_GIB).await.unwrap();
        let work = work(&root, "rt_attacker");
        read_when_there(work.join("filled")).await;
        let read = |name: &str| std::fs::read_to_string(work.join(name)).unwrap_or_default();
        assert!(read("host_secret").contains("No such file"), "{}", read("host_secret"));
        assert!(read("other_secret").contains("No such file"), "{}", read("other_secret"));
        assert!(read("shadow").contains("No such file"), "{}", read("shadow"));
        assert_eq!(read("uid").trim(), "0", "root inside");
        // Outside, every process of it is an unprivileged user of the node's range.
        let cgroups = backend.cgroups.clone().unwrap();
        let pids = cgroups.processes("rt_attacker");
        assert!(!pids.is_empty());
        for pid in &pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let uid: u32 = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(uid >= IdRange::default().base, "pid {pid} runs as host uid {uid}");
        }
        // Each attack's output ends with its exit status: refused, for want of permission.
        for (attack, file) in [("mount", "mount"), ("insmod", "module"), ("nsenter", "nsenter"), ("ping", "raw")] {
            let output = read(file);
            let status = output.lines().last().unwrap_or_default();
            let refused = output.contains("not permitted") || output.contains("permission denied");
            assert!(status != "0" && !status.is_empty() && refused, "{attack}: {output}");
        }
        // A fork bomb stops at the pids limit, and the sandbox still answers.
        assert_eq!(read("forked"), "done\n");
        assert!(read("forks").contains("fork"), "{}", read("forks"));
        assert!(pids.len() as u64 <= bundle::PIDS_MAX, "{} processes", pids.len());
        // Filling its disk fills its layer only.
        assert_ne!(read("filled").trim(), "0", "{}", read("fill"));
        let big = std::fs::metadata(work.join("big")).map(|m| m.len()).unwrap_or(0);
        assert!(big < layer::LAYER_BYTES, "wrote {big} bytes");
        // Its status measures the full layer, and the other sandbox's nearly empty one.
        let Observed::Running { disk_bytes: Some(full), .. } = backend.status(&runtime).await.unwrap() else {
            panic!("a running sandbox's disk is measured")
        };
        assert!(full >= big && full <= layer::LAYER_BYTES, "{full} bytes in use, {big} written");
        let Observed::Running { disk_bytes: Some(other_used), .. } = backend.status(&other).await.unwrap() else {
            panic!("a running sandbox's disk is measured")
        };
        assert!(other_used < 64 << 20, "{other_used} bytes in use by a sandbox that wrote a line");
        // And it stops at once: tini passes SIGTERM on to the command.
        let started = Instant::now();
        let stopped = backend.stop(&cx("op_stop"), &other, false, Duration::from_secs(10)).await.unwrap();
        assert!(
            stopped.contains("SIGTERM") && started.elapsed() < Duration::from_secs(1),
            "{stopped} in {:?}",
            started.elapsed()
        );
    }

    /// A command run in a sandbox (`crun exec`) is held like the sandbox's own processes.
    #[tokio::test]
    async fn a_command_run_in_a_sandbox_is_held_as_the_sandbox_is() {
        use runtimeai_api::sandbox_io::{ExecOutput, ExecRequest, SandboxShell};
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let runtime = sandbox("rt_exec", "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status > held; sleep 60");
        backend.create(&cx("op_exec"), &runtime, &ONE_GIB).await.unwrap();
        let own = read_when_there(work(&root, "rt_exec").join("held")).await;
        let request = ExecRequest {
            command: vec![
                "grep".into(),
                "-E".into(),
                "^(CapEff|NoNewPrivs|Seccomp):".into(),
                "/proc/self/status".into(),
            ],
            env: Default::default(),
            working_dir: None,
            stdin: None,
            timeout_seconds: Some(10),
        };
        let mut output = backend.exec(&runtime, request).await.unwrap();
        let mut printed = String::new();
        let mut ended = None;
        while let Some(line) = output.recv().await {
            match line {
                ExecOutput::Stdout(text) => printed.push_str(&text),
                ExecOutput::Exit { exit_code, .. } => ended = Some(exit_code),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(ended, Some(Some(0)));
        assert_eq!(printed, own, "an exec's capabilities, no_new_privs and seccomp are the sandbox's");
        assert!(own.contains("NoNewPrivs:\t1") && own.contains("Seccomp:\t2"), "{own}");
        let stopped = sandbox("rt_not_running", "sleep 60");
        let refused = backend
            .exec(
                &stopped,
                ExecRequest { command: vec!["id".into()], ..serde_json::from_str("{\"command\":[\"id\"]}").unwrap() },
            )
            .await;
        assert!(refused.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_runs_python_in_the_python_image() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let program = "import json, os, sqlite3, hashlib, ssl, urllib.request; \
            db = sqlite3.connect(':memory:'); db.execute('create table t (x)'); db.execute('insert into t values (41)'); \
            (x,) = db.execute('select x + 1 from t').fetchone(); \
            open('out', 'w').write(json.dumps({'x': x, 'uid': os.getuid(), 'cwd': os.getcwd(), \
                'sha': hashlib.sha256(b'a').hexdigest()[:8]}))";
        let mut runtime = sandbox("rt_python", &format!("python3 -c \"{program}\"; sleep 60"));
        runtime.spec.image = Some(image::PYTHON_IMAGE.into());
        backend.create(&cx("op_python"), &runtime, &ONE_GIB).await.unwrap();
        let out = read_when_there(work(&root, "rt_python").join("out")).await;
        let out: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out, serde_json::json!({"x": 42, "uid": 0, "cwd": "/work", "sha": "ca978112"}));
    }

    /// Everything `logs` yields until it ends (or `within` passes: a followed log ends when the
    /// sandbox does).
    async fn read_logs(backend: &SandboxBackend, runtime: &Runtime, query: &str, within: Duration) -> String {
        use runtimeai_api::sandbox_io::SandboxShell;
        let request: runtimeai_api::sandbox_io::LogsRequest = serde_json::from_str(query).unwrap();
        let mut chunks = backend.logs(runtime, request).await.unwrap();
        let mut text = String::new();
        let deadline = Instant::now() + within;
        while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, chunks.recv()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    }

    #[tokio::test]
    async fn logs_are_tailed_followed_and_rotated_at_their_cap() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let script = "for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2; \
                      while [ ! -e go ]; do sleep 0.1; done; echo later; sleep 60";
        let runtime = sandbox("rt_logs", script);
        backend.create(&cx("op_logs"), &runtime, &ONE_GIB).await.unwrap();
        let out = root.path().join("rt_logs/stdout.log");
        eventually("it has printed", async || (lines(&out) == 5).then_some(())).await;
        let quick = Duration::from_secs(5);
        assert_eq!(read_logs(&backend, &runtime, "{}", quick).await, "line 1\nline 2\nline 3\nline 4\nline 5\n");
        assert_eq!(read_logs(&backend, &runtime, r#"{"tail": 2}"#, quick).await, "line 4\nline 5\n");
        assert_eq!(read_logs(&backend, &runtime, r#"{"stream": "stderr"}"#, quick).await, "oops\n");
        // Followed: what it writes next arrives while the answer is open.
        let follower = {
            let (backend, runtime) = (backend.clone(), runtime.clone());
            tokio::spawn(async move {
                read_logs(&backend, &runtime, r#"{"tail": 1, "follow": true}"#, Duration::from_secs(3)).await
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Through the sandbox (a file put into its layer from outside would not be seen).
        let go = serde_json::from_str(r#"{"command": ["touch", "/work/go"]}"#).unwrap();
        let mut touched = runtimeai_api::sandbox_io::SandboxShell::exec(&backend, &runtime, go).await.unwrap();
        while touched.recv().await.is_some() {}
        assert_eq!(follower.await.unwrap(), "line 5\nlater\n");
        // Past the cap the log is rotated: the newest output stays, the older moves to `.1`.
        let chatty = sandbox("rt_chatty", "head -c 9000000 /dev/zero | tr '\\0' x; echo; echo newest; sleep 60");
        backend.create(&cx("op_chatty"), &chatty, &ONE_GIB).await.unwrap();
        let log = root.path().join("rt_chatty/stdout.log");
        eventually("it has printed 9 MB", async || (lines(&log) == 2).then_some(())).await;
        backend.status(&chatty).await.unwrap();
        let kept = std::fs::metadata(&log).unwrap().len();
        let rotated = std::fs::metadata(root.path().join("rt_chatty/stdout.log.1")).unwrap().len();
        assert!(kept < 1024 && rotated > LOG_CAP_BYTES, "kept {kept}, rotated {rotated}");
    }

    /// The node's helpers are found at start, by absolute path: a `PATH` in a sandbox's
    /// environment reaches only the sandbox.
    #[tokio::test]
    async fn a_path_in_the_spec_changes_nothing_outside_the_sandbox() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let decoys = root.path().join("decoys");
        std::fs::create_dir_all(&decoys).unwrap();
        let marker = root.path().join("decoy-ran");
        for helper in ["crun", "mount", "tar", "mkfs.ext4", "tini-static", "unshare"] {
            let script = decoys.join(helper);
            std::fs::write(&script, format!("#!/bin/sh\necho {helper} >> {}\n", marker.display())).unwrap();
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let mut runtime = sandbox("rt_path", "echo \"$PATH\" > path; sleep 60");
        runtime.spec.env = Some([("PATH".to_string(), format!("{}:/bin", decoys.display()))].into());
        backend.create(&cx("op_path"), &runtime, &ONE_GIB).await.unwrap();
        assert_eq!(
            read_when_there(work(&root, "rt_path").join("path")).await.trim(),
            format!("{}:/bin", decoys.display())
        );
        backend.snapshot(&cx("op_snap"), &runtime, "s", "").await.unwrap();
        backend.restart(&cx("op_restart"), &runtime).await.unwrap();
        backend.delete(&cx("op_delete"), &runtime).await.unwrap();
        assert!(!marker.exists(), "a decoy ran: {}", std::fs::read_to_string(&marker).unwrap_or_default());
    }

    /// A registry of our own (Debian's `docker-registry`) on a free port of loopback, killed
    /// when dropped.
    struct Registry {
        process: std::process::Child,
        address: String,
        _dir: tempfile::TempDir,
    }

    impl Registry {
        async fn start() -> Registry {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let address = format!("127.0.0.1:{port}");
            let config = dir.path().join("config.yml");
            let storage = dir.path().join("storage");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
                    storage.display()
                ),
            )
            .unwrap();
            let process = std::process::Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("docker-registry (deploy/setup-debian.sh installs it)");
            let registry = Registry { process, address, _dir: dir };
            eventually("the registry answers", async || {
                tokio::net::TcpStream::connect(&registry.address).await.ok().map(drop)
            })
            .await;
            registry
        }

        /// Pushes an image of BusyBox with `marker` at `/marker` as `<address>/tools:1`; returns
        /// the manifest's digest.
        fn push_tool_image(&self, marker: &str) -> String {
            let work = tempfile::tempdir().unwrap();
            let layout = work.path().join("layout");
            let bundle = work.path().join("bundle");
            let umoci = |args: &[&str]| {
                let status = std::process::Command::new("umoci").args(args).status().unwrap();
                assert!(status.success(), "umoci {args:?}");
            };
            let image = format!("{}:tools", layout.display());
            umoci(&["init", "--layout", &layout.display().to_string()]);
            umoci(&["new", "--image", &image]);
            umoci(&["unpack", "--image", &image, &bundle.display().to_string()]);
            let rootfs = bundle.join("rootfs");
            std::fs::create_dir_all(rootfs.join("bin")).unwrap();
            std::fs::copy("/usr/bin/busybox", rootfs.join("bin/busybox")).unwrap();
            for applet in ["sh", "cat", "sleep", "echo"] {
                std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
            }
            std::fs::write(rootfs.join("marker"), marker).unwrap();
            umoci(&["repack", "--image", &image, &bundle.display().to_string()]);
            let digest_file = work.path().join("digest");
            let status = std::process::Command::new("skopeo")
                .args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
                .arg(&digest_file)
                .arg(format!("oci:{image}"))
                .arg(format!("docker://{}/tools:1", self.address))
                .status()
                .unwrap();
            assert!(status.success(), "skopeo push");
            std::fs::read_to_string(digest_file).unwrap().trim().to_string()
        }
    }

    impl Drop for Registry {
        fn drop(&mut self) {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }

    #[tokio::test]
    async fn an_image_is_pulled_from_a_registry_by_tag_or_by_digest_and_checked() {
        if !sandboxes_allowed() {
            return;
        }
        let registry = Registry::start().await;
        let digest = registry.push_tool_image("from the registry");
        let root = TestRoot::new();
        let backend =
            SandboxBackend::new(root.path().to_path_buf(), IdRange::default(), vec![registry.address.clone()]).unwrap();
        let mut by_tag = sandbox("rt_tagged", "cat /marker > seen; sleep 60");
        by_tag.spec.image = Some(format!("{}/tools:1", registry.address));
        backend.create(&cx("op_tagged"), &by_tag, &ONE_GIB).await.unwrap();
        assert_eq!(read_when_there(work(&root, "rt_tagged").join("seen")).await, "from the registry");
        let mut by_digest = sandbox("rt_pinned", "cat /marker > seen; sleep 60");
        by_digest.spec.image = Some(format!("{}/tools@{digest}", registry.address));
        backend.create(&cx("op_pinned"), &by_digest, &ONE_GIB).await.unwrap();
        assert_eq!(read_when_there(work(&root, "rt_pinned").join("seen")).await, "from the registry");
        // A digest the registry's image does not have: refused, nothing started.
        let mut forged = sandbox("rt_forged", "sleep 60");
        let wrong = format!("sha256:{}", "0".repeat(64));
        forged.spec.image = Some(format!("{}/tools@{wrong}", registry.address));
        let refused = backend.create(&cx("op_forged"), &forged, &ONE_GIB).await.unwrap_err();
        assert!(matches!(refused, BackendError::Permanent(_)), "{refused}");
        // Without TLS only where the operator said so.
        let strict = SandboxBackend::new(root.path().join("strict"), IdRange::default(), vec![]).unwrap();
        let refused = strict.create(&cx("op_strict"), &sandbox_with_image("rt_strict", &by_tag), &ONE_GIB).await;
        assert!(refused.unwrap_err().to_string().contains("cannot pull"));
    }

    fn sandbox_with_image(id: &str, like: &Runtime) -> Runtime {
        let mut runtime = sandbox(id, "sleep 60");
        runtime.spec.image = like.spec.image.clone();
        runtime
    }

    #[tokio::test]
    async fn memory_beyond_the_limit_is_refused() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let grab = "dd if=/dev/zero of=/dev/null bs=700M count=1 && echo yes > grabbed";
        let small = Resources { cpu: 1.0, memory_bytes: 256 << 20, replicas: 1 };
        let capped = sandbox("rt_small", grab);
        backend.create(&cx("op_small"), &capped, &small).await.unwrap();
        let observed = wait_status(&backend, &capped, |o| !matches!(o, Observed::Running { .. })).await;
        assert!(matches!(observed, Observed::Failed(_)), "{observed:?}");
        assert!(!work(&root, "rt_small").join("grabbed").exists(), "700 MiB fit under a 256 MiB limit");
        let roomy = sandbox("rt_big", grab);
        backend.create(&cx("op_big"), &roomy, &Resources { memory_bytes: 2 << 30, ..small }).await.unwrap();
        assert_eq!(read_when_there(work(&root, "rt_big").join("grabbed")).await, "yes\n");
    }

    #[tokio::test]
    async fn cpu_is_limited_by_the_sandboxes_cgroup() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let cgroups = backend.cgroups.clone().expect("crun runs only where there are cgroups");
        let runtime = sandbox("rt_spin", "echo spinning > spinning; while :; do :; done");
        let message = backend
            .create(&cx("op_spin"), &runtime, &Resources { cpu: 0.2, memory_bytes: 256 << 20, replicas: 1 })
            .await
            .unwrap();
        assert!(message.contains(cgroups.name()) && message.contains("cpu ≤ 0.2"), "{message}");
        read_when_there(work(&root, "rt_spin").join("spinning")).await;
        let used = || cgroups.cpu_usage_ns("rt_spin").expect("the sandbox's cpu use");
        let (before, started) = (used(), Instant::now());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let spent = (used() - before) as f64 / 1e9 / started.elapsed().as_secs_f64();
        assert!(spent > 0.05 && spent < 0.4, "a spinning sandbox limited to 0.2 cpu used {spent:.2} cpu");
        // Its status measures the same: the CPU it used between two looks.
        backend.status(&runtime).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Observed::Running { cpu: Some(measured), .. } = backend.status(&runtime).await.unwrap() else {
            panic!("a running sandbox's cpu is measured")
        };
        assert!(measured > 0.05 && measured < 0.4, "measured {measured:.2} cpu");
        backend.delete(&cx("op_spin_delete"), &runtime).await.unwrap();
        assert!(cgroups.dirs("rt_spin").iter().all(|d| !d.exists()), "its cgroups are removed with it");
    }

    #[tokio::test]
    async fn egress_is_closed_unless_the_spec_opens_it() {
        if !sandboxes_allowed() {
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // `-e true`: once connected, nc runs `true` and ends.
        let probe = format!("if nc -w 2 127.0.0.1 {port} -e true; then echo connected; else echo refused; fi > egress");
        let root = TestRoot::new();
        let backend = backend_in(&root);
        backend.create(&cx("op_closed"), &sandbox("rt_closed", &probe), &ONE_GIB).await.unwrap();
        assert_eq!(read_when_there(work(&root, "rt_closed").join("egress")).await, "refused\n");
        let mut open = sandbox("rt_open", &probe);
        open.spec.networking = Some(NetworkingProfile { egress_policy: EgressPolicy::Open, ..Default::default() });
        backend.create(&cx("op_open"), &open, &ONE_GIB).await.unwrap();
        assert_eq!(read_when_there(work(&root, "rt_open").join("egress")).await, "connected\n");
    }

    #[tokio::test]
    async fn work_survives_snapshot_and_restore_and_agents_are_restarted() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root).with_backoff(Duration::from_millis(50), Duration::from_millis(200));
        let runtime = sandbox("rt_files", "[ -e data ] || echo one > data; echo started >> starts; sleep 30");
        backend.create(&cx("op_create"), &runtime, &ONE_GIB).await.unwrap();
        let work = work(&root, "rt_files");
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

        let mut agent = sandbox("rt_agent", "echo run; exit 3");
        agent.runtime_type = RuntimeType::AgentRuntime;
        backend.create(&cx("op_agent"), &agent, &ONE_GIB).await.unwrap();
        let runs = root.path().join("rt_agent/stdout.log");
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
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let writer = "trap 'date >> ticks; exit' TERM; while :; do echo tick; date >> ticks; mkdir -p d/$$; done";
        for round in 0..8 {
            let id = format!("rt_race_{round}");
            let mut runtime = sandbox(&id, writer);
            if round % 2 == 1 {
                runtime.runtime_type = RuntimeType::AgentRuntime;
            }
            backend.create(&cx(&format!("op_c{round}")), &runtime, &ONE_GIB).await.unwrap();
            read_when_there(work(&root, &id).join("ticks")).await;
            // Many files make a delete take long enough for a late writer to land in it.
            let many = root.path().join(&id).join("many");
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
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let pause = Duration::from_millis(400);
        let backend = backend_in(&root).with_backoff(pause, pause);
        let mut agent = sandbox("rt_pausing", "echo run; exit 3");
        agent.runtime_type = RuntimeType::AgentRuntime;
        backend.create(&cx("op_create"), &agent, &ONE_GIB).await.unwrap();
        let dir = root.path().join("rt_pausing");
        // It has failed and its supervisor waits out the pause before starting it again.
        eventually("the agent fails once", async || dir.join("restarts").exists().then_some(())).await;
        let message = backend.stop(&cx("op_stop"), &agent, false, Duration::from_secs(2)).await.unwrap();
        let runs = lines(&dir.join("stdout.log"));
        // Three pauses: a supervisor that missed the stop would have started it again by now.
        tokio::time::sleep(pause * 3).await;
        assert_eq!(lines(&dir.join("stdout.log")), runs, "stopped ({message}), yet started again");
        assert_eq!(backend.status(&agent).await.unwrap(), Observed::Stopped);
        backend.start(&cx("op_start"), &agent).await.unwrap();
        eventually("a start runs it again", async || (lines(&dir.join("stdout.log")) > runs).then_some(())).await;
        backend.delete(&cx("op_delete"), &agent).await.unwrap();
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn a_clean_shutdown_ends_every_sandbox_of_the_node() {
        if !sandboxes_allowed() {
            return;
        }
        let root = TestRoot::new();
        let backend = backend_in(&root);
        let quiet = sandbox("rt_quiet", "sleep 300");
        // Ignores SIGTERM: the shutdown must SIGKILL it after its grace period.
        let stubborn = sandbox("rt_stubborn", "trap '' TERM; echo up > up; while :; do sleep 1; done");
        for runtime in [&quiet, &stubborn] {
            backend.create(&cx(&format!("op_{}", runtime.id)), runtime, &ONE_GIB).await.unwrap();
        }
        read_when_there(work(&root, "rt_stubborn").join("up")).await;
        backend.shutdown().await;
        for runtime in [&quiet, &stubborn] {
            let left = eventually("the sandbox's processes end", async || {
                let left = left_behind(&backend, root.path(), &runtime.id);
                left.is_empty().then_some(left)
            })
            .await;
            assert_eq!(left, Vec::<i32>::new(), "{}", runtime.id);
            assert!(backend.alive(runtime).is_none(), "{} still runs", runtime.id);
            let dir = root.path().join(&runtime.id);
            for point in [dir.join("rootfs"), dir.join("layer")] {
                assert!(!layer::is_mount_point(&point), "{} is still mounted", point.display());
            }
        }
    }
}
