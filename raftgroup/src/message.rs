//! Messages replicas exchange. [`crate::codec`] turns them into bytes and back.

use crate::types::{Entry, LogIndex, NodeId, Snapshot, Term};

/// One message between two replicas of the same group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// The sender's term; for [`MessageBody::PreVote`] the term the sender *would* campaign in.
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// The kinds of message, with their fields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageBody {
    /// "Would you vote for me in `term`?" Sent before a real campaign so a node that was
    /// partitioned away cannot disrupt a healthy leader by bumping terms.
    PreVote {
        /// Index of the candidate's last entry.
        last_index: LogIndex,
        /// Term of the candidate's last entry.
        last_term: Term,
    },
    /// Answer to [`MessageBody::PreVote`].
    PreVoteResponse {
        /// True if the vote is refused.
        reject: bool,
    },
    /// "Vote for me in `term`."
    Vote {
        /// Index of the candidate's last entry.
        last_index: LogIndex,
        /// Term of the candidate's last entry.
        last_term: Term,
        /// The campaign follows a leadership transfer, so voters must not refuse it because they
        /// still hear from the current leader.
        transfer: bool,
    },
    /// Answer to [`MessageBody::Vote`].
    VoteResponse {
        /// True if the vote is refused.
        reject: bool,
    },
    /// Log replication: append `entries` after `(prev_index, prev_term)`.
    Append {
        /// Index of the entry just before `entries`.
        prev_index: LogIndex,
        /// Term of the entry at `prev_index`.
        prev_term: Term,
        /// The entries, consecutive from `prev_index + 1`; may be empty (a probe).
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: LogIndex,
    },
    /// Answer to [`MessageBody::Append`] or [`MessageBody::Snapshot`].
    AppendResponse {
        /// True if `prev_index`/`prev_term` did not match the follower's log.
        reject: bool,
        /// On success, the last index the follower now holds durably that matches the leader; on
        /// rejection, the `prev_index` that was rejected.
        index: LogIndex,
        /// On rejection, where the leader should probe next: the follower's largest index whose
        /// term is at most the rejected `prev_term` (fast backtracking).
        hint_index: LogIndex,
        /// The term of the follower's entry at `hint_index`.
        hint_term: Term,
    },
    /// Leader liveness, commit propagation and the quorum round of ReadIndex/lease reads.
    Heartbeat {
        /// The leader's commit index, capped at what the follower is known to hold.
        commit: LogIndex,
        /// Increases with every heartbeat round of this leader; echoed back.
        seq: u64,
        /// The leader's tick count when it sent this; echoed back to measure the lease.
        sent_tick: u64,
    },
    /// Answer to [`MessageBody::Heartbeat`].
    HeartbeatResponse {
        /// The `seq` of the heartbeat answered.
        seq: u64,
        /// The `sent_tick` of the heartbeat answered.
        sent_tick: u64,
        /// The responder's own tick count: lets the leader compare clock rates and refuse
        /// leases when they drift apart more than `Config::clock_drift_ticks` allows.
        ticks: u64,
    },
    /// Installs a snapshot on a follower whose log is too far behind.
    Snapshot {
        /// The snapshot.
        snapshot: Snapshot,
    },
    /// A follower asks the leader for a read index on behalf of its client
    /// ([`crate::ReadMode::Lease`]: the leader answers from its lease if it may).
    ReadIndex {
        /// The client's context, echoed back.
        context: u64,
    },
    /// As [`MessageBody::ReadIndex`], but the leader confirms its leadership with a heartbeat
    /// round even while its lease is valid ([`crate::ReadMode::Quorum`]); answered with a
    /// [`MessageBody::ReadIndexResponse`] too.
    ReadIndexQuorum {
        /// The client's context, echoed back.
        context: u64,
    },
    /// The leader's answer to [`MessageBody::ReadIndex`] and [`MessageBody::ReadIndexQuorum`].
    ReadIndexResponse {
        /// The context of the request.
        context: u64,
        /// The index a read may be served at once applied, or `None` if refused.
        index: Option<LogIndex>,
    },
    /// Leadership transfer: "campaign now, without waiting for an election timeout".
    TimeoutNow,
    /// Quiescence: the leader has nothing left to replicate and stops ticking (see
    /// [`crate::Replica::quiesce`]); the follower learns `commit` and may stop ticking too until
    /// its group's next message. Idle groups then cost no ticks and no heartbeats.
    Quiesce {
        /// The leader's commit index, capped at what the follower is known to hold.
        commit: LogIndex,
    },
}

impl MessageBody {
    /// A short name for logs and test output.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PreVote { .. } => "PreVote",
            Self::PreVoteResponse { .. } => "PreVoteResponse",
            Self::Vote { .. } => "Vote",
            Self::VoteResponse { .. } => "VoteResponse",
            Self::Append { .. } => "Append",
            Self::AppendResponse { .. } => "AppendResponse",
            Self::Heartbeat { .. } => "Heartbeat",
            Self::HeartbeatResponse { .. } => "HeartbeatResponse",
            Self::Snapshot { .. } => "Snapshot",
            Self::ReadIndex { .. } => "ReadIndex",
            Self::ReadIndexQuorum { .. } => "ReadIndexQuorum",
            Self::ReadIndexResponse { .. } => "ReadIndexResponse",
            Self::TimeoutNow => "TimeoutNow",
            Self::Quiesce { .. } => "Quiesce",
        }
    }
}
