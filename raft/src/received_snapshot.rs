//! Where a snapshot on its way to this node is written: a named file beside the snapshot
//! (`snapshot.receiving-N`), so that the install renames it into place rather than copying it
//! (1.5 GB at a million runtimes, written and synced a second time).
//!
//! One transfer's file is kept: a new transfer removes the file of the one before it (openraft
//! abandoned it), an install takes its file away, and a node's start removes what a stopped
//! node left.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Names the files of one process's transfers apart.
static TRANSFERS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub(crate) struct ReceivedSnapshots {
    /// `<snapshot>.receiving-`: what every transfer's file name starts with.
    prefix: PathBuf,
    current: Mutex<Option<PathBuf>>,
}

impl ReceivedSnapshots {
    /// For the snapshot at `snapshot_path`; removes the files of transfers a stopped node left.
    pub(crate) fn new(snapshot_path: &Path) -> ReceivedSnapshots {
        let mut prefix = snapshot_path.as_os_str().to_owned();
        prefix.push(".receiving-");
        let received = ReceivedSnapshots { prefix: PathBuf::from(prefix), current: Mutex::new(None) };
        for left in received.files() {
            if let Err(e) = std::fs::remove_file(&left) {
                tracing::warn!(path = %left.display(), error = %e, "cannot remove an interrupted transfer's file");
            }
        }
        received
    }

    /// The files of transfers in the directory.
    fn files(&self) -> Vec<PathBuf> {
        let (Some(dir), Some(start)) = (self.prefix.parent(), self.prefix.file_name()) else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let start = start.as_encoded_bytes();
        entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_name().as_encoded_bytes().starts_with(start))
            .map(|entry| entry.path())
            .collect()
    }

    /// A new, empty file for a transfer beginning now (the one before it is removed).
    pub(crate) fn begin(&self) -> std::io::Result<File> {
        let mut path = self.prefix.as_os_str().to_owned();
        path.push(TRANSFERS.fetch_add(1, Ordering::Relaxed).to_string());
        let path = PathBuf::from(path);
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path)?;
        if let Some(earlier) = self.current.lock().expect("received snapshots lock").replace(path) {
            let _ = std::fs::remove_file(earlier);
        }
        Ok(file)
    }

    /// The path of `file` if it is the current transfer's (same device and inode), which is
    /// then no longer kept here: the caller moves it.
    pub(crate) fn take_path_of(&self, file: &File) -> Option<PathBuf> {
        let mut current = self.current.lock().expect("received snapshots lock");
        let (open, named) = (file.metadata().ok()?, std::fs::metadata(current.as_ref()?).ok()?);
        (open.dev() == named.dev() && open.ino() == named.ino()).then(|| current.take()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_file_is_found_by_what_it_is_and_a_new_transfer_or_a_restart_removes_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("snapshot");
        let received = ReceivedSnapshots::new(&snapshot);
        let first = received.begin().unwrap();
        assert_eq!(received.files().len(), 1);
        let second = received.begin().unwrap();
        assert_eq!(received.files().len(), 1, "the abandoned transfer's file is removed");
        assert_eq!(received.take_path_of(&first), None, "not the current transfer");
        let other = File::create(dir.path().join("other")).unwrap();
        assert_eq!(received.take_path_of(&other), None, "not a transfer at all");
        let path = received.take_path_of(&second).expect("the current transfer");
        assert!(path.starts_with(dir.path()) && path.exists());
        assert_eq!(received.take_path_of(&second), None, "taken once");

        let _third = received.begin().unwrap();
        drop(received);
        let restarted = ReceivedSnapshots::new(&snapshot);
        assert_eq!(restarted.files(), Vec::<PathBuf>::new(), "a start removes what transfers left");
    }
}
