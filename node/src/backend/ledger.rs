//! Fencing and step memory for drivers without a place of their own to keep them.
//!
//! One append-only file of short text records, shared by every process that uses the
//! directory (nodes sharing a backend share it) under an exclusive `flock`:
//!
//! ```text
//! fence <operation> <token>     the newest token seen for the operation
//! pending <operation> <step>    the step's work is about to start
//! done <operation> <step>       the step's work finished
//! ```
//!
//! Each process keeps the records in memory and, holding the lock, reads what other processes
//! appended since it last looked before it decides; so a check costs a `flock` and a short read,
//! not a file per step. A step left `pending` without `done` was cut off by a crash after its
//! work may have happened: the driver is asked whether it did ([`StepLedger::run_probed`])
//! before the work runs again.
//!
//! The records survive a process crash (they are in the page cache as soon as written); they
//! are not fsync'd, so a machine crash may forget the newest ones, and the steps they guarded
//! run again, which the driver contract requires to converge.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{BackendError, CallContext};

/// Whether a step still had to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Fresh,
    AlreadyApplied,
}

#[derive(Debug, Clone)]
pub struct StepLedger {
    dir: PathBuf,
    inner: Arc<Mutex<Ledger>>,
}

/// What the records say of one operation.
#[derive(Debug, Default)]
struct OperationRecord {
    newest_token: u64,
    /// Steps whose work finished.
    done: Vec<u32>,
    /// Steps whose work started and has not been recorded as finished.
    pending: Vec<u32>,
}

#[derive(Debug)]
struct Ledger {
    file: File,
    /// How far this process has read the file.
    read_to: u64,
    operations: HashMap<String, OperationRecord>,
}

impl StepLedger {
    pub fn open(dir: PathBuf) -> std::io::Result<StepLedger> {
        std::fs::create_dir_all(&dir)?;
        let file = OpenOptions::new().create(true).read(true).append(true).open(dir.join("ledger"))?;
        let mut ledger = Ledger { file, read_to: 0, operations: HashMap::new() };
        ledger.file.lock()?;
        let caught_up = ledger.catch_up();
        ledger.file.unlock()?;
        caught_up?;
        Ok(StepLedger { dir, inner: Arc::new(Mutex::new(ledger)) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `apply` for the step unless a newer token was seen (fenced) or the step was already
    /// applied. A step cut off by a crash is applied again: for drivers whose every step
    /// converges when repeated.
    pub fn run<T>(
        &self,
        cx: &CallContext,
        apply: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<(Step, Option<T>), BackendError> {
        self.run_probed(cx, || Ok(false), apply)
    }

    /// Like [`run`](Self::run), but a step cut off by a crash asks `applied` first whether its
    /// work happened (the driver looks at its infrastructure); if it did, the step is recorded
    /// as done and not applied again. The check, the work and the records happen under the
    /// lock, so no other executor of the operation acts in between.
    pub fn run_probed<T>(
        &self,
        cx: &CallContext,
        applied: impl FnOnce() -> Result<bool, BackendError>,
        apply: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<(Step, Option<T>), BackendError> {
        self.lock()?.run_probed(cx, applied, apply)
    }

    /// Starts a step whose work is asynchronous (the ledger is not held while it runs): fenced
    /// like [`run`](Self::run), [`Step::AlreadyApplied`] if it was finished, else recorded as
    /// begun. Its work must converge when repeated: a step begun and cut off is done again.
    pub fn begin(&self, cx: &CallContext) -> Result<Step, BackendError> {
        self.lock()?.ledger.begin(cx, || Ok(false))
    }

    /// As [`begin`](Self::begin), but a step a crash cut off after it began counts as done: for
    /// work that must happen at most once (a command run in a sandbox may have done its part).
    pub fn begin_at_most_once(&self, cx: &CallContext) -> Result<Step, BackendError> {
        self.lock()?.ledger.begin(cx, || Ok(true))
    }

    /// Records a step [`begin`](Self::begin) started as done, once its work has happened;
    /// refused if a newer executor of the operation has come meanwhile.
    pub fn finish(&self, cx: &CallContext) -> Result<(), BackendError> {
        self.lock()?.ledger.finish(cx)
    }

    /// Takes the ledger, waiting while another thread or process holds it.
    pub fn lock(&self) -> Result<LockedLedger<'_>, BackendError> {
        let ledger = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        ledger.file.lock()?;
        Ok(LockedLedger { ledger })
    }

    /// Takes the ledger if nobody else holds it, without waiting: `None` when another thread
    /// or process does. For callers on an async runtime, which then wait on a blocking thread.
    pub fn try_lock(&self) -> Result<Option<LockedLedger<'_>>, BackendError> {
        let ledger = match self.inner.try_lock() {
            Ok(ledger) => ledger,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        match ledger.file.try_lock() {
            Ok(()) => Ok(Some(LockedLedger { ledger })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
        }
    }
}

/// The ledger, held by this thread (the in-process mutex and the file lock); released on drop.
pub struct LockedLedger<'a> {
    ledger: std::sync::MutexGuard<'a, Ledger>,
}

impl LockedLedger<'_> {
    /// [`StepLedger::run_probed`] with the ledger already held.
    pub fn run_probed<T>(
        mut self,
        cx: &CallContext,
        applied: impl FnOnce() -> Result<bool, BackendError>,
        apply: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<(Step, Option<T>), BackendError> {
        self.ledger.decide_and_apply(cx, applied, apply)
    }
}

impl Drop for LockedLedger<'_> {
    /// Releases the file lock, then (as the guard drops) the in-process one. Unlocking an open
    /// file does not fail in practice; if it did, the other processes would wait on it.
    fn drop(&mut self) {
        if let Err(e) = self.ledger.file.unlock() {
            tracing::warn!(error = %e, "cannot release the step ledger's file lock");
        }
    }
}

impl Ledger {
    fn finish(&mut self, cx: &CallContext) -> Result<(), BackendError> {
        self.catch_up()?;
        let id = cx.operation_id.as_str();
        let newest = self.operations.get(id).map_or(0, |record| record.newest_token);
        if cx.token < newest {
            return Err(BackendError::Fenced { token: cx.token, newer: newest });
        }
        self.append(Record::Done(id, cx.step))?;
        Ok(())
    }

    fn decide_and_apply<T>(
        &mut self,
        cx: &CallContext,
        applied: impl FnOnce() -> Result<bool, BackendError>,
        apply: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<(Step, Option<T>), BackendError> {
        if self.begin(cx, applied)? == Step::AlreadyApplied {
            return Ok((Step::AlreadyApplied, None));
        }
        let value = apply()?;
        self.append(Record::Done(&cx.operation_id, cx.step))?;
        Ok((Step::Fresh, Some(value)))
    }

    /// Fences the call, then: [`Step::AlreadyApplied`] if the step is done (or was begun and
    /// `applied` finds its work happened: then recorded as done), else records it as begun.
    fn begin(
        &mut self,
        cx: &CallContext,
        applied: impl FnOnce() -> Result<bool, BackendError>,
    ) -> Result<Step, BackendError> {
        if cx.operation_id.is_empty() || cx.operation_id.contains(char::is_whitespace) {
            return Err(BackendError::Permanent(format!("operation id {:?} cannot key a ledger", cx.operation_id)));
        }
        self.catch_up()?;
        let id = cx.operation_id.as_str();
        let (newest, done, pending) = match self.operations.get(id) {
            Some(record) => (record.newest_token, record.done.contains(&cx.step), record.pending.contains(&cx.step)),
            None => (0, false, false),
        };
        if cx.token < newest {
            return Err(BackendError::Fenced { token: cx.token, newer: newest });
        }
        if cx.token > newest {
            self.append(Record::Fence(id, cx.token))?;
        }
        if done {
            return Ok(Step::AlreadyApplied);
        }
        if pending && applied()? {
            self.append(Record::Done(id, cx.step))?;
            return Ok(Step::AlreadyApplied);
        }
        if !pending {
            self.append(Record::Pending(id, cx.step))?;
        }
        Ok(Step::Fresh)
    }

    /// Reads the records appended since the last look (the caller holds the file lock).
    fn catch_up(&mut self) -> Result<(), std::io::Error> {
        let end = self.file.metadata()?.len();
        if end <= self.read_to {
            return Ok(());
        }
        let mut bytes = vec![0; (end - self.read_to) as usize];
        self.file.read_exact_at(&mut bytes, self.read_to)?;
        self.read_to = end;
        for line in bytes.split(|b| *b == b'\n') {
            // A line cut short by a crash (or garbage) says nothing; skip it.
            if let Some(line) = std::str::from_utf8(line).ok().and_then(Record::parse) {
                self.remember(line);
            }
        }
        if bytes.last() != Some(&b'\n') {
            // A writer died mid-record: end its line so the next record starts on its own.
            self.file.write_all(b"\n")?;
            self.read_to += 1;
        }
        Ok(())
    }

    fn append(&mut self, record: Record<'_>) -> Result<(), std::io::Error> {
        let line = format!("{record}\n");
        self.file.write_all(line.as_bytes())?;
        self.read_to += line.len() as u64;
        self.remember(record);
        Ok(())
    }

    fn remember(&mut self, record: Record<'_>) {
        match record {
            Record::Fence(id, token) => {
                let entry = self.operations.entry(id.to_string()).or_default();
                entry.newest_token = entry.newest_token.max(token);
            }
            Record::Pending(id, step) => self.operations.entry(id.to_string()).or_default().pending.push(step),
            Record::Done(id, step) => {
                let entry = self.operations.entry(id.to_string()).or_default();
                entry.pending.retain(|s| *s != step);
                if !entry.done.contains(&step) {
                    entry.done.push(step);
                }
            }
        }
    }
}

enum Record<'a> {
    Fence(&'a str, u64),
    Pending(&'a str, u32),
    Done(&'a str, u32),
}

/// The text form [`Record::parse`] reads.
impl std::fmt::Display for Record<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Record::Fence(id, token) => write!(f, "fence {id} {token}"),
            Record::Pending(id, step) => write!(f, "pending {id} {step}"),
            Record::Done(id, step) => write!(f, "done {id} {step}"),
        }
    }
}

impl<'a> Record<'a> {
    fn parse(line: &'a str) -> Option<Record<'a>> {
        let mut words = line.split(' ');
        let (kind, id, number, rest) = (words.next()?, words.next()?, words.next()?, words.next());
        if rest.is_some() || id.is_empty() {
            return None;
        }
        match kind {
            "fence" => Some(Record::Fence(id, number.parse().ok()?)),
            "pending" => Some(Record::Pending(id, number.parse().ok()?)),
            "done" => Some(Record::Done(id, number.parse().ok()?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(token: u64, step: u32) -> CallContext {
        CallContext { operation_id: "op_1".into(), step, token }
    }

    #[test]
    fn an_asynchronous_step_is_done_only_once_finished() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = StepLedger::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(ledger.begin(&cx(5, 0)).unwrap(), Step::Fresh);
        // Cut off before its work happened (a crash, an error): a retry does it again.
        assert_eq!(ledger.begin(&cx(5, 0)).unwrap(), Step::Fresh);
        ledger.finish(&cx(5, 0)).unwrap();
        assert_eq!(ledger.begin(&cx(5, 0)).unwrap(), Step::AlreadyApplied);
        // A newer executor began the next step meanwhile: the older one's finish is refused.
        assert_eq!(ledger.begin(&cx(5, 1)).unwrap(), Step::Fresh);
        assert_eq!(ledger.begin(&cx(7, 1)).unwrap(), Step::Fresh);
        assert!(matches!(ledger.finish(&cx(5, 1)), Err(BackendError::Fenced { token: 5, newer: 7 })));
    }

    #[test]
    fn each_step_is_applied_once_and_older_tokens_are_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = StepLedger::open(dir.path().to_path_buf()).unwrap();
        let applied = std::cell::Cell::new(0);
        let apply = || {
            applied.set(applied.get() + 1);
            Ok(())
        };
        assert_eq!(ledger.run(&cx(5, 0), apply).unwrap().0, Step::Fresh);
        assert_eq!(ledger.run(&cx(5, 0), apply).unwrap().0, Step::AlreadyApplied);
        assert_eq!(ledger.run(&cx(9, 1), apply).unwrap().0, Step::Fresh);
        let fenced = ledger.run(&cx(5, 2), apply).unwrap_err();
        assert!(matches!(fenced, BackendError::Fenced { token: 5, newer: 9 }), "{fenced}");
        let failed = ledger.run(&cx(9, 2), || Err::<(), _>(BackendError::Retryable("later".into())));
        assert!(failed.is_err());
        assert_eq!(ledger.run(&cx(9, 2), apply).unwrap().0, Step::Fresh, "a failed step is not marked done");
        assert_eq!(applied.get(), 3);
    }

    #[test]
    fn ledgers_sharing_a_directory_see_each_others_records() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (StepLedger::open(dir.path().into()).unwrap(), StepLedger::open(dir.path().into()).unwrap());
        one.run(&cx(5, 0), || Ok(())).unwrap();
        assert_eq!(two.run(&cx(5, 0), || Ok(())).unwrap().0, Step::AlreadyApplied, "done by the other");
        two.run(&cx(9, 1), || Ok(())).unwrap();
        let fenced = one.run(&cx(5, 1), || Ok(())).unwrap_err();
        assert!(matches!(fenced, BackendError::Fenced { token: 5, newer: 9 }), "{fenced}");
        let reopened = StepLedger::open(dir.path().into()).unwrap();
        assert_eq!(reopened.run(&cx(9, 1), || Ok(())).unwrap().0, Step::AlreadyApplied, "records outlive the process");
    }

    #[test]
    fn a_step_cut_off_after_its_work_asks_the_driver_before_running_again() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = StepLedger::open(dir.path().into()).unwrap();
        // What an executor killed during its work leaves behind, ending in half a record.
        std::fs::write(dir.path().join("ledger"), "fence op_1 5\npending op_1 0\ndone op_").unwrap();
        let reopened = StepLedger::open(dir.path().into()).unwrap();
        let ran = std::cell::Cell::new(false);
        let outcome = reopened
            .run_probed(
                &cx(5, 0),
                || Ok(true),
                || {
                    ran.set(true);
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(outcome.0, Step::AlreadyApplied);
        assert!(!ran.get(), "the driver said the work happened");
        assert_eq!(ledger.run(&cx(5, 0), || Ok(())).unwrap().0, Step::AlreadyApplied, "and it is recorded as done");

        std::fs::write(dir.path().join("ledger"), "fence op_1 5\npending op_1 1\n").unwrap();
        let reopened = StepLedger::open(dir.path().into()).unwrap();
        let outcome = reopened
            .run_probed(
                &cx(5, 1),
                || Ok(false),
                || {
                    ran.set(true);
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(outcome.0, Step::Fresh);
        assert!(ran.get(), "the work did not happen: it runs");
        let text = std::fs::read_to_string(dir.path().join("ledger")).unwrap();
        assert!(text.lines().all(|line| Record::parse(line).is_some()), "every line a record: {text:?}");
    }

    #[test]
    fn try_lock_gives_up_while_another_thread_or_process_holds_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let (one, other) = (StepLedger::open(dir.path().into()).unwrap(), StepLedger::open(dir.path().into()).unwrap());
        let held = one.lock().unwrap();
        assert!(one.try_lock().unwrap().is_none(), "held in this process");
        // Another open of the file stands for another process: `flock` is per open file.
        assert!(other.try_lock().unwrap().is_none(), "held through another open file");
        drop(held);
        let taken = other.try_lock().unwrap().expect("free again");
        assert_eq!(taken.run_probed(&cx(5, 0), || Ok(false), || Ok(())).unwrap().0, Step::Fresh);
        let again = one.try_lock().unwrap().expect("released after the step");
        assert_eq!(again.run_probed(&cx(5, 0), || Ok(false), || Ok(())).unwrap().0, Step::AlreadyApplied);
    }

    #[test]
    fn an_operation_id_that_cannot_key_a_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = StepLedger::open(dir.path().into()).unwrap();
        let bad = CallContext { operation_id: "op 1".into(), step: 0, token: 1 };
        assert!(matches!(ledger.run(&bad, || Ok(())), Err(BackendError::Permanent(_))));
    }
}
