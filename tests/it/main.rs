//! Multi-process integration tests: real `runtimeai` processes on loopback.

mod api;
mod chaos_cli;
mod cli;
mod client;
mod ctl;
mod engine;
mod events;
mod hypervisor;
mod load;
mod mcp;
mod metrics;
mod migration;
mod replication;
mod sandbox;
mod security;
mod startup;
mod tls;
mod webhooks;
