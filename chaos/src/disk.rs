//! A data directory the harness can fill up or make read-only, without root: a size-limited
//! tmpfs mounted in a user and mount namespace of its own (`unshare`), kept alive by a holder
//! process so it outlives the node processes that run in it (`nsenter`) across kills and
//! restarts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};

/// The file that takes up a full disk's space.
const FILLER: &str = ".chaos-filler";

pub struct IsolatedDisk {
    dir: PathBuf,
    holder: Child,
}

impl IsolatedDisk {
    /// Mounts a tmpfs of `size_bytes` on `dir` (created if missing) in a namespace of its own.
    pub fn mount(dir: &Path, size_bytes: u64) -> Result<IsolatedDisk> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
        let unsupported = |reason: String| Error::Unsupported { fault: "disk faults".into(), reason };
        let mut holder = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o "size=$2" tmpfs "$1" && echo mounted && exec sleep 1000000"#)
            .arg("sh")
            .arg(dir)
            .arg(size_bytes.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| unsupported(format!("cannot run unshare (util-linux): {e}")))?;
        let mut line = String::new();
        let stdout = holder.stdout.take().expect("piped stdout");
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() != "mounted" {
            let _ = holder.kill();
            let output = holder.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
            return Err(unsupported(format!(
                "no user and mount namespace with a tmpfs here ({})",
                output.unwrap_or_default().trim()
            )));
        }
        Ok(IsolatedDisk { dir: dir.to_path_buf(), holder })
    }

    /// A command that runs `program` inside the namespace, where the tmpfs is mounted.
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg("--target")
            .arg(self.holder.id().to_string())
            .args(["--user", "--mount", "--preserve-credentials", "--"])
            .arg(program);
        command
    }

    fn run(&self, what: &str, script: &str) -> Result<()> {
        let output = self
            .command(Path::new("sh"))
            .args(["-c", script, "sh"])
            .arg(&self.dir)
            .output()
            .map_err(Error::io(format!("{what} in {}", self.dir.display())))?;
        if !output.status.success() {
            return Err(Error::Cluster(format!(
                "{what} in {}: {}",
                self.dir.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Takes every free byte (writes stop with "No space left on device").
    pub fn fill(&self) -> Result<()> {
        let script = format!(r#"dd if=/dev/zero of="$1/{FILLER}" bs=1M 2>/dev/null; test -s "$1/{FILLER}""#);
        self.run("fill the disk", &script)
    }

    /// Gives the space back.
    pub fn free(&self) -> Result<()> {
        self.run("free the disk", &format!(r#"rm -f "$1/{FILLER}""#))
    }

    /// Remounts read-only (only possible while no process has a file open for writing) or
    /// read-write again.
    pub fn set_read_only(&self, read_only: bool) -> Result<()> {
        let mode = if read_only { "ro" } else { "rw" };
        self.run("remount", &format!(r#"mount -o "remount,{mode}" "$1""#))
    }
}

impl Drop for IsolatedDisk {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
