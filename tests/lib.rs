//! The multi-process tests' harness: real `runtimeai` processes on loopback, from
//! [`runtimeai_chaos::cluster`] (the chaos tool drives clusters with the same code).

pub use runtimeai_chaos::cluster::*;
