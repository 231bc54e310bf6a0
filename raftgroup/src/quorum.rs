//! Quorum arithmetic as pure functions: no state, no allocation.
//!
//! A *majority* configuration is a set of voters; a *joint* configuration is two of them (during a
//! membership change) and a decision needs a majority of each. An empty configuration agrees to
//! everything, which is what makes the joint formulas work when `outgoing` is empty.

use crate::types::{LogIndex, NodeId};

/// Outcome of counting votes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    /// Not decided yet: missing votes could still go either way.
    Pending,
    /// A quorum refused.
    Lost,
    /// A quorum granted.
    Won,
}

/// The size of a majority of `voter_count` voters.
pub const fn majority(voter_count: usize) -> usize {
    voter_count / 2 + 1
}

/// The largest value that a majority of `voters` has reached, given each voter's value (an
/// acknowledged index, a heartbeat round, a tick). `u64::MAX` for an empty set, so that it never
/// limits a joint minimum.
///
/// O(n²) on purpose: groups have a handful of voters and this allocates nothing.
pub fn majority_reached(voters: &[NodeId], value: impl Fn(NodeId) -> u64) -> u64 {
    if voters.is_empty() {
        return u64::MAX;
    }
    let need = majority(voters.len());
    let mut best = 0;
    for &candidate in voters {
        let reached = value(candidate);
        if reached <= best {
            continue;
        }
        let count = voters.iter().filter(|&&voter| value(voter) >= reached).count();
        if count >= need {
            best = reached;
        }
    }
    best
}

/// [`majority_reached`] for a joint configuration: the minimum of both halves (0 if both are
/// empty, which no live group is).
pub fn joint_reached(
    incoming: &[NodeId],
    outgoing: &[NodeId],
    value: impl Fn(NodeId) -> u64,
) -> u64 {
    let reached = majority_reached(incoming, &value).min(majority_reached(outgoing, &value));
    if reached == u64::MAX { 0 } else { reached }
}

/// The largest index a quorum of the joint configuration acknowledged: the commit rule's count.
pub fn joint_committed(
    incoming: &[NodeId],
    outgoing: &[NodeId],
    acked: impl Fn(NodeId) -> LogIndex,
) -> LogIndex {
    LogIndex(joint_reached(incoming, outgoing, |id| acked(id).0))
}

/// Counts votes of a majority configuration; `vote` is `None` for voters not heard from.
pub fn majority_vote(voters: &[NodeId], vote: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
    if voters.is_empty() {
        return VoteResult::Won;
    }
    let need = majority(voters.len());
    let (mut granted, mut missing) = (0, 0);
    for &voter in voters {
        match vote(voter) {
            Some(true) => granted += 1,
            Some(false) => {}
            None => missing += 1,
        }
    }
    if granted >= need {
        VoteResult::Won
    } else if granted + missing >= need {
        VoteResult::Pending
    } else {
        VoteResult::Lost
    }
}

/// Counts votes of a joint configuration: won only if both halves won, lost if either lost.
pub fn joint_vote(
    incoming: &[NodeId],
    outgoing: &[NodeId],
    vote: impl Fn(NodeId) -> Option<bool>,
) -> VoteResult {
    let first = majority_vote(incoming, &vote);
    let second = majority_vote(outgoing, &vote);
    match (first, second) {
        (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
        (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
        _ => VoteResult::Pending,
    }
}

/// True if the voters for which `active` holds form a quorum of the joint configuration.
pub fn joint_active(
    incoming: &[NodeId],
    outgoing: &[NodeId],
    active: impl Fn(NodeId) -> bool,
) -> bool {
    joint_vote(incoming, outgoing, |id| Some(active(id))) == VoteResult::Won
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[u64]) -> Vec<NodeId> {
        raw.iter().copied().map(NodeId).collect()
    }

    #[test]
    fn majority_reached_takes_the_median_of_acks() {
        let voters = ids(&[1, 2, 3, 4, 5]);
        let acks = [5, 1, 9, 7, 3];
        assert_eq!(majority_reached(&voters, |id| acks[(id.0 - 1) as usize]), 5);
        let even = ids(&[1, 2, 3, 4]);
        let reached = majority_reached(&even, |id| acks[(id.0 - 1) as usize]);
        assert_eq!(reached, 5, "4 voters need 3 acks: of 9, 7, 5, 1 the third is 5");
        assert_eq!(majority_reached(&[], |_| 0), u64::MAX, "an empty half never limits");
    }

    #[test]
    fn joint_committed_is_the_minimum_of_both_halves() {
        let acks = [10, 10, 2, 2, 2];
        let at = |id: NodeId| LogIndex(acks[(id.0 - 1) as usize]);
        assert_eq!(joint_committed(&ids(&[1, 2, 3]), &[], at), LogIndex(10));
        assert_eq!(joint_committed(&ids(&[1, 2, 3]), &ids(&[3, 4, 5]), at), LogIndex(2));
    }

    #[test]
    fn votes_are_pending_until_decided() {
        let voters = ids(&[1, 2, 3]);
        assert_eq!(majority_vote(&voters, |id| (id.0 == 1).then_some(true)), VoteResult::Pending);
        assert_eq!(majority_vote(&voters, |id| Some(id.0 != 3)), VoteResult::Won);
        assert_eq!(majority_vote(&voters, |id| Some(id.0 == 1)), VoteResult::Lost);
        assert_eq!(
            joint_vote(&voters, &ids(&[4, 5, 6]), |id| Some(id.0 <= 3)),
            VoteResult::Lost,
            "a joint vote needs both majorities"
        );
        assert_eq!(joint_vote(&voters, &ids(&[3, 4]), |id| Some(id.0 >= 2)), VoteResult::Won);
    }
}
