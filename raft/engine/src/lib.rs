//! The runtime engine's decisions, as pure functions: the size catalogue ([`catalogue`]), the
//! policy engine ([`policy`]), the deterministic planner ([`planner`]) and where a new runtime
//! goes ([`placement`]).
//!
//! Pure so that every place that must decide can: the API answers a request early, the state
//! machine decides again in apply (deterministically, on every replica) when an operation is
//! accepted and right before it runs, and the planner's output is checked by the same rules.

pub mod catalogue;
pub mod placement;
pub mod planner;
pub mod policy;

pub use catalogue::Catalogue;
