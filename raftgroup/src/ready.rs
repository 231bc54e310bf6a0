//! The output of a [`crate::Replica`]: everything the driver must do, as data.

use crate::message::Message;
use crate::read_index::ReadState;
use crate::types::{Entry, HardState, LogIndex, NodeId, Snapshot, Term};

/// Messages that may be sent only once the [`Ready`] that carried them is durable.
///
/// They promise something about this replica's disk — a granted vote (the vote must be on disk,
/// or a crash could let it vote twice in one term), an acknowledged append (the entries must be
/// on disk, or an acknowledged commit could be lost) — so send them only after the Ready's
/// `hard_state`, `snapshot` and `entries` (and those of every earlier Ready) are durable.
#[derive(Debug, Default)]
pub struct SendAfterPersist(pub(crate) Vec<Message>);

impl SendAfterPersist {
    /// Takes the messages; call this only after the Ready's state is durable.
    pub fn into_messages_after_persist(self) -> Vec<Message> {
        self.0
    }

    /// Looks at the messages without sending them (logs, tests).
    pub fn peek(&self) -> &[Message] {
        &self.0
    }

    /// True if there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a [`Fetch`] is needed; hand it back unchanged to [`crate::Replica::on_fetched`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FetchPurpose {
    /// Entries to replicate to a lagging follower.
    Replicate {
        /// The follower.
        to: NodeId,
    },
    /// Committed entries to apply that are no longer cached.
    Apply,
}

/// A read of durable entries from storage that the replica needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fetch {
    /// What the entries are for.
    pub purpose: FetchPurpose,
    /// The replica's term when it asked; stale answers are ignored.
    pub term: Term,
    /// First index wanted.
    pub low: LogIndex,
    /// Last index wanted (inclusive).
    pub high: LogIndex,
    /// Stop after this many bytes (see [`Entry::size_bytes`]), but return at least one entry.
    pub max_bytes: u64,
}

/// One batch of work for the driver. See the crate documentation for the loop.
///
/// The order of duties:
/// 1. send `messages` now (they depend on nothing unpersisted);
/// 2. make `snapshot` (if any), then `entries`, then `hard_state` durable — `entries` may start
///    below the storage's last index: drop the storage's entries from there on first; unless
///    `must_sync`, writing them without an fsync is enough;
/// 3. then send `persisted_messages`;
/// 4. apply `committed_entries` in order (at any time: they are committed by a quorum), serve
///    `read_states` once applied through their index, answer `fetches` with
///    [`crate::Replica::on_fetched`];
/// 5. call [`crate::Replica::advance`] with this Ready, and [`crate::Replica::on_persisted`] when
///    the entries are durable.
#[derive(Debug, Default)]
#[must_use = "a Ready holds work the driver must do"]
pub struct Ready {
    /// The term, vote and commit to persist, if they changed.
    pub hard_state: Option<HardState>,
    /// A snapshot received from the leader: install it (state machine and storage) before the
    /// entries of this Ready.
    pub snapshot: Option<Snapshot>,
    /// Entries to append to storage, consecutive; they replace any stored entries at or after the
    /// first one's index.
    pub entries: Vec<Entry>,
    /// Messages to send now.
    pub messages: Vec<Message>,
    /// Messages to send only after this Ready is durable.
    pub persisted_messages: SendAfterPersist,
    /// Committed entries to apply, in order.
    pub committed_entries: Vec<Entry>,
    /// Reads that became safe.
    pub read_states: Vec<ReadState>,
    /// Log reads to perform and return through [`crate::Replica::on_fetched`].
    pub fetches: Vec<Fetch>,
    /// Whether step 2 needs an fsync: there are entries or a snapshot, or the term or the vote
    /// changed. A new commit index alone need not be durable — a restarted replica learns it
    /// again from the leader, and its state machine comes back from its snapshot, which is
    /// always of committed state — so a write of nothing else may skip the fsync (etcd's
    /// `MustSync`), and `persisted_messages` may leave once it is written.
    pub must_sync: bool,
}

impl Ready {
    /// The last entry in `entries`, as `(term, index)` to pass to
    /// [`crate::Replica::on_persisted`] once they are durable.
    pub fn last_entry(&self) -> Option<(Term, LogIndex)> {
        self.entries.last().map(|entry| (entry.term, entry.index))
    }
}
