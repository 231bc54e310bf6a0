//! The protocol: elections, replication, commit, reads, transfer and membership, as methods on
//! [`Replica`] that turn inputs into state changes and queued output.

use std::mem;

use crate::error::Error;
use crate::message::{Message, MessageBody};
use crate::progress::ProgressState;
use crate::quorum::{self, VoteResult};
use crate::read_index::{MAX_PENDING_READS, PendingRead, ReadMode, ReadState};
use crate::ready::{Fetch, FetchPurpose};
use crate::replica::{Replica, Role};
use crate::types::{Entry, EntryKind, LogIndex, NodeId, Term};

impl Replica {
    // ----- roles -----

    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        assert!(term >= self.term, "terms never go back");
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.reset_role_state();
        self.reset_election_timer();
    }

    /// Drops what only a leader or candidate keeps, releasing its memory.
    fn reset_role_state(&mut self) {
        self.votes = Vec::new();
        self.progress = Vec::new();
        self.transfer_target = None;
        self.leaving = None;
        self.appends_owed = false;
        self.uncommitted_bytes = 0;
        self.reads.clear();
        self.heartbeat_seq = 0;
        self.flushed_heartbeat_seq = 0;
        self.heartbeat_elapsed = 0;
    }

    /// Starts a pre-vote round or a real election (`transfer`: leadership handed to us).
    pub(crate) fn campaign(&mut self, pre_vote: bool, transfer: bool) {
        let (role, term) = if pre_vote {
            (Role::PreCandidate, Term(self.term.0 + 1))
        } else {
            self.term = Term(self.term.0 + 1);
            self.vote = Some(self.id);
            (Role::Candidate, self.term)
        };
        self.reset_role_state();
        self.role = role;
        self.leader = None;
        self.reset_election_timer();
        self.votes.push((self.id, true));
        if self.tally() == VoteResult::Won {
            self.on_election_won();
            return;
        }
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let voters: Vec<NodeId> =
            self.membership().all_voters().filter(|&id| id != self.id).collect();
        for to in voters {
            if pre_vote {
                // A pre-vote promises nothing: it may leave before anything is persisted.
                let body = MessageBody::PreVote { last_index, last_term };
                self.outbox.messages.push(Message { from: self.id, to, term, body });
            } else {
                // The candidate's own vote must be durable before it asks for others'.
                let body = MessageBody::Vote { last_index, last_term, transfer };
                self.send_after_persist(to, term, body);
            }
        }
    }

    fn tally(&self) -> VoteResult {
        self.membership().vote_result(|id| {
            self.votes.iter().find(|(voter, _)| *voter == id).map(|&(_, granted)| granted)
        })
    }

    fn on_election_won(&mut self) {
        if self.role == Role::PreCandidate {
            self.campaign(false, false);
        } else {
            self.become_leader();
        }
    }

    fn become_leader(&mut self) {
        assert_eq!(self.role, Role::Candidate, "only a candidate becomes leader");
        self.reset_role_state();
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.election_elapsed = 0;
        let members: Vec<NodeId> =
            self.membership().members().filter(|&id| id != self.id).collect();
        self.progress = members.into_iter().map(|id| self.new_progress(id)).collect();
        // Entries from earlier terms may hold a membership change; allow no new one until
        // everything up to here is applied.
        self.pending_membership_index = self.log.last_index();
        // The no-op lets the leader commit entries of earlier terms (Figure 8 rule) and learn
        // the commit index that reads need.
        self.append_entry(EntryKind::Empty, bytes::Bytes::new());
    }

    // ----- time -----

    pub(crate) fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.settings.check_quorum && !self.quorum_heard_recently() {
            self.become_follower(self.term, None);
            return;
        }
        if self.election_elapsed >= self.settings.election_ticks {
            if self.leaving.is_some() {
                // Members unheard of for an election timeout no longer count (see
                // `Replica::settled_index`); those that answered without acknowledging the
                // commit learn it from the next leader.
                self.update_settled();
                if self.leaving.is_some() {
                    self.step_down_removed();
                }
                return;
            }
            self.election_elapsed = 0;
            // A transfer that did not finish within an election timeout is abandoned.
            self.transfer_target = None;
        }
        if self.heartbeat_elapsed >= self.settings.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
            let election_ticks = self.settings.election_ticks;
            for progress in &mut self.progress {
                if let ProgressState::Snapshot { .. } = progress.state {
                    // A snapshot lost in transit is re-sent after an election timeout.
                    progress.snapshot_wait_ticks += self.settings.heartbeat_ticks;
                    if progress.snapshot_wait_ticks >= election_ticks {
                        progress.become_probe();
                    }
                }
            }
        }
    }

    /// Check-quorum: true if a quorum answered within the last election timeout. Checked every
    /// tick, so a leader cut off from its followers steps down one timeout after last hearing
    /// from a quorum (O(voters²) per leader tick; followers pay nothing).
    fn quorum_heard_recently(&self) -> bool {
        let membership = self.membership();
        let heard = quorum::joint_reached(&membership.voters, &membership.outgoing, |id| {
            if id == self.id {
                self.ticks
            } else {
                self.progress_of(id).map_or(0, |p| p.heard_tick)
            }
        });
        self.ticks - heard < u64::from(self.settings.election_ticks)
    }

    /// Leader stickiness. Only for a replica that votes in its own view: one that does not (an
    /// empty replica hosted to join, or one removed) is not ticked by its embedder, so its clock
    /// would say "just heard" forever and it would ignore every campaign — even one of a joint
    /// configuration it has not learned yet, which needs its vote (cluster simulator seed 1548).
    fn heard_from_leader_recently(&self) -> bool {
        self.leader.is_some()
            && self.election_elapsed < self.settings.election_ticks
            && self.is_promotable()
    }

    /// True while this replica must ignore campaigns: it heard from a leader within an election
    /// timeout. With lease reads, also during its first election timeout after a restart, since it
    /// may have forgotten acknowledging a leader's heartbeat just before crashing.
    fn in_lease(&self) -> bool {
        let booting =
            self.settings.lease_reads && self.ticks < u64::from(self.settings.election_ticks);
        self.settings.check_quorum && (self.heard_from_leader_recently() || booting)
    }

    // ----- messages -----

    pub(crate) fn step_message(&mut self, message: Message) -> Result<(), Error> {
        if let MessageBody::Append { prev_index, prev_term, entries, .. } = &message.body {
            check_append(message.term, *prev_index, *prev_term, entries)?;
        }
        if message.term > self.term {
            let is_vote_request = matches!(
                message.body,
                MessageBody::PreVote { .. } | MessageBody::Vote { transfer: false, .. }
            );
            if is_vote_request && self.in_lease() {
                // Leader stickiness: a node that still hears from a leader ignores campaigns, so
                // a partitioned node cannot depose a healthy leader (and leases stay valid).
                return Ok(());
            }
            match message.body {
                // A pre-vote does not change terms; a granted pre-vote answer carries the term
                // the pre-candidate would campaign in.
                MessageBody::PreVote { .. } | MessageBody::PreVoteResponse { reject: false } => {}
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::Snapshot { .. }
                | MessageBody::Quiesce { .. } => {
                    self.become_follower(message.term, Some(message.from));
                }
                _ => self.become_follower(message.term, None),
            }
        } else if message.term < self.term {
            match message.body {
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::Quiesce { .. }
                    if self.settings.check_quorum || self.settings.pre_vote =>
                {
                    // A stale leader (perhaps one whose pre-votes keep failing) learns the new
                    // term from this and steps down. A quiet leader sends nothing but its
                    // `Quiesce`: left unanswered, this replica would stay a term ahead, never
                    // follow, and wake the group with a pre-vote every election timeout.
                    let body = MessageBody::AppendResponse {
                        reject: true,
                        index: LogIndex::ZERO,
                        hint_index: LogIndex::ZERO,
                        hint_term: Term::ZERO,
                    };
                    self.send(message.from, body);
                }
                MessageBody::PreVote { .. } => {
                    self.send(message.from, MessageBody::PreVoteResponse { reject: true });
                }
                _ => {}
            }
            return Ok(());
        }
        self.step_current(message)
    }

    /// Handles a message whose term is the current one (or a pre-vote for a later one).
    fn step_current(&mut self, message: Message) -> Result<(), Error> {
        let from = message.from;
        match message.body {
            MessageBody::PreVote { last_index, last_term } => {
                // Thesis §9.6: refuse while hearing from a leader, so a node returning from a
                // partition cannot win a pre-vote and disrupt a healthy leader.
                let grant = message.term > self.term
                    && !self.heard_from_leader_recently()
                    && self.log.is_up_to_date(last_index, last_term);
                let term = if grant { message.term } else { self.term };
                let body = MessageBody::PreVoteResponse { reject: !grant };
                self.outbox.messages.push(Message { from: self.id, to: from, term, body });
            }
            MessageBody::Vote { last_index, last_term, .. } => {
                let can_vote =
                    self.vote == Some(from) || (self.vote.is_none() && self.leader.is_none());
                let grant = can_vote && self.log.is_up_to_date(last_index, last_term);
                if grant {
                    self.vote = Some(from);
                    self.reset_election_timer();
                }
                self.send_after_persist(
                    from,
                    self.term,
                    MessageBody::VoteResponse { reject: !grant },
                );
            }
            MessageBody::PreVoteResponse { reject } => {
                if self.role == Role::PreCandidate {
                    self.record_vote(from, !reject);
                }
            }
            MessageBody::VoteResponse { reject } => {
                if self.role == Role::Candidate {
                    self.record_vote(from, !reject);
                }
            }
            MessageBody::Append { prev_index, prev_term, entries, commit } => {
                self.follow(from);
                self.handle_append(from, prev_index, prev_term, entries, commit)?;
            }
            MessageBody::Heartbeat { commit, seq, sent_tick } => {
                self.follow(from);
                if self.role == Role::Follower {
                    let commit = commit.min(self.log.last_index());
                    self.commit_to(commit);
                    let ticks = self.ticks;
                    self.send(from, MessageBody::HeartbeatResponse { seq, sent_tick, ticks });
                }
            }
            MessageBody::Snapshot { snapshot } => {
                self.follow(from);
                if self.role == Role::Follower {
                    self.handle_snapshot(from, snapshot);
                }
            }
            MessageBody::AppendResponse { reject, index, hint_index, hint_term } => {
                if self.role == Role::Leader {
                    self.handle_append_response(from, reject, index, hint_index, hint_term);
                }
            }
            MessageBody::HeartbeatResponse { seq, sent_tick, ticks } => {
                if self.role == Role::Leader {
                    self.handle_heartbeat_response(from, seq, sent_tick);
                    self.sample_clock(from, ticks);
                }
            }
            MessageBody::ReadIndex { context } => {
                self.forwarded_read(from, context, ReadMode::Lease);
            }
            MessageBody::ReadIndexQuorum { context } => {
                self.forwarded_read(from, context, ReadMode::Quorum);
            }
            MessageBody::ReadIndexResponse { context, index } => {
                if let Some(index) = index {
                    self.outbox.read_states.push(ReadState { context, index });
                }
            }
            MessageBody::TimeoutNow => {
                if self.role != Role::Leader && self.can_campaign() {
                    self.campaign(false, true);
                }
            }
            MessageBody::Quiesce { commit } => {
                self.follow(from);
                if self.role == Role::Follower {
                    // Capped by the leader at what this follower holds; capped here too, as a
                    // heartbeat's is.
                    self.commit_to(commit.min(self.log.last_index()));
                }
            }
        }
        Ok(())
    }

    /// A read forwarded by the follower `from`.
    fn forwarded_read(&mut self, from: NodeId, context: u64, mode: ReadMode) {
        // Forwarded reads share the leader's bound: refused beyond it, so the follower's client
        // retries instead of the queue growing without limit.
        if self.role == Role::Leader && self.reads.len() < MAX_PENDING_READS {
            self.leader_read(context, from, mode);
        } else {
            self.send(from, MessageBody::ReadIndexResponse { context, index: None });
        }
    }

    /// A message from the leader of the current term: follow it.
    fn follow(&mut self, leader: NodeId) {
        match self.role {
            Role::Leader => {
                // Two leaders in one term cannot happen; a forged message must not make it so.
            }
            Role::Follower => {
                self.leader = Some(leader);
                self.election_elapsed = 0;
            }
            Role::PreCandidate | Role::Candidate => self.become_follower(self.term, Some(leader)),
        }
    }

    fn record_vote(&mut self, from: NodeId, granted: bool) {
        if self.votes.iter().any(|(voter, _)| *voter == from) {
            return;
        }
        self.votes.push((from, granted));
        match self.tally() {
            VoteResult::Won => self.on_election_won(),
            VoteResult::Lost => self.become_follower(self.term, None),
            VoteResult::Pending => {}
        }
    }

    fn commit_to(&mut self, commit: LogIndex) {
        if commit > self.log.commit {
            self.log.commit = commit;
        }
    }

    // ----- follower side of replication -----

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: LogIndex,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: LogIndex,
    ) -> Result<(), Error> {
        if self.role != Role::Follower {
            return Ok(());
        }
        let term = self.term;
        if prev_index < self.log.commit {
            // Everything through our commit index already matches the leader's log.
            let skip = entries.iter().take_while(|e| e.index <= self.log.commit).count();
            if skip == entries.len() {
                let index = self.log.commit;
                self.send_after_persist(from, term, append_ack(index));
                return Ok(());
            }
            let (prev_index, prev_term) = (entries[skip - 1].index, entries[skip - 1].term);
            let entries = entries.into_iter().skip(skip).collect();
            return self.handle_append(from, prev_index, prev_term, entries, commit);
        }
        if self.log.term(prev_index) != Some(prev_term) {
            let (hint_index, hint_term) = self.log.find_conflict_by_term(prev_index, prev_term);
            let body = MessageBody::AppendResponse {
                reject: true,
                index: prev_index,
                hint_index,
                hint_term,
            };
            self.send_after_persist(from, term, body);
            return Ok(());
        }
        let last_new = LogIndex(prev_index.0 + entries.len() as u64);
        self.log.merge(entries).map_err(|index| Error::CommittedConflict { index })?;
        self.commit_to(commit.min(last_new));
        // Acknowledged only once durable: hence after persist.
        self.send_after_persist(from, term, append_ack(last_new));
        Ok(())
    }

    fn handle_snapshot(&mut self, from: NodeId, snapshot: crate::types::Snapshot) {
        let meta = &snapshot.meta;
        let term = self.term;
        if meta.index <= self.log.commit {
            let index = self.log.commit;
            self.send_after_persist(from, term, append_ack(index));
            return;
        }
        if self.log.term(meta.index) == Some(meta.term) {
            // We hold the entries already: just learn that they are committed.
            self.commit_to(meta.index);
            self.send_after_persist(from, term, append_ack(meta.index));
            return;
        }
        self.log.restore(meta);
        self.applying = meta.index;
        self.applied = meta.index;
        self.apply_fetching = false;
        self.outbox.committed_entries.clear();
        self.base_membership = meta.membership.clone();
        self.membership_changes = Vec::new();
        let index = meta.index;
        self.snapshot = Some(Box::new(snapshot.clone()));
        self.outbox.snapshot = Some(Box::new(snapshot));
        self.send_after_persist(from, term, append_ack(index));
    }

    // ----- leader side of replication -----

    /// Replicates new entries to every follower — at the next [`Replica::ready`], so that all
    /// the proposals made between two Readies leave as one Append per follower (split only by
    /// `max_batch_bytes` and the inflight window) instead of one Append per proposal.
    ///
    /// Deferring costs no latency: messages leave a replica only through `ready` anyway.
    pub(crate) fn broadcast_append(&mut self) {
        self.appends_owed |= self.role == Role::Leader && !self.progress.is_empty();
    }

    /// Sends the Appends owed since the last Ready ([`Replica::broadcast_append`], commit index
    /// advances in [`Replica::maybe_commit`]): to each follower everything it lacks that its
    /// progress allows (pipelined in `Replicate`, one probe in `Probe`, nothing while paused —
    /// acknowledgements and heartbeat responses resume it as usual), and at least an empty
    /// Append to one that has not been sent the current commit index yet.
    pub(crate) fn flush_appends(&mut self) {
        if !mem::take(&mut self.appends_owed) {
            return;
        }
        // By position: sending never adds or removes progress entries, and this allocates nothing.
        for position in 0..self.progress.len() {
            let id = self.progress[position].id;
            if self.send_append(id, false) {
                self.pipeline(id);
            } else {
                self.send_owed_commit(id);
            }
        }
    }

    /// Sends `to` what it lacks, if its progress allows. With `allow_empty`, sends an empty
    /// Append when there is nothing new (to carry the commit index, or to probe).
    /// Returns true if a message was sent.
    pub(crate) fn send_append(&mut self, to: NodeId, allow_empty: bool) -> bool {
        let max_inflight = self.settings.max_inflight_messages;
        let last_index = self.log.last_index();
        let Some(progress) = self.progress_of(to) else { return false };
        if progress.is_paused(max_inflight) {
            return false;
        }
        let next = progress.next_index;
        let prev_index = next.prev();
        let Some(prev_term) = self.log.term(prev_index) else {
            return self.send_snapshot(to);
        };
        let mut entries = Vec::new();
        if let Err(missing) =
            self.log.entries(next, last_index, self.settings.max_batch_bytes, &mut entries)
        {
            self.progress_mut(to).expect("checked").fetching = true;
            let fetch = Fetch {
                purpose: FetchPurpose::Replicate { to },
                term: self.term,
                low: missing.low,
                high: missing.high,
                max_bytes: self.settings.max_batch_bytes,
            };
            self.outbox.fetches.push(fetch);
            return false;
        }
        if entries.is_empty() && !allow_empty {
            return false;
        }
        self.send_entries(to, prev_index, prev_term, entries);
        true
    }

    fn send_entries(
        &mut self,
        to: NodeId,
        prev_index: LogIndex,
        prev_term: Term,
        entries: Vec<Entry>,
    ) {
        let last = entries.last().map(|entry| entry.index);
        // The follower caps the commit index at the entries it verified from this message.
        let commit = self.log.commit;
        let progress = self.progress_mut(to).expect("caller checked");
        progress.sent(last);
        progress.sent_commit = commit;
        self.send(to, MessageBody::Append { prev_index, prev_term, entries, commit });
    }

    /// Entries fetched for `to`, answering the current request (the caller checked).
    pub(crate) fn on_replicate_fetched(&mut self, fetch: Fetch, to: NodeId, entries: Vec<Entry>) {
        let next_index = self.progress_of(to).expect("caller checked").next_index;
        if next_index != fetch.low {
            // The follower moved on meanwhile; start over from where it is now.
            self.send_append(to, true);
            return;
        }
        if entries.is_empty() {
            // Storage compacted them meanwhile.
            self.send_snapshot(to);
            return;
        }
        let prev_index = fetch.low.prev();
        let Some(prev_term) = self.log.term(prev_index) else {
            self.send_snapshot(to);
            return;
        };
        self.send_entries(to, prev_index, prev_term, entries);
        self.pipeline(to);
    }

    fn send_snapshot(&mut self, to: NodeId) -> bool {
        let Some(snapshot) = self.snapshot.as_deref().cloned() else {
            // Only a compacted log lacks entries; compaction always records a snapshot.
            unreachable!("log compacted without a snapshot");
        };
        let progress = self.progress_mut(to).expect("caller checked");
        progress.become_snapshot(snapshot.meta.index);
        self.send(to, MessageBody::Snapshot { snapshot });
        true
    }

    /// In `Replicate`, keeps sending until the window is full or nothing is left.
    fn pipeline(&mut self, to: NodeId) {
        while self.progress_of(to).is_some_and(|p| p.state == ProgressState::Replicate)
            && self.send_append(to, false)
        {}
    }

    fn handle_append_response(
        &mut self,
        from: NodeId,
        reject: bool,
        index: LogIndex,
        hint_index: LogIndex,
        hint_term: Term,
    ) {
        let last_index = self.log.last_index();
        let probe = if hint_term > Term::ZERO {
            self.log.find_conflict_by_term(hint_index, hint_term).0
        } else {
            hint_index
        };
        let max_inflight = self.settings.max_inflight_messages;
        let now = self.ticks;
        let Some(progress) = self.progress_mut(from) else { return };
        progress.heard_tick = now;
        if reject {
            if progress.maybe_decrease(index, probe) {
                self.send_append(from, true);
            }
            return;
        }
        let index = index.min(last_index);
        let was_paused = progress.is_paused(max_inflight);
        if !progress.maybe_update(index) {
            // A stale acknowledgement may still free room in the window (what was sent up to it
            // arrived); what the window held back goes out with the next Ready's Appends.
            if was_paused && progress.state == ProgressState::Replicate {
                self.appends_owed = true;
            }
            return;
        }
        match progress.state {
            ProgressState::Probe => progress.become_replicate(),
            ProgressState::Snapshot { pending } if progress.match_index >= pending => {
                progress.become_probe();
                progress.become_replicate();
            }
            ProgressState::Snapshot { .. } | ProgressState::Replicate => {}
        }
        let caught_up = progress.match_index == last_index;
        // Entries not sent yet (held back by the window, or the rest of the log after a probe
        // succeeded) go out with the next Ready's Appends, together with whatever is proposed
        // meanwhile.
        if progress.state == ProgressState::Replicate && progress.next_index <= last_index {
            self.appends_owed = true;
        }
        self.maybe_commit();
        if caught_up && self.transfer_target == Some(from) {
            // The commit index, if owed, goes first: the target should know it before it
            // campaigns.
            self.send_owed_commit(from);
            self.send(from, MessageBody::TimeoutNow);
        }
    }

    /// Advances the commit index to what a quorum holds durably, if that entry is of the
    /// current term (Figure 8: counting replicas of older entries is not enough). On success
    /// tells every follower. Returns true if the commit index moved.
    pub(crate) fn maybe_commit(&mut self) -> bool {
        let stable = self.log.stable;
        let committed = self.membership().committed(|id| {
            if id == self.id {
                stable
            } else {
                self.progress_of(id).map_or(LogIndex::ZERO, |p| p.match_index)
            }
        });
        if committed <= self.log.commit || self.log.term(committed) != Some(self.term) {
            return false;
        }
        let first_in_term = self.log.term(self.log.commit) != Some(self.term);
        self.log.commit = committed;
        if first_in_term {
            self.release_reads_before_commit();
        }
        // Every follower learns the new commit index from the next Ready's Appends: with new
        // entries if there are any, else in an empty Append (see `flush_appends`).
        self.appends_owed |= !self.progress.is_empty();
        true
    }

    /// Sends `to` an Append (empty if there is nothing new it may be sent) if the last one it
    /// was sent carried an older commit index.
    pub(crate) fn send_owed_commit(&mut self, to: NodeId) {
        let commit = self.log.commit;
        if self.progress_of(to).is_some_and(|p| p.sent_commit < commit) {
            self.send_append(to, true);
        }
    }

    pub(crate) fn broadcast_heartbeat(&mut self) {
        self.heartbeat_seq += 1;
        let (seq, sent_tick) = (self.heartbeat_seq, self.ticks);
        for index in 0..self.progress.len() {
            let progress = &mut self.progress[index];
            let commit = self.log.commit.min(progress.match_index);
            progress.heartbeat_commit = commit;
            let message = Message {
                from: self.id,
                to: progress.id,
                term: self.term,
                body: MessageBody::Heartbeat { commit, seq, sent_tick },
            };
            self.outbox.messages.push(message);
        }
    }

    fn handle_heartbeat_response(&mut self, from: NodeId, seq: u64, sent_tick: u64) {
        let last_index = self.log.last_index();
        let max_inflight = self.settings.max_inflight_messages as usize;
        let now = self.ticks;
        let latest = self.heartbeat_seq;
        let Some(progress) = self.progress_mut(from) else { return };
        progress.heard_tick = now;
        progress.acked_seq = progress.acked_seq.max(seq);
        if seq == latest {
            // An answer to the latest round: the peer took in the commit index it carried.
            progress.commit_acked = progress.commit_acked.max(progress.heartbeat_commit);
        }
        progress.acked_sent_tick =
            Some(progress.acked_sent_tick.map_or(sent_tick, |t| t.max(sent_tick)));
        progress.probe_sent = false;
        if progress.state == ProgressState::Replicate && progress.inflight.len() >= max_inflight {
            // The oldest Append may be lost; make room so replication cannot stall forever.
            progress.inflight.pop_front();
        }
        if progress.match_index < last_index {
            if progress.state == ProgressState::Replicate && progress.next_index <= last_index {
                // Entries not sent yet leave with the next Ready's Appends (and expose a lost
                // batch as a rejection, as any Append after it does).
                self.appends_owed = true;
            } else {
                // An empty Append exposes a lost batch as a rejection.
                self.send_append(from, true);
            }
        }
        self.confirm_reads();
        self.update_settled();
    }

    /// Raises [`Replica::settled_index`] to what every member heard from within an election
    /// timeout acknowledged; a removed leader waiting on it then steps down.
    fn update_settled(&mut self) {
        let membership = self.membership();
        if membership.is_joint() {
            return;
        }
        let timeout = u64::from(self.settings.election_ticks);
        let now = self.ticks;
        let known = self
            .progress
            .iter()
            .filter(|p| membership.is_member(p.id) && now - p.heard_tick < timeout)
            .map(|p| p.commit_acked)
            .fold(self.log.commit, LogIndex::min);
        self.settled = self.settled.max(known);
        if self.leaving.is_some_and(|index| self.settled >= index) {
            self.step_down_removed();
        }
    }

    /// Compares `from`'s clock rate with ours over windows of two election timeouts. A lease is
    /// safe only if no follower's clock runs faster than ours by more than
    /// `election_ticks / (election_ticks - clock_drift_ticks)`: a faster follower would stop
    /// refusing votes before our lease ends.
    fn sample_clock(&mut self, from: NodeId, peer_ticks: u64) {
        let now = self.ticks;
        let election_ticks = u64::from(self.settings.election_ticks);
        let lease_ticks = election_ticks - u64::from(self.settings.clock_drift_ticks);
        let Some(progress) = self.progress_mut(from) else { return };
        match progress.clock_sample {
            Some((leader_start, peer_start)) if now - leader_start >= 2 * election_ticks => {
                // A restarted peer counts from zero again: that reads as slow, which is safe.
                let peer_elapsed = peer_ticks.saturating_sub(peer_start);
                let leader_elapsed = now - leader_start;
                progress.clock_in_bounds = u128::from(peer_elapsed) * u128::from(lease_ticks)
                    <= u128::from(leader_elapsed) * u128::from(election_ticks);
                progress.clock_sample = Some((now, peer_ticks));
            }
            Some(_) => {}
            None => progress.clock_sample = Some((now, peer_ticks)),
        }
    }

    // ----- reads -----

    /// A read on the leader, for itself or for the follower `from`.
    pub(crate) fn leader_read(&mut self, context: u64, from: NodeId, mode: ReadMode) {
        if self.log.term(self.log.commit) != Some(self.term) {
            // Until an entry of this term commits, the commit index may be behind the group's.
            self.reads.before_commit.push((context, from, mode));
            return;
        }
        let index = self.log.commit;
        if mode == ReadMode::Lease && self.lease_valid() {
            self.release_read(PendingRead { context, from, index, seq: 0 });
            return;
        }
        if self.membership().all_voters().all(|id| id == self.id) {
            self.release_read(PendingRead { context, from, index, seq: 0 });
            return;
        }
        // Heartbeats still in the outbox leave after this read arrived, so their round can
        // confirm it: reads between two Readies share one round.
        if self.heartbeat_seq <= self.flushed_heartbeat_seq {
            self.broadcast_heartbeat();
        }
        let seq = self.heartbeat_seq;
        self.reads.pending.push_back(PendingRead { context, from, index, seq });
    }

    fn release_reads_before_commit(&mut self) {
        for (context, from, mode) in mem::take(&mut self.reads.before_commit) {
            self.leader_read(context, from, mode);
        }
    }

    fn confirm_reads(&mut self) {
        let membership = self.membership();
        let confirmed = quorum::joint_reached(&membership.voters, &membership.outgoing, |id| {
            if id == self.id { u64::MAX } else { self.progress_of(id).map_or(0, |p| p.acked_seq) }
        });
        let mut released = Vec::new();
        self.reads.confirm(confirmed, |read| released.push(read));
        for read in released {
            self.release_read(read);
        }
    }

    fn release_read(&mut self, read: PendingRead) {
        if read.from == self.id {
            self.outbox.read_states.push(ReadState { context: read.context, index: read.index });
        } else {
            let body =
                MessageBody::ReadIndexResponse { context: read.context, index: Some(read.index) };
            self.send(read.from, body);
        }
    }

    /// A lease is valid while a quorum acknowledged a heartbeat sent less than
    /// `election_ticks - clock_drift_ticks` ago: none of them will vote for another leader
    /// before `election_ticks` after receiving it, by their clocks — which is later by ours as
    /// long as their clocks are not too fast, so only peers measured in bounds count.
    fn lease_valid(&self) -> bool {
        if !self.settings.lease_reads || self.transfer_target.is_some() {
            return false;
        }
        let membership = self.membership();
        // Ticks are counted from 1 so that 0 can mean "never acknowledged".
        let start = quorum::joint_reached(&membership.voters, &membership.outgoing, |id| {
            if id == self.id {
                self.ticks + 1
            } else {
                // Only peers whose clocks were measured within bounds count: fail closed.
                self.progress_of(id)
                    .filter(|p| p.clock_in_bounds)
                    .and_then(|p| p.acked_sent_tick)
                    .map_or(0, |tick| tick + 1)
            }
        });
        let Some(start) = start.checked_sub(1) else { return false };
        // Acknowledgements from before a quiet period prove nothing about now: the clock stood
        // still while real time passed (see `Replica::wake`).
        if start < self.lease_floor {
            return false;
        }
        let lease_ticks = u64::from(self.settings.election_ticks - self.settings.clock_drift_ticks);
        self.ticks < start + lease_ticks
    }

    // ----- quiescence -----

    /// See [`Replica::can_quiesce`].
    pub(crate) fn quiesce_allowed(&self, live: &dyn Fn(NodeId) -> bool) -> bool {
        let last = self.log.last_index();
        let settled = self.role == Role::Leader
            && self.transfer_target.is_none()
            && self.leaving.is_none()
            && self.reads.len() == 0
            && !self.appends_owed
            && self.log.commit == last
            && self.log.stable == last
            && self.log.last_term() == self.term
            && self.applied == last
            && !self.membership().is_joint();
        if !settled {
            return false;
        }
        // A live member that is behind, or not yet confirmed, still needs the leader's ticks.
        let caught_up = self.progress.iter().all(|p| {
            !live(p.id)
                || (p.match_index == last
                    && p.state == ProgressState::Replicate
                    && p.inflight.is_empty()
                    && !p.fetching)
        });
        // Without a live quorum the leader must keep ticking so check-quorum can depose it.
        caught_up
            && self.membership().vote_result(|id| Some(id == self.id || live(id)))
                == VoteResult::Won
    }

    /// See [`Replica::quiesce`].
    pub(crate) fn send_quiesce(&mut self, live: &dyn Fn(NodeId) -> bool) {
        for index in 0..self.progress.len() {
            let progress = &self.progress[index];
            if !live(progress.id) {
                continue;
            }
            let commit = self.log.commit.min(progress.match_index);
            let message = Message {
                from: self.id,
                to: progress.id,
                term: self.term,
                body: MessageBody::Quiesce { commit },
            };
            self.outbox.messages.push(message);
        }
    }

    // ----- membership -----

    /// Called as a membership entry is handed out for applying.
    pub(crate) fn on_membership_applied(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let membership = self.membership().clone();
        // A member this change removes still gets the commit index owed to it, so that it
        // learns of its removal; then the leader tracks exactly the new member set.
        for position in 0..self.progress.len() {
            let id = self.progress[position].id;
            if !membership.is_member(id) {
                self.send_owed_commit(id);
            }
        }
        self.progress.retain(|p| membership.is_member(p.id));
        for id in membership.members() {
            if id != self.id && self.progress_of(id).is_none() {
                let progress = self.new_progress(id);
                self.progress.push(progress);
                self.send_append(id, true);
            }
        }
        if !membership.is_joint() && !membership.is_voter(self.id) && self.leaving.is_none() {
            // Removed: tell the others the final commit index, and keep leading (the new
            // configuration's voters commit) until they acknowledge it — each heartbeat round
            // asks — or an election timeout passes; then hand leadership over.
            for position in 0..self.progress.len() {
                let id = self.progress[position].id;
                self.send_append(id, true);
            }
            self.leaving = Some(self.applying);
            self.election_elapsed = 0;
            self.heartbeat_elapsed = self.settings.heartbeat_ticks;
        }
    }

    /// A removed leader hands leadership to a voter that holds its whole log, so the group
    /// need not wait for an election timeout, and steps down.
    fn step_down_removed(&mut self) {
        let membership = self.membership();
        let last_index = self.log.last_index();
        let successor = self
            .progress
            .iter()
            .find(|p| membership.is_voter(p.id) && p.match_index == last_index)
            .map(|p| p.id);
        if let Some(successor) = successor {
            self.send_owed_commit(successor);
            self.send(successor, MessageBody::TimeoutNow);
        }
        self.become_follower(self.term, None);
    }

    /// Leader: once the joint configuration is applied (and no change is in flight), proposes
    /// leaving it. Also covers a leader elected in the middle of a change.
    pub(crate) fn maybe_leave_joint(&mut self) {
        if self.role == Role::Leader
            && self.membership().is_joint()
            && self.pending_membership_index <= self.applying
        {
            let leave = self.membership().leave_joint();
            let index = self.append_entry(EntryKind::Membership, leave.encode());
            self.pending_membership_index = index;
        }
    }
}

fn append_ack(index: LogIndex) -> MessageBody {
    MessageBody::AppendResponse {
        reject: false,
        index,
        hint_index: LogIndex::ZERO,
        hint_term: Term::ZERO,
    }
}

/// Rejects Appends that no correct leader sends, before they touch the log.
fn check_append(
    term: Term,
    prev_index: LogIndex,
    prev_term: Term,
    entries: &[Entry],
) -> Result<(), Error> {
    let mut expected_index = prev_index;
    let mut previous_term = prev_term;
    for entry in entries {
        expected_index = expected_index.next();
        if entry.index != expected_index {
            return Err(Error::MalformedAppend { reason: "entries are not consecutive" });
        }
        if entry.term < previous_term || entry.term > term {
            return Err(Error::MalformedAppend { reason: "entry terms out of order" });
        }
        previous_term = entry.term;
    }
    if prev_term > term {
        return Err(Error::MalformedAppend { reason: "prev_term above the message term" });
    }
    Ok(())
}
