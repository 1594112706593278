//! Fault injection against real RuntimeAI clusters, workload histories, and the
//! linearizability and invariant checkers that judge them.
//!
//! Built so far: [`linearizability`], the checker (Wing–Gong–Lowe search over per-key
//! histories, with a register/compare-and-set model). The fault injection, the workload and the
//! `runtimeai-chaos` binary are still to come; until they land, the multi-process tests in
//! `tests/` (kill, restart, membership changes against real `runtimeai` processes) are the fault
//! coverage.

pub mod linearizability;
