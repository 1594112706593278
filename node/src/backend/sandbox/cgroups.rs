//! The cgroups a sandbox runs in, where the OCI runtime puts it (`cgroupsPath`
//! `runtimeai/<group>/<runtime id>`, one group per sandbox directory, so that two nodes on one
//! host — a dev cluster, a migration between them — never touch each other's sandboxes):
//! cgroup v2 where the host has it, else cgroup v1's controllers.
//! The runtime creates and removes them; the backend reads them (memory in use, the processes
//! left) and changes their limits while the sandbox runs.

use std::path::{Path, PathBuf};

/// The cgroups sandboxes run in: cgroup v2 where the host has it, else cgroup v1's `memory`
/// and `cpu` controllers.
#[derive(Debug, Clone)]
pub(super) enum Cgroups {
    V2 { root: PathBuf },
    V1 { memory: PathBuf, cpu: PathBuf, group: String },
}

/// The group of the sandboxes kept in `sandbox_dir`: `runtimeai/` and a digest of the
/// directory's path. The OCI runtime is told to put sandbox `id` at `/<group>/<id>`
/// (`linux.cgroupsPath`), below each hierarchy's root, where [`Cgroups::dirs`] look.
pub(super) fn group_of(sandbox_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(sandbox_dir.as_os_str().as_encoded_bytes());
    let short = hex::encode(&digest[..4]);
    format!("runtimeai/{short}")
}

/// The CFS period the cpu quota is a share of, in microseconds.
pub(super) const CPU_PERIOD_US: u64 = 100_000;

impl Cgroups {
    /// The host's cgroups, for sandboxes of `group` ([`group_of`]).
    pub(super) fn detect(group: String) -> Option<Cgroups> {
        let fs = Path::new("/sys/fs/cgroup");
        if let Ok(controllers) = std::fs::read_to_string(fs.join("cgroup.controllers")) {
            if controllers.split_whitespace().any(|c| c == "memory")
                && controllers.split_whitespace().any(|c| c == "cpu")
            {
                return Some(Cgroups::V2 { root: fs.join(&group) });
            }
        }
        let (memory, cpu) = (fs.join("memory"), fs.join("cpu"));
        (memory.join("memory.limit_in_bytes").exists() && cpu.join("cpu.cfs_quota_us").exists()).then(|| Cgroups::V1 {
            memory: memory.join(&group),
            cpu: cpu.join(&group),
            group,
        })
    }

    /// A cgroup v1 controller's directory for sandbox `id`.
    fn v1(controller: &str, group: &str, id: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup").join(controller).join(group).join(id)
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Cgroups::V2 { .. } => "cgroup v2",
            Cgroups::V1 { .. } => "cgroup v1",
        }
    }

    pub(super) fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { root } => vec![root.join(id)],
            Cgroups::V1 { memory, cpu, .. } => vec![memory.join(id), cpu.join(id)],
        }
    }

    /// Sets the limits (also while the sandbox runs: cgroups apply them live).
    pub(super) fn set_limits(&self, id: &str, cpu: f64, memory_bytes: u64) -> std::io::Result<()> {
        let quota = ((cpu * CPU_PERIOD_US as f64) as u64).max(1_000);
        match self {
            Cgroups::V2 { root } => {
                std::fs::write(root.join(id).join("memory.max"), memory_bytes.to_string())?;
                // No swapping past the limit, where the host has swap accounting.
                let _ = std::fs::write(root.join(id).join("memory.swap.max"), "0");
                std::fs::write(root.join(id).join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))
            }
            Cgroups::V1 { memory, cpu: cpu_root, .. } => {
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

    /// CPU time the sandbox's processes have used, in nanoseconds.
    pub(super) fn cpu_usage_ns(&self, id: &str) -> Option<u64> {
        match self {
            Cgroups::V2 { root } => {
                let stat = std::fs::read_to_string(root.join(id).join("cpu.stat")).ok()?;
                let usec = stat.lines().find_map(|line| line.strip_prefix("usage_usec "))?;
                usec.trim().parse::<u64>().ok().map(|us| us * 1_000)
            }
            Cgroups::V1 { group, .. } => {
                let acct = Cgroups::v1("cpuacct", group, id).join("cpuacct.usage");
                std::fs::read_to_string(acct).ok()?.trim().parse().ok()
            }
        }
    }

    /// Memory in use by the sandbox's processes, as the cgroup counts it.
    pub(super) fn memory_usage(&self, id: &str) -> Option<u64> {
        let file = match self {
            Cgroups::V2 { root } => root.join(id).join("memory.current"),
            Cgroups::V1 { memory, .. } => memory.join(id).join("memory.usage_in_bytes"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Whether the sandbox's processes are frozen (paused), as the freezer says; `None` where
    /// the host has no freezer to ask.
    pub(super) fn frozen(&self, id: &str) -> Option<bool> {
        match self {
            Cgroups::V2 { root } => {
                let freeze = std::fs::read_to_string(root.join(id).join("cgroup.freeze")).ok()?;
                Some(freeze.trim() == "1")
            }
            Cgroups::V1 { group, .. } => {
                let state = Cgroups::v1("freezer", group, id).join("freezer.state");
                Some(std::fs::read_to_string(state).ok()?.trim() != "THAWED")
            }
        }
    }

    /// Whether the freeze asked for has taken hold: every process of the group stopped
    /// (cgroup v2's `frozen 1` in `cgroup.events`, v1's `FROZEN`). The kernel freezes a group
    /// asynchronously, so a freeze just asked for may still have processes running; `None`
    /// where the host has no freezer to ask.
    pub(super) fn fully_frozen(&self, id: &str) -> Option<bool> {
        match self {
            Cgroups::V2 { root } => {
                let events = std::fs::read_to_string(root.join(id).join("cgroup.events")).ok()?;
                Some(events.lines().any(|line| line.trim() == "frozen 1"))
            }
            Cgroups::V1 { group, .. } => {
                let state = Cgroups::v1("freezer", group, id).join("freezer.state");
                Some(std::fs::read_to_string(state).ok()?.trim() == "FROZEN")
            }
        }
    }

    /// The processes in the sandbox's groups.
    pub(super) fn processes(&self, id: &str) -> Vec<i32> {
        let procs = self.dirs(id).into_iter().filter_map(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok());
        let mut pids: Vec<i32> = procs
            .flat_map(|text| text.lines().filter_map(|line| line.trim().parse().ok()).collect::<Vec<_>>())
            .collect();
        // Each v1 hierarchy lists them all.
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    pub(super) fn remove(&self, id: &str) {
        for dir in self.dirs(id) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
