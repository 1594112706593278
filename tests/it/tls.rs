//! Transport security tried as an attacker would, against a real cluster with TLS on both
//! ports: a process without a member certificate, one with a certificate of another CA, a
//! member claiming to be another, and certificates replaced on disk while the cluster runs.

use std::path::Path;
use std::time::{Duration, Instant};

use openraft::raft::VoteRequest;
use reqwest::Method;
use serde_json::json;

use runtimeai_proto::raft_client::RaftClient;
use runtimeai_proto::{cluster_client::ClusterClient, ForwardRequest, RaftRequest};
use runtimeai_raft::tls::{self, TlsFiles};
use runtimeai_tests::{binary, harness_ca, phase, Cluster, ClusterOptions, Eventually, EVENTUALLY};

fn certs(args: &[&str]) {
    let output = std::process::Command::new(binary()).arg("certs").args(args).output().unwrap();
    assert!(output.status.success(), "runtimeai certs {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A raft client of node `via` that presents `cert`/`key` and trusts the harness's CA (none:
/// plain text).
fn raft_client(cluster: &Cluster, via: u64, files: Option<(&Path, &Path)>) -> RaftClient<tonic::transport::Channel> {
    let tls = files.map(|(cert, key)| {
        let ca = Some(harness_ca().unwrap().join("ca.pem"));
        tls::client(TlsFiles { cert: cert.to_path_buf(), key: key.to_path_buf(), ca }).unwrap()
    });
    RaftClient::new(runtimeai_raft::network::channel(&cluster.node(via).grpc, tls).unwrap())
}

/// A vote request from `candidate` in term 0: every member refuses it as stale, so sending it
/// disturbs nothing; only whether the node takes the call at all is in question.
fn stale_vote(candidate: u64) -> RaftRequest {
    let rpc = VoteRequest::<u64> { vote: openraft::Vote::new(0, candidate), last_log_id: None };
    RaftRequest { cluster: "runtimeai".into(), payload: runtimeai_raft::codec::encode("vote", &rpc).unwrap() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_call_members_and_none_can_claim_another_members_id() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let certs_dir = cluster.dir.path().join("certs");
    let (cert2, key2) = (certs_dir.join("node-2.pem"), certs_dir.join("node-2-key.pem"));

    phase("member 2's certificate may call as member 2");
    let mut as_two = raft_client(&cluster, 1, Some((&cert2, &key2)));
    as_two.vote(stale_vote(2)).await.expect("a member's call is taken (and its stale vote refused)");

    phase("plain text, and a certificate that names no member, are refused");
    let plain = raft_client(&cluster, 1, None).vote(stale_vote(2)).await;
    assert!(plain.is_err(), "a plain-text call: {plain:?}");
    let ca = harness_ca()?.display().to_string();
    let out = cluster.dir.path().join("intruder");
    certs(&["client", "--dir", &ca, "--out", &out.display().to_string(), "--name", "mallory"]);
    let (cert, key) = (out.join("client-mallory.pem"), out.join("client-mallory-key.pem"));
    let status = raft_client(&cluster, 1, Some((&cert, &key))).vote(stale_vote(2)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    phase("a member certificate of another CA is refused in the handshake");
    let rogue = cluster.dir.path().join("rogue");
    certs(&["ca", "--dir", &rogue.display().to_string()]);
    certs(&["node", "--dir", &rogue.display().to_string(), "--id", "2"]);
    let (cert, key) = (rogue.join("node-2.pem"), rogue.join("node-2-key.pem"));
    let refused = raft_client(&cluster, 1, Some((&cert, &key))).vote(stale_vote(2)).await;
    assert!(refused.is_err(), "a certificate of another CA: {refused:?}");

    phase("member 2 cannot act as member 3: not in a vote, not in a forward");
    let status = as_two.vote(stale_vote(3)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let files = TlsFiles { cert: cert2.clone(), key: key2.clone(), ca: Some(harness_ca()?.join("ca.pem")) };
    let channel = runtimeai_raft::network::channel(&cluster.node(1).grpc, Some(tls::client(files)?)).unwrap();
    let forward = ForwardRequest { cluster: "runtimeai".into(), hops_left: 1, command: Vec::new(), from: 3 };
    let status = ClusterClient::new(channel).forward(forward).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    phase("the cluster is none the worse");
    let created = cluster
        .call_eventually(2, Method::POST, "/v1/runtimes", Some(&json!({"name": "after", "type": "vm"})), &[])
        .await?;
    assert_eq!(created.status, 201, "{created:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_replaced_on_disk_are_used_by_new_connections_without_a_restart() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let certs_dir = cluster.dir.path().join("certs");
    let served = |via: u64| {
        let url = cluster.node(via).url("/healthz");
        async move {
            let client = runtimeai_tests::client_builder().unwrap().tls_info(true).build().unwrap();
            let response = client.get(url).send().await.ok()?;
            let info = response.extensions().get::<reqwest::tls::TlsInfo>()?;
            info.peer_certificate().map(<[u8]>::to_vec)
        }
    };
    let before = served(1).await.expect("node 1 serves a certificate");
    assert_eq!(before, tls::certificates(&certs_dir.join("node-1.pem"))?[0].to_vec());

    phase("node 1's certificate and key are replaced on disk (a rotation)");
    let ca = harness_ca()?.display().to_string();
    certs(&[
        "node",
        "--dir",
        &ca,
        "--out",
        &certs_dir.display().to_string(),
        "--id",
        "1",
        "--hosts",
        "127.0.0.1,localhost",
    ]);
    let replaced = tls::certificates(&certs_dir.join("node-1.pem"))?[0].to_vec();
    assert_ne!(replaced, before);
    let started = Instant::now();
    loop {
        if served(1).await.as_ref() == Some(&replaced) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "node 1 still serves its old certificate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("new connections got the new certificate {:?} after it was written", started.elapsed());

    phase("its peers take the new certificate too: a leader change and writes through every node");
    let leader = cluster.wait_leader(EVENTUALLY).await?;
    cluster.signal(leader, nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.signal(leader, nix::sys::signal::Signal::SIGCONT);
    for via in 1..=3 {
        let body = json!({"name": format!("after-{via}"), "type": "vm"});
        let created = cluster.call_eventually(via, Method::POST, "/v1/runtimes", Some(&body), &[]).await?;
        assert_eq!(created.status, 201, "through node {via}: {created:?}");
    }
    let all_reachable =
        |view: &serde_json::Value| view["members"].as_array().is_some_and(|m| m.iter().all(|m| m["reachable"] == true));
    cluster.wait_view(1, "every member reachable again", all_reachable).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_as_the_principal_of_the_key_it_names() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let ca = harness_ca()?.display().to_string();
    let out = cluster.dir.path().join("clients");
    for name in ["certy", "nobody"] {
        certs(&["client", "--dir", &ca, "--out", &out.display().to_string(), "--name", name]);
    }
    let as_client = |name: &str| {
        let mut pem = std::fs::read(out.join(format!("client-{name}.pem"))).unwrap();
        pem.extend(std::fs::read(out.join(format!("client-{name}-key.pem"))).unwrap());
        let identity = reqwest::Identity::from_pem(&pem).unwrap();
        runtimeai_tests::client_builder().unwrap().identity(identity).build().unwrap()
    };
    let whoami = |client: reqwest::Client| {
        let url = cluster.node(2).url("/v1/auth/whoami");
        async move {
            let response = client.get(url).send().await.unwrap();
            (response.status().as_u16(), response.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    let made = cluster
        .call_eventually(
            1,
            Method::POST,
            "/v1/keys",
            Some(&json!({"name": "certy", "kind": "service", "tenants": ["acme"], "roles": ["viewer"]})),
            &[],
        )
        .await?;
    assert_eq!(made.status, 201, "{made:?}");
    let (status, me) = whoami(as_client("certy")).await;
    assert_eq!((status, me["actor"].as_str()), (200, Some("service:certy")), "{me}");
    assert_eq!(whoami(as_client("nobody")).await.0, 401, "a certificate no key names authenticates no one");

    phase("revoking the key ends the certificate's access too");
    let key_id = made.body["key"]["id"].as_str().unwrap();
    assert_eq!(cluster.call_eventually(1, Method::DELETE, &format!("/v1/keys/{key_id}"), None, &[]).await?.status, 200);
    let started = Instant::now();
    while whoami(as_client("certy")).await.0 != 401 {
        assert!(started.elapsed() < Duration::from_secs(5), "node 2 still takes the certificate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
