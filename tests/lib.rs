//! The multi-process tests' harness: real `runtimeai` processes on loopback, from
//! [`runtimeai_chaos::cluster`] (the chaos tool drives clusters with the same code).

pub use runtimeai_chaos::cluster::*;

/// Prints a test phase, so a failing test's output shows how far it got.
pub fn phase(text: &str) {
    eprintln!("--- {text}");
}
