//! Flotilla: the multi-raft engine. Work in progress: see issue 4.
//!
//! The engine will join [`flotilla_wal`] (one log per shard) and [`flotilla_raftgroup`] (one
//! replica per group member) into a node that hosts thousands of groups.

pub use flotilla_raftgroup as raftgroup;
pub use flotilla_wal as wal;
