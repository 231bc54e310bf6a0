//! Raft consensus for one group, as a pure deterministic state machine (sans-IO).
//!
//! Work in progress: see issue 3.

#[cfg(feature = "testkit")]
pub mod testkit;
