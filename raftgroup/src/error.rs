//! Typed errors, one enum per operation family.

use thiserror::Error;

use crate::types::{LogIndex, NodeId, Term};

/// A [`crate::Config`] that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Node id zero means "nobody".
    #[error("node id 0 is reserved")]
    ZeroId,
    /// A node is listed both as voter and learner.
    #[error("a node is both voter and learner")]
    LearnerIsVoter,
    /// Heartbeats must happen.
    #[error("heartbeat_ticks must be positive")]
    ZeroHeartbeat,
    /// Followers would time out between heartbeats.
    #[error("election_ticks ({election_ticks}) must exceed heartbeat_ticks ({heartbeat_ticks})")]
    ElectionNotAboveHeartbeat {
        /// The configured election timeout.
        election_ticks: u32,
        /// The configured heartbeat interval.
        heartbeat_ticks: u32,
    },
    /// Replication could never send.
    #[error("max_inflight_messages must be positive")]
    ZeroInflight,
    /// A byte limit of zero would block everything.
    #[error("byte limits must be positive")]
    ZeroByteLimit,
    /// Leases rely on followers refusing votes while they hear from a leader.
    #[error("lease_reads requires check_quorum")]
    LeaseWithoutCheckQuorum,
    /// The lease would be empty.
    #[error(
        "clock_drift_ticks ({clock_drift_ticks}) must be below election_ticks ({election_ticks})"
    )]
    DriftTooLarge {
        /// The configured drift margin.
        clock_drift_ticks: u32,
        /// The configured election timeout.
        election_ticks: u32,
    },
    /// The recovered state contradicts itself.
    #[error("recovered state is inconsistent: {reason}")]
    BadRecoveredState {
        /// What is wrong.
        reason: &'static str,
    },
}

/// Why [`crate::Replica::step`] refused a message. The replica's state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Error {
    /// The message is addressed to another node.
    #[error("message for {to} delivered to {me}")]
    WrongRecipient {
        /// The addressee.
        to: NodeId,
        /// This replica.
        me: NodeId,
    },
    /// The sender id is zero or this replica's own id.
    #[error("invalid sender {from}")]
    InvalidSender {
        /// The claimed sender.
        from: NodeId,
    },
    /// Entries in an Append are not consecutive from `prev_index + 1`, or have terms above the
    /// message's term.
    #[error("malformed append: {reason}")]
    MalformedAppend {
        /// What is wrong.
        reason: &'static str,
    },
    /// An Append would overwrite an entry already committed: the sender is broken or byzantine.
    #[error("append conflicts with committed entry at {index}")]
    CommittedConflict {
        /// The committed index that would be overwritten.
        index: LogIndex,
    },
    /// A fetched batch does not match the request or the log.
    #[error("fetched entries do not match the request")]
    BadFetch,
}

/// Why [`crate::Replica::propose`] (or [`crate::Replica::propose_membership`]) refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ProposeError {
    /// Only the leader accepts proposals; retry at `leader_hint` if known.
    #[error("not the leader (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The leader this replica last heard from in its current term.
        leader_hint: Option<NodeId>,
    },
    /// The leader is handing over leadership and accepts nothing meanwhile.
    #[error("proposal dropped: leadership transfer in progress")]
    ProposalDropped,
    /// Backpressure: the group cannot absorb more now; back off and retry.
    #[error("busy: {reason}")]
    Busy {
        /// Which limit was reached.
        reason: BusyReason,
    },
    /// A membership change is still in progress (not yet committed, or joint not yet left).
    #[error("a membership change is already pending")]
    MembershipChangePending,
    /// The requested membership is invalid.
    #[error("invalid membership: {reason}")]
    InvalidMembership {
        /// What is wrong.
        reason: &'static str,
    },
}

/// Which backpressure limit made a proposal fail with [`ProposeError::Busy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BusyReason {
    /// The leader holds `Config::max_uncommitted_bytes` of entries not yet applied.
    #[error("{uncommitted_bytes} uncommitted bytes")]
    UncommittedBytes {
        /// Bytes of entries appended in this term and not yet committed and handed out.
        uncommitted_bytes: u64,
    },
    /// The Append pipelines to a quorum are full (`Config::max_inflight_messages` each): a new
    /// entry could not even be sent to a quorum.
    #[error("inflight windows to a quorum are full")]
    InflightWindowsFull,
}

/// Why [`crate::Replica::read_index`] refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ReadError {
    /// No leader is known to forward the read to.
    #[error("not the leader (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The leader this replica last heard from in its current term.
        leader_hint: Option<NodeId>,
    },
    /// Too many reads waiting for confirmation.
    #[error("busy: too many pending reads")]
    Busy,
}

/// Why [`crate::Replica::transfer_leadership`] refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TransferError {
    /// Only the leader can transfer leadership.
    #[error("not the leader (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The leader this replica last heard from in its current term.
        leader_hint: Option<NodeId>,
    },
    /// The target is not a voter.
    #[error("{to} is not a voter")]
    NotVoter {
        /// The target.
        to: NodeId,
    },
    /// A transfer is already in progress.
    #[error("a transfer to {to} is already in progress")]
    InProgress {
        /// The current target.
        to: NodeId,
    },
}

/// Why [`crate::Replica::compact`] refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CompactError {
    /// Only applied entries can be compacted into a snapshot.
    #[error("cannot compact through {index}: only applied through {applied}")]
    NotApplied {
        /// The requested index.
        index: LogIndex,
        /// The applied index.
        applied: LogIndex,
    },
    /// Only locally durable entries can be compacted.
    #[error("cannot compact through {index}: only persisted through {persisted}")]
    NotPersisted {
        /// The requested index.
        index: LogIndex,
        /// The persisted index.
        persisted: LogIndex,
    },
    /// Already compacted at or beyond `index`.
    #[error("already compacted through {snapshot_index}")]
    AlreadyCompacted {
        /// The current snapshot index.
        snapshot_index: LogIndex,
    },
}

/// A broken invariant found by [`crate::Replica::check_invariants`]; always a bug.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("invariant violated at {term}: {what}")]
pub struct InvariantError {
    /// The replica's term when it was found.
    pub term: Term,
    /// Which invariant.
    pub what: String,
}
