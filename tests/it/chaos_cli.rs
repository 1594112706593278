//! The `runtimeai-chaos` command line: what it lists, and how it refuses bad input. (The
//! scenarios themselves run in CI through `deploy/test.sh`, each in a short form.)

use std::process::Command;

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
