//! Real RuntimeAI clusters under faults and under load: fault injection and the checkers that
//! judge what clients saw (the proof that the cluster keeps its promises while nodes die and
//! networks split, the way etcd's robustness tests and Jepsen prove theirs), and benchmarks
//! against etcd on the same machine.
//!
//! - [`cluster`]: real `runtimeai` processes on loopback (also the integration tests' harness);
//! - [`proxy`]: a TCP proxy per ordered pair of nodes: partitions, one-way cuts, loss, delay;
//! - [`disk`]: data directories that fill up or turn read-only;
//! - [`workload`]: concurrent clients recording a history of invoke / ok / fail / unknown;
//! - [`hostile`]: the clients the load scenarios set loose beside it (flood, slow-loris, list
//!   storm);
//! - [`linearizability`] and [`checks`]: the Wing–Gong–Lowe checker and the invariants;
//! - [`scenario`]: the named fault schedules `runtimeai-chaos run --scenario` runs;
//! - [`report`]: the one-screen summary, `report.json` and the PNG timeline;
//! - [`etcd`], [`bench`] and [`balanced`]: an etcd cluster beside ours, and `runtimeai-bench`,
//!   which measures both the same way: through haproxy with wrk, as users send traffic, or
//!   directly with our SDK and the same HTTP stack for etcd, for profiling;
//! - [`stages`]: where a create's time goes, from the nodes' `/metrics`;
//! - [`interrupt`]: a tool stopped by Ctrl-C or SIGTERM stops the clusters it started.

pub mod balanced;
pub mod bench;
pub mod checks;
pub mod cluster;
pub mod disk;
pub mod error;
pub mod etcd;
pub mod hostile;
pub mod interrupt;
pub mod linearizability;
pub mod proxy;
pub mod report;
pub mod scenario;
pub mod stages;
pub mod workload;
