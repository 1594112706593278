//! The raft log on RocksDB.
//!
//! `append` writes entries into the database at once (so they are readable when it returns, as
//! openraft requires) and hands the flush callback to a syncer thread, which syncs the
//! write-ahead log and completes it: openraft acknowledges a write only after the callback, so
//! nothing is acknowledged before it is on disk. The thread takes every callback waiting when
//! it starts a sync, but with openraft 0.9, whose core awaits each append's flush before the
//! next, there is only ever one: writes share an fsync by sharing an entry (the leader's
//! batcher). The sync stays off tokio's threads all the same: done in `append`, it froze nodes
//! under load, and `block_in_place` around it bloated memory (`chaos/PERFORMANCE.md`, stop 42).
//!
//! The newest entries are also kept in memory as appended ([`RecentEntries`]): the leader reads
//! each entry back once per follower to replicate it, and every node once more to apply it, right
//! after appending it; copying it from memory costs less than reading and decoding it again.
//!
//! Purges are carried out by a thread of their own ([`purge_loop`]). The state machine's writes
//! skip the write-ahead log (see `store.rs`), so before entries are deleted the state machine is
//! flushed, and a flush takes a while; openraft calls `purge` from its core task, whose
//! heartbeats must not wait for that. So `purge` records the purge point in memory (entries up to
//! it are no longer read from then on) and the thread flushes, then deletes them and records the
//! point on disk. A crash before that leaves them in the log: harmless, the next purge takes them.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, StorageIOError};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use crate::codec;
use crate::limits;
use crate::store::{cf, flush_state_machine, CF_LOG, CF_RAFT_META};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// Counters of the log's disk work.
#[derive(Debug, Default)]
pub struct LogStats {
    /// `append` calls.
    pub appends: AtomicU64,
    /// Entries written.
    pub entries: AtomicU64,
    /// fsyncs of the write-ahead log made for appends.
    pub syncs: AtomicU64,
}

impl LogStats {
    pub fn get(&self) -> (u64, u64, u64) {
        (self.appends.load(Ordering::Relaxed), self.entries.load(Ordering::Relaxed), self.syncs.load(Ordering::Relaxed))
    }
}

/// RocksDB-backed [`RaftLogStorage`]. Cheap to clone: clones share the database and syncer.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: Arc<Worker<PendingFlush>>,
    purger: Arc<Worker<LogId>>,
    /// The newest purge point asked for; the purger deletes up to it soon after.
    purged: Arc<Mutex<Option<LogId>>>,
    /// Why the purger failed, if it did: the next append fails with it, which stops raft.
    purge_failure: Arc<Mutex<Option<String>>>,
    stats: Arc<LogStats>,
    recent: Arc<Mutex<RecentEntries>>,
}

/// The tail of the log, in memory: consecutive entries ending with the last one appended
/// (a truncation drops its end, a purge its start), bounded in count and encoded size.
#[derive(Default)]
struct RecentEntries {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

const RECENT_MAX_ENTRIES: usize = 1024;
const RECENT_MAX_BYTES: usize = 16 << 20;

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(entry, _)| entry.log_id.index)
    }

    fn push(&mut self, entry: Entry, size: usize) {
        let follows = self.entries.back().is_none_or(|(last, _)| last.log_id.index + 1 == entry.log_id.index);
        if !follows {
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > RECENT_MAX_ENTRIES || self.bytes > RECENT_MAX_BYTES {
            let Some((_, size)) = self.entries.pop_front() else { break };
            self.bytes -= size;
        }
    }

    /// Drops the entries from `index` on.
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(entry, _)| entry.log_id.index >= index) {
            let Some((_, size)) = self.entries.pop_back() else { break };
            self.bytes -= size;
        }
    }

    /// Drops the entries up to `index`.
    fn purge(&mut self, index: u64) {
        while self.entries.front().is_some_and(|(entry, _)| entry.log_id.index <= index) {
            let Some((_, size)) = self.entries.pop_front() else { break };
            self.bytes -= size;
        }
    }

    /// The entries of `range` from `start` on, up to `max_bytes` (the first always), if they
    /// are all here.
    fn get(&self, start: u64, range: &impl RangeBounds<u64>, max_bytes: usize) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let skip = (start - first) as usize;
        let mut bytes = 0;
        let mut entries = Vec::new();
        for (entry, size) in self.entries.iter().skip(skip) {
            bytes += size;
            if !range.contains(&entry.log_id.index) || (bytes > max_bytes && !entries.is_empty()) {
                break;
            }
            entries.push(entry.clone());
        }
        Some(entries)
    }
}

/// A thread of the log store that works through what is sent to it: the syncer,
/// the purger. Dropping the last handle stops it once its work is done and waits for it, so its
/// hold on the database ends before the drop returns (RocksDB must not be torn down by process
/// exit while a thread still uses it).
struct Worker<T> {
    work: Option<mpsc::Sender<T>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<T: Send + 'static> Worker<T> {
    fn spawn(name: &str, body: impl FnOnce(mpsc::Receiver<T>) + Send + 'static) -> Worker<T> {
        let (work, pending) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(pending))
            .unwrap_or_else(|e| panic!("spawn the {name} thread: {e}"));
        Worker { work: Some(work), thread: Some(thread) }
    }

    /// Hands `item` to the thread; gives it back if the thread is gone (it cannot stop while
    /// handles exist, so only if it panicked).
    fn send(&self, item: T) -> Result<(), T> {
        let work = self.work.as_ref().expect("the thread runs while a handle exists");
        work.send(item).map_err(|mpsc::SendError(item)| item)
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        self.work.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> LogStore {
        let stats = Arc::new(LogStats::default());
        let syncer = Worker::spawn("raft-log-sync", {
            let (db, stats) = (db.clone(), stats.clone());
            move |pending| sync_loop(db, pending, stats)
        });
        let purge_failure = Arc::new(Mutex::new(None));
        let purger = Worker::spawn("raft-log-purge", {
            let (db, failure) = (db.clone(), purge_failure.clone());
            move |pending| purge_loop(db, pending, failure)
        });
        LogStore {
            db,
            syncer: Arc::new(syncer),
            purger: Arc::new(purger),
            purged: Arc::default(),
            purge_failure,
            stats,
            recent: Arc::default(),
        }
    }

    /// The first index not purged.
    fn first_kept(&self) -> u64 {
        self.purged.lock().expect("purge point lock").map_or(0, |purged| purged.index + 1)
    }

    pub fn stats(&self) -> Arc<LogStats> {
        self.stats.clone()
    }

    fn log_cf(&self) -> &rocksdb::ColumnFamily {
        cf(&self.db, CF_LOG)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        let bytes = self.db.get_cf(cf(&self.db, CF_RAFT_META), key).map_err(|e| StorageIOError::read(&e))?;
        bytes.map(|b| codec::decode("raft metadata", &b)).transpose().map_err(|e| StorageIOError::read(&e).into())
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T, sync: bool) -> Result<(), StorageError> {
        let bytes = codec::encode("raft metadata", value).map_err(|e| StorageIOError::write(&e))?;
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.db.put_cf_opt(cf(&self.db, CF_RAFT_META), key, bytes, &opts).map_err(|e| StorageIOError::write(&e).into())
    }

    fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let mut iter = self.db.iterator_cf(self.log_cf(), IteratorMode::End);
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                let entry: Entry = codec::decode("log entry", &value).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(Some(entry.log_id))
            }
        }
    }
}

/// An append waiting for the fsync that makes it durable, and when it was made.
type PendingFlush = (LogFlushed<TypeConfig>, std::time::Instant);

/// Log keys are big-endian indexes, so RocksDB's byte order is log order.
fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn sync_loop(db: Arc<DB>, pending: mpsc::Receiver<PendingFlush>, stats: Arc<LogStats>) {
    let stages = crate::metrics::stages();
    while let Ok(first) = pending.recv() {
        let mut waiting = vec![first];
        waiting.extend(pending.try_iter());
        let started = std::time::Instant::now();
        let result = db.flush_wal(true);
        crate::metrics::observe_since(&stages.log_sync, started);
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        for (callback, appended) in waiting {
            callback.log_io_completed(result.clone().map_err(std::io::Error::other));
            crate::metrics::observe_since(&stages.log_flush, appended);
        }
    }
}

/// Deletes purged entries, each time after flushing the state machine (whose state on disk must
/// not lack what the deleted entries did). Purge points come in order; only the newest waiting
/// one matters.
fn purge_loop(db: Arc<DB>, pending: mpsc::Receiver<LogId>, failure: Arc<Mutex<Option<String>>>) {
    while let Ok(first) = pending.recv() {
        let log_id = pending.try_iter().last().unwrap_or(first);
        if let Err(e) = purge_now(&db, &log_id) {
            tracing::error!(error = %e, "purging the raft log failed");
            failure.lock().expect("purge failure lock").get_or_insert(e);
        }
    }
}

fn purge_now(db: &DB, log_id: &LogId) -> Result<(), String> {
    flush_state_machine(db).map_err(|e| format!("flushing the state machine before a purge: {e}"))?;
    // Record the purge point in the same batch, so a crash never leaves a hole unexplained.
    let mut batch = WriteBatch::default();
    let meta = codec::encode("raft metadata", log_id).map_err(|e| e.to_string())?;
    batch.put_cf(cf(db, CF_RAFT_META), KEY_LAST_PURGED, meta);
    batch.delete_range_cf(cf(db, CF_LOG), log_key(0), log_key(log_id.index + 1));
    db.write(batch).map_err(|e| format!("deleting purged log entries: {e}"))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.entries_within(range, usize::MAX)
    }

    /// What replication sends: the entries of `start..end` up to [`limits::APPEND_BYTES`],
    /// and always the first (see [`crate::limits`]).
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        self.entries_within(start..end, limits::APPEND_BYTES)
    }
}

impl LogStore {
    /// The entries of `range`, in order, up to `max_bytes` encoded (the first one always).
    fn entries_within<RB: RangeBounds<u64>>(&self, range: RB, max_bytes: usize) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        // Purged entries may wait for the purger a while; they are gone all the same.
        let start = start.max(self.first_kept());
        if let Some(entries) = self.recent.lock().expect("recent entries lock").get(start, &range, max_bytes) {
            return Ok(entries);
        }
        let mut entries = Vec::new();
        let mut bytes = 0;
        let iter = self.db.iterator_cf(self.log_cf(), IteratorMode::From(&log_key(start), Direction::Forward));
        for item in iter {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StorageIOError::read_logs(AnyError::error(format!("malformed log key {key:?}"))))?,
            );
            bytes += value.len();
            if !range.contains(&index) || (bytes > max_bytes && !entries.is_empty()) {
                break;
            }
            let entry: Entry = codec::decode("log entry", &value).map_err(|e| StorageIOError::read_logs(&e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let on_disk: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last_purged_log_id = on_disk.max(*self.purged.lock().expect("purge point lock"));
        // Entries waiting for the purger are still on disk; a purge may also reach past the last
        // entry (after a snapshot install), so the purge point is the floor.
        let last_log_id = self.last_log_id()?.max(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        // A vote must be on disk before the node acts on it.
        self.put_meta(KEY_VOTE, vote, true)
            .map_err(|e| StorageIOError::new(ErrorSubject::Vote, ErrorVerb::Write, AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: it only lets a restart re-apply committed entries before serving, and the
        // next synced append carries it to disk anyway.
        self.put_meta(KEY_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        if let Some(failure) = self.purge_failure.lock().expect("purge failure lock").clone() {
            return Err(StorageIOError::write_logs(AnyError::error(failure)).into());
        }
        let started = std::time::Instant::now();
        let mut batch = WriteBatch::default();
        let mut appended = Vec::new();
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        for entry in entries {
            self.stats.entries.fetch_add(1, Ordering::Relaxed);
            let bytes = codec::encode("log entry", &entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.put_cf(self.log_cf(), log_key(entry.log_id.index), &bytes);
            appended.push((entry, bytes.len()));
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        let written = self.db.write_opt(batch, &opts);
        {
            let mut recent = self.recent.lock().expect("recent entries lock");
            match written {
                Ok(()) => appended.into_iter().for_each(|(entry, size)| recent.push(entry, size)),
                Err(_) => *recent = RecentEntries::default(),
            }
        }
        written.map_err(|e| StorageIOError::write_logs(&e))?;
        if let Err((callback, _)) = self.syncer.send((callback, started)) {
            // The syncer thread died; sync here instead.
            callback.log_io_completed(self.db.flush_wal(true).map_err(std::io::Error::other));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.log_cf(), log_key(log_id.index), log_key(u64::MAX));
        batch.delete_cf(self.log_cf(), log_key(u64::MAX));
        self.recent.lock().expect("recent entries lock").truncate(log_id.index);
        self.db.write(batch).map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        *self.purged.lock().expect("purge point lock") = Some(log_id);
        self.recent.lock().expect("recent entries lock").purge(log_id.index);
        if let Err(log_id) = self.purger.send(log_id) {
            // The purger thread died; purge here instead.
            purge_now(&self.db, &log_id).map_err(|e| StorageIOError::write_logs(AnyError::error(e)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Blank }
    }

    fn ids(entries: Option<Vec<Entry>>) -> Option<Vec<(u64, u64)>> {
        entries.map(|entries| entries.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect())
    }

    /// Entries a purge covers are gone for readers at once; the purger deletes them from disk
    /// only after the state machine's memtables (written without the write-ahead log) are
    /// flushed, and records the purge point there.
    #[tokio::test]
    async fn a_purge_hides_its_entries_at_once_and_deletes_them_after_flushing_the_state_machine() {
        use crate::store::{DataDir, CF_SETTINGS};

        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(&dir.path().join("data"), 1, "purge").unwrap();
        let db = data.db.clone();
        for index in 1..=10 {
            db.put_cf(cf(&db, CF_LOG), log_key(index), codec::encode("log entry", &entry(1, index)).unwrap()).unwrap();
        }
        let mut no_wal = WriteOptions::default();
        no_wal.disable_wal(true);
        db.put_cf_opt(cf(&db, CF_SETTINGS), b"applied", b"state", &no_wal).unwrap();
        let in_memtable = |db: &DB| {
            db.property_int_value_cf(cf(db, CF_SETTINGS), "rocksdb.num-entries-active-mem-table").unwrap().unwrap()
        };
        assert_eq!(in_memtable(&db), 1);

        let mut store = LogStore::new(db.clone());
        store.purge(entry(1, 5).log_id).await.unwrap();
        assert_eq!(
            ids(Some(store.try_get_log_entries(0..100).await.unwrap())),
            Some((6..=10).map(|i| (1, i)).collect())
        );
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(5));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(10));
        drop(store); // waits for the purger

        assert_eq!(in_memtable(&db), 0, "the state machine was flushed");
        let on_disk: Vec<u64> = db
            .iterator_cf(cf(&db, CF_LOG), IteratorMode::Start)
            .map(|item| u64::from_be_bytes(item.unwrap().0.as_ref().try_into().unwrap()))
            .collect();
        assert_eq!(on_disk, (6..=10).collect::<Vec<_>>());
        let mut reopened = LogStore::new(db);
        let state = reopened.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(5), "the purge point is on disk");

        // A purge past the last entry (after a snapshot install): the last log id is the purge
        // point, even while the entries behind it wait for the purger.
        reopened.purge(entry(1, 12).log_id).await.unwrap();
        let state = reopened.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(12));
        assert!(reopened.try_get_log_entries(0..100).await.unwrap().is_empty());
    }

    /// openraft 0.9 waits for each append's flush before the next: every append gets an fsync
    /// of its own, made by the syncer thread, and its callback reports once it is done.
    #[tokio::test]
    async fn each_append_is_synced_and_reported() {
        use openraft::storage::RaftLogStorageExt;

        use crate::store::DataDir;

        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(&dir.path().join("data"), 1, "sync").unwrap();
        let mut store = LogStore::new(data.db.clone());
        for index in 1..=3 {
            // `blocking_append` returns once the callback has reported (it awaits it).
            tokio::time::timeout(std::time::Duration::from_secs(5), store.blocking_append([entry(1, index)]))
                .await
                .expect("the callback reported")
                .unwrap();
        }
        store.blocking_append([entry(1, 4), entry(1, 5)]).await.unwrap();
        assert_eq!(store.stats().get(), (4, 5, 4), "appends, entries, fsyncs");
        assert_eq!(
            ids(Some(store.try_get_log_entries(0..100).await.unwrap())),
            Some((1..=5).map(|i| (1, i)).collect())
        );
    }

    #[tokio::test]
    async fn replication_reads_stop_at_their_byte_budget_but_always_take_one_entry() {
        use crate::store::DataDir;

        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(&dir.path().join("data"), 1, "budget").unwrap();
        let db = data.db.clone();
        let size = codec::encode("log entry", &entry(1, 1)).unwrap().len();
        for index in 1..=10 {
            db.put_cf(cf(&db, CF_LOG), log_key(index), codec::encode("log entry", &entry(1, index)).unwrap()).unwrap();
        }
        let store = LogStore::new(db);
        let read = |max| ids(Some(store.entries_within(2..9, max).unwrap())).unwrap();
        assert_eq!(read(3 * size), [(1, 2), (1, 3), (1, 4)], "from disk");
        assert_eq!(read(1), [(1, 2)], "one entry larger than the budget still goes");
        assert_eq!(read(usize::MAX).len(), 7);

        let mut recent = RecentEntries::default();
        (1..=10).for_each(|i| recent.push(entry(1, i), 100));
        assert_eq!(ids(recent.get(3, &(3..), 250)), Some(vec![(1, 3), (1, 4)]), "from the tail in memory");
        assert_eq!(ids(recent.get(3, &(3..), 10)), Some(vec![(1, 3)]));
    }

    // How the tail agrees with the store through appends, truncations and purges is what
    // openraft's storage suite checks (`storage_suite.rs`), reading through this cache.
    #[test]
    fn the_tail_in_memory_follows_appends_truncations_and_purges() {
        let mut recent = RecentEntries::default();
        (1..=10).for_each(|i| recent.push(entry(1, i), 100));
        assert_eq!(ids(recent.get(3, &(3..6), usize::MAX)), Some(vec![(1, 3), (1, 4), (1, 5)]));
        assert_eq!(ids(recent.get(0, &(0..6), usize::MAX)), None, "what it does not hold is read from the store");
        recent.truncate(7);
        (7..=8).for_each(|i| recent.push(entry(2, i), 100));
        assert_eq!(
            ids(recent.get(5, &(5..), usize::MAX)),
            Some(vec![(1, 5), (1, 6), (2, 7), (2, 8)]),
            "the new end only"
        );
        recent.purge(5);
        assert_eq!(recent.first_index(), Some(6));
        assert_eq!(recent.bytes, 300);
        recent.push(entry(2, 20), 100);
        assert_eq!(ids(recent.get(20, &(20..), usize::MAX)), Some(vec![(2, 20)]), "a gap starts the tail afresh");
        assert_eq!(ids(recent.get(6, &(6..), usize::MAX)), None);
        (21..=21 + RECENT_MAX_ENTRIES as u64).for_each(|i| recent.push(entry(2, i), 1));
        assert_eq!(recent.entries.len(), RECENT_MAX_ENTRIES, "bounded");
        recent.push(entry(2, 22 + RECENT_MAX_ENTRIES as u64), RECENT_MAX_BYTES);
        assert_eq!(recent.entries.len(), 1, "bounded in bytes too");
    }
}
