//! What the API asks of a sandbox this node hosts: commands run in it (`crun exec`: the
//! sandbox's namespaces, user, limits, capabilities and seccomp filter), their output passed on
//! as it comes — a command that outlives its timeout, or whose caller goes away, is killed —
//! and its logs, tailed and followed.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runtimeai_api::sandbox_io::{ExecOutput, ExecRequest, SandboxShell};
use runtimeai_api::sandbox_io::{FileError, MAX_FILE_BYTES};
use runtimeai_api::sandbox_io::{LogStream, LogsRequest};
use runtimeai_model::Runtime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::bundle::{self, WORK};
use super::SandboxBackend;

#[async_trait::async_trait]
impl SandboxShell for SandboxBackend {
    async fn exec(&self, runtime: &Runtime, request: ExecRequest) -> Result<mpsc::Receiver<ExecOutput>, String> {
        if self.alive(runtime).is_none() {
            return Err(format!("sandbox {} is not running on this node", runtime.id));
        }
        let pid_file = self.dir(runtime).join(format!("exec-{}.pid", ulid::Ulid::new()));
        let cwd = request.working_dir.as_deref().unwrap_or(WORK);
        let mut crun = self.exec_command(runtime, cwd, &request.env, Some(&pid_file));
        crun.args(&request.command);
        let stdin = request.stdin.clone().map(String::into_bytes);
        let mut child = spawn_fed(crun, stdin).map_err(|e| format!("cannot run crun exec: {e}"))?;
        let (output, answer) = mpsc::channel(64);
        let readers = [
            tokio::spawn(pass_on(child.stdout.take(), output.clone(), ExecOutput::Stdout)),
            tokio::spawn(pass_on(child.stderr.take(), output.clone(), ExecOutput::Stderr)),
        ];
        tokio::spawn(async move {
            let started = Instant::now();
            let timeout = request.timeout();
            let (exit_code, timed_out) = tokio::select! {
                status = child.wait() => (status.ok().and_then(|s| s.code()), false),
                _ = tokio::time::sleep(timeout) => (None, true),
                _ = output.closed() => (None, false),
            };
            if exit_code.is_none() {
                // Timed out or abandoned: the command itself (crun exec only waits for it).
                if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                let _ = child.kill().await;
            }
            for reader in readers {
                let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
            }
            let _ = std::fs::remove_file(&pid_file);
            let duration_ms = started.elapsed().as_millis() as u64;
            let _ = output.send(ExecOutput::Exit { exit_code, duration_ms, timed_out }).await;
        });
        Ok(answer)
    }

    async fn read_file(&self, runtime: &Runtime, path: &str) -> Result<Vec<u8>, FileError> {
        match self.run_inside(runtime, &["cat", path], None, MAX_FILE_BYTES).await? {
            (Some(0), content, _) => Ok(content),
            (_, _, errors) => Err(refused(path, &errors)),
        }
    }

    async fn write_file(&self, runtime: &Runtime, path: &str, content: Vec<u8>) -> Result<(), FileError> {
        let script = r#"mkdir -p "$(dirname "$1")" && cat > "$1""#;
        match self.run_inside(runtime, &["sh", "-c", script, "sh", path], Some(content), 0).await? {
            (Some(0), _, _) => Ok(()),
            (_, _, errors) => Err(refused(path, &errors)),
        }
    }

    async fn logs(&self, runtime: &Runtime, request: LogsRequest) -> Result<mpsc::Receiver<Vec<u8>>, String> {
        let dir = self.dir(runtime);
        if !dir.exists() {
            return Err(format!("sandbox {} has no logs on this node", runtime.id));
        }
        let file = dir.join(match request.stream {
            LogStream::Stdout => "stdout.log",
            LogStream::Stderr => "stderr.log",
        });
        let (output, answer) = mpsc::channel(16);
        let (backend, runtime) = (self.clone(), runtime.clone());
        tokio::spawn(async move {
            let mut offset = match request.tail {
                Some(lines) => tail_offset(&file, lines).await,
                None => 0,
            };
            loop {
                // Whether it ran before this look: what it wrote until it ended is still sent.
                let running = backend.alive(&runtime).is_some();
                if !send_from(&file, &mut offset, &output).await || !request.follow || !running {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(FOLLOW_POLL) => {}
                    _ = output.closed() => return,
                }
            }
        });
        Ok(answer)
    }
}

/// How much of each output an approved command keeps in its operation.
pub(super) const KEPT_OUTPUT_BYTES: usize = 16 << 10;

/// One output of a command run to its end: the first [`KEPT_OUTPUT_BYTES`] of it, and how many
/// bytes more there were.
#[derive(Default)]
struct Kept {
    text: String,
    dropped: usize,
}

impl Kept {
    fn push(&mut self, chunk: &str) {
        let room = KEPT_OUTPUT_BYTES.saturating_sub(self.text.len());
        let mut cut = chunk.len().min(room);
        while !chunk.is_char_boundary(cut) {
            cut -= 1;
        }
        self.text.push_str(&chunk[..cut]);
        self.dropped += chunk.len() - cut;
    }

    fn section(&self, name: &str) -> String {
        let more = if self.dropped > 0 { format!("\n… ({} bytes more)", self.dropped) } else { String::new() };
        format!("\n--- {name} ---\n{}{more}", self.text)
    }
}

impl SandboxBackend {
    /// Runs `request` in the sandbox to its end and says how it went: its exit code and time,
    /// then what it printed (kept to [`KEPT_OUTPUT_BYTES`] of each output). `Err` (permanent)
    /// when it could not start, did not end on its own, or exited non-zero.
    pub(super) async fn run_to_end(&self, runtime: &Runtime, request: ExecRequest) -> Result<String, String> {
        let mut output = self.exec(runtime, request).await?;
        let (mut stdout, mut stderr) = (Kept::default(), Kept::default());
        let mut ended = None;
        while let Some(line) = output.recv().await {
            match line {
                ExecOutput::Stdout(chunk) => stdout.push(&chunk),
                ExecOutput::Stderr(chunk) => stderr.push(&chunk),
                ExecOutput::Exit { exit_code, duration_ms, timed_out } => {
                    ended = Some((exit_code, duration_ms, timed_out))
                }
            }
        }
        let printed = format!("{}{}", stdout.section("stdout"), stderr.section("stderr"));
        match ended {
            Some((Some(0), ms, _)) => Ok(format!("exit code 0 after {ms} ms{printed}")),
            Some((Some(code), ms, _)) => Err(format!("exit code {code} after {ms} ms{printed}")),
            Some((None, ms, true)) => Err(format!("killed at its timeout, after {ms} ms{printed}")),
            Some((None, _, false)) | None => {
                let ms = ended.map_or(0, |(_, ms, _)| ms);
                Err(format!("killed before it ended (the sandbox stopped), after {ms} ms{printed}"))
            }
        }
    }

    /// `crun exec` in the sandbox, as its own processes run: its namespaces, user,
    /// capabilities and seccomp filter (which crun exec keeps), no_new_privs (which it keeps only
    /// when told), its environment with `extra` over it (`--env` replaces the whole
    /// environment), in `cwd`. The caller adds the command.
    fn exec_command(
        &self,
        runtime: &Runtime,
        cwd: &str,
        extra: &BTreeMap<String, String>,
        pid_file: Option<&std::path::Path>,
    ) -> tokio::process::Command {
        let mut crun = tokio::process::Command::from(self.crun_command());
        crun.args(["exec", "--no-new-privs", "--cwd", cwd]);
        if let Some(pid_file) = pid_file {
            crun.arg("--pid-file").arg(pid_file);
        }
        let own = runtime.spec.env.iter().flatten().chain(extra).map(|(name, value)| format!("{name}={value}"));
        for variable in bundle::base_env().into_iter().chain(own) {
            crun.arg("--env").arg(variable);
        }
        crun.arg(&runtime.id);
        crun.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        crun
    }

    /// Runs `command` in the sandbox to its end (60 s at most), `stdin` as its input; its exit
    /// code, what it printed (up to `limit` bytes and one more) and its error output.
    async fn run_inside(
        &self,
        runtime: &Runtime,
        command: &[&str],
        stdin: Option<Vec<u8>>,
        limit: u64,
    ) -> Result<(Option<i32>, Vec<u8>, String), FileError> {
        if self.alive(runtime).is_none() {
            return Err(FileError::NotRunning(format!("sandbox {} is not running on this node", runtime.id)));
        }
        let mut crun = self.exec_command(runtime, WORK, &BTreeMap::new(), None);
        crun.args(command);
        let mut child = spawn_fed(crun, stdin).map_err(|e| FileError::Failed(e.to_string()))?;
        let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(FileError::Failed("crun exec gave no output pipes".into()));
        };
        let mut printed = Vec::new();
        let reading = async {
            let _ = stdout.take(limit + 1).read_to_end(&mut printed).await;
            if printed.len() as u64 > limit {
                return None; // too much: the command is killed with `child`
            }
            let mut errors = String::new();
            let _ = stderr.read_to_string(&mut errors).await;
            Some(errors)
        };
        let errors = match tokio::time::timeout(Duration::from_secs(60), reading).await {
            Err(_) => return Err(FileError::Failed("the sandbox did not answer within 60 s".into())),
            Ok(None) => return Err(FileError::TooLarge),
            Ok(Some(errors)) => errors,
        };
        let code = child.wait().await.ok().and_then(|status| status.code());
        Ok((code, printed, errors))
    }
}

/// Starts `command` with `stdin` written to its input (then closed), or with none.
fn spawn_fed(mut command: tokio::process::Command, stdin: Option<Vec<u8>>) -> std::io::Result<tokio::process::Child> {
    command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = command.spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        tokio::spawn(async move {
            let _ = pipe.write_all(&input).await;
        });
    }
    Ok(child)
}

/// A file call's refusal, from what the command in the sandbox said (or crun, when the sandbox
/// ended before it could enter it).
fn refused(path: &str, errors: &str) -> FileError {
    if errors.contains("setns(") {
        FileError::NotRunning(format!("{path}: the sandbox stopped before the call could enter it"))
    } else if errors.contains("No such file") {
        FileError::NotFound(format!("{path}: no such file in the sandbox"))
    } else {
        FileError::Failed(format!("{path}: {}", errors.trim()))
    }
}

/// How often a followed log is looked at for more.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Sends what `file` holds from `offset` on (from its start if it was rotated meanwhile), and
/// moves `offset` past it; `false` when nobody listens any more.
async fn send_from(file: &std::path::Path, offset: &mut u64, output: &mpsc::Sender<Vec<u8>>) -> bool {
    let Ok(mut log) = tokio::fs::File::open(file).await else { return true };
    let length = log.metadata().await.map(|m| m.len()).unwrap_or(0);
    if length < *offset {
        *offset = 0;
    }
    if log.seek(std::io::SeekFrom::Start(*offset)).await.is_err() {
        return true;
    }
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        match log.read(&mut buffer).await {
            Ok(0) | Err(_) => return true,
            Ok(read) => {
                *offset += read as u64;
                if output.send(buffer[..read].to_vec()).await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Where the last `lines` lines of `file` begin (looking at its last 4 MiB at most).
async fn tail_offset(file: &std::path::Path, lines: u64) -> u64 {
    let Ok(bytes) = tokio::fs::read(file).await else { return 0 };
    if lines == 0 {
        return bytes.len() as u64;
    }
    let window = bytes.len().saturating_sub(4 << 20);
    let text = &bytes[window..];
    // A last line without its newline counts as a line; a trailing newline ends the last one.
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (at, byte) in body.iter().enumerate().rev() {
        if *byte == b'\n' {
            seen += 1;
            if seen == lines {
                return (window + at + 1) as u64;
            }
        }
    }
    window as u64
}

/// Sends what `pipe` yields, chunk by chunk, as text, until it ends or nobody listens.
async fn pass_on(
    pipe: Option<impl AsyncRead + Unpin>,
    output: mpsc::Sender<ExecOutput>,
    wrap: fn(String) -> ExecOutput,
) {
    let Some(mut pipe) = pipe else { return };
    let mut buffer = vec![0u8; 8192];
    while let Ok(read) = pipe.read(&mut buffer).await {
        if read == 0 || output.send(wrap(String::from_utf8_lossy(&buffer[..read]).into_owned())).await.is_err() {
            return;
        }
    }
}
