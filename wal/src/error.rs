//! The log's errors: one enum, typed fields, `Clone` so one failure can complete many futures.

use std::sync::Arc;

use crate::GroupId;
use crate::index::InvalidOp;
use crate::io::ProbeError;

/// Everything a log operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// A write or fdatasync failed earlier; the log refuses every operation from then on, because
    /// after a failed fdatasync the page cache can no longer be trusted (it is never retried).
    #[error("log poisoned by an earlier {op} failure: {cause}")]
    Poisoned {
        /// The operation that failed: `write` or `fdatasync`, or `writing a round` when a panic
        /// (a bug) unwound through a round's write.
        op: &'static str,
        /// The error it returned.
        cause: Arc<std::io::Error>,
    },
    /// The disk (or quota) is full: new entries are refused until compaction frees segments.
    /// Maintenance batches (truncation, compaction, hard state) still use a reserved segment.
    #[error("disk full")]
    DiskFull,
    /// Damage found at or before the durable point: the log refuses to open rather than drop
    /// synced data (see `RecoveryMode::TruncateCorrupt` for the opt-in alternative).
    #[error("corrupt log: segment {segment}, offset {offset}: {reason}")]
    Corrupt {
        /// Sequence number of the segment.
        segment: u64,
        /// Byte offset of the damage within it.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// An IO error outside the write path (open, recovery, segment preparation).
    #[error("io error during {context}: {source}")]
    Io {
        /// What the log was doing.
        context: &'static str,
        /// The error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The batch does not fit the group's log (a gap, or an index already compacted).
    #[error("invalid batch for group {group}: {reason}")]
    InvalidBatch {
        /// The group.
        group: GroupId,
        /// Why.
        reason: InvalidOp,
    },
    /// A batch larger than one record may be (`batch_bytes_max`).
    #[error("batch of {bytes} bytes exceeds the maximum of {max}")]
    BatchTooLarge {
        /// The batch's encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The requested entries were compacted away.
    #[error("group {group}: entries before {first_index} were compacted")]
    Compacted {
        /// The group.
        group: GroupId,
        /// Its first live index.
        first_index: u64,
    },
    /// The requested entries are past the group's last index.
    #[error("group {group}: no entries after {last_index}")]
    Unavailable {
        /// The group.
        group: GroupId,
        /// Its last index.
        last_index: u64,
    },
    /// The log knows nothing of the group.
    #[error("group {0} not found")]
    GroupNotFound(GroupId),
    /// Another process (or another open log) holds the directory.
    #[error("log directory is locked by another process or log")]
    Locked,
    /// The log was closed.
    #[error("log closed")]
    Closed,
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// io_uring was required but cannot be used here.
    #[error(transparent)]
    IoUringUnavailable(#[from] ProbeError),
}

impl WalError {
    pub(crate) fn io(context: &'static str, source: std::io::Error) -> WalError {
        if crate::io::is_disk_full(&source) {
            return WalError::DiskFull;
        }
        WalError::Io { context, source: Arc::new(source) }
    }
}
