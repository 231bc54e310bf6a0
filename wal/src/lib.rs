//! Flotilla's write-ahead log: one segmented, group-committed, crash-safe log shared by many Raft
//! groups.
//!
//! Every group on a core appends into the same log. Producers encode their batches straight into
//! the open *round*; one writer turns the whole round into one record, one write and one
//! `fdatasync`, while the next round fills. Segments are fixed-size, pre-written files, recycled
//! once no group needs them, so the hot path never extends a file. Reads return zero-copy slices
//! of the segments' memory maps. Recovery verifies every checksum and tells a torn unsynced tail
//! (cut off) from damage to synced data (refused) — see `FORMAT.md` for the bytes and the rule.
//! Any write or `fdatasync` error poisons the log: it is never retried.
//!
//! ```
//! use bytes::Bytes;
//! use flotilla_wal::{Config, GroupId, Wal, WriteBatch, block_on};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let config = Config { segment_bytes: 1 << 20, batch_bytes_max: 64 << 10, ..Config::default() };
//! let (wal, _recovery) = Wal::open(dir.path(), config).unwrap();
//! let mut batch = WriteBatch::new();
//! batch.add_entries(GroupId(7), 1, [(1, Bytes::from_static(b"x")), (1, Bytes::from_static(b"y"))]);
//! block_on(wal.append(batch)).unwrap();
//! let entries = wal.entries(GroupId(7), 1..3).unwrap();
//! assert_eq!(entries[1].payload, "y");
//! block_on(wal.compact(GroupId(7), 1, 1)).unwrap();
//! assert_eq!(wal.group_state(GroupId(7)).unwrap().first_index, 2);
//! ```

mod commit;
mod config;
mod error;
mod index;
pub mod io;
mod log;
pub mod record;
mod recovery;
pub mod segment;
pub mod sim;

pub use commit::{AppendFuture, block_on, waiting_caller};
pub use config::{Config, RecoveryMode, WriterMode};
pub use error::WalError;
pub use index::{GroupState, InvalidOp};
pub use io::{ActiveBackend, Backend, ProbeError, probe_io_uring};
pub use log::{Entry, Stats, Wal};
pub use record::{HardState, Op, WriteBatch};
pub use recovery::{Recovery, RecoveryReport};
pub use segment::ReadView;

/// Identifies a Raft group (a shard of the application's state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GroupId(pub u64);

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
