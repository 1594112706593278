//! The `runtimeai-chaos` command line: what it lists, and how it refuses bad input (the
//! scenarios themselves run in CI through `deploy/test.sh`, each in a short form); and that the
//! operator tools (`runtimeai-chaos`, `runtimeai-bench`) stopped by a signal stop their clusters.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runtimeai_chaos::scenario::SCENARIOS;
use runtimeai_tests::binary;

fn chaos() -> Command {
    Command::new(binary().with_file_name("runtimeai-chaos"))
}

#[test]
fn list_names_every_scenario_and_what_it_injects() {
    let output = chaos().arg("list").output().expect("run runtimeai-chaos (cargo build --bins)");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.lines().count(), SCENARIOS.len(), "{text}");
    for scenario in SCENARIOS {
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(scenario.name));
        assert!(line.is_some_and(|l| l.contains(scenario.injects.split_whitespace().next().unwrap())), "{text}");
    }
}

#[test]
fn bad_input_is_refused_with_a_readable_message_and_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--scenario", "earthquake"], "unknown scenario \"earthquake\"; known: all, kill-leader"),
        (&["run", "--scenario", "kill-leader", "--nodes", "2"], "--nodes"),
        (&["run", "--scenario", "kill-leader", "--duration", "soon"], "--duration"),
        (&["run", "--scenario", "kill-leader", "--duration", "1s"], "between 5s and 1h"),
    ];
    for (args, expected) in cases {
        let output = chaos().args(*args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr:?} should say {expected:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The processes whose parent is `parent`, with their command lines.
fn children(parent: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (comm) state ppid ...`; the command name may hold spaces and parentheses.
        let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        if after_comm.split_whitespace().nth(1).and_then(|ppid| ppid.parse::<u32>().ok()) == Some(parent) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// Alive and not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.split_whitespace().next() != Some("Z")))
}

#[test]
fn a_tool_stopped_by_sigterm_stops_the_clusters_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let runs: [(&str, Vec<&str>); 2] = [
        ("runtimeai-chaos", vec!["run", "--scenario", "kill-leader", "--duration", "60s", "--out", out]),
        ("runtimeai-bench", vec!["--smoke", "--out", out]),
    ];
    for (tool, args) in runs {
        let mut child = Command::new(binary().with_file_name(tool))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("run {tool} (cargo build --bins): {e}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let nodes = loop {
            let nodes: Vec<u32> = children(child.id())
                .into_iter()
                .filter(|(_, cmd)| cmd.contains(" node "))
                .map(|(pid, _)| pid)
                .collect();
            if nodes.len() >= 3 {
                break nodes;
            }
            assert!(Instant::now() < deadline, "{tool} started no cluster within a minute");
            std::thread::sleep(Duration::from_millis(50));
        };
        let started = children(child.id());
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{tool} did not stop within a minute of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(143), "{tool} exits as a process ended by SIGTERM would");
        assert!(nodes.len() >= 3);
        let left: Vec<&(u32, String)> = started.iter().filter(|(pid, _)| running(*pid)).collect();
        assert!(left.is_empty(), "{tool} left processes running: {left:?}");
    }
}
