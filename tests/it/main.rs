//! Multi-process integration tests: real `runtimeai` processes on loopback.

mod cli;
mod replication;
mod startup;
