//! Identifiers, positions and log records shared by every part of the crate.

use std::fmt;

use bytes::Bytes;

macro_rules! newtype {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The zero value: no node, the term before any election, the index before the log.
            pub const ZERO: Self = Self(0);

            /// The raw number.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

newtype!(
    /// A member of the group. `NodeId(0)` means "nobody" and is never a valid member.
    NodeId,
    "n"
);
newtype!(
    /// A Raft term: a logical clock that at most one leader owns.
    Term,
    "t"
);
newtype!(
    /// A position in the replicated log; the first entry has index 1, index 0 is "before the log".
    LogIndex,
    "i"
);

impl LogIndex {
    /// The next index.
    #[must_use]
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }

    /// The previous index, saturating at zero.
    #[must_use]
    pub const fn prev(self) -> Self {
        Self(self.0.saturating_sub(1))
    }
}

/// What an entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A client command for the state machine.
    Normal,
    /// A membership change; the payload is an encoded [`Membership`] (see
    /// [`Membership::decode`]). It takes effect when committed.
    Membership,
    /// The no-op a new leader appends so that it can commit entries of earlier terms.
    Empty,
}

/// One record of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Position in the log.
    pub index: LogIndex,
    /// Term of the leader that created it.
    pub term: Term,
    /// What the payload means.
    pub kind: EntryKind,
    /// The bytes; empty for [`EntryKind::Empty`].
    pub payload: Bytes,
}

impl Entry {
    /// Bytes this entry counts for in batch and backpressure limits: the payload plus a fixed
    /// header, so that a flood of empty entries is bounded too.
    pub fn size_bytes(&self) -> u64 {
        self.payload.len() as u64 + ENTRY_OVERHEAD_BYTES
    }
}

/// Fixed per-entry cost counted by [`Entry::size_bytes`] (index, term, kind, length).
pub const ENTRY_OVERHEAD_BYTES: u64 = 24;

/// The state a replica must persist before it sends any of [`crate::Ready::persisted_messages`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HardState {
    /// The latest term this replica has seen.
    pub term: Term,
    /// Whom it voted for in `term`, if anyone.
    pub vote: Option<NodeId>,
    /// The highest index it knows to be committed.
    pub commit: LogIndex,
}

/// Who belongs to the group, at one point of the log.
///
/// Outside a change `outgoing` is empty. During a joint-consensus change it holds the old voters:
/// a decision then needs a majority of `voters` *and* a majority of `outgoing`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Membership {
    /// Voters of the (new) configuration, sorted, without duplicates.
    pub voters: Vec<NodeId>,
    /// Voters of the old configuration while a joint change is in progress, else empty.
    pub outgoing: Vec<NodeId>,
    /// Non-voting members that receive the log, sorted, disjoint from `voters`.
    pub learners: Vec<NodeId>,
}

/// Where a snapshot stands in the log, and the membership at that point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnapshotMeta {
    /// The last index the snapshot covers.
    pub index: LogIndex,
    /// The term of the entry at `index`.
    pub term: Term,
    /// The membership in effect at `index`.
    pub membership: Membership,
}

/// A state-machine snapshot: metadata plus the application's opaque bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// Position and membership.
    pub meta: SnapshotMeta,
    /// The state machine's image, produced and interpreted by the application.
    pub data: Bytes,
}
