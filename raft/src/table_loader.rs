//! Loads a snapshot's records into the store as table files, not as writes.
//!
//! A snapshot's records come family by family, each in key order: exactly what RocksDB's
//! `SstFileWriter` takes. Written as table files and ingested, a million runtimes (~1.5 GB)
//! are written to disk once and installed in ~6 s; as writes they went through the write-ahead
//! log, the memtables, their flushes and then compactions: three to four times the bytes, and
//! ~27 s of a core.
//!
//! The families are emptied first (see [`drop_deleted`]): ingested into an empty family, the
//! files go to its last level and nothing compacts them again.
//!
//! Reading the snapshot (decompressing it, splitting its records) and building the tables
//! (their blocks, filters and compression) take about as long as each other, so they run on two
//! threads at once ([`TableLoader::load`]), the records passed between them in batches.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rocksdb::{BottommostLevelCompaction, CompactOptions, IngestExternalFileOptions, Options, SstFileWriter, DB};

use crate::store::cf;

/// Table files are cut at this size, RocksDB's target file size: a compaction that reaches
/// one of them later rewrites that much, not a family's whole state.
const TABLE_FILE_BYTES: u64 = 64 << 20;

/// Errors of loading table files, as RocksDB or the file system gave them.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{what}: {reason}")]
    Store { what: String, reason: String },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot start the table writer's thread: {0}")]
    Thread(std::io::Error),
    #[error("the table writer stopped")]
    WriterStopped,
}

/// A RocksDB error as a [`LoadError`], saying what failed (`what` runs only on an error: `put`
/// maps every record's result).
fn store<W: Into<String>>(what: impl FnOnce() -> W) -> impl FnOnce(rocksdb::Error) -> LoadError {
    move |e| LoadError::Store { what: what().into(), reason: e.into_string() }
}

/// Frees the space of `families`, whose every record a committed range delete (up to
/// `key_max`, which sorts after every key) removed already, so that files ingested next land in
/// their last level: whole table files are dropped, what is left is compacted away.
pub(crate) fn drop_deleted(db: &DB, families: &[&str], key_max: &[u8]) -> Result<(), LoadError> {
    // Down to the last level, whose files RocksDB would otherwise move there whole, range
    // delete and all, so that the ingested files, which the delete covers, would land above it.
    let mut compaction = CompactOptions::default();
    compaction.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
    for name in families {
        let family = cf(db, name);
        db.delete_file_in_range_cf(family, b"".as_slice(), key_max)
            .map_err(store(|| format!("dropping {name}'s files")))?;
        db.compact_range_cf_opt(family, None::<&[u8]>, None::<&[u8]>, &compaction);
    }
    Ok(())
}

/// Writes records, family by family and in key order, to table files in `dir`, and ingests each
/// family's files once its records end.
pub(crate) struct TableLoader<'a> {
    db: &'a DB,
    options: &'a Options,
    dir: PathBuf,
    family: Option<String>,
    writer: Option<SstFileWriter<'a>>,
    /// The current family's finished files.
    files: Vec<PathBuf>,
    next_file: u64,
}

impl<'a> TableLoader<'a> {
    /// A loader writing into `dir`, emptied first (a crash may have left files there).
    pub(crate) fn new(db: &'a DB, options: &'a Options, dir: &Path) -> Result<TableLoader<'a>, LoadError> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LoadError::Io { path: dir.to_path_buf(), source }),
        }
        std::fs::create_dir_all(dir).map_err(|source| LoadError::Io { path: dir.to_path_buf(), source })?;
        Ok(TableLoader {
            db,
            options,
            dir: dir.to_path_buf(),
            family: None,
            writer: None,
            files: Vec::new(),
            next_file: 0,
        })
    }

    /// Writes the records `read` hands its sink (family by family, each in key order) while
    /// `read` goes on reading, and ingests them once it succeeds: a failed read ingests nothing
    /// more. A failure to write wins over the read's failure it caused.
    pub(crate) fn load<E: From<LoadError>>(
        mut self,
        read: impl FnOnce(&mut RecordSink) -> Result<(), E>,
    ) -> Result<(), E> {
        let (full, to_write) = mpsc::sync_channel::<RecordBatch>(BATCHES_ON_THEIR_WAY);
        let (written, to_reuse) = mpsc::channel::<RecordBatch>();
        std::thread::scope(|scope| {
            let writer = std::thread::Builder::new()
                .name("snapshot-tables".into())
                .spawn_scoped(scope, move || -> Result<TableLoader<'a>, LoadError> {
                    for mut batch in to_write {
                        for (family, key, value) in batch.records() {
                            self.put(family, key, value)?;
                        }
                        batch.clear();
                        let _ = written.send(batch);
                    }
                    Ok(self)
                })
                .map_err(LoadError::Thread)?;
            let mut sink = RecordSink { batch: RecordBatch::default(), full, to_reuse };
            let read = read(&mut sink).and_then(|()| sink.send().map_err(E::from));
            drop(sink);
            let loader = writer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            read?;
            loader.finish().map_err(E::from)
        })
    }

    /// Adds a record of `family`; records of one family come together, in key order.
    fn put(&mut self, family: &str, key: &[u8], value: &[u8]) -> Result<(), LoadError> {
        if self.family.as_deref() != Some(family) {
            self.ingest()?;
            self.family = Some(family.to_string());
        }
        if self.writer.as_ref().is_some_and(|w| w.file_size() >= TABLE_FILE_BYTES) {
            self.finish_file()?;
        }
        if self.writer.is_none() {
            let path = self.dir.join(format!("{:06}.sst", self.next_file));
            self.next_file += 1;
            let writer = SstFileWriter::create(self.options);
            writer.open(&path).map_err(store(|| format!("creating {}", path.display())))?;
            self.files.push(path);
            self.writer = Some(writer);
        }
        let writer = self.writer.as_mut().expect("a writer was just opened");
        writer.put(key, value).map_err(store(|| format!("writing a record of {family}")))
    }

    /// Ingests what is written so far and removes the directory.
    fn finish(mut self) -> Result<(), LoadError> {
        self.ingest()?;
        std::fs::remove_dir_all(&self.dir).map_err(|source| LoadError::Io { path: self.dir.clone(), source })
    }

    fn finish_file(&mut self) -> Result<(), LoadError> {
        if let Some(mut writer) = self.writer.take() {
            writer.finish().map_err(store(|| "finishing a table file"))?;
        }
        Ok(())
    }

    /// Hands the current family's files to RocksDB (moved, not copied).
    fn ingest(&mut self) -> Result<(), LoadError> {
        self.finish_file()?;
        let files = std::mem::take(&mut self.files);
        let Some(family) = &self.family else { return Ok(()) };
        if files.is_empty() {
            return Ok(());
        }
        let mut options = IngestExternalFileOptions::default();
        options.set_move_files(true);
        self.db
            .ingest_external_file_cf_opts(cf(self.db, family), &options, files)
            .map_err(store(|| format!("ingesting {family}'s table files")))
    }
}

/// How many full batches may wait for the writer: the reader runs ahead by at most this much.
const BATCHES_ON_THEIR_WAY: usize = 2;

/// Records on their way from the reading thread to the writing one: their bytes in one buffer.
#[derive(Debug, Default)]
pub(crate) struct RecordBatch {
    bytes: Vec<u8>,
    /// Per record: its family, and where its key and its value end in `bytes`.
    ends: Vec<(&'static str, usize, usize)>,
}

impl RecordBatch {
    /// A batch is sent once it holds this many bytes.
    const FULL: usize = 1 << 20;

    fn push(&mut self, family: &'static str, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.ends.push((family, key_end, self.bytes.len()));
    }

    fn records(&self) -> impl Iterator<Item = (&'static str, &[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(family, key_end, value_end)| {
            let record = (family, &self.bytes[start..key_end], &self.bytes[key_end..value_end]);
            start = value_end;
            record
        })
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

/// Where [`TableLoader::load`]'s reader puts records; the batches come back empty to be filled
/// again (a fresh buffer's pages cost a first touch each).
pub(crate) struct RecordSink {
    batch: RecordBatch,
    full: mpsc::SyncSender<RecordBatch>,
    to_reuse: mpsc::Receiver<RecordBatch>,
}

impl RecordSink {
    pub(crate) fn put(&mut self, family: &'static str, key: &[u8], value: &[u8]) -> Result<(), LoadError> {
        self.batch.push(family, key, value);
        if self.batch.bytes.len() >= RecordBatch::FULL {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), LoadError> {
        let next = self.to_reuse.try_recv().unwrap_or_default();
        let batch = std::mem::replace(&mut self.batch, next);
        self.full.send(batch).map_err(|_| LoadError::WriterStopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gives_back_its_records_as_they_were_put() {
        let mut batch = RecordBatch::default();
        batch.push("runtimes", b"rt_1", b"{}");
        batch.push("runtimes", b"", b"empty key");
        batch.push("events", b"rt_1\0", b"");
        let records: Vec<_> = batch.records().collect();
        assert_eq!(
            records,
            [("runtimes", &b"rt_1"[..], &b"{}"[..]), ("runtimes", b"", b"empty key"), ("events", b"rt_1\0", b"")]
        );
        batch.clear();
        assert_eq!(batch.records().count(), 0);
    }

    /// A store with the families `a` and `b`, and what loading `read` into it returned.
    fn loaded(
        read: impl FnOnce(&mut RecordSink) -> Result<(), LoadError>,
    ) -> (tempfile::TempDir, DB, Result<(), LoadError>) {
        let dir = tempfile::tempdir().unwrap();
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let db = DB::open_cf(&options, dir.path().join("db"), ["a", "b"]).unwrap();
        let loader = TableLoader::new(&db, &options, &dir.path().join("tables")).unwrap();
        let result = loader.load(read);
        (dir, db, result)
    }

    fn key(i: u32) -> [u8; 4] {
        i.to_be_bytes()
    }

    /// 3 MiB of records in `a` then 1 MiB in `b`: several batches, two families.
    fn records() -> impl Iterator<Item = (&'static str, [u8; 4], Vec<u8>)> {
        let value = |i: u32| vec![(i % 251) as u8; 1024];
        (0..3 * 1024).map(move |i| ("a", key(i), value(i))).chain((0..1024).map(move |i| ("b", key(i), value(i))))
    }

    /// A family's records: key and value.
    type Records = Vec<(Box<[u8]>, Box<[u8]>)>;

    fn family(db: &DB, name: &str) -> Records {
        db.iterator_cf(cf(db, name), rocksdb::IteratorMode::Start).map(Result::unwrap).collect()
    }

    #[test]
    fn records_read_on_one_thread_are_written_on_another_and_ingested_whole_in_order() {
        let (dir, db, result) = loaded(|sink| {
            for (family, key, value) in records() {
                sink.put(family, &key, &value)?;
            }
            Ok(())
        });
        result.unwrap();
        let expected =
            |name| -> Records { records().filter(|r| r.0 == name).map(|(_, k, v)| (k.into(), v.into())).collect() };
        assert_eq!(family(&db, "a"), expected("a"));
        assert_eq!(family(&db, "b"), expected("b"));
        assert!(!dir.path().join("tables").exists(), "the loader's files are gone");
    }

    #[test]
    fn a_read_that_fails_part_way_ingests_no_family_in_part() {
        let (_dir, db, failed) = loaded(|sink| {
            for (n, (family, key, value)) in records().enumerate() {
                if n == 3 * 1024 + 10 {
                    return Err(LoadError::Io {
                        path: "snapshot".into(),
                        source: std::io::ErrorKind::InvalidData.into(),
                    });
                }
                sink.put(family, &key, &value)?;
            }
            Ok(())
        });
        assert!(matches!(failed, Err(LoadError::Io { .. })), "{failed:?}");
        // (The install that failed stays marked as under way, and is done again from the start.)
        let a = family(&db, "a").len();
        assert!(a == 0 || a == 3 * 1024, "a family goes in whole or not at all: {a} records");
        assert!(family(&db, "b").is_empty(), "none of the family the read failed in");
    }

    #[test]
    fn a_write_that_fails_is_the_error_returned_not_the_stop_the_reader_then_meets() {
        // Keys out of order: the table writer refuses the second record.
        let (_dir, db, failed) = loaded(|sink| {
            for i in (0..4 * 1024).rev() {
                sink.put("a", &key(i), &[0; 1024])?;
            }
            Ok(())
        });
        match failed {
            Err(LoadError::Store { what, .. }) => assert_eq!(what, "writing a record of a"),
            other => panic!("expected the table writer's error, got {other:?}"),
        }
        assert!(family(&db, "a").is_empty());
    }
}
