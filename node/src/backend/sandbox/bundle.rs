//! A sandbox's OCI runtime configuration (`config.json` of its bundle), which the OCI runtime
//! (`crun`) enforces:
//!
//! - a user namespace: the sandbox's root is an unprivileged host uid (the node's range, see
//!   [`IdRange`]), so what escapes its other walls is nobody on the host;
//! - its own pid, mount, ipc, uts and cgroup namespaces, and a network namespace with nothing
//!   but loopback unless its spec opens egress; a private `/proc`, no `/sys`;
//! - only a few capabilities, and none of `CAP_SYS_ADMIN`, `CAP_NET_RAW`, `CAP_SYS_MODULE`,
//!   `CAP_SYS_PTRACE` or `CAP_MKNOD`; `no_new_privs`; a seccomp filter refusing the calls a
//!   sandbox has no use for (mounts, namespaces, modules, ptrace, kexec, bpf, keyrings, ...);
//! - cgroup limits on cpu, memory (no swap) and the number of processes;
//! - `tini` as PID 1, bound in read-only from the node: it forwards signals to the command and
//!   reaps orphans, so a stop is a SIGTERM the command sees, not a 10 s wait.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::cgroups::CPU_PERIOD_US;

/// Where the node's `tini` appears inside every sandbox.
pub(super) const INIT: &str = "/.runtimeai/init";
/// The sandbox's working directory and `HOME`.
pub(super) const WORK: &str = "/work";
/// The command of a sandbox whose spec names none: an idle process.
const IDLE: &[&str] = &["sleep", "infinity"];
/// Processes one sandbox may have at once (a fork bomb stops here).
pub(super) const PIDS_MAX: u64 = 512;

/// The host ids a sandbox's ids map to: its root is `base`, its id n is `base + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub base: u32,
    pub size: u32,
}

impl Default for IdRange {
    /// Above the ids of the host's users, as `/etc/subuid` ranges usually are.
    fn default() -> IdRange {
        IdRange { base: 100_000, size: 65_536 }
    }
}

/// What a sandbox is started with.
pub(super) struct Launching<'a> {
    pub id: &'a str,
    /// Its cgroups below each hierarchy's root (`/<group>/<id>`).
    pub cgroups_path: &'a str,
    pub command: Option<&'a [String]>,
    pub env: Option<&'a BTreeMap<String, String>>,
    pub open_egress: bool,
    pub cpu: f64,
    pub memory_bytes: u64,
    /// The merged root file system (image below, the sandbox's own layer above).
    pub rootfs: &'a Path,
    /// The node's `tini`.
    pub init: &'a Path,
    pub ids: IdRange,
}

/// What every sandbox process's environment starts with (its spec's `env` may override it).
pub(super) fn base_env() -> Vec<String> {
    vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(), format!("HOME={WORK}")]
}

/// The bundle's `config.json`.
pub(super) fn config(launching: &Launching<'_>) -> Value {
    let command: Vec<&str> = match launching.command {
        Some(command) if !command.is_empty() => command.iter().map(String::as_str).collect(),
        _ => IDLE.to_vec(),
    };
    let mut args = vec![INIT, "-g", "--"];
    args.extend(command);
    let mut env = base_env();
    env.extend(launching.env.into_iter().flatten().map(|(name, value)| format!("{name}={value}")));
    let caps = CAPABILITIES;
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env,
            "cwd": WORK,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
            "noNewPrivileges": true,
        },
        "root": {"path": launching.rootfs, "readonly": false},
        "hostname": launching.id.replace('_', "-"),
        "mounts": mounts(launching.init),
        "linux": linux(launching),
    })
}

/// What root in a sandbox may do: enough to own and change its own files and run services on
/// low ports, nothing over the kernel, other processes' memory, raw packets or device nodes.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_SETFCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_AUDIT_WRITE",
];

fn mounts(init: &Path) -> Value {
    json!([
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": INIT, "type": "bind", "source": init, "options": ["bind", "ro", "nosuid", "nodev"]},
    ])
}

fn linux(launching: &Launching<'_>) -> Value {
    let mut namespaces = vec![json!({"type": "pid"}), json!({"type": "ipc"}), json!({"type": "uts"})];
    namespaces.extend([json!({"type": "mount"}), json!({"type": "user"}), json!({"type": "cgroup"})]);
    if !launching.open_egress {
        namespaces.push(json!({"type": "network"}));
    }
    let ids = json!([{"containerID": 0, "hostID": launching.ids.base, "size": launching.ids.size}]);
    let quota = ((launching.cpu.max(0.01) * CPU_PERIOD_US as f64) as i64).max(1_000);
    json!({
        "namespaces": namespaces,
        "uidMappings": ids,
        "gidMappings": ids,
        "cgroupsPath": launching.cgroups_path,
        "resources": {
            "devices": [{"allow": false, "access": "rwm"}],
            "memory": {"limit": launching.memory_bytes, "swap": launching.memory_bytes},
            "cpu": {"quota": quota, "period": CPU_PERIOD_US},
            "pids": {"limit": PIDS_MAX},
        },
        "seccomp": seccomp(),
        "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    })
}

/// System calls a sandbox is refused (EPERM): everything else is allowed. What changes the
/// kernel, mounts or namespaces, reads other processes, or is a known way out of containers.
const REFUSED_CALLS: &[&str] = &[
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "add_key",
    "request_key",
    "keyctl",
    "open_by_handle_at",
    "name_to_handle_at",
    "acct",
    "syslog",
    "quotactl",
    "iopl",
    "ioperm",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "vhangup",
    "lookup_dcookie",
];

fn seccomp() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
        "syscalls": [{"names": REFUSED_CALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launching<'a>(rootfs: &'a Path, init: &'a Path, open_egress: bool) -> Launching<'a> {
        Launching {
            id: "rt_1",
            cgroups_path: "/runtimeai/test/rt_1",
            command: None,
            env: None,
            open_egress,
            cpu: 0.5,
            memory_bytes: 256 << 20,
            rootfs,
            init,
            ids: IdRange::default(),
        }
    }

    #[test]
    fn a_sandbox_is_an_unprivileged_user_with_few_capabilities_and_its_own_network() {
        let (rootfs, init) = (Path::new("/s/rootfs"), Path::new("/usr/bin/tini-static"));
        let config = config(&launching(rootfs, init, false));
        assert_eq!(config["process"]["args"], json!([INIT, "-g", "--", "sleep", "infinity"]));
        assert_eq!(config["process"]["noNewPrivileges"], true);
        assert_eq!(config["linux"]["uidMappings"][0]["hostID"], 100_000);
        let caps: Vec<&str> = config["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        for dangerous in ["CAP_SYS_ADMIN", "CAP_NET_RAW", "CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_MKNOD"] {
            assert!(!caps.contains(&dangerous), "{dangerous}");
        }
        let namespaces = config["linux"]["namespaces"].to_string();
        assert!(namespaces.contains("\"network\"") && namespaces.contains("\"user\""), "{namespaces}");
        let open = super::config(&launching(rootfs, init, true));
        assert!(!open["linux"]["namespaces"].to_string().contains("\"network\""));
        assert_eq!(config["linux"]["resources"]["pids"]["limit"], PIDS_MAX);
        assert_eq!(config["linux"]["resources"]["cpu"]["quota"], 50_000);
    }
}
