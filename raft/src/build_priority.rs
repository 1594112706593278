//! How a snapshot build shares the CPU: at nice 19, on the CPU the requests leave, like
//! RocksDB's flushes, unless someone waits for it.
//!
//! A member joining waits: it is sent the leader's latest snapshot and then the log since, and
//! at a million runtimes a build at nice 19 under load takes over a minute, so the snapshot it
//! got was a build old and it replayed ~14 000 entries (21 s of a 29 s join). The leader then
//! [hurries](BuildPriority::hurry): the build under way goes back to the priority its thread
//! started with, or the next one starts there.
//!
//! On Linux a thread's nice value is its own. Lowering it is always allowed; raising it back
//! needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20 (systemd's `LimitNICE=20`, which the unit in
//! `deploy/systemd` sets): without, the build under way keeps its low priority (logged), the
//! member is not kept waiting for it, and the next build starts at normal priority anyway.

use std::sync::{Arc, Mutex};

/// The nice value of a build nobody waits for.
const LOW: i32 = 19;

/// The state machine's snapshot builds: the one under way, and whether the next is awaited.
#[derive(Debug, Default)]
pub struct BuildPriority {
    state: Mutex<BuildState>,
}

#[derive(Debug, Default)]
struct BuildState {
    /// The next build starts at normal priority.
    next_awaited: bool,
    under_way: Option<BuildThread>,
}

#[derive(Debug, Clone, Copy)]
struct BuildThread {
    id: libc::pid_t,
    /// Its nice value before it was lowered, if it was.
    started_at: Option<i32>,
}

/// A build under way; it counts as one until dropped.
pub struct BuildUnderWay(Arc<BuildPriority>);

impl BuildPriority {
    /// Called on a build's thread as it starts: lowers the thread's priority unless the build
    /// is awaited. The build counts as under way until the returned guard is dropped.
    pub fn build_starts(self: &Arc<Self>) -> BuildUnderWay {
        let mut state = self.lock();
        let awaited = std::mem::take(&mut state.next_awaited);
        let started_at = if awaited { None } else { lower_this_thread() };
        // SAFETY: gettid takes nothing and cannot fail.
        let id = unsafe { libc::gettid() };
        state.under_way = Some(BuildThread { id, started_at });
        BuildUnderWay(self.clone())
    }

    /// Someone waits for a build: the one under way goes back to the priority it started with,
    /// or, if none is under way, the next one starts at normal priority. False if the build under
    /// way could not be raised (it goes on at nice 19, and may take long on a busy node).
    pub fn hurry(&self) -> bool {
        let mut state = self.lock();
        let Some(build) = state.under_way else {
            state.next_awaited = true;
            return true;
        };
        let Some(nice) = build.started_at else { return true };
        // SAFETY: setpriority takes integers only; `build.id` is a live thread of this process
        // (its guard, which clears `under_way`, is dropped before the thread ends).
        let refused = unsafe { libc::setpriority(libc::PRIO_PROCESS, build.id as libc::id_t, nice) } != 0;
        if refused {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot raise the snapshot build under way to normal priority (needs CAP_SYS_NICE or \
                 RLIMIT_NICE of 20: systemd's LimitNICE=20); it goes on at nice {LOW}"
            );
            return false;
        }
        tracing::info!(nice, "raised the snapshot build under way to normal priority: a member waits for it");
        state.under_way = Some(BuildThread { started_at: None, ..build });
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BuildState> {
        self.state.lock().expect("build priority lock")
    }
}

impl Drop for BuildUnderWay {
    fn drop(&mut self) {
        self.0.lock().under_way = None;
    }
}

/// Nice [`LOW`] for the calling thread; its nice value before, if it was lowered.
fn lower_this_thread() -> Option<i32> {
    let before = this_threads_nice()?;
    // SAFETY: setpriority takes integers only and touches no memory of ours.
    let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, LOW) } != 0;
    if failed {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the snapshot build's priority");
        return None;
    }
    Some(before)
}

/// The calling thread's nice value (`None` if it cannot be read).
fn this_threads_nice() -> Option<i32> {
    // getpriority may return -1 as a nice value: errno tells it from a failure.
    // SAFETY: __errno_location points at this thread's errno, which lives as long as the thread.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority takes integers only.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    (nice != -1 || std::io::Error::last_os_error().raw_os_error() == Some(0)).then_some(nice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Runs a "build" on a thread of its own: it reports its nice value when asked, until told
    /// to end.
    struct FakeBuild {
        ask: mpsc::Sender<bool>,
        nice: mpsc::Receiver<Option<i32>>,
        thread: std::thread::JoinHandle<()>,
    }

    impl FakeBuild {
        fn start(priority: &Arc<BuildPriority>) -> FakeBuild {
            let (ask, asked) = mpsc::channel::<bool>();
            let (tell, nice) = mpsc::channel();
            let priority = priority.clone();
            let thread = std::thread::spawn(move || {
                let _under_way = priority.build_starts();
                while asked.recv() == Ok(true) {
                    tell.send(this_threads_nice()).unwrap();
                }
            });
            FakeBuild { ask, nice, thread }
        }

        fn nice(&self) -> i32 {
            self.ask.send(true).unwrap();
            self.nice.recv().unwrap().expect("the build's nice value")
        }

        fn end(self) {
            self.ask.send(false).unwrap();
            self.thread.join().unwrap();
        }
    }

    /// Root (CAP_SYS_NICE), or an RLIMIT_NICE of 20 or more (down to nice 0).
    fn may_raise_priority() -> bool {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the rlimit it is given, which lives across the call.
        let allowed = unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } == 0 && limit.rlim_cur >= 20;
        // SAFETY: geteuid takes nothing and cannot fail.
        allowed || unsafe { libc::geteuid() } == 0
    }

    #[test]
    fn a_build_nobody_waits_for_runs_at_nice_19_and_a_hurried_one_at_the_priority_it_started_with() {
        let normal = this_threads_nice().expect("this thread's nice value");
        assert!(normal < LOW, "the tests must not run at nice {LOW} already ({normal})");
        let priority = Arc::new(BuildPriority::default());
        let build = FakeBuild::start(&priority);
        assert_eq!(build.nice(), LOW);
        assert_eq!(this_threads_nice(), Some(normal), "the other threads keep theirs");
        // Raising a thread's priority back takes CAP_SYS_NICE (CI runs as root).
        assert_eq!(priority.hurry(), may_raise_priority());
        let hurried = if may_raise_priority() { normal } else { LOW };
        assert_eq!(build.nice(), hurried);
        build.end();
        assert!(priority.lock().under_way.is_none(), "a build that ended counts as under way");
    }

    #[test]
    fn hurrying_with_no_build_under_way_starts_the_next_one_and_only_that_one_at_normal_priority() {
        let normal = this_threads_nice().expect("this thread's nice value");
        let priority = Arc::new(BuildPriority::default());
        assert!(priority.hurry());
        let awaited = FakeBuild::start(&priority);
        assert_eq!(awaited.nice(), normal);
        awaited.end();
        let next = FakeBuild::start(&priority);
        assert_eq!(next.nice(), LOW);
        next.end();
    }
}
