//! Multi-process integration tests: real `runtimeai` processes on loopback.

mod api;
mod cli;
mod engine;
mod hypervisor;
mod linearizable;
mod replication;
mod startup;
