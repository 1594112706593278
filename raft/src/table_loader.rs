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

use std::path::{Path, PathBuf};

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
}

fn store(what: impl Into<String>) -> impl FnOnce(rocksdb::Error) -> LoadError {
    let what = what.into();
    move |e| LoadError::Store { what, reason: e.into_string() }
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
            .map_err(store(format!("dropping {name}'s files")))?;
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

    /// Adds a record of `family`; records of one family come together, in key order.
    pub(crate) fn put(&mut self, family: &str, key: &[u8], value: &[u8]) -> Result<(), LoadError> {
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
            writer.open(&path).map_err(store(format!("creating {}", path.display())))?;
            self.files.push(path);
            self.writer = Some(writer);
        }
        let writer = self.writer.as_mut().expect("a writer was just opened");
        writer.put(key, value).map_err(store(format!("writing a record of {family}")))
    }

    /// Ingests what is written so far and removes the directory.
    pub(crate) fn finish(mut self) -> Result<(), LoadError> {
        self.ingest()?;
        std::fs::remove_dir_all(&self.dir).map_err(|source| LoadError::Io { path: self.dir.clone(), source })
    }

    fn finish_file(&mut self) -> Result<(), LoadError> {
        if let Some(mut writer) = self.writer.take() {
            writer.finish().map_err(store("finishing a table file"))?;
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
            .map_err(store(format!("ingesting {family}'s table files")))
    }
}
