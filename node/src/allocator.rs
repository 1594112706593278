//! The process allocator's tuning. The binary uses mimalloc (glibc's malloc spent about a
//! quarter of a loaded node's CPU allocating, freeing and consolidating). Left at its defaults,
//! mimalloc keeps freed memory for a second before returning it, which doubled a node's peak
//! resident memory while it created 100 000 runtimes (1.1 GiB against 0.5 GiB); returning it at
//! once (no delay) cost a fifth of the write throughput instead (every purged page is faulted
//! in and zeroed again). A tenth of a second keeps most of both.

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, v3; default 1000 ms).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process before it goes back to the OS.
pub const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`], unless the operator set
/// `MIMALLOC_PURGE_DELAY` (mimalloc's own variable, read at start). Call first thing in `main`.
pub fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets a process-wide integer option; mimalloc reads it when it next purges.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_option_set_is_the_purge_delay() {
        // SAFETY: reads and writes a process-wide integer option.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(super::PURGE_DELAY), 1000, "mimalloc's default purge delay");
            std::env::remove_var("MIMALLOC_PURGE_DELAY");
            super::return_freed_memory_promptly();
            assert_eq!(libmimalloc_sys::mi_option_get(super::PURGE_DELAY), super::PURGE_DELAY_MS);
        }
    }
}
