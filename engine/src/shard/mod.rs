//! Shards: one per core, each hosting many groups. `core.rs` is the pure shard loop.

mod core;
pub(crate) mod driver;
pub mod store;

pub use self::core::{
    Completion, PersistItem, Quiescence, RequestError, ShardCore, ShardOutput, Token,
};
