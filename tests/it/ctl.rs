//! The CLI for people (`runtimeai runtimes|operations|events|policies|cluster|settings`),
//! command by command against a live cluster: a config file of contexts with failover past a
//! member it cannot reach, table, JSON and YAML output, `--wait`, and exit codes scripts can use.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use runtimeai_tests::{admin_token, binary, harness_ca, key_for, phase, Cluster, ClusterOptions, EVENTUALLY};

/// `runtimeai <args>` with the config file `config`.
fn ctl(config: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("RUNTIMEAI_CONFIG", config)
        .env_remove("RUNTIMEAI_TOKEN")
        .output()
        .expect("runs")
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("{e}: {} / {}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    })
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

/// A config with the contexts `admin` and `agent` (current: `admin`), each first naming a
/// member that cannot be reached.
fn config(dir: &Path, cluster: &Cluster, agent_token: &str) -> anyhow::Result<std::path::PathBuf> {
    std::fs::write(dir.join("admin.key"), admin_token())?;
    std::fs::write(dir.join("agent.key"), agent_token)?;
    let ca = harness_ca()?.join("ca.pem");
    let servers =
        format!("[\"https://127.0.0.1:1\", \"{}\", \"{}\"]", cluster.node(2).url(""), cluster.node(3).url(""));
    let text = format!(
        "current_context = \"admin\"\n[contexts.admin]\nservers = {servers}\nca = \"{ca}\"\ntoken_file = \"admin.key\"\n\
         [contexts.agent]\nservers = {servers}\nca = \"{ca}\"\ntoken_file = \"agent.key\"\n",
        ca = ca.display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_every_verb_against_a_live_cluster_with_exit_codes_scripts_can_use() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    cluster.wait_leader(EVENTUALLY).await?;
    let dir = tempfile::tempdir()?;
    let agent = key_for(&cluster, 1, "cli-agent", "agent", &["*"], &["agent"], Some("act")).await?;
    let config = config(dir.path(), &cluster, &agent)?;

    phase("cluster, create --wait, list, get: JSON, YAML and tables");
    let members = ctl(&config, &["cluster", "members", "-o", "json"]);
    assert_eq!((code(&members), json(&members)["items"].as_array().map(Vec::len)), (0, Some(3)));
    let status = ctl(&config, &["cluster", "status"]);
    assert!(String::from_utf8_lossy(&status.stdout).starts_with("CLUSTER"), "{status:?}");
    let created = ctl(&config, &["runtimes", "create", "cli-a", "--type", "vcluster", "--wait", "-o", "json"]);
    assert_eq!(code(&created), 0, "{created:?}");
    let operation = json(&created);
    assert_eq!(operation["status"], "succeeded");
    let id = operation["runtime_id"].as_str().unwrap().to_string();
    let listed = json(&ctl(&config, &["runtimes", "list", "-o", "json"]));
    assert!(listed["items"].as_array().unwrap().iter().any(|r| r["id"] == id.as_str()), "{listed}");
    let yaml = ctl(&config, &["runtimes", "get", &id, "-o", "yaml"]);
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("name: cli-a"), "{yaml:?}");
    let table = String::from_utf8_lossy(&ctl(&config, &["runtimes", "get", &id]).stdout).into_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[1].contains("cli-a") && lines[1].contains("running"), "{table}");

    phase("lifecycle calls and the exit codes of refusals");
    assert_eq!(code(&ctl(&config, &["runtimes", "do", "stop", &id, "--wait"])), 0);
    let again = ctl(&config, &["runtimes", "do", "stop", &id]);
    assert_eq!(code(&again), 4, "409: {}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("409"), "a readable message: {again:?}");
    assert_eq!(code(&ctl(&config, &["runtimes", "get", "rt_nope"])), 3);
    let bad_scale = ctl(&config, &["runtimes", "do", "scale", &id, "--set", "size=galactic"]);
    assert_eq!(code(&bad_scale), 4, "{bad_scale:?}");

    phase("an agent's request waits for a human: --wait runs out, the human approves, watch follows it");
    let start =
        ctl(&config, &["runtimes", "--context", "agent", "do", "start", &id, "--wait", "--timeout", "1", "-o", "json"]);
    assert_eq!(code(&start), 8, "still pending: {start:?}");
    let waiting = json(&start)["id"].as_str().unwrap().to_string();
    let pending = json(&ctl(&config, &["operations", "list", "--status", "pending_approval", "-o", "json"]));
    assert!(pending["items"].as_array().unwrap().iter().any(|o| o["id"] == waiting.as_str()), "{pending}");
    assert_eq!(
        code(&ctl(&config, &["operations", "--context", "agent", "approve", &waiting])),
        5,
        "agents decide nothing"
    );
    assert_eq!(code(&ctl(&config, &["operations", "approve", &waiting, "--reason", "ok"])), 0);
    let watched = ctl(&config, &["operations", "watch", &waiting, "-o", "json"]);
    assert_eq!((code(&watched), json(&watched)["status"].as_str()), (0, Some("succeeded")));

    phase("intents, plans, action lists, cancel, reject and delete");
    let planned = json(&ctl(&config, &["runtimes", "plan", &id, "restart", "-o", "json"]));
    assert!(planned["actions"].as_array().is_some_and(|a| !a.is_empty()), "{planned}");
    let dry =
        ctl(&config, &["runtimes", "intent", &id, "restart", "--constraint", "cost=any", "--dry-run", "-o", "json"]);
    assert_eq!(code(&dry), 0, "{dry:?}");
    let nothing = json(&dry)["operation_id"].as_str().is_none_or(str::is_empty);
    assert!(nothing, "a dry run runs nothing: {}", json(&dry));
    let actions = dir.path().join("actions.json");
    std::fs::write(&actions, r#"{"actions": [{"type": "restart"}]}"#)?;
    let executed = ctl(&config, &["runtimes", "execute", &id, "-f", actions.to_str().unwrap(), "--wait", "-o", "json"]);
    assert_eq!((code(&executed), json(&executed)["kind"].as_str()), (0, Some("execute")), "{executed:?}");
    let to_reject = json(&ctl(&config, &["runtimes", "--context", "agent", "do", "restart", &id, "-o", "json"]));
    let to_reject = to_reject["id"].as_str().unwrap().to_string();
    let rejected = ctl(&config, &["operations", "reject", &to_reject, "--reason", "not now", "-o", "json"]);
    assert_eq!((code(&rejected), json(&rejected)["status"].as_str()), (0, Some("cancelled")), "{rejected:?}");
    let watched = ctl(&config, &["operations", "watch", &to_reject]);
    assert_eq!(code(&watched), 7, "a rejected operation ends the wait badly: {watched:?}");
    let to_cancel = json(&ctl(&config, &["runtimes", "--context", "agent", "do", "restart", &id, "-o", "json"]));
    let to_cancel = to_cancel["id"].as_str().unwrap().to_string();
    assert_eq!(json(&ctl(&config, &["operations", "cancel", &to_cancel, "-o", "json"]))["status"], "cancelled");
    assert_eq!(json(&ctl(&config, &["operations", "get", &to_cancel, "-o", "json"]))["status"], "cancelled");

    phase("a policy applied from YAML denies the agent; settings read back and set");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "name: cli-no-agent-snapshots\nrules:\n  - kind: deny_action\n    selector:\n      actions: [snapshot]\n      actor: agent\n")?;
    assert_eq!(code(&ctl(&config, &["policies", "apply", "-f", policy.to_str().unwrap()])), 0);
    assert!(String::from_utf8_lossy(&ctl(&config, &["policies", "list"]).stdout).contains("cli-no-agent-snapshots"));
    assert_eq!(code(&ctl(&config, &["runtimes", "--context", "agent", "do", "snapshot", &id])), 5, "policy-denied");
    let mut settings = json(&ctl(&config, &["settings", "get", "-o", "json"]));
    assert!(settings["event_retention_count"].is_u64(), "{settings}");
    settings["event_retention_count"] = 2000.into();
    let file = dir.path().join("settings.json");
    std::fs::write(&file, settings.to_string())?;
    assert_eq!(code(&ctl(&config, &["settings", "set", "-f", file.to_str().unwrap()])), 0);
    assert_eq!(json(&ctl(&config, &["settings", "get", "-o", "json"]))["event_retention_count"], 2000);
    let policies = json(&ctl(&config, &["policies", "list", "-o", "json"]));
    let policy_id = policies["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(code(&ctl(&config, &["policies", "delete", &policy_id])), 0);
    assert_eq!(code(&ctl(&config, &["policies", "delete", &policy_id])), 3, "gone");

    phase("events, and --follow printing each as it comes");
    let events = json(&ctl(&config, &["events", "--runtime", &id, "-o", "json"]));
    assert!(events["items"].as_array().is_some_and(|e| e.len() >= 3), "{events}");
    let mut follower = Command::new(binary())
        .args(["events", "--follow", "--type", "runtime.created", "--timeout", "60", "-o", "json"])
        .args(["--after", events["items"].as_array().unwrap().last().unwrap()["id"].as_str().unwrap()])
        .env("RUNTIMEAI_CONFIG", &config)
        .stdout(Stdio::piped())
        .spawn()?;
    assert_eq!(code(&ctl(&config, &["runtimes", "create", "cli-followed", "--type", "vcluster"])), 0);
    let stdout = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).find(|line| line.contains("cli-followed"))
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(reader.join().unwrap().is_some(), "the followed feed printed the new runtime's event");

    phase("what a script meets when things are wrong");
    let completion = ctl(&config, &["completion", "bash"]);
    assert!(code(&completion) == 0 && String::from_utf8_lossy(&completion.stdout).contains("runtimeai"));
    let missing = ctl(&config, &["cluster", "status", "--context", "prod"]);
    assert_eq!(code(&missing), 1);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no context \"prod\""), "{missing:?}");
    let nowhere = ctl(&config, &["cluster", "status", "--server", "https://127.0.0.1:1"]);
    assert_eq!(code(&nowhere), 6, "{nowhere:?}");
    let deleted = ctl(&config, &["runtimes", "delete", &id, "--wait", "-o", "json"]);
    assert_eq!(code(&deleted), 0, "{deleted:?}");
    assert_eq!(code(&ctl(&config, &["runtimes", "get", &id])), 3, "deleted");
    Ok(())
}
