//! Shards: one per core, each hosting many groups. `core.rs` is the pure shard loop.

mod core;
pub(crate) mod driver;
mod peer;
mod pending;
pub mod store;
pub(crate) mod transfer;

pub use self::core::{
    Completion, MembershipEdit, PROMOTE_LAG_ENTRIES_MAX, PendingSnapshot, PersistItem, Quiescence,
    RequestError, ShardCore, ShardOutput, Token,
};
pub use self::transfer::SnapshotTransferStats;
