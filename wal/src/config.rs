//! The log's configuration.

use crate::WalError;
use crate::io::Backend;
use crate::record::RECORD_HEADER_LEN;
use crate::segment::SEGMENT_HEADER_LEN;

/// What `open` does when it finds damage at or before the durable point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecoveryMode {
    /// Refuse to open with [`WalError::Corrupt`] (the default: never silently drop synced data).
    #[default]
    Strict,
    /// Truncate the log at the damage and report what was cut in the [`crate::RecoveryReport`]:
    /// for an engine that re-fetches the lost suffix from its Raft peers.
    TruncateCorrupt,
}

/// How the log performs its writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriterMode {
    /// A writer thread performs group commit; a preparer thread readies segments ahead of need.
    /// On an idle log, an append awaited with [`crate::block_on`] or
    /// [`crate::AppendFuture::wait`] is written and synced by the appending thread itself,
    /// sparing it the hand-off to the writer thread and back.
    #[default]
    Threads,
    /// No threads: the task awaiting an append performs the round itself. Deterministic, for tests
    /// and simulation (every IO step happens in a reproducible order).
    Inline,
}

/// Configuration of a [`crate::Wal`]. Build it with struct-update syntax over
/// `Config::default()`, so new knobs keep old code compiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Size of every new segment file in bytes (default 64 MiB).
    pub segment_bytes: u64,
    /// Largest group-commit round (one record, one write) in bytes; also the largest batch
    /// (default 4 MiB).
    pub batch_bytes_max: usize,
    /// How long the writer may wait for more appends before writing a round that is not full
    /// (default 0: never wait; rounds grow by themselves while the previous one syncs).
    pub batch_delay_us_max: u64,
    /// IO backend (default [`Backend::Auto`]; `FLOTILLA_WAL_BACKEND` overrides it).
    pub backend: Backend,
    /// What to do with damage found at open.
    pub recovery: RecoveryMode,
    /// Segments kept ready ahead of need so rotation never waits (default 1).
    pub prepared_segments: usize,
    /// Segments held back for maintenance batches when the disk is full (default 1).
    pub reserved_segments: usize,
    /// When the oldest segment is pinned by groups with at most this many live entries, the log
    /// copies them forward so one slow group cannot hold the disk (default 256; 0 disables).
    pub rewrite_entries_max: usize,
    /// Threads or inline writes.
    pub writer: WriterMode,
    /// Labels put on every metric the log records, e.g. `("shard", "3")`: an engine runs one
    /// log per shard, and unlabelled their fdatasync latencies and batch sizes would merge
    /// (default none). The log registers its metrics once, at open, with the recorder
    /// installed then: install a `metrics` recorder before opening the log (or the engine).
    pub metrics_labels: Vec<(String, String)>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            segment_bytes: 64 << 20,
            batch_bytes_max: 4 << 20,
            batch_delay_us_max: 0,
            backend: Backend::Auto,
            recovery: RecoveryMode::Strict,
            prepared_segments: 1,
            reserved_segments: 1,
            rewrite_entries_max: 256,
            writer: WriterMode::Threads,
            metrics_labels: Vec::new(),
        }
    }
}

impl Config {
    /// Checks the configuration for values the log cannot work with.
    pub fn validate(&self) -> Result<(), WalError> {
        if self.segment_bytes < 4096 || self.segment_bytes > u64::from(u32::MAX) {
            return Err(WalError::InvalidConfig(format!(
                "segment_bytes must be within 4 KiB..4 GiB, got {}",
                self.segment_bytes
            )));
        }
        if !self.segment_bytes.is_multiple_of(4096) {
            return Err(WalError::InvalidConfig("segment_bytes must be a multiple of 4096".into()));
        }
        let room = self.segment_bytes as usize - SEGMENT_HEADER_LEN - RECORD_HEADER_LEN - 8;
        if self.batch_bytes_max == 0 || self.batch_bytes_max > room {
            return Err(WalError::InvalidConfig(format!(
                "batch_bytes_max must be within 1..={room} for {}-byte segments",
                self.segment_bytes
            )));
        }
        if self.prepared_segments == 0 {
            return Err(WalError::InvalidConfig("prepared_segments must be at least 1".into()));
        }
        Ok(())
    }
}
