//! What a leader knows about each follower's log, and how fast it may send to it.

use std::collections::VecDeque;

use crate::types::{LogIndex, NodeId};

/// How the leader is currently feeding a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// The follower's log position is unknown: send one Append at a time and wait.
    Probe,
    /// The follower accepts: pipeline Appends up to the inflight window.
    Replicate,
    /// A snapshot through `pending` is on its way; send nothing else until it is acknowledged.
    Snapshot {
        /// Index of the snapshot sent.
        pending: LogIndex,
    },
}

/// Replication state of one peer, kept by the leader only.
#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) id: NodeId,
    /// Highest index known to match the leader's log (and be durable on the peer).
    pub(crate) match_index: LogIndex,
    /// Next index to send.
    pub(crate) next_index: LogIndex,
    pub(crate) state: ProgressState,
    /// In `Probe`: an Append was sent and not answered yet.
    pub(crate) probe_sent: bool,
    /// In `Replicate`: last index of each Append in flight, oldest first.
    pub(crate) inflight: VecDeque<LogIndex>,
    /// A storage fetch is outstanding for this peer.
    pub(crate) fetching: bool,
    /// The commit index carried by the last Append sent to this peer. While it is behind the
    /// leader's, the next flush of owed Appends sends one even if there is no new entry (see
    /// `Replica::flush_appends`).
    pub(crate) sent_commit: LogIndex,
    /// The leader's tick count when it last heard from this peer (check-quorum).
    pub(crate) heard_tick: u64,
    /// Highest heartbeat `seq` acknowledged in this term.
    pub(crate) acked_seq: u64,
    /// Highest heartbeat `sent_tick` acknowledged in this term (lease).
    pub(crate) acked_sent_tick: Option<u64>,
    /// Start of the current clock-rate window: (leader's ticks, peer's ticks).
    pub(crate) clock_sample: Option<(u64, u64)>,
    /// The last complete window showed the peer's clock within the drift bound of ours; until
    /// then the peer does not count toward a lease.
    pub(crate) clock_in_bounds: bool,
    /// Ticks spent waiting in `Snapshot` state.
    pub(crate) snapshot_wait_ticks: u32,
    /// The commit index carried by the latest heartbeat round to this peer.
    pub(crate) heartbeat_commit: LogIndex,
    /// The highest commit index this peer acknowledged knowing (it answered the heartbeat
    /// round that carried it). Not durable on the peer at that moment; soon after.
    pub(crate) commit_acked: LogIndex,
}

impl Progress {
    /// A peer as seen by a leader elected at tick `now` (which gives it a full election timeout
    /// to answer before check-quorum counts it as lost).
    pub(crate) fn new(id: NodeId, next_index: LogIndex, now: u64) -> Self {
        Self {
            id,
            match_index: LogIndex::ZERO,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflight: VecDeque::new(),
            fetching: false,
            sent_commit: LogIndex::ZERO,
            heard_tick: now,
            acked_seq: 0,
            acked_sent_tick: None,
            clock_sample: None,
            clock_in_bounds: false,
            snapshot_wait_ticks: 0,
            heartbeat_commit: LogIndex::ZERO,
            commit_acked: LogIndex::ZERO,
        }
    }

    /// True if nothing more may be sent now.
    pub(crate) fn is_paused(&self, max_inflight: u32) -> bool {
        self.fetching
            || match self.state {
                ProgressState::Probe => self.probe_sent,
                ProgressState::Replicate => self.inflight.len() >= max_inflight as usize,
                ProgressState::Snapshot { .. } => true,
            }
    }

    pub(crate) fn become_probe(&mut self) {
        // After a snapshot, continue right after it.
        if let ProgressState::Snapshot { pending } = self.state {
            self.next_index = self.match_index.max(pending).next();
        } else {
            self.next_index = self.match_index.next();
        }
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.inflight = VecDeque::new();
    }

    pub(crate) fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index.next();
        self.probe_sent = false;
        self.inflight.clear();
    }

    pub(crate) fn become_snapshot(&mut self, pending: LogIndex) {
        self.state = ProgressState::Snapshot { pending };
        self.probe_sent = false;
        self.inflight = VecDeque::new();
        self.snapshot_wait_ticks = 0;
    }

    /// Records that an Append with entries through `last` was sent.
    pub(crate) fn sent(&mut self, last: Option<LogIndex>) {
        match self.state {
            ProgressState::Replicate => {
                if let Some(last) = last {
                    self.next_index = last.next();
                    self.inflight.push_back(last);
                }
            }
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Snapshot { .. } => unreachable!("nothing is sent during a snapshot"),
        }
    }

    /// A successful acknowledgement through `index`; false if stale.
    pub(crate) fn maybe_update(&mut self, index: LogIndex) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index.next());
        while self.inflight.front().is_some_and(|&last| last <= index) {
            self.inflight.pop_front();
        }
        updated
    }

    /// A rejection of `rejected` with the leader-side probe point `probe`; false if stale.
    pub(crate) fn maybe_decrease(&mut self, rejected: LogIndex, probe: LogIndex) -> bool {
        match self.state {
            ProgressState::Replicate => {
                if rejected <= self.match_index {
                    return false;
                }
                self.become_probe();
                self.next_index = self.match_index.next().max(probe.next().min(rejected));
                true
            }
            ProgressState::Probe => {
                if rejected != self.next_index.prev() {
                    return false;
                }
                self.next_index = self.match_index.next().max(probe.next().min(rejected));
                self.probe_sent = false;
                true
            }
            // Followers never reject a snapshot: a rejection now answers an older Append.
            ProgressState::Snapshot { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicate_window_pauses_and_acks_free_it() {
        let mut progress = Progress::new(NodeId(2), LogIndex(1), 0);
        progress.maybe_update(LogIndex(0));
        progress.become_replicate();
        progress.sent(Some(LogIndex(3)));
        progress.sent(Some(LogIndex(5)));
        assert!(progress.is_paused(2));
        assert!(progress.maybe_update(LogIndex(3)));
        assert!(!progress.is_paused(2));
        assert_eq!(progress.next_index, LogIndex(6));
        assert!(!progress.maybe_update(LogIndex(2)), "a stale ack changes nothing");
    }

    #[test]
    fn stale_rejections_are_ignored() {
        let mut progress = Progress::new(NodeId(2), LogIndex(10), 0);
        progress.sent(None);
        assert!(!progress.maybe_decrease(LogIndex(5), LogIndex(4)), "not the probe in flight");
        assert!(progress.maybe_decrease(LogIndex(9), LogIndex(4)));
        assert_eq!(progress.next_index, LogIndex(5));
        assert!(!progress.probe_sent);
    }
}
