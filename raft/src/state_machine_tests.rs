//! Apply and snapshot behaviour of the state machine, on a real RocksDB in a temp dir.

use std::collections::BTreeMap;

use chrono::TimeZone;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership};

use runtimeai_model::{Actor, Runtime, RuntimeSpec, RuntimeState, RuntimeType};

use super::StateMachineStore;
use crate::command::{Command, CommandReply, IdempotencyClaim, Op, Rejection};
use crate::store::DataDir;
use crate::types::Entry;

fn open() -> (tempfile::TempDir, StateMachineStore) {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(&dir.path().join("data"), 1, "test").unwrap();
    let sm = StateMachineStore::new(data.db.clone(), data.snapshot_path()).unwrap();
    (dir, sm)
}

fn at(seconds: i64) -> runtimeai_model::Timestamp {
    chrono::Utc.timestamp_opt(1_700_000_000 + seconds, 0).unwrap()
}

fn runtime(id: &str, name: &str) -> Runtime {
    Runtime {
        id: id.into(),
        name: name.into(),
        runtime_type: RuntimeType::Vm,
        state: RuntimeState::Creating,
        tenant_id: Some("acme".into()),
        labels: BTreeMap::from([("env".into(), "prod".into())]),
        capabilities: vec![],
        backend: None,
        spec: RuntimeSpec::default(),
        created_at: at(0),
        updated_at: None,
        version: 1,
    }
}

fn command(op: Op) -> Command {
    Command { at: at(1), actor: Actor::Agent("planner".into()), idempotency: None, op }
}

fn entry(index: u64, command: Command) -> Entry {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(command) }
}

async fn apply(sm: &mut StateMachineStore, commands: Vec<(u64, Command)>) -> Vec<CommandReply> {
    sm.apply(commands.into_iter().map(|(i, c)| entry(i, c))).await.unwrap()
}

#[tokio::test]
async fn names_are_unique_per_tenant_even_within_one_batch() {
    let (_dir, mut sm) = open();
    let replies = apply(
        &mut sm,
        vec![
            (1, command(Op::CreateRuntime { runtime: runtime("rt_a", "web") })),
            (2, command(Op::CreateRuntime { runtime: runtime("rt_b", "web") })),
            (3, command(Op::CreateRuntime { runtime: Runtime { tenant_id: None, ..runtime("rt_c", "web") } })),
        ],
    )
    .await;
    assert!(matches!(&replies[0], CommandReply::Runtime(r) if r.id == "rt_a"));
    assert_eq!(
        replies[1],
        CommandReply::Rejected(Rejection::NameTaken { name: "web".into(), existing_id: "rt_a".into() })
    );
    assert!(matches!(&replies[2], CommandReply::Runtime(r) if r.id == "rt_c"), "another tenant may reuse the name");
    assert_eq!(sm.list_runtimes().unwrap().len(), 2);
    assert_eq!(sm.last_applied().unwrap().map(|l| l.index), Some(3));
}

#[tokio::test]
async fn updates_check_the_expected_version_and_bump_it() {
    let (_dir, mut sm) = open();
    apply(&mut sm, vec![(1, command(Op::CreateRuntime { runtime: runtime("rt_a", "web") }))]).await;
    let mut renamed = runtime("rt_a", "web-2");
    renamed.labels.insert("tier".into(), "gold".into());
    let replies = apply(
        &mut sm,
        vec![
            (2, command(Op::UpdateRuntime { runtime: renamed.clone(), expected_version: Some(7) })),
            (3, command(Op::UpdateRuntime { runtime: renamed.clone(), expected_version: Some(1) })),
            (4, command(Op::CreateRuntime { runtime: runtime("rt_b", "web") })),
        ],
    )
    .await;
    assert_eq!(replies[0], CommandReply::Rejected(Rejection::VersionMismatch { expected: 7, actual: 1 }));
    let CommandReply::Runtime(updated) = &replies[1] else { panic!("{:?}", replies[1]) };
    assert_eq!(updated.version, 2);
    assert_eq!(updated.updated_at, Some(at(1)));
    assert!(matches!(&replies[2], CommandReply::Runtime(_)), "the old name is free again: {:?}", replies[2]);
}

#[tokio::test]
async fn every_change_writes_an_ordered_event_and_delete_frees_the_name() {
    let (_dir, mut sm) = open();
    apply(
        &mut sm,
        vec![
            (1, command(Op::CreateRuntime { runtime: runtime("rt_a", "web") })),
            (2, command(Op::UpdateRuntime { runtime: runtime("rt_a", "web"), expected_version: None })),
            (3, command(Op::DeleteRuntime { id: "rt_a".into(), expected_version: Some(2) })),
            (4, command(Op::DeleteRuntime { id: "rt_a".into(), expected_version: None })),
        ],
    )
    .await;
    let events = sm.runtime_events("rt_a").unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["runtime.created", "runtime.updated", "runtime.deleted"]);
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(events.iter().all(|e| e.actor == Actor::Agent("planner".into()) && e.ts == at(1)));
    assert!(sm.get_runtime("rt_a").unwrap().is_none());
    let replies = apply(&mut sm, vec![(5, command(Op::CreateRuntime { runtime: runtime("rt_b", "web") }))]).await;
    assert!(matches!(&replies[0], CommandReply::Runtime(_)));
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_reply_and_refuses_other_requests() {
    let (_dir, mut sm) = open();
    let claim = |fingerprint: &str| IdempotencyClaim { key: "acme/k1".into(), fingerprint: fingerprint.into() };
    let with_claim = |op: Op, fingerprint: &str| Command { idempotency: Some(claim(fingerprint)), ..command(op) };
    let replies = apply(
        &mut sm,
        vec![
            (1, with_claim(Op::CreateRuntime { runtime: runtime("rt_a", "web") }, "f1")),
            (2, with_claim(Op::CreateRuntime { runtime: runtime("rt_a", "web") }, "f1")),
            (3, with_claim(Op::CreateRuntime { runtime: runtime("rt_z", "other") }, "f2")),
        ],
    )
    .await;
    assert!(matches!(&replies[0], CommandReply::Runtime(r) if r.id == "rt_a"));
    assert_eq!(replies[1], replies[0], "a retry gets the original reply, not a conflict");
    assert_eq!(replies[2], CommandReply::Rejected(Rejection::IdempotencyKeyReused { key: "acme/k1".into() }));
    assert_eq!(sm.runtime_events("rt_a").unwrap().len(), 1, "applied once");
}

#[tokio::test]
async fn a_snapshot_carries_the_whole_state_to_another_replica() {
    let (_dir, mut source) = open();
    let membership = Membership::new(vec![[1u64, 2, 3].into()], None);
    let mut entries = vec![Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Membership(membership),
    }];
    for i in 0..50u64 {
        entries.push(entry(
            2 + i,
            command(Op::CreateRuntime { runtime: runtime(&format!("rt_{i:03}"), &format!("n{i}")) }),
        ));
    }
    source.apply(entries).await.unwrap();
    let snapshot = source.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(51));

    let (_dir2, mut target) = open();
    apply(&mut target, vec![(1, command(Op::CreateRuntime { runtime: runtime("rt_stale", "stale") }))]).await;
    target.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
    assert!(target.get_runtime("rt_stale").unwrap().is_none(), "install replaces the whole state");
    assert_eq!(target.list_runtimes().unwrap(), source.list_runtimes().unwrap());
    assert_eq!(target.runtime_events("rt_007").unwrap(), source.runtime_events("rt_007").unwrap());
    let (applied, stored_membership) = target.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(51));
    assert_eq!(stored_membership.membership().voter_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
    let current = target.get_current_snapshot().await.unwrap().expect("installed snapshot is kept");
    assert_eq!(current.meta, snapshot.meta);
}

#[tokio::test]
async fn a_snapshot_of_another_format_version_is_refused() {
    let (_dir, mut source) = open();
    apply(&mut source, vec![(1, command(Op::CreateRuntime { runtime: runtime("rt_a", "web") }))]).await;
    let snapshot = source.build_snapshot().await.unwrap();
    let mut bytes = snapshot.snapshot.into_inner();
    // The format version is the first field (a varint): make it another version.
    bytes[0] = 99;
    let (_dir2, mut target) = open();
    let err = target.install_snapshot(&snapshot.meta, Box::new(std::io::Cursor::new(bytes))).await.unwrap_err();
    assert!(err.to_string().contains("format version"), "{err}");
    assert!(target.get_runtime("rt_a").unwrap().is_none());
}

#[tokio::test]
async fn a_retried_create_gets_the_same_runtime_and_no_second_event() {
    let (_dir, mut sm) = open();
    let replies = apply(
        &mut sm,
        vec![
            (1, command(Op::CreateRuntime { runtime: runtime("rt_a", "web") })),
            (2, command(Op::CreateRuntime { runtime: runtime("rt_a", "web") })),
            (3, command(Op::CreateRuntime { runtime: runtime("rt_a", "other") })),
        ],
    )
    .await;
    assert_eq!(replies[0], replies[1]);
    assert_eq!(
        replies[2],
        CommandReply::Rejected(Rejection::AlreadyExists { kind: "runtime".into(), id: "rt_a".into() })
    );
    assert_eq!(sm.runtime_events("rt_a").unwrap().len(), 1);
}
