//! ReadIndex bookkeeping on the leader: reads wait until a quorum has answered a heartbeat round
//! sent after they arrived, which proves no newer leader could have committed anything else.

use std::collections::VecDeque;

use crate::types::{LogIndex, NodeId};

/// A read that became safe: once the state machine has applied through `index`, a read for
/// `context` may be served from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReadState {
    /// The caller's context from [`crate::Replica::read_index`].
    pub context: u64,
    /// Serve the read after applying at least this index.
    pub index: LogIndex,
}

/// How a leader makes sure it still leads before it answers a read
/// ([`crate::Replica::read_index_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadMode {
    /// Always confirm leadership with a heartbeat round acknowledged by a quorum (ReadIndex),
    /// even while a lease is valid: safe whatever the clocks do, at the cost of a round trip.
    Quorum,
    /// Answer at once from the leader lease when [`crate::Config::lease_reads`] is on and the
    /// lease is valid (which assumes clocks drift within [`crate::Config::clock_drift_ticks`]);
    /// otherwise as [`ReadMode::Quorum`]. What [`crate::Replica::read_index`] does.
    Lease,
}

/// One read waiting for its heartbeat round.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingRead {
    pub(crate) context: u64,
    /// Who asked: this replica or a follower that forwarded the read.
    pub(crate) from: NodeId,
    pub(crate) index: LogIndex,
    /// Heartbeat round that must be acknowledged by a quorum.
    pub(crate) seq: u64,
}

/// Reads waiting on the leader. Bounded by [`MAX_PENDING_READS`].
#[derive(Debug, Default)]
pub(crate) struct ReadQueue {
    /// Reads that arrived before the leader committed an entry of its term: the commit index is
    /// not yet known to be the group's.
    pub(crate) before_commit: Vec<(u64, NodeId, ReadMode)>,
    /// Reads with an index, in increasing `seq`.
    pub(crate) pending: VecDeque<PendingRead>,
}

/// Most reads a leader holds unconfirmed.
pub(crate) const MAX_PENDING_READS: usize = 4096;

impl ReadQueue {
    pub(crate) fn len(&self) -> usize {
        self.before_commit.len() + self.pending.len()
    }

    /// Removes every read whose round `confirmed_seq` covers, oldest first.
    pub(crate) fn confirm(&mut self, confirmed_seq: u64, mut release: impl FnMut(PendingRead)) {
        while self.pending.front().is_some_and(|read| read.seq <= confirmed_seq) {
            release(self.pending.pop_front().expect("checked non-empty"));
        }
    }

    /// Drops everything and releases the memory (leadership lost: clients retry).
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }
}
