//! Flotilla: an embeddable multi-raft storage engine. An [`Engine`] is one node: one shard
//! thread per core, each with its own WAL ([`flotilla_wal`]) shared by every group on it, its own
//! replicas ([`flotilla_raftgroup`]) and its own connections to the peer nodes. Groups run a
//! [`kv::StateMachine`]: the built-in ordered KV store or the application's own.
//!
//! Start with [`Engine::open_kv`], [`Engine::create_group`], [`Engine::propose_kv`] and
//! [`Engine::read`]; `ARCHITECTURE.md` maps the modules.

mod engine;
pub mod kv;
mod liveness;
pub mod shard;
pub mod transport;

pub use flotilla_raftgroup as raftgroup;
pub use flotilla_wal as wal;

pub use engine::{
    Applied, Consistency, Engine, EngineConfig, Error, GroupStatus, MachineFactory, ShardStats,
    shard_of,
};
pub use flotilla_raftgroup::{LogIndex, Membership, MembershipChange, NodeId};
pub use flotilla_wal::GroupId;
pub use shard::SnapshotTransferStats;
pub use transport::ClusterId;
pub use transport::faults::{Faults, LinkFault};

/// The README's Rust examples (engine and WAL), compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
