//! Fault injection against real RuntimeAI clusters, workload histories, and the
//! linearizability and invariant checkers that judge them.
//!
//! Not built yet: the crate exists so the workspace has the layout the project fixed. Until it
//! lands, the multi-process tests in `tests/` (kill, restart, membership changes against real
//! `runtimeai` processes) are the fault coverage.
