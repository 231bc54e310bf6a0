//! Flotilla: the multi-raft engine. Work in progress (issue 4): the pure building blocks land
//! first — the transport's frame codec and the built-in KV state machine — then the shard loop,
//! the runtime and the API.
//!
//! The engine joins [`flotilla_wal`] (one log per shard) and [`flotilla_raftgroup`] (one replica
//! per group member) into a node that hosts thousands of groups.

mod engine;
pub mod kv;
pub mod shard;
pub mod transport;

pub use flotilla_raftgroup as raftgroup;
pub use flotilla_wal as wal;

pub use engine::{
    Applied, Consistency, Engine, EngineConfig, Error, GroupStatus, MachineFactory, ShardStats,
    shard_of,
};
pub use flotilla_raftgroup::{LogIndex, NodeId};
pub use flotilla_wal::GroupId;
pub use transport::ClusterId;
pub use transport::faults::{Faults, LinkFault};
