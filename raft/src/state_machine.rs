//! The replicated state machine on RocksDB: applies committed commands, builds and installs
//! snapshots, and answers reads for the API.
//!
//! Apply is deterministic: it reads only the command and the store. The writes of one `apply`
//! call go into one RocksDB batch together with the new `last_applied`, so a crash leaves the
//! state either before or after that batch. They skip the write-ahead log (the entries they
//! come from are in it, synced) and reach disk by atomic memtable flushes: a crash takes the
//! batches applied since the last flush, and `last applied` with them, and the node re-applies
//! those entries from its log before it serves. The log store flushes the state machine before
//! it purges entries (see `store.rs`).
//!
//! A snapshot is installed as a stream of table files, ingested family by family
//! (`table_loader.rs`), and survives a crash half way: the received file is kept under a name
//! first, a marker in the state machine's own family says an install is under way, and a node
//! that starts with the marker loads the file again before it serves
//! ([`StateMachineStore::install`]).
//!
//! The unfinished operations are also kept in memory (loaded at open, followed by apply,
//! reloaded by a snapshot install): the scheduler and every executor read them on each change,
//! and scanning RocksDB's index of them, full of the tombstones finished operations leave,
//! cost more than applying.

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{AnyError, EntryPayload, OptionalSend, StorageIOError};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};
use tokio::io::AsyncWriteExt;

use crate::apply::apply_entry;
use crate::build_priority::BuildPriority;
use crate::codec;
use crate::command::CommandReply;
use crate::error::DataDirError;
use crate::keys::{KEY_INSTALLING, KEY_LAST_APPLIED, KEY_MEMBERSHIP};
use crate::received_snapshot::ReceivedSnapshots;
use crate::snapshot_file::{self, SnapshotFormatError, SnapshotReader, SnapshotWriter};
use crate::state_reader::StateReader;
use crate::store::{cf, sync_parent_dir, write_atomically_with, CF_SM_META, STATE_MACHINE_CFS};
use crate::table_loader::{self, TableLoader};
use crate::txn::Txn;
use crate::types::{
    read_err, write_err, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// The families a snapshot holds: the state machine's but its metadata (which the install
/// writes itself).
fn loaded_families() -> Vec<&'static str> {
    STATE_MACHINE_CFS.iter().copied().filter(|name| *name != CF_SM_META).collect()
}

/// Upper bound for range deletes: every key we write sorts below it.
const KEY_MAX: [u8; 32] = [0xff; 32];

/// RocksDB-backed [`RaftStateMachine`]: the [`StateReader`] and what writes. Clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    reader: StateReader,
    /// The latest snapshot (`snapshot_file.rs`), read when a follower needs it; nothing of it
    /// is kept in memory.
    snapshot_path: PathBuf,
    /// The file a snapshot on its way here is written to.
    received: Arc<ReceivedSnapshots>,
    /// At what priority snapshots are built.
    build_priority: Arc<BuildPriority>,
}

/// The store reads as its reader does.
impl std::ops::Deref for StateMachineStore {
    type Target = StateReader;

    fn deref(&self) -> &StateReader {
        &self.reader
    }
}

impl From<SnapshotFormatError> for StorageError {
    fn from(e: SnapshotFormatError) -> Self {
        match e {
            SnapshotFormatError::Io(_) | SnapshotFormatError::TooLarge { .. } => {
                StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
            }
            _ => StorageIOError::read_snapshot(None, AnyError::new(&e)).into(),
        }
    }
}

/// Loading a snapshot's tables writes the state machine.
impl From<table_loader::LoadError> for StorageError {
    fn from(e: table_loader::LoadError) -> Self {
        write_err(e)
    }
}

/// The snapshot file is the one file the state machine writes itself.
impl From<DataDirError> for StorageError {
    fn from(e: DataDirError) -> Self {
        StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
    }
}

impl StateMachineStore {
    pub fn new(db: Arc<DB>, snapshot_path: PathBuf) -> Result<StateMachineStore, StorageError> {
        let received = Arc::new(ReceivedSnapshots::new(&snapshot_path));
        let reader = StateReader::open(db)?;
        let store = StateMachineStore { reader, snapshot_path, received, build_priority: Default::default() };
        store.finish_an_interrupted_install()?;
        // A snapshot this build cannot read is refused now, not when a follower needs it.
        store.current()?;
        Ok(store)
    }

    /// The read side, for those who read only (the API, the scheduler, the executors).
    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    /// At what priority snapshots are built: for a leader whose new member waits for one.
    pub fn build_priority(&self) -> &Arc<BuildPriority> {
        &self.build_priority
    }

    /// Writes the state machine, as of one RocksDB snapshot, to the snapshot file as it reads
    /// it: no copy of the state is held in memory.
    fn build(&self) -> Result<Snapshot, StorageError> {
        let view = self.db.snapshot();
        let decode_meta = |key: &[u8]| -> Result<Option<Vec<u8>>, StorageError> {
            view.get_cf(cf(&self.db, CF_SM_META), key).map_err(read_err)
        };
        let last_applied: Option<LogId> =
            decode_meta(KEY_LAST_APPLIED)?.map(|b| codec::decode("state record", &b)).transpose().map_err(read_err)?;
        let membership: StoredMembership = decode_meta(KEY_MEMBERSHIP)?
            .map(|b| codec::decode("state record", &b))
            .transpose()
            .map_err(read_err)?
            .unwrap_or_default();
        let snapshot_id = match &last_applied {
            Some(id) => format!("{}-{}", id.leader_id.term, id.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        let write = |out: &mut dyn std::io::Write| -> Result<(), StorageError> {
            let mut writer = SnapshotWriter::new(out, &meta)?;
            for name in loaded_families() {
                // A build reads the whole state once: through the block cache it would push out
                // what the API reads (64 MiB against ~1.5 GB at a million runtimes).
                let mut once = rocksdb::ReadOptions::default();
                once.fill_cache(false);
                let records =
                    view.iterator_cf_opt(cf(&self.db, name), once, IteratorMode::Start).map(|r| r.map_err(read_err));
                writer.family(name, records)?;
            }
            writer.finish()?;
            Ok(())
        };
        write_atomically_with(&self.snapshot_path, write)?;
        // The file itself, open: openraft reads it only to send it; nothing is read back.
        let file = std::fs::File::open(&self.snapshot_path).map_err(read_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }

    /// The latest snapshot, open, with the metadata of that very file (a concurrent build
    /// replaces the path, not what an open file reads). Its checksum is checked first (at a
    /// node's start and before it is sent): a corrupt file is set aside (`.corrupt`) and a new
    /// snapshot built from the state, which is intact in the store.
    fn current(&self) -> Result<Option<Snapshot>, StorageError> {
        let mut file = match std::fs::File::open(&self.snapshot_path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let meta = snapshot_file::read_meta(std::io::BufReader::new(&mut file))?;
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        if let Err(corrupt) = snapshot_file::verify(std::io::BufReader::new(&mut file)) {
            let aside = self.snapshot_path.with_extension("corrupt");
            tracing::error!(
                path = %self.snapshot_path.display(),
                set_aside = %aside.display(),
                error = %corrupt,
                "the snapshot file is corrupt; setting it aside and building a new one from the state"
            );
            std::fs::rename(&self.snapshot_path, &aside).map_err(write_err)?;
            return self.build().map(Some);
        }
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }

    /// Installs the snapshot a leader sent (in `file`), so that a crash at any point leaves
    /// either the state as it was or an install the next start finishes: the file is checked and
    /// kept as `snapshot.installing` (renamed if it is the transfer's own file, else copied);
    /// one synced batch marks the install (the log position it installs) and empties the state
    /// machine; [`Self::load`] streams the records in and ends it. Nothing of the snapshot is
    /// held in memory but a few 1 MiB batches of records on their way to the table writer and
    /// the table block being written.
    fn install(&self, meta: &SnapshotMeta, mut file: std::fs::File) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        snapshot_file::verify(std::io::BufReader::with_capacity(1 << 20, &mut file))?;
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        let found = snapshot_file::read_meta(std::io::BufReader::new(&mut file))?;
        if found.last_log_id != meta.last_log_id {
            return Err(read_err(AnyError::error(format!(
                "snapshot content is at {:?} but its metadata says {:?}",
                found.last_log_id, meta.last_log_id
            ))));
        }
        let checked = started.elapsed();
        let installing = self.snapshot_path.with_extension("installing");
        match self.received.take_path_of(&file) {
            Some(received) => {
                file.sync_all().map_err(write_err)?;
                std::fs::rename(&received, &installing).map_err(write_err)?;
                sync_parent_dir(&self.snapshot_path).map_err(write_err)?;
            }
            None => {
                file.seek(SeekFrom::Start(0)).map_err(read_err)?;
                write_atomically_with(&installing, |out| std::io::copy(&mut file, out).map(drop).map_err(write_err))?;
            }
        }
        let kept = started.elapsed();
        self.begin_install(&meta.last_log_id)?;
        self.load(&installing, meta)?;
        let seconds = started.elapsed();
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes = std::fs::metadata(&self.snapshot_path).map(|m| m.len()).unwrap_or(0),
            seconds = seconds.as_secs_f64(),
            checking = checked.as_secs_f64(),
            keeping = (kept - checked).as_secs_f64(),
            loading = (seconds - kept).as_secs_f64(),
            "snapshot installed"
        );
        Ok(())
    }

    /// Empties the state machine and marks an install of the snapshot at `at` as under way, in
    /// one synced batch (the mark after the deletes: they include the meta family).
    pub(crate) fn begin_install(&self, at: &Option<LogId>) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        for name in STATE_MACHINE_CFS {
            batch.delete_range_cf(cf(&self.db, name), b"".as_slice(), KEY_MAX.as_slice());
        }
        let mark = codec::encode("state record", at).map_err(write_err)?;
        batch.put_cf(cf(&self.db, CF_SM_META), KEY_INSTALLING, mark);
        self.write_synced(batch)?;
        Ok(table_loader::drop_deleted(&self.db, &loaded_families(), &KEY_MAX)?)
    }

    /// Loads the snapshot file at `path` into the state machine (emptied, and marked as
    /// installing) as table files, renames the file as the current snapshot, then in one synced
    /// batch records its log position and membership and removes the mark.
    fn load(&self, path: &Path, meta: &SnapshotMeta) -> Result<(), StorageError> {
        let file = std::fs::File::open(path).map_err(read_err)?;
        let reader = SnapshotReader::new(std::io::BufReader::with_capacity(1 << 20, file))?;
        let options = crate::store::table_file_options();
        let tables = TableLoader::new(&self.db, &options, &self.snapshot_path.with_extension("tables"))?;
        let families = loaded_families();
        let mut family = "";
        tables.load(|sink| {
            reader.for_each(|name, key, value| {
                if name != family {
                    family = families.iter().copied().find(|known| *known == name).ok_or_else(|| {
                        read_err(AnyError::error(format!("snapshot holds unknown column family {name:?}")))
                    })?;
                }
                sink.put(family, key, value).map_err(StorageError::from)
            })
        })?;
        let mut batch = WriteBatch::default();
        if path != self.snapshot_path {
            std::fs::rename(path, &self.snapshot_path).map_err(write_err)?;
            sync_parent_dir(&self.snapshot_path).map_err(write_err)?;
        }
        let meta_cf = cf(&self.db, CF_SM_META);
        if let Some(last_log_id) = &meta.last_log_id {
            batch.put_cf(meta_cf, KEY_LAST_APPLIED, codec::encode("state record", last_log_id).map_err(write_err)?);
        }
        batch.put_cf(meta_cf, KEY_MEMBERSHIP, codec::encode("state record", &meta.last_membership).map_err(write_err)?);
        batch.delete_cf(meta_cf, KEY_INSTALLING);
        self.write_synced(batch)?;
        self.reload()
    }

    /// At open: an install a crash cut short is loaded again from its file (kept under its
    /// installing name, or already renamed as the current snapshot).
    fn finish_an_interrupted_install(&self) -> Result<(), StorageError> {
        let Some(marker) = self.db.get_cf(cf(&self.db, CF_SM_META), KEY_INSTALLING).map_err(read_err)? else {
            return Ok(());
        };
        let wanted: Option<LogId> = codec::decode("state record", &marker).map_err(read_err)?;
        for path in [self.snapshot_path.with_extension("installing"), self.snapshot_path.clone()] {
            let Ok(file) = std::fs::File::open(&path) else { continue };
            let Ok(meta) = snapshot_file::read_meta(std::io::BufReader::new(file)) else { continue };
            if meta.last_log_id == wanted {
                tracing::warn!(path = %path.display(), at = ?wanted, "a snapshot install was cut short; loading it again");
                self.begin_install(&wanted)?;
                return self.load(&path, &meta);
            }
        }
        Err(read_err(AnyError::error(format!(
            "a snapshot install (at {wanted:?}) was cut short and its file is gone: the state machine is incomplete; \
             remove this node's data directory and add it to the cluster again"
        ))))
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(write_err)
    }
}

/// Commands one write batch of apply holds at most (one entry always goes, whatever it holds).
/// openraft hands a member catching up everything committed at once: at 400 000 runtimes a
/// new member's applies of ~2 000 creates each held a tokio worker (of two) and RocksDB's write
/// queue for 0.1–0.8 s at a time, and the log appends behind them outlasted openraft's
/// AppendEntries timeout (one heartbeat) 20–24 times per join; in pieces, 9.
const APPLY_PIECE_COMMANDS: usize = 256;

/// The commands `entry` holds.
fn commands_in(entry: &Entry) -> usize {
    match &entry.payload {
        EntryPayload::Normal(command) => command.command().count(),
        _ => 1,
    }
}

impl StateMachineStore {
    /// Applies `entries` as one write batch.
    fn apply_piece(&mut self, entries: Vec<Entry>) -> Result<Vec<CommandReply>, StorageError> {
        let started = std::time::Instant::now();
        let unfinished = self.active_operations.read().expect("active operations lock");
        let mut txn = Txn::new(&self.db).reading_unfinished(&unfinished);
        let mut replies = Vec::new();
        let mut last_applied = None;
        for entry in entries {
            last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => CommandReply::Empty,
                EntryPayload::Normal(command) => apply_entry(&mut txn, entry.log_id.index, command.into_command())?,
                EntryPayload::Membership(membership) => {
                    txn.put(
                        CF_SM_META,
                        KEY_MEMBERSHIP.to_vec(),
                        &StoredMembership::new(Some(entry.log_id), membership),
                    )?;
                    CommandReply::Empty
                }
            };
            replies.push(reply);
        }
        if let Some(last_applied) = last_applied {
            txn.put(CF_SM_META, KEY_LAST_APPLIED.to_vec(), &last_applied)?;
        }
        // No write-ahead log: the log entries are in it already; see the module's docs.
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        let (operations_written, nodes_written, settings_written, placement_written, api_keys_written) = (
            std::mem::take(&mut txn.operations_written),
            txn.nodes_written,
            txn.settings_written,
            txn.placement_written,
            txn.api_keys_written,
        );
        self.db.write_opt(txn.into_batch(), &opts).map_err(write_err)?;
        drop(unfinished);
        self.follow_operations(operations_written);
        if nodes_written {
            self.reload_nodes()?;
        }
        if settings_written {
            self.reload_settings()?;
        }
        if placement_written {
            self.reload_placement()?;
        }
        if api_keys_written {
            self.reload_api_keys()?;
        }
        if let Some(applied) = last_applied {
            self.applied_up_to(applied.index);
        }
        crate::metrics::observe_since(&crate::metrics::stages().apply, started);
        Ok(replies)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied()?, self.membership()?))
    }

    /// In pieces of at most [`APPLY_PIECE_COMMANDS`] commands, one write batch each, yielding
    /// between them: a member catching up is handed thousands of entries at once.
    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandReply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut entries = entries.into_iter().peekable();
        let mut replies = Vec::new();
        while entries.peek().is_some() {
            let mut piece = Vec::new();
            let mut commands = 0;
            while let Some(entry) = entries.next_if(|_| piece.is_empty() || commands < APPLY_PIECE_COMMANDS) {
                commands += commands_in(&entry);
                piece.push(entry);
            }
            replies.extend(self.apply_piece(piece)?);
            if entries.peek().is_some() {
                tokio::task::yield_now().await;
            }
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    /// A file beside the snapshot ([`ReceivedSnapshots`]); the chunks are written to it as
    /// they arrive.
    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let received = self.received.clone();
        let file = tokio::task::spawn_blocking(move || received.begin()).await.map_err(write_err)?;
        Ok(Box::new(tokio::fs::File::from_std(file.map_err(write_err)?)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let this = self.clone();
        let meta = meta.clone();
        // Chunks still on their way to the file land (or fail) before it is read.
        let mut snapshot = snapshot;
        snapshot.flush().await.map_err(write_err)?;
        let file = snapshot.into_std().await;
        tokio::task::spawn_blocking(move || this.install(&meta, file)).await.map_err(write_err)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.current()).await.map_err(read_err)?
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    /// Builds on a thread of its own at low CPU priority unless a build is awaited
    /// ([`BuildPriority`]): a build reads the whole state, and on a busy node it should take the
    /// idle CPU, not the requests'.
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let this = self.clone();
        let (done, built) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("snapshot-build".into())
            .spawn(move || {
                let under_way = this.build_priority.build_starts();
                let (started, cpu) = (std::time::Instant::now(), this_threads_cpu());
                let built = this.build();
                if let Ok(snapshot) = &built {
                    let bytes = std::fs::metadata(&this.snapshot_path).map(|m| m.len()).unwrap_or(0);
                    tracing::info!(
                        snapshot = %snapshot.meta.snapshot_id,
                        bytes,
                        seconds = started.elapsed().as_secs_f64(),
                        cpu_seconds = (this_threads_cpu() - cpu).as_secs_f64(),
                        "snapshot built"
                    );
                }
                // Over before anyone hears of it: whoever hurries the next build finds none under way.
                drop(under_way);
                let _ = done.send(built);
            })
            .map_err(write_err)?;
        built.await.map_err(write_err)?
    }
}

/// The CPU time the calling thread has used.
fn this_threads_cpu() -> std::time::Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given, which lives across the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[cfg(test)]
#[path = "state_machine_tests.rs"]
mod tests;
