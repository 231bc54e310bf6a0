//! [`Replica`]: the public face of one group's consensus — inputs, the [`Ready`] output, and
//! introspection. The protocol rules live in `raft.rs`.

use std::mem;

use bytes::Bytes;

use crate::config::Config;
use crate::error::{
    BusyReason, CompactError, ConfigError, Error, InvariantError, ProposeError, ReadError,
    TransferError,
};
use crate::log::RaftLog;
use crate::membership::MembershipChange;
use crate::message::{Message, MessageBody};
use crate::progress::{Progress, ProgressState};
use crate::quorum;
use crate::read_index::{MAX_PENDING_READS, ReadMode, ReadQueue, ReadState};
use crate::ready::{Fetch, FetchPurpose, Ready, SendAfterPersist};
use crate::types::{
    ENTRY_OVERHEAD_BYTES, Entry, EntryKind, HardState, LogIndex, Membership, NodeId, Snapshot,
    SnapshotMeta, Term,
};

/// What a replica is doing in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asks whether it could win an election, without bumping its term.
    PreCandidate,
    /// Campaigns in its term.
    Candidate,
    /// Leads its term.
    Leader,
}

/// What storage holds when a replica starts (all of it durable).
#[derive(Clone, Debug, Default)]
pub struct RecoveredState {
    /// The last persisted hard state (default for a new replica).
    pub hard_state: HardState,
    /// The latest snapshot, if any; entries start right after it.
    pub snapshot: Option<Snapshot>,
    /// Durable log entries after the snapshot, consecutive. If `term_starts` is empty these
    /// must be *all* of them (the replica learns every index's term from them); otherwise any
    /// suffix ending at `last_index` (possibly none): they only warm the cache. Either way the
    /// replica keeps only what `Config::log_cache_bytes` allows.
    pub entries: Vec<Entry>,
    /// The first index of each term present in the log after the snapshot, increasing, with
    /// the term: lets a storage recover a replica without reading every entry. Empty: derive
    /// them from `entries`.
    pub term_starts: Vec<(LogIndex, Term)>,
    /// The last durable index; used only with `term_starts`.
    pub last_index: LogIndex,
    /// The index the state machine has applied through (at least the snapshot's).
    pub applied: LogIndex,
    /// The membership in effect at `applied`, with the index of the entry that set it, if it is
    /// newer than the snapshot's. `None`: the snapshot's, or the `Config`'s for a new group.
    pub membership: Option<(LogIndex, Membership)>,
}

/// A summary for tests, metrics and the simulator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// This replica.
    pub id: NodeId,
    /// Current role.
    pub role: Role,
    /// Current term.
    pub term: Term,
    /// Vote in the current term.
    pub vote: Option<NodeId>,
    /// Known leader of the current term.
    pub leader: Option<NodeId>,
    /// Commit index.
    pub commit: LogIndex,
    /// Last log index.
    pub last_index: LogIndex,
    /// Last durable index.
    pub persisted: LogIndex,
    /// Highest index handed out for applying.
    pub applying: LogIndex,
    /// Highest index reported applied.
    pub applied: LogIndex,
    /// Snapshot index (entries at or below it are compacted).
    pub snapshot_index: LogIndex,
}

/// Output being accumulated until the next [`Replica::ready`].
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub(crate) messages: Vec<Message>,
    pub(crate) persisted_messages: Vec<Message>,
    pub(crate) read_states: Vec<ReadState>,
    pub(crate) committed_entries: Vec<Entry>,
    pub(crate) fetches: Vec<Fetch>,
    /// Boxed: rare, and an idle replica should stay small.
    pub(crate) snapshot: Option<Box<Snapshot>>,
}

/// One replica of one Raft group: a deterministic state machine. See the crate documentation.
#[derive(Debug)]
pub struct Replica {
    pub(crate) id: NodeId,
    pub(crate) settings: Settings,
    pub(crate) term: Term,
    pub(crate) vote: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) leader: Option<NodeId>,
    pub(crate) log: RaftLog,
    /// Membership at the snapshot point.
    pub(crate) base_membership: Membership,
    /// Membership changes applied after the snapshot, oldest first.
    pub(crate) membership_changes: Vec<(LogIndex, Membership)>,
    /// Leader: index of the last membership entry it appended (no new change until applied).
    pub(crate) pending_membership_index: LogIndex,
    /// The latest snapshot, served to followers that are too far behind (boxed: most replicas
    /// rarely need it, and an idle replica should stay small).
    pub(crate) snapshot: Option<Box<Snapshot>>,
    /// Entries through this index were handed out for applying.
    pub(crate) applying: LogIndex,
    /// Entries through this index are applied.
    pub(crate) applied: LogIndex,
    /// An apply fetch is outstanding.
    pub(crate) apply_fetching: bool,
    /// Ticks since creation (the leader's lease clock).
    pub(crate) ticks: u64,
    /// No heartbeat sent before this tick counts toward a lease: set by [`Replica::wake`].
    pub(crate) lease_floor: u64,
    pub(crate) election_elapsed: u32,
    pub(crate) heartbeat_elapsed: u32,
    pub(crate) randomized_election_ticks: u32,
    pub(crate) rng: u64,
    /// Votes received in the current campaign.
    pub(crate) votes: Vec<(NodeId, bool)>,
    /// Leader: progress of every other member.
    pub(crate) progress: Vec<Progress>,
    pub(crate) transfer_target: Option<NodeId>,
    /// Leader removed by the change whose leave-joint entry is at this index: it stays leader
    /// until every live member acknowledged that commit (or an election timeout passed), so
    /// that none is left in the joint configuration needing its vote (see
    /// [`Replica::settled_index`]).
    pub(crate) leaving: Option<LogIndex>,
    /// See [`Replica::settled_index`].
    pub(crate) settled: LogIndex,
    pub(crate) uncommitted_bytes: u64,
    pub(crate) reads: ReadQueue,
    /// Leader: followers may be owed Appends (new entries, entries the window held back, a new
    /// commit index); [`Replica::ready`] sends them, so a Ready's worth of proposals leaves as
    /// one Append per follower.
    pub(crate) appends_owed: bool,
    pub(crate) heartbeat_seq: u64,
    /// The last heartbeat round already handed out in a Ready (sent, as far as we know).
    pub(crate) flushed_heartbeat_seq: u64,
    pub(crate) outbox: Outbox,
    /// The hard state last handed out in a Ready.
    pub(crate) last_hard_state: HardState,
    /// Spare buffers returned by `advance`.
    pub(crate) spare_entries: Vec<Entry>,
}

/// The configuration fields used after creation (the member lists live in the membership).
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) election_ticks: u32,
    pub(crate) heartbeat_ticks: u32,
    pub(crate) pre_vote: bool,
    pub(crate) check_quorum: bool,
    pub(crate) max_inflight_messages: u32,
    pub(crate) max_batch_bytes: u64,
    pub(crate) max_uncommitted_bytes: u64,
    pub(crate) log_cache_bytes: u64,
    pub(crate) lease_reads: bool,
    pub(crate) clock_drift_ticks: u32,
}

impl Replica {
    /// Creates a replica from its configuration and what storage recovered.
    pub fn new(config: Config, recovered: RecoveredState) -> Result<Self, ConfigError> {
        config.validate()?;
        let bad = |reason| ConfigError::BadRecoveredState { reason };
        let (snapshot_index, snapshot_term) =
            recovered.snapshot.as_ref().map_or((LogIndex::ZERO, Term::ZERO), |snapshot| {
                (snapshot.meta.index, snapshot.meta.term)
            });
        let hard_state = recovered.hard_state;
        // A snapshot is always of committed state, whatever the hard state says.
        let commit = hard_state.commit.max(snapshot_index);
        let term_starts = (!recovered.term_starts.is_empty()
            || recovered.last_index > snapshot_index)
            .then_some((recovered.term_starts.as_slice(), recovered.last_index));
        let log =
            RaftLog::recover(snapshot_index, snapshot_term, term_starts, recovered.entries, commit)
                .map_err(bad)?;
        if log.last_term() > hard_state.term {
            return Err(bad("log has entries of a term above the hard state's"));
        }
        let applied = recovered.applied.max(snapshot_index);
        if applied > commit {
            return Err(bad("applied beyond commit"));
        }
        let base_membership = match &recovered.snapshot {
            Some(snapshot) => snapshot.meta.membership.clone(),
            None => Membership::new(config.voters, config.learners),
        };
        let membership_changes = match recovered.membership {
            Some((index, membership)) if index > snapshot_index => {
                if index > applied {
                    return Err(bad("membership newer than applied"));
                }
                vec![(index, membership)]
            }
            _ => Vec::new(),
        };
        let settings = Settings {
            election_ticks: config.election_ticks,
            heartbeat_ticks: config.heartbeat_ticks,
            pre_vote: config.pre_vote,
            check_quorum: config.check_quorum,
            max_inflight_messages: config.max_inflight_messages,
            max_batch_bytes: config.max_batch_bytes,
            max_uncommitted_bytes: config.max_uncommitted_bytes,
            log_cache_bytes: config.log_cache_bytes,
            lease_reads: config.lease_reads,
            clock_drift_ticks: config.clock_drift_ticks,
        };
        let mut replica = Self {
            id: config.id,
            settings,
            term: hard_state.term,
            vote: hard_state.vote,
            role: Role::Follower,
            leader: None,
            log,
            base_membership,
            membership_changes,
            pending_membership_index: LogIndex::ZERO,
            leaving: None,
            settled: LogIndex::ZERO,
            snapshot: recovered.snapshot.map(Box::new),
            applying: applied,
            applied,
            apply_fetching: false,
            ticks: 0,
            lease_floor: 0,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_ticks: 0,
            // splitmix64 seeds badly from zero-ish values only in theory; mix in the id anyway so
            // replicas given the same seed still draw different timeouts.
            rng: config.seed ^ config.id.0.rotate_left(32),
            votes: Vec::new(),
            progress: Vec::new(),
            transfer_target: None,
            uncommitted_bytes: 0,
            reads: ReadQueue::default(),
            appends_owed: false,
            heartbeat_seq: 0,
            flushed_heartbeat_seq: 0,
            outbox: Outbox::default(),
            last_hard_state: HardState { term: hard_state.term, vote: hard_state.vote, commit },
            spare_entries: Vec::new(),
        };
        replica.reset_election_timer();
        Ok(replica)
    }

    // ----- inputs -----

    /// Advances logical time by one tick. O(1) and allocation-free for an idle follower.
    pub fn tick(&mut self) {
        self.ticks += 1;
        if self.role == Role::Leader {
            self.tick_leader();
        } else {
            self.election_elapsed += 1;
            if self.election_elapsed >= self.randomized_election_ticks && self.can_campaign() {
                self.election_elapsed = 0;
                self.campaign(self.settings.pre_vote, false);
            }
        }
    }

    /// Whether this replica, a leader, may stop ticking: everything is committed, durable and
    /// applied, no read, transfer or membership change is under way, a live quorum exists, and
    /// every member `live` says is up holds the whole log. Members `live` declares down (the
    /// embedder's node-level liveness) are not waited for: whoever notices them return wakes the
    /// group to catch them up.
    pub fn can_quiesce(&self, live: impl Fn(NodeId) -> bool) -> bool {
        self.quiesce_allowed(&live)
    }

    /// Quiescence (idle groups cost nothing): if [`Replica::can_quiesce`], queues a
    /// [`MessageBody::Quiesce`](crate::MessageBody::Quiesce) to every live follower and returns
    /// true. The caller then stops calling [`Replica::tick`] until the group has work again,
    /// and calls [`Replica::wake`] before any input. Followers that receive it may stop ticking
    /// too; the embedder wakes them on their group's next message, or when node-level liveness
    /// declares the leader's node dead.
    pub fn quiesce(&mut self, live: impl Fn(NodeId) -> bool) -> bool {
        if !self.quiesce_allowed(&live) {
            return false;
        }
        self.send_quiesce(&live);
        true
    }

    /// On a quiet leader: tells follower `to` again to stop ticking. A follower woken by a
    /// message still in flight when the group went quiet (a straggling heartbeat) answers it and
    /// would otherwise tick on alone — forever, for a learner, which never campaigns. The
    /// embedder calls it when such an answer reaches its quiet leader. Returns whether a
    /// [`MessageBody::Quiesce`](crate::MessageBody::Quiesce) was queued (only on a leader, to
    /// another member).
    pub fn requiesce(&mut self, to: NodeId) -> bool {
        if self.role() != Role::Leader || to == self.id || self.progress_of(to).is_none() {
            return false;
        }
        self.send_quiesce(&|id| id == to);
        true
    }

    /// Releases the spare capacity of this replica's buffers — queues, the term runs, a
    /// leader's spare entry buffer, the votes of a finished election — so that a group that
    /// went quiet costs as little memory as possible. Changes nothing observable; the next work
    /// allocates again. Meant for the moment a group goes quiet (not the hot path).
    pub fn release_memory(&mut self) {
        if self.role != Role::PreCandidate && self.role != Role::Candidate {
            // Only a campaign reads the votes, and a new campaign starts from none.
            self.votes = Vec::new();
        }
        self.membership_changes.shrink_to_fit();
        self.log.shrink();
        for progress in &mut self.progress {
            progress.inflight.shrink_to_fit();
        }
        self.progress.shrink_to_fit();
        self.reads.before_commit.shrink_to_fit();
        self.reads.pending.shrink_to_fit();
        let Outbox {
            messages, persisted_messages, read_states, committed_entries, fetches, ..
        } = &mut self.outbox;
        messages.shrink_to_fit();
        persisted_messages.shrink_to_fit();
        read_states.shrink_to_fit();
        committed_entries.shrink_to_fit();
        fetches.shrink_to_fit();
        self.spare_entries = Vec::new();
    }

    /// Resumes ticking after a quiet period (any role), or after the embedder's thread stalled
    /// and did not replay the ticks it missed. The replica's clock stood still while real time
    /// passed, so heartbeats acknowledged before now no longer support a lease: the next lease
    /// read needs a fresh quorum round.
    pub fn wake(&mut self) {
        self.ticks += 1;
        self.lease_floor = self.ticks;
    }

    /// The embedder's failure detector says node `leader` is down (it has heard nothing from it
    /// for well over an election timeout). If this replica follows `leader`, it forgets it —
    /// so it no longer refuses other campaigns on that leader's behalf (leader stickiness), which
    /// would otherwise hold a new election off for a full election timeout after the death is
    /// known — and restarts its election timer to fire after `campaign_in_ticks` ticks, or after
    /// a randomized election timeout if `None`. The embedder gives a short delay to the one live
    /// voter it picks to go first, so that the survivors do not split their votes. Returns
    /// whether the leader was forgotten (only a follower of `leader` does).
    ///
    /// Only a hint: Raft's safety does not depend on it, and a wrong one costs at most an
    /// election. The replica may then grant a pre-vote (or a vote in a later term), but a
    /// campaign still needs a quorum, and every voter that hears from a live leader still
    /// refuses it. Lease reads stay sound only if the hint comes later than this replica's own
    /// election timeout would have (its clock counted from the leader's last message), as it
    /// does when the detector waits longer than an election timeout of silence.
    pub fn leader_down(&mut self, leader: NodeId, campaign_in_ticks: Option<u32>) -> bool {
        if self.role != Role::Follower || self.leader != Some(leader) || leader == self.id {
            return false;
        }
        self.leader = None;
        match campaign_in_ticks {
            Some(ticks) => {
                self.election_elapsed = 0;
                self.randomized_election_ticks = ticks.max(1);
            }
            None => self.reset_election_timer(),
        }
        true
    }

    /// Handles a message from a peer.
    pub fn step(&mut self, message: Message) -> Result<(), Error> {
        if message.to != self.id {
            return Err(Error::WrongRecipient { to: message.to, me: self.id });
        }
        if message.from == NodeId::ZERO || message.from == self.id {
            return Err(Error::InvalidSender { from: message.from });
        }
        self.step_message(message)
    }

    /// Starts an election now (as if the election timeout fired), with pre-vote if configured.
    /// Does nothing on a leader or a non-voter.
    pub fn campaign_now(&mut self) {
        if self.role != Role::Leader && self.can_campaign() {
            self.campaign(self.settings.pre_vote, false);
        }
    }

    /// Appends a client command to the log; returns its index. Committing it is not promised:
    /// watch [`Ready::committed_entries`] for an entry at that index *with the returned term*
    /// ([`Replica::term`] right after this call).
    pub fn propose(&mut self, payload: Bytes) -> Result<LogIndex, ProposeError> {
        self.check_can_propose(payload.len() as u64 + ENTRY_OVERHEAD_BYTES)?;
        Ok(self.append_entry(EntryKind::Normal, payload))
    }

    /// Starts a joint-consensus change towards `change`; returns the index of its first entry.
    /// The leader leaves the joint configuration on its own once that entry is applied.
    pub fn propose_membership(
        &mut self,
        change: &MembershipChange,
    ) -> Result<LogIndex, ProposeError> {
        self.check_can_propose(ENTRY_OVERHEAD_BYTES)?;
        if self.pending_membership_index > self.applying {
            return Err(ProposeError::MembershipChangePending);
        }
        let joint = self.membership().enter_joint(change)?;
        let index = self.append_entry(EntryKind::Membership, joint.encode());
        self.pending_membership_index = index;
        Ok(index)
    }

    /// Asks for a linearizable read: a [`ReadState`] with `context` appears in a later
    /// [`Ready::read_states`] once safe. On a leader with a valid lease (and `lease_reads`) it is
    /// immediate; otherwise the leader confirms its leadership with a heartbeat round; a follower
    /// forwards to its leader. A read may be silently dropped (leader change, lost message): the
    /// caller retries on its own timeout. The same as [`Replica::read_index_with`] with
    /// [`ReadMode::Lease`].
    ///
    /// `context` must never repeat for this node — not even across restarts: an answer to a
    /// read of an earlier life, delayed in the network, carries its context and would confirm
    /// a new read with the same one at an old index (a stale read; the engine's cluster
    /// simulator, seed 4718). Number reads from a fresh random base at every start.
    pub fn read_index(&mut self, context: u64) -> Result<(), ReadError> {
        self.read_index_with(context, ReadMode::Lease)
    }

    /// As [`Replica::read_index`], with the caller choosing per request how the leader confirms
    /// its leadership: [`ReadMode::Quorum`] always with a heartbeat round, even while a lease is
    /// valid; [`ReadMode::Lease`] from the lease when `lease_reads` is on and the lease is valid,
    /// else with a round. A follower forwards the mode with the read.
    pub fn read_index_with(&mut self, context: u64, mode: ReadMode) -> Result<(), ReadError> {
        match (self.role, self.leader) {
            (Role::Leader, _) => {
                if self.reads.len() >= MAX_PENDING_READS {
                    return Err(ReadError::Busy);
                }
                self.leader_read(context, self.id, mode);
                Ok(())
            }
            (_, Some(leader)) => {
                let body = match mode {
                    ReadMode::Quorum => MessageBody::ReadIndexQuorum { context },
                    ReadMode::Lease => MessageBody::ReadIndex { context },
                };
                self.send(leader, body);
                Ok(())
            }
            (_, None) => Err(ReadError::NotLeader { leader_hint: None }),
        }
    }

    /// Storage made the entries through `index` durable; `term` is the term of the entry at
    /// `index` (as in [`Ready::last_entry`]). Acknowledgements for entries since overwritten are
    /// ignored.
    ///
    /// There is no separate acknowledgement for the hard state: nothing inside the replica waits
    /// for it. Everything that depends on it (votes, append acknowledgements) is in
    /// [`Ready::persisted_messages`], which the driver holds until the Ready is durable.
    pub fn on_persisted(&mut self, term: Term, index: LogIndex) {
        if self.log.on_persisted(term, index) && self.role == Role::Leader {
            // The leader's own log counts toward the quorum only once durable.
            self.maybe_commit();
        }
    }

    /// The state machine applied every entry through `index`.
    pub fn on_applied(&mut self, index: LogIndex) {
        assert!(index <= self.applying, "applied {index} beyond what was handed out");
        self.applied = self.applied.max(index);
    }

    /// Returns the entries storage read for `fetch` (consecutive from `fetch.low`, possibly
    /// fewer than asked; empty if storage compacted them away).
    pub fn on_fetched(&mut self, fetch: Fetch, entries: Vec<Entry>) -> Result<(), Error> {
        // A stale answer (leadership changed, or a snapshot moved the apply point) is dropped
        // quietly: the log may have changed since the request, so its entries prove nothing.
        let current = match fetch.purpose {
            FetchPurpose::Apply => self.apply_fetching && fetch.low == self.applying.next(),
            FetchPurpose::Replicate { to } => {
                self.role == Role::Leader
                    && fetch.term == self.term
                    && self.progress_of(to).is_some_and(|progress| progress.fetching)
            }
        };
        if !current {
            return Ok(());
        }
        // The request is answered: a bad answer is reported, and the request issued again.
        match fetch.purpose {
            FetchPurpose::Apply => self.apply_fetching = false,
            FetchPurpose::Replicate { to } => {
                self.progress_mut(to).expect("checked above").fetching = false;
            }
        }
        let valid = entries.iter().enumerate().all(|(offset, entry)| {
            entry.index.0 == fetch.low.0 + offset as u64
                && entry.index <= fetch.high
                && self.log.term(entry.index).is_none_or(|term| term == entry.term)
        });
        if !valid {
            return Err(Error::BadFetch);
        }
        match fetch.purpose {
            FetchPurpose::Apply => {
                if entries.last().is_some_and(|entry| entry.index > self.log.commit) {
                    return Err(Error::BadFetch);
                }
                if !entries.is_empty() {
                    self.hand_out_committed(entries);
                }
            }
            FetchPurpose::Replicate { to } => self.on_replicate_fetched(fetch, to, entries),
        }
        Ok(())
    }

    /// Hands leadership to `to` (a voter): the leader stops taking proposals, brings `to` up to
    /// date and tells it to campaign at once. Aborted after an election timeout.
    pub fn transfer_leadership(&mut self, to: NodeId) -> Result<(), TransferError> {
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader { leader_hint: self.leader });
        }
        if !self.membership().is_voter(to) {
            return Err(TransferError::NotVoter { to });
        }
        if let Some(current) = self.transfer_target {
            return if current == to {
                Ok(())
            } else {
                Err(TransferError::InProgress { to: current })
            };
        }
        if to == self.id {
            return Ok(());
        }
        self.transfer_target = Some(to);
        // The transfer gets one election timeout.
        self.election_elapsed = 0;
        let caught_up =
            self.progress_of(to).is_some_and(|p| p.match_index == self.log.last_index());
        if caught_up {
            self.send_owed_commit(to);
            self.send(to, MessageBody::TimeoutNow);
        } else {
            self.send_append(to, true);
        }
        Ok(())
    }

    /// The application snapshotted its state machine through `index` (at most the applied and
    /// the persisted index) as `data`: the log before it is forgotten, and the snapshot is what
    /// lagging followers get. The driver compacts its storage too.
    pub fn compact(&mut self, index: LogIndex, data: Bytes) -> Result<SnapshotMeta, CompactError> {
        let meta = self.snapshot_meta_at(index)?;
        let kept = self.membership_changes.partition_point(|(at, _)| *at <= index);
        if kept > 0 {
            self.base_membership =
                self.membership_changes.drain(..kept).next_back().expect("kept > 0").1;
        }
        debug_assert_eq!(meta.membership, self.base_membership);
        self.log.compact(index);
        self.snapshot = Some(Box::new(Snapshot { meta: meta.clone(), data }));
        Ok(meta)
    }

    /// What [`Replica::compact`] at `index` would record — index, term, membership — without
    /// compacting: for an application that writes the snapshot out first and compacts once it
    /// is durable. The result stays valid until then: the entries through `index` are applied,
    /// so neither their terms nor the membership changes among them can change.
    pub fn snapshot_meta_at(&self, index: LogIndex) -> Result<SnapshotMeta, CompactError> {
        if index > self.applied {
            return Err(CompactError::NotApplied { index, applied: self.applied });
        }
        if index > self.log.stable {
            // Committed entries may be applied before they are durable here; storage cannot drop
            // entries it has not written yet.
            return Err(CompactError::NotPersisted { index, persisted: self.log.stable });
        }
        if index <= self.log.snapshot_index() {
            return Err(CompactError::AlreadyCompacted {
                snapshot_index: self.log.snapshot_index(),
            });
        }
        let term = self.log.term(index).expect("applied entries are in the log");
        let kept = self.membership_changes.partition_point(|(at, _)| *at <= index);
        let membership = match kept {
            0 => self.base_membership.clone(),
            _ => self.membership_changes[kept - 1].1.clone(),
        };
        Ok(SnapshotMeta { index, term, membership })
    }

    /// The highest index this replica, as leader, knows to be committed at every member of its
    /// configuration that it heard from within the last election timeout (each acknowledged a
    /// heartbeat carrying a commit index at least this high); kept after it stops leading.
    ///
    /// An embedder may delete a removed member's replica once the change's leave-joint entry is
    /// settled: a member that has not learned that commit is still in the joint configuration,
    /// whose old half may need the removed member's vote to elect anyone. (A member down
    /// meanwhile learns the commit from whoever leads next: the live ones know it.)
    pub fn settled_index(&self) -> LogIndex {
        self.settled
    }

    /// On a leader, the lowest index a member still needs from the log and is not known to be
    /// receiving: `match + 1` of each member being probed, being sent a snapshot, or not heard
    /// from within an election timeout. Compacting the log at or past it makes that member
    /// need a snapshot (a newer one, if one is on its way). `None` on a follower, or while
    /// every member keeps up.
    pub fn lagging_from(&self) -> Option<LogIndex> {
        if self.role() != Role::Leader {
            return None;
        }
        let timeout = u64::from(self.settings.election_ticks);
        self.progress
            .iter()
            .filter(|p| p.id != self.id)
            .filter(|p| {
                p.state != ProgressState::Replicate
                    || self.ticks.saturating_sub(p.heard_tick) >= timeout
            })
            .map(|p| p.match_index.next())
            .min()
    }

    // ----- output -----

    /// True if [`Replica::ready`] has something to do.
    pub fn has_ready(&self) -> bool {
        !self.outbox.messages.is_empty()
            || !self.outbox.persisted_messages.is_empty()
            || !self.outbox.read_states.is_empty()
            || !self.outbox.fetches.is_empty()
            || !self.outbox.committed_entries.is_empty()
            || self.outbox.snapshot.is_some()
            || self.appends_owed
            || self.log.handed < self.log.last_index()
            || self.hard_state() != self.last_hard_state
            || (self.applying < self.log.commit && !self.apply_fetching)
    }

    /// Collects the work accumulated since the last call. Calling it again before
    /// [`Replica::advance`] is allowed: each Ready holds only new work.
    pub fn ready(&mut self) -> Ready {
        // First: applying a membership entry may append (leave joint) or change role.
        self.collect_committed();
        // Then the Appends owed since the last Ready: one per follower for all the new entries.
        self.flush_appends();
        let hard_state = self.hard_state();
        let previous = self.last_hard_state;
        let hard_state = (hard_state != previous).then(|| {
            self.last_hard_state = hard_state;
            hard_state
        });
        let mut entries = mem::take(&mut self.spare_entries);
        self.log.take_unstable(&mut entries);
        self.flushed_heartbeat_seq = self.heartbeat_seq;
        let snapshot = self.outbox.snapshot.take().map(|snapshot| *snapshot);
        let must_sync = !entries.is_empty()
            || snapshot.is_some()
            || hard_state.is_some_and(|new| new.term != previous.term || new.vote != previous.vote);
        Ready {
            hard_state,
            snapshot,
            entries,
            messages: mem::take(&mut self.outbox.messages),
            persisted_messages: SendAfterPersist(mem::take(&mut self.outbox.persisted_messages)),
            committed_entries: mem::take(&mut self.outbox.committed_entries),
            read_states: mem::take(&mut self.outbox.read_states),
            fetches: mem::take(&mut self.outbox.fetches),
            must_sync,
        }
    }

    /// Acknowledges a [`Ready`] whose duties are done (or underway in order); a leader keeps
    /// its `entries` buffer for the next Ready. Durability is reported separately by
    /// [`Replica::on_persisted`].
    pub fn advance(&mut self, ready: Ready) {
        // Only leaders write often enough to be worth a spare buffer, and only a modest one:
        // thousands of idle replicas must stay small.
        let mut entries = ready.entries;
        if self.role == Role::Leader && entries.capacity() <= 64 {
            entries.clear();
            self.spare_entries = entries;
        } else if self.role != Role::Leader {
            self.spare_entries = Vec::new();
        }
        let unneeded = self.unneeded_index();
        self.log.evict(unneeded, self.settings.log_cache_bytes);
    }

    // ----- introspection -----

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The leader of the current term, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// Commit index.
    pub fn commit_index(&self) -> LogIndex {
        self.log.commit
    }

    /// Index of the last entry.
    pub fn last_index(&self) -> LogIndex {
        self.log.last_index()
    }

    /// Term of the entry at `index`, if the log (or snapshot point) covers it.
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term(index)
    }

    /// The membership in effect (applied).
    pub fn membership(&self) -> &Membership {
        self.membership_changes.last().map_or(&self.base_membership, |(_, membership)| membership)
    }

    /// The hard state as it is now (possibly not yet handed out).
    pub fn hard_state(&self) -> HardState {
        HardState { term: self.term, vote: self.vote, commit: self.log.commit }
    }

    /// Ticks since this replica last heard from the leader of its term: 0 on the leader itself
    /// (which steps down once a quorum stops answering, with `check_quorum`), `None` when no
    /// leader is known. It bounds how stale a read served from the local state machine can be.
    pub fn leader_contact_ticks(&self) -> Option<u32> {
        match (self.role, self.leader) {
            (Role::Leader, _) => Some(0),
            (Role::Follower, Some(_)) => Some(self.election_elapsed),
            _ => None,
        }
    }

    /// A summary of the replica's state.
    pub fn status(&self) -> Status {
        Status {
            id: self.id,
            role: self.role,
            term: self.term,
            vote: self.vote,
            leader: self.leader,
            commit: self.log.commit,
            last_index: self.log.last_index(),
            persisted: self.log.stable,
            applying: self.applying,
            applied: self.applied,
            snapshot_index: self.log.snapshot_index(),
        }
    }

    /// The leader's view of follower `id`: `(match_index, next_index, state)`.
    pub fn progress(&self, id: NodeId) -> Option<(LogIndex, LogIndex, ProgressState)> {
        self.progress_of(id).map(|p| (p.match_index, p.next_index, p.state))
    }

    /// Checks internal invariants that must hold between any two inputs. The simulator calls it
    /// after every step; cross-step properties (terms never decrease...) are asserted inline.
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        let fail = |what: &str| Err(InvariantError { term: self.term, what: what.to_owned() });
        if let Err(what) = self.log.check() {
            return fail(what);
        }
        if self.log.last_term() > self.term {
            return fail("log has an entry of a future term");
        }
        if self.last_hard_state.term > self.term {
            return fail("term went back");
        }
        if self.last_hard_state.term == self.term
            && self.last_hard_state.vote.is_some()
            && self.last_hard_state.vote != self.vote
        {
            return fail("vote changed within a term");
        }
        if self.last_hard_state.commit > self.log.commit {
            return fail("commit went back");
        }
        if self.applied > self.applying || self.applying > self.log.commit {
            return fail("applied <= applying <= commit violated");
        }
        if self.role == Role::Leader {
            if self.leader != Some(self.id) || self.vote != Some(self.id) {
                return fail("leader without its own vote");
            }
            if self.progress.iter().any(|p| p.match_index > self.log.last_index()) {
                return fail("follower matched beyond the leader's log");
            }
            if self.progress.iter().any(|p| p.next_index <= p.match_index) {
                return fail("next_index <= match_index");
            }
        } else if !self.progress.is_empty() {
            return fail("non-leader keeps progress");
        } else if self.appends_owed {
            return fail("non-leader owes Appends");
        }
        if matches!(self.role, Role::Candidate) && self.vote != Some(self.id) {
            return fail("candidate did not vote for itself");
        }
        Ok(())
    }

    // ----- shared helpers -----

    pub(crate) fn is_promotable(&self) -> bool {
        self.membership().is_voter(self.id)
    }

    /// Whether this replica may start an election: it votes in the membership it applied, and
    /// no committed membership entry is waiting to be applied (etcd's rule). A change takes
    /// effect when applied, so until then the membership in effect may be stale — after a
    /// restart it is the snapshot's (or the initial one) until the log after it is replayed —
    /// and a campaign under it could count votes of nodes that no longer vote, or make a
    /// removed node a candidate.
    ///
    /// Committed entries are handed out first (membership takes effect as they are), so a
    /// replica that just learned the commit index — a transfer target told it together with
    /// `TimeoutNow` — campaigns under the membership in effect there.
    pub(crate) fn can_campaign(&mut self) -> bool {
        self.collect_committed();
        self.is_promotable() && !self.has_unapplied_membership()
    }

    /// True if an entry between the applied and the commit index may change the membership.
    /// Entries no longer in memory count as such: the campaign waits until they are applied.
    fn has_unapplied_membership(&self) -> bool {
        if self.applying >= self.log.commit {
            return false;
        }
        let mut entries = Vec::new();
        match self.log.entries(self.applying.next(), self.log.commit, u64::MAX, &mut entries) {
            Ok(()) => entries.iter().any(|entry| entry.kind == EntryKind::Membership),
            Err(_) => true,
        }
    }

    pub(crate) fn progress_of(&self, id: NodeId) -> Option<&Progress> {
        self.progress.iter().find(|p| p.id == id)
    }

    pub(crate) fn progress_mut(&mut self, id: NodeId) -> Option<&mut Progress> {
        self.progress.iter_mut().find(|p| p.id == id)
    }

    pub(crate) fn send(&mut self, to: NodeId, body: MessageBody) {
        let message = Message { from: self.id, to, term: self.term, body };
        self.outbox.messages.push(message);
    }

    /// Queues a message that depends on this replica's unpersisted state.
    pub(crate) fn send_after_persist(&mut self, to: NodeId, term: Term, body: MessageBody) {
        let message = Message { from: self.id, to, term, body };
        self.outbox.persisted_messages.push(message);
    }

    fn check_can_propose(&self, bytes: u64) -> Result<(), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader_hint: self.leader });
        }
        if self.transfer_target.is_some() {
            return Err(ProposeError::ProposalDropped);
        }
        // One entry is always allowed, so a single large entry cannot wedge the group.
        if self.uncommitted_bytes > 0
            && self.uncommitted_bytes + bytes > self.settings.max_uncommitted_bytes
        {
            let reason = BusyReason::UncommittedBytes { uncommitted_bytes: self.uncommitted_bytes };
            return Err(ProposeError::Busy { reason });
        }
        let max_inflight = self.settings.max_inflight_messages as usize;
        let open = |id: NodeId| {
            id == self.id
                || self.progress_of(id).is_some_and(|progress| {
                    progress.state != ProgressState::Replicate
                        || progress.inflight.len() < max_inflight
                })
        };
        let membership = self.membership();
        if !quorum::joint_active(&membership.voters, &membership.outgoing, open) {
            return Err(ProposeError::Busy { reason: BusyReason::InflightWindowsFull });
        }
        Ok(())
    }

    /// Leader: appends an entry of its term and replicates it.
    pub(crate) fn append_entry(&mut self, kind: EntryKind, payload: Bytes) -> LogIndex {
        assert_eq!(self.role, Role::Leader);
        let index = self.log.last_index().next();
        let entry = Entry { index, term: self.term, kind, payload };
        self.uncommitted_bytes += entry.size_bytes();
        self.log.append(entry);
        // Sent with the next Ready, while the local disk writes it too: the leader's own copy
        // counts toward the quorum only after `on_persisted`.
        self.broadcast_append();
        index
    }

    /// Hands out committed entries from memory; fetches the ones no longer cached.
    pub(crate) fn collect_committed(&mut self) {
        if self.applying >= self.log.commit || self.apply_fetching {
            return;
        }
        let low = self.applying.next();
        let mut entries = Vec::new();
        match self.log.entries(low, self.log.commit, self.settings.max_batch_bytes, &mut entries) {
            Ok(()) => self.hand_out_committed(entries),
            Err(missing) => {
                self.apply_fetching = true;
                self.outbox.fetches.push(Fetch {
                    purpose: FetchPurpose::Apply,
                    term: self.term,
                    low: missing.low,
                    high: missing.high,
                    max_bytes: self.settings.max_batch_bytes,
                });
            }
        }
    }

    /// Queues `entries` (the next committed ones) for applying: membership changes take effect.
    fn hand_out_committed(&mut self, entries: Vec<Entry>) {
        for entry in &entries {
            assert_eq!(entry.index, self.applying.next(), "committed entries are applied in order");
            self.applying = entry.index;
            if self.role == Role::Leader && entry.term == self.term {
                self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(entry.size_bytes());
            }
            if entry.kind == EntryKind::Membership {
                // A malformed membership entry could only come from a broken leader; a
                // replica must still not panic on it, so it is ignored.
                if let Ok(membership) = Membership::decode(&entry.payload) {
                    self.membership_changes.push((entry.index, membership));
                    self.on_membership_applied();
                }
            }
        }
        self.maybe_leave_joint();
        if self.outbox.committed_entries.is_empty() {
            self.outbox.committed_entries = entries;
        } else {
            self.outbox.committed_entries.extend(entries);
        }
    }

    /// Entries that no one needs from memory any more.
    fn unneeded_index(&self) -> LogIndex {
        let mut unneeded = self.applied;
        if self.role == Role::Leader {
            for progress in &self.progress {
                unneeded = unneeded.min(progress.match_index);
            }
        }
        unneeded
    }

    pub(crate) fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        let election_ticks = self.settings.election_ticks;
        let jitter = (self.next_random() % u64::from(election_ticks)) as u32;
        self.randomized_election_ticks = election_ticks + jitter;
    }

    /// splitmix64: a few lines, good enough for timeouts, and deterministic from the seed.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn new_progress(&self, id: NodeId) -> Progress {
        Progress::new(id, self.log.last_index().next(), self.ticks)
    }
}
