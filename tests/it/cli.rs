//! Bad input to `runtimeai node`: a clear one-line error, a non-zero exit, never a panic, and
//! a store left as it was.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use runtimeai_tests::{binary, free_port, phase};

/// Runs `runtimeai node` with `args` (and, unless they name their own, backends that need no
/// hypervisor and `--insecure`, so that each case meets the check it is about).
fn node(args: &[&str]) -> Output {
    let backends: &[&str] = if args.contains(&"--backends") { &[] } else { &["--backends", "sandbox=process"] };
    let tls = args.iter().any(|a| a.starts_with("--tls") || a.starts_with("--peer") || *a == "--secure");
    let args: Vec<&str> = args.iter().copied().filter(|a| *a != "--secure").collect();
    Command::new(binary())
        .arg("node")
        .args(&args)
        .args(if tls { &[][..] } else { &["--insecure"][..] })
        .args(backends)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run runtimeai")
}

/// Asserts a refused start: non-zero exit, an `error:` line naming `expected`, no panic.
fn assert_refused(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "expected a refusal, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "must not panic: {stderr}");
    let error_line = stderr.lines().find(|l| l.starts_with("error:") || l.starts_with("error: "));
    let line = error_line.unwrap_or_else(|| panic!("no error line in: {stderr}"));
    assert!(line.contains(expected), "error line {line:?} should mention {expected:?}");
}

fn addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[test]
fn conflicting_or_malformed_flags_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let data = data.to_str().unwrap();
    let (http, grpc) = (addr(), addr());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--http", &http, "--grpc", &grpc, "--data-dir", data], "--id is required"),
        (vec!["--id", "1", "--http", &http, "--grpc", &grpc, "--data-dir", data, "--secure"], "no TLS: give"),
        (
            vec!["--id", "1", "--http", &http, "--grpc", &grpc, "--data-dir", data, "--tls-cert", "/nonexistent"],
            "HTTPS needs both --tls-cert and --tls-key",
        ),
        (
            vec![
                "--id",
                "1",
                "--http",
                &http,
                "--grpc",
                &grpc,
                "--data-dir",
                data,
                "--tls-cert",
                "/nonexistent",
                "--tls-key",
                "/nonexistent",
                "--peer-cert",
                "/nonexistent",
                "--peer-key",
                "/nonexistent",
                "--peer-ca",
                "/nonexistent",
            ],
            "cannot read /nonexistent",
        ),
        (vec!["--id", "1", "--http", "nonsense", "--grpc", &grpc, "--data-dir", data], "expected host:port"),
        (vec!["--id", "1", "--http", &http, "--grpc", &http, "--data-dir", data], "both use"),
        (
            vec!["--id", "1", "--http", &http, "--grpc", &grpc, "--data-dir", data, "--initial-cluster", "1=x"],
            "expected host:port",
        ),
        (
            vec![
                "--id",
                "4",
                "--http",
                &http,
                "--grpc",
                &grpc,
                "--data-dir",
                data,
                "--initial-cluster",
                "1=127.0.0.1:1,2=127.0.0.1:2",
            ],
            "does not list",
        ),
        (
            vec!["--id", "1", "--http", &http, "--grpc", &grpc, "--data-dir", data, "--backends", "vm=process"],
            "does not run vm",
        ),
        (
            vec!["--id", "1", "--http", &http, "--grpc", &grpc, "--data-dir", data, "--backends", "gpu"],
            "unknown runtime type",
        ),
        (
            vec![
                "--id",
                "1",
                "--http",
                &http,
                "--grpc",
                &grpc,
                "--data-dir",
                data,
                "--backends",
                "vm=libvirt:nowhere:///x",
            ],
            "cannot use libvirt at nowhere:///x",
        ),
    ];
    let refused = node(&["--id", "1", "--data-dir", data, "--backends", "vm=libvirt:nowhere:///x"]);
    assert_eq!(String::from_utf8_lossy(&refused.stderr).lines().count(), 1, "libvirt's own printing is silenced");
    for (args, expected) in cases {
        assert_refused(&node(&args), expected);
    }
    assert!(!Path::new(data).exists(), "a refused start must not create the data directory");

    phase("clap's own errors also exit non-zero");
    let output = node(&["--id", "not-a-number"]);
    assert!(!output.status.success());
    assert!(!String::from_utf8_lossy(&output.stderr).contains("panicked"));
}

#[test]
fn the_environment_and_a_config_file_configure_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "id = 1\nhttp = \"nonsense\"\n").unwrap();
    let output = Command::new(binary())
        .args(["node", "--config", file.to_str().unwrap()])
        .env("RUNTIMEAI_GRPC", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_refused(&output, "--http \"nonsense\"");
    std::fs::write(&file, "id = 1\nno-such-option = true\n").unwrap();
    let output = node(&["--config", file.to_str().unwrap()]);
    assert_refused(&output, "no-such-option");
}

/// Starts a one-node cluster in `data`, configured through a TOML file and the environment
/// (JSON logs), waits for it to serve, and stops it with SIGTERM.
fn make_store(data: &Path) {
    let (http, grpc) = (addr(), addr());
    let config = data.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "http = \"{http}\"\ngrpc = \"{grpc}\"\ndata-dir = \"{}\"\ninitial-cluster = \"1={grpc}\"\nbackends = \"sandbox=process\"\ninsecure = true\n",
            data.file_name().unwrap().to_str().unwrap()
        ),
    )
    .unwrap();
    let stderr_path = data.with_extension("log");
    let mut child = Command::new(binary())
        .args(["node", "--config", config.to_str().unwrap()])
        .env("RUNTIMEAI_ID", "1")
        .env("RUNTIMEAI_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ureq_like_get(&http) {
        assert!(std::time::Instant::now() < deadline, "single node never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM must stop the node cleanly, got {status}");
    assert!(data.join("IDENTITY").exists(), "data-dir from the config file, relative to it");
    let logs = std::fs::read_to_string(&stderr_path).unwrap();
    let first = logs.lines().next().expect("the node logs to stderr");
    let line: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{first:?} is not JSON: {e}"));
    assert!(line["fields"]["message"].is_string(), "{line}");
    assert!(logs.contains("\"stopped\""), "a clean stop is logged: {logs}");
    assert!(logs.contains("--insecure: a port runs in plain text"), "plain text is an opt-out, said loudly: {logs}");
}

/// A minimal HTTP/1.0 readiness probe (no curl needed).
fn ureq_like_get(http: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(http) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    if stream.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

fn snapshot_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                // RocksDB's diagnostic log may record the refused open; the store may not change.
                if entry.file_name() != "logs" {
                    stack.push(entry.path());
                }
            } else {
                files.push((entry.path(), std::fs::read(entry.path()).unwrap()));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn a_store_of_another_node_or_cluster_or_a_corrupt_store_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node-1");
    make_store(&data);
    let before = snapshot_of(&data);
    let data_arg = data.to_str().unwrap();
    let (http, grpc) = (addr(), addr());

    phase("another node id");
    assert_refused(
        &node(&["--id", "2", "--http", &http, "--grpc", &grpc, "--data-dir", data_arg]),
        "belongs to node 1",
    );
    phase("another cluster");
    let output =
        node(&["--id", "1", "--http", &http, "--grpc", &grpc, "--data-dir", data_arg, "--cluster-name", "other"]);
    assert_refused(&output, "belongs to cluster");
    assert_eq!(snapshot_of(&data), before, "refused starts must leave the store byte for byte");

    phase("a corrupt database");
    std::fs::write(data.join("db").join("CURRENT"), b"garbage").unwrap();
    let before = snapshot_of(&data);
    assert_refused(
        &node(&["--id", "1", "--http", &http, "--grpc", &grpc, "--data-dir", data_arg]),
        "cannot open the store",
    );
    assert_eq!(snapshot_of(&data), before, "a refused start must not modify a corrupt store");

    phase("a non-empty directory that is not a RuntimeAI store");
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("important.txt"), b"keep me").unwrap();
    let output = node(&["--id", "1", "--http", &http, "--grpc", &grpc, "--data-dir", foreign.to_str().unwrap()]);
    assert_refused(&output, "no RuntimeAI IDENTITY");
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = listener.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let output = node(&["--id", "1", "--http", &taken, "--grpc", &addr(), "--data-dir", data.to_str().unwrap()]);
    assert_refused(&output, &format!("cannot listen for HTTP on {taken}"));
    assert!(!data.exists(), "nothing is written when the node cannot listen");
}
