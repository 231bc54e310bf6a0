//! Membership: who votes, who learns, and joint-consensus changes between configurations.
//!
//! A change from voters `C_old` to `C_new` goes through two log entries, each taking effect when
//! applied (handed out in [`crate::Ready::committed_entries`]):
//! 1. *enter joint*: `voters = C_new, outgoing = C_old`; every election and commit needs a majority
//!    of both, so no two disjoint majorities can decide during the change;
//! 2. *leave joint*: `voters = C_new, outgoing = []`, proposed automatically by the leader as soon
//!    as it applies the first.
//!
//! Learners receive the log but never vote; promoting one is a change that moves it to `voters`.

use crate::codec::{decode_membership, encode_membership};
use crate::error::ProposeError;
use crate::quorum;
use crate::types::{LogIndex, Membership, NodeId};

/// A requested target membership for [`crate::Replica::propose_membership`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipChange {
    /// The voters after the change.
    pub voters: Vec<NodeId>,
    /// The learners after the change.
    pub learners: Vec<NodeId>,
}

impl Membership {
    /// A membership outside any change.
    pub fn new(mut voters: Vec<NodeId>, mut learners: Vec<NodeId>) -> Self {
        voters.sort_unstable();
        voters.dedup();
        learners.sort_unstable();
        learners.dedup();
        Self { voters, outgoing: Vec::new(), learners }
    }

    /// True during a joint-consensus change.
    pub fn is_joint(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// True if `id` votes in either half.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.binary_search(&id).is_ok() || self.outgoing.binary_search(&id).is_ok()
    }

    /// True if `id` receives the log (voter or learner).
    pub fn is_member(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.learners.binary_search(&id).is_ok()
    }

    /// Every member once, voters first: whom a leader replicates to.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        let outgoing_only =
            self.outgoing.iter().filter(|id| self.voters.binary_search(id).is_err());
        let learners = self.learners.iter().filter(|&&id| !self.is_voter(id));
        self.voters.iter().chain(outgoing_only).chain(learners).copied()
    }

    /// Every voter once: whom a candidate asks.
    pub fn all_voters(&self) -> impl Iterator<Item = NodeId> + '_ {
        let outgoing_only =
            self.outgoing.iter().filter(|id| self.voters.binary_search(id).is_err());
        self.voters.iter().chain(outgoing_only).copied()
    }

    /// The index acknowledged by a quorum, given each voter's acknowledged index.
    pub fn committed(&self, acked: impl Fn(NodeId) -> LogIndex) -> LogIndex {
        quorum::joint_committed(&self.voters, &self.outgoing, acked)
    }

    /// The outcome of an election, given each voter's answer so far.
    pub fn vote_result(&self, vote: impl Fn(NodeId) -> Option<bool>) -> quorum::VoteResult {
        quorum::joint_vote(&self.voters, &self.outgoing, vote)
    }

    /// The entry that enters the joint configuration towards `change`.
    pub(crate) fn enter_joint(&self, change: &MembershipChange) -> Result<Self, ProposeError> {
        if self.is_joint() {
            return Err(ProposeError::MembershipChangePending);
        }
        let target = Self::new(change.voters.clone(), change.learners.clone());
        if target.voters.is_empty() {
            return Err(ProposeError::InvalidMembership { reason: "no voters" });
        }
        if target.voters.contains(&NodeId::ZERO) || target.learners.contains(&NodeId::ZERO) {
            return Err(ProposeError::InvalidMembership { reason: "node id 0" });
        }
        if target.learners.iter().any(|id| target.voters.binary_search(id).is_ok()) {
            return Err(ProposeError::InvalidMembership { reason: "a node is voter and learner" });
        }
        Ok(Self { outgoing: self.voters.clone(), ..target })
    }

    /// The entry that leaves the joint configuration.
    pub(crate) fn leave_joint(&self) -> Self {
        Self { voters: self.voters.clone(), outgoing: Vec::new(), learners: self.learners.clone() }
    }

    /// The payload of a membership entry.
    pub fn encode(&self) -> bytes::Bytes {
        let mut out = Vec::new();
        encode_membership(self, &mut out);
        out.into()
    }

    /// Parses the payload of a membership entry.
    pub fn decode(payload: &[u8]) -> Result<Self, crate::codec::DecodeError> {
        decode_membership(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[u64]) -> Vec<NodeId> {
        raw.iter().copied().map(NodeId).collect()
    }

    #[test]
    fn joint_membership_needs_both_majorities() {
        let old = Membership::new(ids(&[1, 2, 3]), vec![]);
        let change = MembershipChange { voters: ids(&[3, 4, 5]), learners: ids(&[6]) };
        let joint = old.enter_joint(&change).expect("valid change");
        assert!(joint.is_joint());
        assert_eq!(joint.members().collect::<Vec<_>>(), ids(&[3, 4, 5, 1, 2, 6]));
        let acked = |id: NodeId| LogIndex(if id.0 <= 3 { 10 } else { 1 });
        assert_eq!(joint.committed(acked), LogIndex(1), "new majority has only node 3 at 10");
        assert_eq!(joint.leave_joint().committed(acked), LogIndex(1));
        assert_eq!(old.committed(acked), LogIndex(10));
        assert_eq!(joint.enter_joint(&change), Err(ProposeError::MembershipChangePending));
        assert_eq!(Membership::decode(&joint.encode()), Ok(joint));
    }
}
