//! Membership changes, the operator's side: at the nemesis's random moments, one
//! joint-consensus change of a random group, asked of its leader (now and then of another node,
//! which must refuse), as an operator drives `Engine::{add_learner, promote, remove_member,
//! change_membership}`:
//!
//! - a group with a learner: promote it (sometimes: remove it);
//! - otherwise: remove a voter while more than the minimum remain (the leader itself about a
//!   third of the time), add a node that is not a member as a learner, or, now and then, replace
//!   a voter by a node that does not host the group, in one change.
//!
//! A node that is to receive a replica of a group it does not host first hosts an empty one
//! (`Engine::join_group`); a node that already hosts one (a removed member whose replica was not
//! deleted yet) is added back with it. Typed refusals (a change pending, a learner not caught up,
//! not the leader, no quorum, busy) are expected and counted; a change that is accepted either
//! finishes — the membership it reports must be what was asked — or fails or times out, and then
//! may or may not have happened.
//!
//! A removed node's replica is deleted (`Engine::remove_group`) as soon as the removal finished
//! — the engine reports a change only once every live member acknowledged the commit of its
//! leave-joint entry, so that none is left in the joint configuration needing the deleted
//! replica's vote (seed 357: the leader replaced itself, reported the change done, and its
//! replica was deleted before the others learned the commit; they pre-voted forever) — and no
//! later change named that node (an edit naming it that is still in some log could make it a
//! member again; one asked before the removal can no longer commit after it).
//! `CLUSTER_SIM_EAGER_REMOVAL=0` instead waits until every member of the group's current
//! membership durably knows the change committed (its WAL's commit is at or past where the
//! change's leader had applied when it reported it): the operator's rule before the engine
//! settled changes itself.

use std::collections::BTreeMap;

use flotilla::raftgroup::testkit::SimRng;
use flotilla::raftgroup::{Membership, MembershipChange, NodeId};
use flotilla::shard::{MembershipEdit, RequestError, Token};
use flotilla::wal::GroupId;

use super::cluster::{Cluster, MEMBERSHIP_TOKENS};
use super::workload::Frontend;

/// What the membership operator did.
#[derive(Clone, Copy, Debug, Default)]
pub struct MembershipStats {
    /// Changes chosen and asked of some node.
    pub asked: u64,
    /// Changes not asked: the group had no leader, or the node to host it was not up.
    pub skipped: u64,
    /// Changes a node accepted.
    pub accepted: u64,
    /// Accepted changes that finished (their joint configuration entered and left).
    pub done: u64,
    /// Accepted changes that failed (overwritten by another leader, or left behind by a leader
    /// change): maybe applied.
    pub failed: u64,
    /// Accepted changes given up at the operator's deadline: maybe applied.
    pub timed_out: u64,
    /// Refused: another change under way.
    pub refused_pending: u64,
    /// Refused: the learner to promote has not caught up.
    pub refused_learner_not_ready: u64,
    /// Refused: not the leader.
    pub refused_not_leader: u64,
    /// Refused: no live quorum.
    pub refused_no_quorum: u64,
    /// Refused otherwise (busy; a leadership transfer under way; an invalid edit asked of a
    /// node that was not the one planned against).
    pub refused_other: u64,
    /// Of the accepted: removals of the leader that was asked.
    pub leader_removals: u64,
    /// Of the accepted: replacements of a voter by a node that did not host the group.
    pub replacements: u64,
    /// Empty replicas hosted on nodes about to be added.
    pub replicas_hosted: u64,
    /// Replicas of removed nodes deleted.
    pub replicas_removed: u64,
}

/// An accepted change not finished yet.
#[derive(Debug)]
struct Change {
    group: GroupId,
    edit: MembershipEdit,
    node: NodeId,
    /// The operator's sequence number of the request.
    seq: u64,
    /// Members it removes.
    removes: Vec<NodeId>,
    deadline: u64,
}

/// The membership operator, with its own random stream.
#[derive(Debug)]
pub struct Reconfigurer {
    rng: SimRng,
    /// Fewest voters a group is shrunk to.
    min_voters: usize,
    /// How long the operator waits for an accepted change.
    patience: u64,
    next_token: Token,
    seq: u64,
    pending: BTreeMap<Token, Change>,
    /// The last request that named each node of each group as a (future) member.
    named: BTreeMap<(GroupId, NodeId), u64>,
    /// Replicas of removed nodes to delete once it is safe, with the index every member must
    /// durably know committed first.
    removals: BTreeMap<(GroupId, NodeId), u64>,
    /// Deletes as soon as the removal finished (the default; `CLUSTER_SIM_EAGER_REMOVAL=0`
    /// waits until every member durably knows the commit).
    eager: bool,
    stats: MembershipStats,
}

impl Reconfigurer {
    /// An operator for a cluster of `nodes` nodes whose election timeout is `election_units`.
    pub fn new(rng: SimRng, nodes: usize, election_units: u64) -> Self {
        Self {
            rng,
            // Three voters where there are more than three nodes; two (a quorum of two) in a
            // cluster of three, so that a removal is possible there too.
            min_voters: if nodes > 3 { 3 } else { 2 },
            patience: 4 * election_units,
            next_token: MEMBERSHIP_TOKENS.start,
            seq: 0,
            pending: BTreeMap::new(),
            named: BTreeMap::new(),
            removals: BTreeMap::new(),
            eager: !std::env::var("CLUSTER_SIM_EAGER_REMOVAL").is_ok_and(|value| value == "0"),
            stats: MembershipStats::default(),
        }
    }

    /// What it did.
    pub fn stats(&self) -> MembershipStats {
        self.stats
    }

    /// Follows the changes under way: their outcomes, the operator's deadline, and the
    /// replicas of removed nodes to delete.
    pub fn step(&mut self, cluster: &mut Cluster) {
        let now = cluster.now();
        for (token, result) in cluster.take_membership_results() {
            let Some(change) = self.pending.remove(&token) else { continue };
            match result {
                Ok(membership) => self.finished(cluster, &change, &membership),
                Err(_) => self.stats.failed += 1,
            }
        }
        let expired: Vec<Token> = self
            .pending
            .iter()
            .filter(|(_, change)| change.deadline <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            let change = self.pending.remove(&token).expect("listed");
            cluster.expire(change.node, &[token]);
            self.stats.timed_out += 1;
        }
        let due: Vec<(GroupId, NodeId)> = self
            .removals
            .iter()
            .filter(|&(&(group, node), &known)| {
                cluster.is_up(node) && (self.eager || safe_to_delete(cluster, group, node, known))
            })
            .map(|(key, _)| *key)
            .collect();
        for (group, node) in due {
            if !cluster.hosts(node, group) {
                self.removals.remove(&(group, node));
            } else if cluster.remove_group(node, group).is_ok() {
                self.removals.remove(&(group, node));
                self.stats.replicas_removed += 1;
            }
        }
    }

    fn finished(&mut self, cluster: &Cluster, change: &Change, membership: &Membership) {
        // At or past the leave-joint entry: the asked node applied it to report the change.
        let known = cluster.applied(change.node, change.group).unwrap_or(u64::MAX);
        self.stats.done += 1;
        let sorted = |list: &[NodeId]| {
            let mut list = list.to_vec();
            list.sort_unstable();
            list
        };
        let as_asked = !membership.is_joint()
            && match &change.edit {
                MembershipEdit::AddLearner(node) => {
                    membership.learners.contains(node) && !membership.is_voter(*node)
                }
                MembershipEdit::Promote(node) => {
                    membership.voters.contains(node) && !membership.learners.contains(node)
                }
                MembershipEdit::Remove(node) => !membership.is_member(*node),
                MembershipEdit::Replace(target) => {
                    membership.voters == sorted(&target.voters)
                        && membership.learners == sorted(&target.learners)
                }
            };
        if !as_asked {
            cluster.violation(&format!(
                "membership change {:?} of group {} (asked of {}) finished with {membership:?}",
                change.edit, change.group, change.node
            ));
        }
        for &removed in &change.removes {
            let named_since =
                self.named.get(&(change.group, removed)).is_some_and(|&at| at > change.seq);
            if !named_since && !membership.is_member(removed) {
                self.removals.insert((change.group, removed), known);
            }
        }
    }

    /// Asks for one membership change of `group`.
    pub fn act(&mut self, cluster: &mut Cluster, group: GroupId) {
        let Some(leader) = cluster.leader_of(group) else {
            self.stats.skipped += 1;
            return;
        };
        let membership = cluster.membership(leader, group).expect("the leader hosts it").clone();
        let nodes = cluster.ids().to_vec();
        let Some((edit, removes)) = self.plan(cluster, group, leader, &membership) else {
            self.stats.skipped += 1;
            return;
        };
        // Every node the change makes a member must host the group first.
        let joining: Vec<NodeId> = match &edit {
            MembershipEdit::AddLearner(node) | MembershipEdit::Promote(node) => vec![*node],
            MembershipEdit::Replace(change) => {
                change.voters.iter().chain(&change.learners).copied().collect()
            }
            MembershipEdit::Remove(_) => Vec::new(),
        };
        for &node in &joining {
            if cluster.hosts(node, group) {
                continue;
            }
            if !cluster.is_up(node) {
                self.stats.skipped += 1;
                return;
            }
            match cluster.host_group(node, group) {
                Ok(()) => self.stats.replicas_hosted += 1,
                Err(RequestError::Busy) => {
                    self.stats.skipped += 1;
                    return;
                }
                Err(error) => cluster.violation(&format!(
                    "{node} could not host an empty replica of group {group}: {error}"
                )),
            }
        }
        self.seq += 1;
        for &node in &joining {
            self.named.insert((group, node), self.seq);
            // Added back before its replica was deleted: it keeps it.
            self.removals.remove(&(group, node));
        }
        // Now and then asked of another node hosting the group, which must refuse unless it
        // leads too (a deposed leader that does not know it yet).
        let others: Vec<NodeId> = nodes
            .iter()
            .copied()
            .filter(|node| *node != leader && cluster.is_up(*node) && cluster.hosts(*node, group))
            .collect();
        let node = if !others.is_empty() && self.rng.percent(10) {
            others[self.rng.index(others.len())]
        } else {
            leader
        };
        let token = self.next_token;
        self.next_token += 1;
        self.stats.asked += 1;
        match cluster.change_membership(node, group, edit.clone(), token) {
            Ok(()) => {
                self.stats.accepted += 1;
                if removes.contains(&node) && node == leader {
                    self.stats.leader_removals += 1;
                }
                if matches!(edit, MembershipEdit::Replace(_)) {
                    self.stats.replacements += 1;
                }
                let deadline = cluster.now() + self.patience;
                let change = Change { group, edit, node, seq: self.seq, removes, deadline };
                self.pending.insert(token, change);
            }
            Err(RequestError::MembershipChangePending) => self.stats.refused_pending += 1,
            Err(RequestError::LearnerNotReady(_)) => self.stats.refused_learner_not_ready += 1,
            Err(RequestError::NotLeader { .. }) => self.stats.refused_not_leader += 1,
            Err(RequestError::NoQuorum) => self.stats.refused_no_quorum += 1,
            // Busy, or handing leadership over (`ProposalDropped` at once: nothing appended).
            Err(RequestError::Busy | RequestError::ProposalDropped) => {
                self.stats.refused_other += 1;
            }
            // Planned against another replica's membership: it may differ.
            Err(RequestError::InvalidArgument(_)) if node != leader => {
                self.stats.refused_other += 1;
            }
            Err(error) => cluster.violation(&format!(
                "membership change {edit:?} of group {group} refused by {node} (planned against \
                 its membership {membership:?}): {error}"
            )),
        }
    }

    /// The change to ask of `group`, whose `leader` has `membership` in effect, and the members
    /// it removes: see the module doc.
    fn plan(
        &mut self,
        cluster: &Cluster,
        group: GroupId,
        leader: NodeId,
        membership: &Membership,
    ) -> Option<(MembershipEdit, Vec<NodeId>)> {
        let outsiders: Vec<NodeId> =
            cluster.ids().iter().copied().filter(|node| !membership.is_member(*node)).collect();
        let not_hosting: Vec<NodeId> =
            outsiders.iter().copied().filter(|node| !cluster.hosts(*node, group)).collect();
        let can_remove = membership.voters.len() > self.min_voters;
        let roll = self.rng.below(100);
        let planned = if let Some(&learner) = membership.learners.first() {
            if roll < 80 {
                (MembershipEdit::Promote(learner), Vec::new())
            } else {
                (MembershipEdit::Remove(learner), vec![learner])
            }
        } else if can_remove && (outsiders.is_empty() || roll < 45) {
            let voter = if self.rng.percent(30) {
                leader
            } else {
                membership.voters[self.rng.index(membership.voters.len())]
            };
            (MembershipEdit::Remove(voter), vec![voter])
        } else if !not_hosting.is_empty() && roll >= 85 {
            let newcomer = not_hosting[self.rng.index(not_hosting.len())];
            let old = if self.rng.percent(30) {
                leader
            } else {
                membership.voters[self.rng.index(membership.voters.len())]
            };
            let mut voters: Vec<NodeId> =
                membership.voters.iter().copied().filter(|voter| *voter != old).collect();
            voters.push(newcomer);
            let change = MembershipChange { voters, learners: membership.learners.clone() };
            (MembershipEdit::Replace(change), vec![old])
        } else if !outsiders.is_empty() {
            let newcomer = outsiders[self.rng.index(outsiders.len())];
            (MembershipEdit::AddLearner(newcomer), Vec::new())
        } else {
            return None;
        };
        Some(planned)
    }
}

/// Whether `node`'s replica of `group`, removed by a change whose leader had applied `known`
/// when it reported it, can go: the group's leader is another node, outside any change and
/// without `node`, and every member runs, hosts the group and durably knows `known` committed
/// (so no restart puts it back in the joint configuration that needed `node`'s vote).
fn safe_to_delete(cluster: &Cluster, group: GroupId, node: NodeId, known: u64) -> bool {
    let Some(leader) = cluster.leader_of(group) else { return false };
    let Some(membership) = cluster.membership(leader, group) else { return false };
    leader != node
        && !membership.is_joint()
        && !membership.is_member(node)
        && membership.members().all(|member| {
            cluster.is_up(member)
                && cluster.durable_commit(member, group).is_some_and(|commit| commit >= known)
        })
}
