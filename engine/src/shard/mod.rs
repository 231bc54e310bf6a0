//! Shards: one per core, each hosting many groups. `core.rs` is the pure shard loop.

mod core;

pub use self::core::{Completion, PersistItem, RequestError, ShardCore, ShardOutput, Token};
