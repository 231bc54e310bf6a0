//! `ShardCore`: the shard loop of DESIGN.md §2 as a pure state machine — inputs in, one
//! [`ShardOutput`] out per iteration — so a node, and a whole cluster, can run in a deterministic
//! simulator. The driver around it owns the clock, the log store and the sockets.
//!
//! One iteration:
//! 1. feed inputs: [`ShardCore::tick`], [`ShardCore::step`], [`ShardCore::propose`],
//!    [`ShardCore::read`], [`ShardCore::on_fetched`];
//! 2. [`ShardCore::collect`] takes a Ready from every dirty group and fills one output: what to
//!    persist (one log-store write for all groups), messages per peer node that may go now,
//!    messages that may go only once that write is durable, fetches, and completed requests
//!    (committed entries are applied to each group's state machine on the way);
//! 3. the driver persists `output.persist`, sends `output.send_now` meanwhile, and once the write
//!    is durable sends `output.send_after_persist` and calls [`ShardCore::on_persisted`] with
//!    `output.persisted`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use flotilla_raftgroup::quorum::{self, VoteResult};
use flotilla_raftgroup::{
    Config, Entry, EntryKind, Fetch, HardState, LogIndex, Membership, MembershipChange, Message,
    MessageBody, NodeId, ProposeError, ReadError, ReadMode, RecoveredState, Replica, Role,
    Snapshot, SnapshotMeta, Term, TransferError,
};
use flotilla_wal::GroupId;

use crate::kv::StateMachine;

/// Identifies a request so its completion can be matched (chosen by the driver).
pub type Token = u64;

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// This shard does not host the group.
    #[error("group {0} not found")]
    GroupNotFound(GroupId),
    /// This replica is not the leader; `leader_hint` may know better.
    #[error("not leader (hint: {leader_hint:?})")]
    NotLeader {
        /// The leader this replica knows of, if any.
        leader_hint: Option<NodeId>,
    },
    /// The proposal was lost to a leader change: its index now holds another entry. It was not
    /// applied.
    #[error("proposal dropped by a leader change")]
    ProposalDropped,
    /// Backpressure: too much is pending. Retry later.
    #[error("busy")]
    Busy,
    /// This replica leads, but node-level liveness says a quorum of its group's voters is
    /// down: refused at once instead of waiting for a quorum that cannot answer (CP).
    #[error("no quorum of the group's nodes is reachable")]
    NoQuorum,
    /// A membership change of the group is still under way (not yet committed, or its joint
    /// configuration not yet left): one at a time. Retry once it is done.
    #[error("a membership change is already in progress")]
    MembershipChangePending,
    /// The learner to promote is still catching up with the leader's log: promoting it now
    /// would make the group's commits wait for it. Retry once it caught up.
    #[error("learner {0} has not caught up with the leader yet")]
    LearnerNotReady(NodeId),
    /// The request makes no sense for the group as it is (promoting a node that is not a
    /// learner, removing the last voter...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The proposal may or may not have been applied: a snapshot from the leader replaced
    /// this replica's log before its entry's fate was known here. Retry through a client
    /// session to apply it exactly once.
    #[error("outcome unknown: a snapshot replaced the log before the proposal's fate was known")]
    OutcomeUnknown,
    /// The group rejected the request for another reason.
    #[error("rejected: {0}")]
    Rejected(String),
}

/// A change to a group's membership, relative to the membership in effect on its leader (see
/// [`ShardCore::change_membership`]). Each runs as one joint-consensus change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEdit {
    /// Adds a learner: it receives the log but neither votes nor counts toward quorums.
    AddLearner(NodeId),
    /// Makes a caught-up learner a voter.
    Promote(NodeId),
    /// Removes a voter or a learner (never the last voter).
    Remove(NodeId),
    /// Moves to exactly these voters and learners.
    Replace(MembershipChange),
}

/// Entries a learner may still lag behind the leader's commit index when it is promoted: it
/// then counts toward quorums, so a far-behind learner would stall commits until it caught up
/// (etcd refuses such promotions the same way).
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 1_000;

impl MembershipEdit {
    /// The target membership this edit asks for, given the one in effect.
    pub fn plan(&self, current: &Membership) -> Result<MembershipChange, RequestError> {
        let invalid = |what: String| Err(RequestError::InvalidArgument(what));
        let mut voters = current.voters.clone();
        let mut learners = current.learners.clone();
        match self {
            Self::AddLearner(node) => {
                if current.is_member(*node) {
                    return invalid(format!("{node} is already a member"));
                }
                learners.push(*node);
            }
            Self::Promote(node) => {
                if !learners.contains(node) {
                    return invalid(format!("{node} is not a learner"));
                }
                learners.retain(|id| id != node);
                voters.push(*node);
            }
            Self::Remove(node) => {
                if !current.is_member(*node) {
                    return invalid(format!("{node} is not a member"));
                }
                if voters == [*node] {
                    return invalid(format!("{node} is the last voter"));
                }
                voters.retain(|id| id != node);
                learners.retain(|id| id != node);
            }
            Self::Replace(change) => {
                if change.voters.is_empty() {
                    return invalid("no voters".to_owned());
                }
                if change.learners.iter().any(|id| change.voters.contains(id)) {
                    return invalid("a node is both voter and learner".to_owned());
                }
                return Ok(change.clone());
            }
        }
        if voters.contains(&NodeId::ZERO) || learners.contains(&NodeId::ZERO) {
            return invalid("node id 0 is reserved".to_owned());
        }
        Ok(MembershipChange { voters, learners })
    }

    /// Every node the edit names.
    pub fn nodes(&self) -> Vec<NodeId> {
        match self {
            Self::AddLearner(node) | Self::Promote(node) | Self::Remove(node) => vec![*node],
            Self::Replace(change) => {
                change.voters.iter().chain(&change.learners).copied().collect()
            }
        }
    }
}

/// What a completed request returns.
pub enum Completion<S: StateMachine> {
    /// A proposal was applied at `index`; `response` is the state machine's answer.
    Applied {
        /// The request.
        token: Token,
        /// Its log index.
        index: LogIndex,
        /// The state machine's answer.
        response: S::Response,
    },
    /// A linearizable read was served at `applied` (the group's applied index).
    Read {
        /// The request.
        token: Token,
        /// The applied index the answer reflects.
        applied: LogIndex,
        /// The answer.
        result: S::QueryResult,
    },
    /// The request failed.
    Failed {
        /// The request.
        token: Token,
        /// Why.
        error: RequestError,
    },
}

/// What one group asks the log store to persist this iteration, in order: snapshot, entries,
/// hard state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PersistItem {
    /// A snapshot to install (the log before it is dropped).
    pub snapshot: Option<Snapshot>,
    /// Entries to append (replacing any suffix from the first one's index).
    pub entries: Vec<Entry>,
    /// The hard state to record.
    pub hard_state: Option<HardState>,
    /// Whether this needs an fsync before what waits for it goes ahead (see
    /// [`flotilla_raftgroup::Ready::must_sync`]): not for a new commit index alone.
    pub must_sync: bool,
}

/// A snapshot taken of a group's state machine but not yet written: the log store writes
/// `image` to the group's snapshot file off the shard thread, then hands the file back with
/// [`ShardCore::snapshot_written`]; only then is the log compacted.
pub struct PendingSnapshot<S: StateMachine> {
    /// What the snapshot covers: index, term and membership (as the file header records them).
    pub meta: SnapshotMeta,
    /// The state machine's image at `meta.index`.
    pub image: S::Snapshot,
}

impl<S: StateMachine> std::fmt::Debug for PendingSnapshot<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSnapshot").field("meta", &self.meta).finish_non_exhaustive()
    }
}

/// Everything one iteration produced; owned by the driver and reused across iterations.
pub struct ShardOutput<S: StateMachine> {
    /// What to persist, per group, as one write (one WAL round).
    pub persist: Vec<(GroupId, PersistItem)>,
    /// After that write is durable: `(group, term, index)` for [`ShardCore::on_persisted`].
    pub persisted: Vec<(GroupId, Term, LogIndex)>,
    /// Messages that may be sent at once, grouped per peer node (one frame each).
    pub send_now: BTreeMap<NodeId, Vec<(GroupId, Message)>>,
    /// Messages that may be sent only once the write is durable (votes, acknowledgements).
    pub send_after_persist: BTreeMap<NodeId, Vec<(GroupId, Message)>>,
    /// Log reads the replicas need: answer each with [`ShardCore::on_fetched`].
    pub fetches: Vec<(GroupId, Fetch)>,
    /// Requests that finished.
    pub completions: Vec<Completion<S>>,
    /// Membership changes that finished (their joint configuration entered and left, applied
    /// here), with the membership now in effect; failures are in `completions`.
    pub memberships: Vec<(Token, Membership)>,
    /// State machines replaced by ones restored off the shard thread (or restored for nothing):
    /// the driver drops them off the shard thread too, since dropping a large state takes
    /// about as long as building it.
    pub retired: Vec<S>,
    /// Consecutive [`ShardCore::collect`] calls in which no group had work.
    idle_collects: u32,
}

/// After this many consecutive [`ShardCore::collect`] calls in which no group had work, the
/// output's buffers (grown by the last burst) are released: an idle shard keeps none, a busy
/// one never pays for shrinking.
const RELEASE_AFTER_IDLE_COLLECTS: u32 = 64;

impl<S: StateMachine> std::fmt::Debug for Completion<S>
where
    S::Response: std::fmt::Debug,
    S::QueryResult: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Completion::Applied { token, index, response } => f
                .debug_struct("Applied")
                .field("token", token)
                .field("index", index)
                .field("response", response)
                .finish(),
            Completion::Read { token, applied, result } => f
                .debug_struct("Read")
                .field("token", token)
                .field("applied", applied)
                .field("result", result)
                .finish(),
            Completion::Failed { token, error } => {
                f.debug_struct("Failed").field("token", token).field("error", error).finish()
            }
        }
    }
}

impl<S: StateMachine> std::fmt::Debug for ShardOutput<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardOutput")
            .field("persist", &self.persist.len())
            .field("messages", &self.message_count())
            .field("fetches", &self.fetches.len())
            .field("completions", &self.completions.len())
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> Default for ShardOutput<S> {
    fn default() -> Self {
        Self {
            persist: Vec::new(),
            persisted: Vec::new(),
            send_now: BTreeMap::new(),
            send_after_persist: BTreeMap::new(),
            fetches: Vec::new(),
            completions: Vec::new(),
            memberships: Vec::new(),
            retired: Vec::new(),
            idle_collects: 0,
        }
    }
}

impl<S: StateMachine> ShardOutput<S> {
    /// Whether the iteration produced nothing.
    pub fn is_empty(&self) -> bool {
        self.persist.is_empty()
            && self.persisted.is_empty()
            && self.send_now.values().all(Vec::is_empty)
            && self.send_after_persist.values().all(Vec::is_empty)
            && self.fetches.is_empty()
            && self.completions.is_empty()
            && self.memberships.is_empty()
            && self.retired.is_empty()
    }

    /// Empties the output, keeping its buffers.
    pub fn clear(&mut self) {
        self.persist.clear();
        self.persisted.clear();
        self.send_now.values_mut().for_each(Vec::clear);
        self.send_after_persist.values_mut().for_each(Vec::clear);
        self.fetches.clear();
        self.completions.clear();
        self.memberships.clear();
        self.retired.clear();
    }

    /// Whether the last [`ShardCore::collect`] released the buffers because the shard has been
    /// idle for a while (true once per idle period): the driver's cue to return freed heap
    /// memory to the system.
    pub fn just_went_idle(&self) -> bool {
        self.idle_collects == RELEASE_AFTER_IDLE_COLLECTS
    }

    /// Releases the spare capacity of every buffer (see [`RELEASE_AFTER_IDLE_COLLECTS`]).
    fn release_memory(&mut self) {
        self.persist.shrink_to_fit();
        self.persisted.shrink_to_fit();
        self.send_now.values_mut().for_each(Vec::shrink_to_fit);
        self.send_after_persist.values_mut().for_each(Vec::shrink_to_fit);
        self.fetches.shrink_to_fit();
        self.completions.shrink_to_fit();
        self.memberships.shrink_to_fit();
    }

    /// Messages waiting to be sent (both kinds).
    pub fn message_count(&self) -> usize {
        self.send_now.values().chain(self.send_after_persist.values()).map(Vec::len).sum()
    }
}

struct PendingProposal {
    index: LogIndex,
    term: Term,
    token: Token,
}

/// A membership change this replica proposed as leader: done once its entry at `index` (of
/// `term`) is applied and the joint configuration it entered is left again.
struct PendingMembership {
    index: LogIndex,
    term: Term,
    token: Token,
    entered: bool,
    /// Applied here: the leave-joint entry's index and the membership it left to, reported once
    /// every live member acknowledged that commit (`Replica::settled_index`).
    left: Option<(LogIndex, Membership)>,
}

struct PendingRead<Q> {
    context: u64,
    token: Token,
    query: Q,
    /// Set once the replica confirmed the read: serve when applied reaches it.
    read_index: Option<LogIndex>,
    /// The replica's term and leader when the read was asked: if they change before the read
    /// is confirmed, the confirmation is lost (a deposed leader drops its pending reads; a
    /// follower's forwarded request or its answer may be lost with the old leader).
    asked: (Term, Option<NodeId>),
}

#[expect(
    clippy::struct_excessive_bools,
    reason = "independent flags: dirty (collect), asleep, listed and queued (quiescence)"
)]
struct Group<S: StateMachine> {
    replica: Replica,
    machine: S,
    dirty: bool,
    /// Quiescent: not ticked until its group has work again (see [`Quiescence`]).
    asleep: bool,
    /// Listed in `ShardCore::awake` (an asleep group leaves the list at the next tick).
    listed: bool,
    /// In `ShardCore::wake_queue`.
    queued: bool,
    proposals: VecDeque<PendingProposal>,
    reads: Vec<PendingRead<S::Query>>,
    /// Boxed: rare, and an idle group should stay small.
    membership_change: Option<Box<PendingMembership>>,
}

impl<S: StateMachine> Group<S> {
    /// Releases spare buffer capacity as the group goes quiet: thousands of quiet groups must
    /// stay small, and a quiet group allocates nothing until it wakes.
    fn release_memory(&mut self) {
        self.proposals.shrink_to_fit();
        self.reads.shrink_to_fit();
        self.replica.release_memory();
    }
}

/// How a shard lets idle groups go quiet, so that tens of thousands of them cost no ticks and
/// no heartbeats ([`ShardCore::enable_quiescence`]).
///
/// A leader with nothing left to replicate tells its followers ([`Replica::quiesce`]) and
/// stops ticking; a follower told so stops too. Any proposal, read, transfer or message of the
/// group (but a straggling heartbeat answer) wakes it. What stands in for the group's
/// heartbeats is node-level liveness, fed by the driver with [`ShardCore::node_contact`]: when
/// a node is declared down, the quiet followers it led wake (and elect a new leader), and so do
/// the quiet leaders it leaves without a live quorum (so check-quorum deposes them); when it
/// returns, the quiet leaders of groups it belongs to wake to catch it up. Wake-ups go through
/// a queue drained at [`Quiescence::wakes_per_tick`], so a node blip never wakes every group
/// at once.
///
/// So that failover takes a few election timeouts rather than many, a follower whose leader's
/// node is declared down forgets that leader at once ([`Replica::leader_down`]): its clock
/// stood still while quiet, so it would otherwise hold to the dead leader (stickiness) and
/// refuse the survivors' campaigns for an election timeout after waking. One live voter per
/// group, picked by a hash of the group that every survivor computes alike, wakes ahead of the
/// queue and campaigns a few ticks later; the others keep a randomized election timeout (they
/// wake by its campaign, or take over if it does not come), so the survivors do not split
/// their votes. Liveness is only a hint: a replica that wrongly forgets a live leader costs a
/// failed pre-vote at most, since the voters that hear from the leader refuse it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quiescence {
    /// A node unheard of for this many ticks counts as down.
    pub dead_after_ticks: u32,
    /// At most this many queued groups wake per tick.
    pub wakes_per_tick: usize,
}

/// The pure shard loop: many groups, one output per iteration.
pub struct ShardCore<S: StateMachine> {
    node: NodeId,
    /// Boxed: a table of tens of thousands of groups keeps up to half its slots empty, and an
    /// empty slot then costs a pointer rather than a whole group (~1 KiB).
    groups: HashMap<GroupId, Box<Group<S>>>,
    dirty: Vec<GroupId>,
    next_read_context: u64,
    quiescence: Option<Quiescence>,
    /// Groups being ticked (plus asleep ones not yet dropped from the list).
    awake: Vec<GroupId>,
    /// Groups to wake, at most `wakes_per_tick` per tick.
    wake_queue: VecDeque<GroupId>,
    /// Ticks since each peer node was last heard of (node-level liveness).
    node_age: BTreeMap<NodeId, u32>,
    /// Peer nodes declared down.
    down: BTreeSet<NodeId>,
    /// See [`ShardCore::set_compaction_defer_entries`].
    compaction_defer_entries: u64,
    /// State machines restored off the shard thread from a leader's snapshot (at that index),
    /// stepped in with [`ShardCore::step_restored`] and swapped in by the next collect.
    restored: HashMap<GroupId, (LogIndex, S)>,
    /// Whether [`ShardCore::compact_due`] may find something (see there).
    compaction_scan_due: bool,
    /// Scratch for the responses of one group's apply (one buffer for the shard rather than
    /// one kept by every group).
    responses: Vec<S::Response>,
}

impl<S: StateMachine> std::fmt::Debug for ShardCore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCore")
            .field("node", &self.node)
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> ShardCore<S> {
    /// An empty shard of node `node`.
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            groups: HashMap::new(),
            dirty: Vec::new(),
            next_read_context: 1,
            quiescence: None,
            awake: Vec::new(),
            wake_queue: VecDeque::new(),
            node_age: BTreeMap::new(),
            down: BTreeSet::new(),
            compaction_defer_entries: COMPACTION_DEFER_DEFAULT,
            restored: HashMap::new(),
            compaction_scan_due: true,
            responses: Vec::new(),
        }
    }

    /// Numbers this shard's reads from `base` on. Read contexts must never repeat across
    /// incarnations of a node: a `ReadIndexResponse` to a read of an earlier incarnation,
    /// delayed in the network, would otherwise confirm a new read with the same context at an
    /// old index, and the read would miss writes acknowledged before it began (cluster
    /// simulator seed 4718: a restarted node's first reads reused the numbers of its previous
    /// life). The driver passes a random base at every start.
    pub fn set_read_context_base(&mut self, base: u64) {
        self.next_read_context = base;
    }

    /// A leader holds off compacting a group while a member still needs entries the compaction
    /// would drop — it is catching up from the log, or is down, or is being sent a snapshot —
    /// until `entries` were applied since the last snapshot. Compacting under such a
    /// follower makes it need a snapshot, and a snapshot in flight stale on arrival (the whole
    /// state would be sent again). The engine passes four times its snapshot threshold.
    pub fn set_compaction_defer_entries(&mut self, entries: u64) {
        self.compaction_defer_entries = entries;
    }

    /// Lets idle groups go quiet (see [`Quiescence`]). The driver must then report node-level
    /// liveness with [`ShardCore::node_contact`] every tick: a quiet follower learns of its
    /// leader's death from nothing else.
    pub fn enable_quiescence(&mut self, quiescence: Quiescence) {
        self.quiescence = Some(quiescence);
    }

    /// Node-level liveness: `node` was last heard of `age_ticks` ticks ago (any frame counts).
    /// Crossing [`Quiescence::dead_after_ticks`] either way queues the quiet groups that must
    /// react (see [`Quiescence`]). Also used without quiescence: a leader whose group has no
    /// live quorum refuses requests at once with [`RequestError::NoQuorum`].
    pub fn node_contact(&mut self, node: NodeId, age_ticks: u32) {
        self.node_age.insert(node, age_ticks);
        let Some(quiescence) = self.quiescence else { return };
        let down = age_ticks >= quiescence.dead_after_ticks;
        if down == self.down.contains(&node) {
            return;
        }
        if down {
            self.down.insert(node);
        } else {
            self.down.remove(&node);
        }
        let me = self.node;
        let dead = &self.down;
        // Queued in group order, not the map's: which groups wake first must not depend on a
        // hash seed, or a run cannot be replayed (the cluster simulator's seeds).
        let mut woken = Vec::new();
        // Followers that campaign first: they wake ahead of the queue.
        let mut first = Vec::new();
        for (group, slot) in &mut self.groups {
            if down && slot.replica.role() == Role::Follower && slot.replica.leader() == Some(node)
            {
                // Its leader is gone: forget it at once, asleep or not, so this replica grants
                // the pre-vote of whichever survivor campaigns first instead of holding to its
                // leader for another election timeout; one survivor per group goes first.
                let campaigner = first_campaigner(*group, &slot.replica, dead);
                let campaign_in = (campaigner == Some(me)).then_some(FIRST_CAMPAIGN_TICKS);
                slot.replica.leader_down(node, campaign_in);
                if slot.asleep && !slot.queued {
                    slot.queued = true;
                    if campaign_in.is_some() { &mut first } else { &mut woken }.push(*group);
                }
                continue;
            }
            if !slot.asleep || slot.queued {
                continue;
            }
            let replica = &slot.replica;
            let wake = match replica.role() {
                Role::Follower => false,
                Role::Leader if down => !live_quorum(replica, me, dead),
                // Back: catch it up.
                Role::Leader => replica.membership().is_member(node),
                _ => true,
            };
            if wake {
                slot.queued = true;
                woken.push(*group);
            }
        }
        woken.sort_unstable();
        self.wake_queue.extend(woken);
        first.sort_unstable();
        for group in first.into_iter().rev() {
            self.wake_queue.push_front(group);
        }
    }

    /// Whether node-level liveness currently declares `node` down.
    pub fn is_node_down(&self, node: NodeId) -> bool {
        self.down.contains(&node)
    }

    /// Groups not quiet: being ticked, or queued to wake.
    pub fn awake_count(&self) -> usize {
        self.groups.values().filter(|slot| !slot.asleep || slot.queued).count()
    }

    /// Whether `group` is quiet.
    pub fn is_asleep(&self, group: GroupId) -> bool {
        self.groups.get(&group).is_some_and(|slot| slot.asleep)
    }

    /// Puts `group` to sleep and queues it to wake later: for groups recovered at start, so a
    /// restart does not wake all of them in the same tick. Does nothing without quiescence.
    pub fn defer_wake(&mut self, group: GroupId) {
        if self.quiescence.is_none() {
            return;
        }
        if let Some(slot) = self.groups.get_mut(&group)
            && !slot.queued
        {
            slot.asleep = true;
            slot.queued = true;
            self.wake_queue.push_back(group);
        }
    }

    fn wake(&mut self, group: GroupId) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        slot.queued = false;
        if slot.asleep {
            slot.asleep = false;
            slot.replica.wake();
        }
        if !slot.listed {
            slot.listed = true;
            self.awake.push(group);
        }
    }

    /// The node this shard belongs to.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Hosts `group` with a replica built from `config` (whose id must be this node) and what
    /// the log store recovered, applying into `machine`.
    pub fn create_group(
        &mut self,
        group: GroupId,
        config: Config,
        recovered: RecoveredState,
        machine: S,
    ) -> Result<(), RequestError> {
        assert_eq!(config.id, self.node, "a replica of this node");
        if self.groups.contains_key(&group) {
            return Err(RequestError::Rejected(format!("group {group} exists")));
        }
        let replica =
            Replica::new(config, recovered).map_err(|e| RequestError::Rejected(e.to_string()))?;
        self.groups.insert(
            group,
            Box::new(Group {
                replica,
                machine,
                dirty: false,
                asleep: false,
                listed: true,
                queued: false,
                proposals: VecDeque::new(),
                reads: Vec::new(),
                membership_change: None,
            }),
        );
        self.awake.push(group);
        self.mark(group);
        Ok(())
    }

    /// Stops hosting `group`; its pending requests fail.
    pub fn remove_group(&mut self, group: GroupId, out: &mut ShardOutput<S>) -> bool {
        let Some(removed) = self.groups.remove(&group) else { return false };
        for proposal in removed.proposals {
            out.completions.push(Completion::Failed {
                token: proposal.token,
                error: RequestError::GroupNotFound(group),
            });
        }
        for read in removed.reads {
            out.completions.push(Completion::Failed {
                token: read.token,
                error: RequestError::GroupNotFound(group),
            });
        }
        if let Some(change) = removed.membership_change {
            out.completions.push(Completion::Failed {
                token: change.token,
                error: RequestError::GroupNotFound(group),
            });
        }
        true
    }

    /// The groups hosted here.
    pub fn groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied()
    }

    /// The replica of `group` (for status and tests).
    pub fn replica(&self, group: GroupId) -> Option<&Replica> {
        self.groups.get(&group).map(|g| &g.replica)
    }

    /// The state machine of `group`.
    pub fn machine(&self, group: GroupId) -> Option<&S> {
        self.groups.get(&group).map(|g| &g.machine)
    }

    fn mark(&mut self, group: GroupId) {
        if let Some(slot) = self.groups.get_mut(&group)
            && !slot.dirty
        {
            slot.dirty = true;
            self.dirty.push(group);
        }
    }

    /// The embedder's thread stood still for longer than a tick or two (descheduled, or one
    /// loop iteration ran long): the replicas' clocks, which count the ticks they are given,
    /// fell behind real time, and the embedder does not replay the ticks it missed. So no lease
    /// may rest on acknowledgements from before now (each awake replica's clock restarts as
    /// after a quiet period, see [`Replica::wake`]): a leader serves its next lease read only
    /// after a fresh heartbeat round. The embedder must call it before stepping any input
    /// once it knows the clock is behind (the engine checks before every input and tick).
    ///
    /// Replaying missed ticks in a burst instead would keep leases sound but make every leader
    /// that could not hear its followers during the stall step down (check quorum), and every
    /// follower time out, before the messages waiting for the thread are even read.
    pub fn clock_stalled(&mut self) {
        for group in &self.awake {
            if let Some(slot) = self.groups.get_mut(group)
                && !slot.asleep
            {
                slot.replica.wake();
            }
        }
    }

    /// Advances the clock of every group that is not quiet by one tick; with quiescence, lets
    /// leaders with nothing to do go quiet and wakes queued groups first.
    pub fn tick(&mut self) {
        if let Some(quiescence) = self.quiescence {
            let mut woken = 0;
            while woken < quiescence.wakes_per_tick {
                let Some(group) = self.wake_queue.pop_front() else { break };
                // Entries of groups woken meanwhile (or removed) cost nothing.
                if self.groups.get(&group).is_some_and(|slot| slot.queued) {
                    self.wake(group);
                    woken += 1;
                }
            }
        }
        let mut awake = std::mem::take(&mut self.awake);
        let Self { node, groups, dirty, quiescence, down, .. } = self;
        awake.retain(|group| {
            let Some(slot) = groups.get_mut(group) else { return false };
            if slot.asleep {
                slot.listed = false;
                return false;
            }
            let idle = slot.proposals.is_empty()
                && slot.reads.is_empty()
                && slot.membership_change.is_none();
            if idle
                && slot.replica.role() != Role::Leader
                && !slot.replica.membership().is_member(*node)
                && slot.replica.status().applied >= slot.replica.commit_index()
            {
                // Not a member (removed, or joined and not yet added): it never campaigns, so it
                // needs no clock — with or without quiescence. A leader's message wakes it (a
                // re-added node catches up that way). Not while committed entries wait to be
                // applied, though: the membership in effect may be stale — a node restarted from
                // a snapshot taken before it was added — and those entries may make it a voter
                // that its peers wait for (the leader they follow, quietly, when it crashed and
                // came back before liveness noticed: cluster simulator seed 1939).
                slot.asleep = true;
                slot.listed = false;
                slot.release_memory();
                return false;
            }
            if quiescence.is_some() && idle && slot.replica.quiesce(|id| !down.contains(&id)) {
                slot.asleep = true;
                slot.listed = false;
                slot.release_memory();
            } else {
                slot.replica.tick();
            }
            if !slot.dirty {
                slot.dirty = true;
                dirty.push(*group);
            }
            !slot.asleep
        });
        self.awake = awake;
    }

    /// Whether a leader's snapshot at `index` for `group` would replace its state machine: then
    /// the driver restores it into a fresh machine off the shard thread first (see
    /// [`ShardCore::step_restored`]) rather than have the shard parse the whole image.
    pub fn would_restore(&self, group: GroupId, index: LogIndex) -> bool {
        self.groups.get(&group).is_some_and(|slot| {
            index > slot.machine.applied_index() && index > slot.replica.commit_index()
        })
    }

    /// [`ShardCore::step`] of a leader's `Snapshot` message whose image the driver already
    /// restored into `machine` (a fresh instance, off the shard thread). If Raft installs the
    /// snapshot, the next [`ShardCore::collect`] swaps `machine` in instead of calling
    /// [`StateMachine::restore`] here — parsing a large image would stall every group on the
    /// shard. Otherwise it is handed back in [`ShardOutput::retired`].
    pub fn step_restored(&mut self, group: GroupId, message: Message, machine: S) {
        let index = match &message.body {
            MessageBody::Snapshot { snapshot } => snapshot.meta.index,
            _ => {
                self.step(group, message);
                return;
            }
        };
        if self.groups.contains_key(&group) {
            self.restored.insert(group, (index, machine));
            // Collected this iteration: stepping a message marks the group.
            self.step(group, message);
            self.mark(group);
        }
    }

    /// Delivers a message for `group`. Messages for groups not hosted here are dropped (the
    /// sender retries; a group being created catches up).
    pub fn step(&mut self, group: GroupId, message: Message) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        let from = message.from;
        let quiesce = match message.body {
            MessageBody::Quiesce { commit } => Some(commit),
            _ => None,
        };
        // A straggling answer to a heartbeat sent before the leader went quiet needs no ticks:
        // it can no longer support a lease (see `Replica::wake`) and no read waits for it.
        let straggler = matches!(message.body, MessageBody::HeartbeatResponse { .. })
            && message.term == slot.replica.term();
        let wakes = quiesce.is_none() && !straggler;
        // A malformed or stale message is the sender's problem; it changes nothing here.
        let _ = slot.replica.step(message);
        // The follower that answered is ticking (a heartbeat in flight when the group went
        // quiet woke it): tell it again, or it ticks alone forever (cluster simulator seeds
        // 167, 208 — learners, which never campaign).
        if straggler && slot.asleep {
            slot.replica.requiesce(from);
        }
        if let Some(commit) = quiesce
            && self.quiescence.is_some()
            && slot.replica.role() == Role::Follower
            && slot.replica.leader() == Some(from)
            && slot.replica.commit_index() >= commit
            && slot.reads.is_empty()
            && slot.proposals.is_empty()
        {
            slot.asleep = true;
            slot.release_memory();
        } else if wakes || quiesce.is_some() {
            self.wake(group);
        }
        self.mark(group);
    }

    /// Proposes `payload` to `group`; completes with [`Completion::Applied`] once applied here.
    pub fn propose(
        &mut self,
        group: GroupId,
        payload: Bytes,
        token: Token,
    ) -> Result<(), RequestError> {
        self.check_quorum_live(group)?;
        self.wake(group);
        let slot = self.groups.get_mut(&group).ok_or(RequestError::GroupNotFound(group))?;
        let index = slot.replica.propose(payload).map_err(|error| match error {
            ProposeError::NotLeader { leader_hint } => RequestError::NotLeader { leader_hint },
            ProposeError::Busy { .. } => RequestError::Busy,
            other => RequestError::Rejected(other.to_string()),
        })?;
        let term = slot.replica.term();
        // Kept in index order, which `apply` relies on. A leader that lost its term and won
        // again may append below proposals of its old term still pending (its log was cut
        // back): those stay queued until an entry at their index is applied.
        let at = slot.proposals.partition_point(|pending| pending.index <= index);
        slot.proposals.insert(at, PendingProposal { index, term, token });
        self.mark(group);
        Ok(())
    }

    /// A linearizable read of `group`: completes with [`Completion::Read`] once the replica
    /// confirmed it (ReadIndex with a quorum round, on the leader or through it) and applied
    /// that far.
    pub fn read(
        &mut self,
        group: GroupId,
        query: S::Query,
        token: Token,
    ) -> Result<(), RequestError> {
        self.read_with(group, query, ReadMode::Quorum, token)
    }

    /// [`ShardCore::read`] with the leader's confirmation chosen by `mode`: a quorum round, or
    /// its lease when the replicas run with `lease_reads` and the lease is valid.
    pub fn read_with(
        &mut self,
        group: GroupId,
        query: S::Query,
        mode: ReadMode,
        token: Token,
    ) -> Result<(), RequestError> {
        self.check_quorum_live(group)?;
        self.wake(group);
        let context = self.next_read_context;
        let slot = self.groups.get_mut(&group).ok_or(RequestError::GroupNotFound(group))?;
        slot.replica.read_index_with(context, mode).map_err(|error| match error {
            ReadError::NotLeader { leader_hint } => RequestError::NotLeader { leader_hint },
            ReadError::Busy => RequestError::Busy,
            other => RequestError::Rejected(other.to_string()),
        })?;
        self.next_read_context = self.next_read_context.wrapping_add(1);
        let asked = (slot.replica.term(), slot.replica.leader());
        slot.reads.push(PendingRead { context, token, query, read_index: None, asked });
        self.mark(group);
        Ok(())
    }

    /// Changes `group`'s membership by `edit` (relative to the membership in effect here, on its
    /// leader) through joint consensus: completes in [`ShardOutput::memberships`] once the joint
    /// configuration was entered and left again (both entries applied here), or fails with
    /// [`RequestError::NotLeader`], [`RequestError::MembershipChangePending`] (one change at a
    /// time), [`RequestError::InvalidArgument`], [`RequestError::LearnerNotReady`].
    pub fn change_membership(
        &mut self,
        group: GroupId,
        edit: &MembershipEdit,
        token: Token,
    ) -> Result<(), RequestError> {
        self.check_quorum_live(group)?;
        self.wake(group);
        let slot = self.groups.get_mut(&group).ok_or(RequestError::GroupNotFound(group))?;
        let replica = &slot.replica;
        if replica.role() != Role::Leader {
            return Err(RequestError::NotLeader { leader_hint: replica.leader() });
        }
        if slot.membership_change.is_some() || replica.membership().is_joint() {
            return Err(RequestError::MembershipChangePending);
        }
        let change = edit.plan(replica.membership())?;
        if let MembershipEdit::Promote(learner) = edit {
            let matched =
                replica.progress(*learner).map_or(LogIndex::ZERO, |(matched, ..)| matched);
            if matched.0 + PROMOTE_LAG_ENTRIES_MAX < replica.commit_index().0 {
                return Err(RequestError::LearnerNotReady(*learner));
            }
        }
        let index = slot.replica.propose_membership(&change).map_err(|error| match error {
            ProposeError::NotLeader { leader_hint } => RequestError::NotLeader { leader_hint },
            ProposeError::Busy { .. } => RequestError::Busy,
            ProposeError::MembershipChangePending => RequestError::MembershipChangePending,
            ProposeError::InvalidMembership { reason } => {
                RequestError::InvalidArgument(reason.to_owned())
            }
            ProposeError::ProposalDropped => RequestError::ProposalDropped,
            other => RequestError::Rejected(other.to_string()),
        })?;
        let term = slot.replica.term();
        slot.membership_change =
            Some(Box::new(PendingMembership { index, term, token, entered: false, left: None }));
        self.mark(group);
        Ok(())
    }

    /// A leader without a live quorum (by node-level liveness) refuses at once: its followers'
    /// silence means a proposal or read would only wait out its deadline.
    fn check_quorum_live(&self, group: GroupId) -> Result<(), RequestError> {
        let slot = self.groups.get(&group).ok_or(RequestError::GroupNotFound(group))?;
        if self.down.is_empty()
            || slot.replica.role() != Role::Leader
            || live_quorum(&slot.replica, self.node, &self.down)
        {
            Ok(())
        } else {
            Err(RequestError::NoQuorum)
        }
    }

    /// The log store made `group`'s entries through `index` (of term `term`) durable.
    pub fn on_persisted(&mut self, group: GroupId, term: Term, index: LogIndex) {
        if let Some(slot) = self.groups.get_mut(&group) {
            slot.replica.on_persisted(term, index);
            self.mark(group);
        }
    }

    /// Answers a fetch with the entries the log store read.
    pub fn on_fetched(&mut self, group: GroupId, fetch: Fetch, entries: Vec<Entry>) {
        if let Some(slot) = self.groups.get_mut(&group) {
            // A stale or bad answer is dropped by the replica, which asks again.
            let _ = slot.replica.on_fetched(fetch, entries);
            self.mark(group);
        }
    }

    /// Fails every pending request older than what `keep` allows: the driver's deadline. Reads
    /// can be dropped silently by Raft (a leader change), so nothing may wait forever.
    pub fn fail_requests(
        &mut self,
        mut expired: impl FnMut(Token) -> bool,
        out: &mut ShardOutput<S>,
    ) {
        for slot in self.groups.values_mut() {
            let leader_hint = slot.replica.leader();
            slot.reads.retain(|read| {
                if expired(read.token) {
                    out.completions.push(Completion::Failed {
                        token: read.token,
                        error: RequestError::NotLeader { leader_hint },
                    });
                    false
                } else {
                    true
                }
            });
            slot.proposals.retain(|proposal| {
                if expired(proposal.token) {
                    out.completions.push(Completion::Failed {
                        token: proposal.token,
                        error: RequestError::ProposalDropped,
                    });
                    false
                } else {
                    true
                }
            });
            if let Some(change) = slot.membership_change.take_if(|change| expired(change.token)) {
                // The change may still complete in the log; the caller reads the membership.
                out.completions.push(Completion::Failed {
                    token: change.token,
                    error: RequestError::NotLeader { leader_hint },
                });
            }
        }
    }

    /// Takes a Ready from every dirty group into `out` (see the module doc for what the driver
    /// does with it). Returns how many groups had work.
    pub fn collect(&mut self, out: &mut ShardOutput<S>) -> usize {
        let mut worked = 0;
        for group in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.groups.get_mut(&group) else { continue };
            slot.dirty = false;
            // A heartbeat answer may have settled a change without giving the replica work.
            if slot.membership_change.is_some() {
                finish_membership_change(slot, out);
            }
            if !slot.replica.has_ready() {
                continue;
            }
            worked += 1;
            let restored = self.restored.remove(&group);
            collect_group(group, slot, restored, &mut self.responses, out);
            // Applying may have produced more (a membership change appends, for instance).
            if slot.replica.has_ready() {
                slot.dirty = true;
                self.dirty.push(group);
            }
        }
        // Restored for a snapshot Raft did not take up (or a group removed meanwhile).
        out.retired.extend(self.restored.drain().map(|(_, (_, machine))| machine));
        if worked > 0 {
            self.compaction_scan_due = true;
        }
        if worked == 0 {
            out.idle_collects = out.idle_collects.saturating_add(1);
            if out.idle_collects == RELEASE_AFTER_IDLE_COLLECTS {
                out.release_memory();
                self.responses = Vec::new();
            }
        } else {
            out.idle_collects = 0;
        }
        worked
    }

    /// Answers `query` from this replica's state machine without a quorum round, if the replica
    /// heard from its group's leader within `max_lag_ticks` (see
    /// [`Replica::leader_contact_ticks`]): the answer may miss the most recent writes, by at most
    /// that lag, but never shows an uncommitted one. Returns the applied index it reflects.
    pub fn stale_read(
        &self,
        group: GroupId,
        query: &S::Query,
        max_lag_ticks: u32,
    ) -> Result<(LogIndex, S::QueryResult), RequestError> {
        let slot = self.groups.get(&group).ok_or(RequestError::GroupNotFound(group))?;
        if !slot.replica.membership().is_member(self.node) {
            // Removed (or not yet added): nobody keeps it up to date any more.
            return Err(RequestError::NotLeader { leader_hint: slot.replica.leader() });
        }
        let contact = if slot.asleep {
            // A quiet replica's clock stands still: node-level liveness says how fresh it is.
            self.quiet_contact_ticks(&slot.replica)
        } else {
            slot.replica.leader_contact_ticks()
        };
        match contact {
            Some(age) if age <= max_lag_ticks => {
                Ok((slot.machine.applied_index(), slot.machine.query(query)))
            }
            _ => Err(RequestError::NotLeader { leader_hint: slot.replica.leader() }),
        }
    }

    /// For a quiet replica: ticks since its leader's node was heard of (on the leader itself,
    /// since a quorum of its group's nodes was), or `None` without a known leader.
    fn quiet_contact_ticks(&self, replica: &Replica) -> Option<u32> {
        let age = |id: NodeId| {
            if id == self.node { 0 } else { self.node_age.get(&id).copied().unwrap_or(u32::MAX) }
        };
        match replica.role() {
            Role::Follower => replica.leader().map(age),
            Role::Leader => {
                let membership = replica.membership();
                // The youngest age a quorum is within, as a "value a quorum reached".
                let reached =
                    quorum::joint_reached(&membership.voters, &membership.outgoing, |id| {
                        u64::from(u32::MAX - age(id))
                    });
                Some(u32::MAX - u32::try_from(reached).unwrap_or(u32::MAX))
            }
            _ => None,
        }
    }

    /// Takes snapshots of up to `max_groups` groups that applied at least `min_entries` entries
    /// since their last snapshot (skipping those `skip` names), pushing them onto `out`. Nothing
    /// is compacted yet: the log store writes each image to its file (off the shard thread) and
    /// then calls [`ShardCore::snapshot_written`].
    ///
    /// A scan finds nothing new unless a group worked since the last one (nothing else raises
    /// what a group applied), so it is skipped until one did — or until groups the last scan
    /// left (deferred, skipped, not yet durable, past `max_groups`) are looked at again: with
    /// ten thousand quiet groups the scan was half of a node's idle CPU.
    pub fn compact_due(
        &mut self,
        min_entries: u64,
        max_groups: usize,
        skip: impl Fn(GroupId) -> bool,
        out: &mut Vec<(GroupId, PendingSnapshot<S>)>,
    ) {
        if !self.compaction_scan_due {
            return;
        }
        let limit = out.len() + max_groups;
        let mut left_some = false;
        for (group, slot) in &mut self.groups {
            if out.len() >= limit {
                left_some = true;
                break;
            }
            if skip(*group) {
                left_some = true;
                continue;
            }
            match compact_group(slot, min_entries, self.compaction_defer_entries) {
                Compacted::Snapshot(snapshot) => {
                    out.push((*group, snapshot));
                    // Compacted only once written: the next scan must look at it again.
                    left_some = true;
                }
                Compacted::NotDue => {}
                Compacted::Later => left_some = true,
            }
        }
        self.compaction_scan_due = left_some;
    }

    /// Takes a snapshot of `group` if it applied anything since its last one (the log store
    /// wants the segments its old entries pin): like [`ShardCore::compact_due`] for one group.
    pub fn compact_now(&mut self, group: GroupId) -> Option<PendingSnapshot<S>> {
        let slot = self.groups.get_mut(&group)?;
        match compact_group(slot, 1, self.compaction_defer_entries) {
            Compacted::Snapshot(snapshot) => Some(snapshot),
            Compacted::NotDue | Compacted::Later => None,
        }
    }

    /// The snapshot of `group` at `meta` is durable in its file, whose map is `data`: the
    /// replica's log is compacted through it, and `data` is what lagging followers are sent.
    /// Returns whether the log store should drop the entries it covers — not if the group
    /// is gone or a newer snapshot (a leader's, installed meanwhile) already replaced them.
    pub fn snapshot_written(&mut self, group: GroupId, meta: &SnapshotMeta, data: Bytes) -> bool {
        let Some(slot) = self.groups.get_mut(&group) else { return false };
        match slot.replica.compact(meta.index, data) {
            Ok(compacted) => {
                debug_assert_eq!(&compacted, meta, "the snapshot's metadata changed meanwhile");
                true
            }
            Err(_) => false,
        }
    }

    /// Asks `group`'s leader (this replica) to hand leadership to `to`: it brings `to` up to
    /// date and tells it to campaign; abandoned after an election timeout.
    pub fn transfer_leadership(&mut self, group: GroupId, to: NodeId) -> Result<(), RequestError> {
        self.wake(group);
        let slot = self.groups.get_mut(&group).ok_or(RequestError::GroupNotFound(group))?;
        slot.replica.transfer_leadership(to).map_err(|error| match error {
            TransferError::NotLeader { leader_hint } => RequestError::NotLeader { leader_hint },
            other => RequestError::Rejected(other.to_string()),
        })?;
        self.mark(group);
        Ok(())
    }

    /// Whether this shard's replica of `group` leads it.
    pub fn is_leader(&self, group: GroupId) -> bool {
        self.replica(group).is_some_and(|replica| replica.role() == Role::Leader)
    }
}

/// Whether the voters of `replica`'s group that node-level liveness does not declare down form
/// a quorum (this node counts as up).
fn live_quorum(replica: &Replica, me: NodeId, down: &BTreeSet<NodeId>) -> bool {
    replica.membership().vote_result(|id| Some(id == me || !down.contains(&id))) == VoteResult::Won
}

/// The voter of `replica`'s group that campaigns first once its leader's node is declared
/// down: one of those liveness does not declare down, picked by a hash of the group, so that
/// every survivor agrees without a word (while they agree on who is down) and the elections of
/// a dead node's groups are spread over the survivors. `None` if no voter is live.
fn first_campaigner(group: GroupId, replica: &Replica, down: &BTreeSet<NodeId>) -> Option<NodeId> {
    let mut live: Vec<NodeId> =
        replica.membership().all_voters().filter(|id| !down.contains(id)).collect();
    live.sort_unstable();
    // splitmix64's finalizer: group ids are often sequential, and the groups a node led may
    // follow a pattern in them.
    let mut hash = group.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    hash ^= hash >> 31;
    let count = u64::try_from(live.len()).expect("fits");
    (count > 0).then(|| live[usize::try_from(hash % count).expect("below the length")])
}

/// Ticks (of its own, counted once awake) before the survivor picked by [`first_campaigner`]
/// campaigns: the other survivors judge the dead node from frames that stopped at the same
/// moment, but on their own tick, so they may declare it down a tick or two later — until then
/// they still hold to their leader and would refuse the pre-vote (costing an election timeout).
const FIRST_CAMPAIGN_TICKS: u32 = 3;

/// [`ShardCore::set_compaction_defer_entries`] until set: four times the engine's default
/// snapshot threshold.
const COMPACTION_DEFER_DEFAULT: u64 = 40_000;

/// What [`compact_group`] did.
enum Compacted<S: StateMachine> {
    /// A snapshot was taken, to be written and then compacted.
    Snapshot(PendingSnapshot<S>),
    /// Too little applied since the last snapshot.
    NotDue,
    /// Due, but not now (a follower needs the entries, or they are not durable here yet).
    Later,
}

fn compact_group<S: StateMachine>(
    slot: &mut Group<S>,
    min_entries: u64,
    defer_entries: u64,
) -> Compacted<S> {
    let applied = slot.machine.applied_index();
    let since = applied.0.saturating_sub(slot.replica.status().snapshot_index.0);
    if since < min_entries.max(1) {
        return Compacted::NotDue;
    }
    // Down or not: a follower that is down may be back in a moment (a snapshot cut by a blip
    // resumes only into the same file), and the bound keeps what it holds small.
    if since < defer_entries && slot.replica.lagging_from().is_some_and(|from| from <= applied) {
        return Compacted::Later;
    }
    // Not yet durable here, or already compacted: a later call tries again.
    match slot.replica.snapshot_meta_at(applied) {
        Ok(meta) => Compacted::Snapshot(PendingSnapshot { meta, image: slot.machine.snapshot() }),
        Err(_) => Compacted::Later,
    }
}

fn collect_group<S: StateMachine>(
    group: GroupId,
    slot: &mut Group<S>,
    restored: Option<(LogIndex, S)>,
    responses: &mut Vec<S::Response>,
    out: &mut ShardOutput<S>,
) {
    let mut ready = slot.replica.ready();
    let last = ready.last_entry();
    // Everything the driver needs is moved out of the Ready, not cloned: this runs for every dirty
    // group on every iteration.
    let snapshot = ready.snapshot.take();
    if let Some(snapshot) = &snapshot {
        // A snapshot from the leader replaces the state machine; proposals before it are gone.
        if snapshot.meta.index > slot.machine.applied_index() {
            let installed = match restored {
                // Restored off the shard thread from this very snapshot: swap it in.
                Some((index, machine)) if index == snapshot.meta.index => {
                    out.retired.push(std::mem::replace(&mut slot.machine, machine));
                    Ok(())
                }
                other => {
                    out.retired.extend(other.map(|(_, machine)| machine));
                    slot.machine.restore(&snapshot.data)
                }
            };
            match installed {
                Ok(()) => {
                    slot.replica.on_applied(snapshot.meta.index);
                    // Proposals at or below the snapshot may be inside it or may have been
                    // overwritten; their entries will never be applied here one by one.
                    while slot.proposals.front().is_some_and(|p| p.index <= snapshot.meta.index) {
                        let proposal = slot.proposals.pop_front().expect("front exists");
                        out.completions.push(Completion::Failed {
                            token: proposal.token,
                            error: RequestError::OutcomeUnknown,
                        });
                    }
                }
                // The leader's snapshot does not restore: this replica cannot apply past it.
                // It stays behind (and says so) rather than apply entries on a wrong base.
                Err(error) => tracing::error!(%group, %error, "snapshot does not restore"),
            }
        } else {
            out.retired.extend(restored.map(|(_, machine)| machine));
        }
    } else {
        // Raft refused the snapshot (stale, or from an old term): the restored machine goes.
        out.retired.extend(restored.map(|(_, machine)| machine));
    }
    if snapshot.is_some() || !ready.entries.is_empty() || ready.hard_state.is_some() {
        out.persist.push((
            group,
            PersistItem {
                snapshot,
                entries: std::mem::take(&mut ready.entries),
                hard_state: ready.hard_state,
                must_sync: ready.must_sync,
            },
        ));
    }
    if let Some((term, index)) = last {
        out.persisted.push((group, term, index));
    }
    for message in ready.messages.drain(..) {
        out.send_now.entry(message.to).or_default().push((group, message));
    }
    let after_persist = std::mem::take(&mut ready.persisted_messages);
    for message in after_persist.into_messages_after_persist() {
        out.send_after_persist.entry(message.to).or_default().push((group, message));
    }
    out.fetches.extend(ready.fetches.iter().map(|fetch| (group, *fetch)));
    if !ready.committed_entries.is_empty() {
        apply(slot, &ready.committed_entries, responses, out);
        settle_membership_change(slot, &ready.committed_entries, out);
    }
    for state in &ready.read_states {
        if let Some(read) = slot.reads.iter_mut().find(|read| read.context == state.context) {
            read.read_index = Some(state.index);
        }
    }
    serve_reads(slot, out);
    slot.replica.advance(ready);
}

fn apply<S: StateMachine>(
    slot: &mut Group<S>,
    entries: &[Entry],
    responses: &mut Vec<S::Response>,
    out: &mut ShardOutput<S>,
) {
    responses.clear();
    slot.machine.apply(entries, responses);
    assert_eq!(responses.len(), entries.len(), "one response per entry");
    for (entry, response) in entries.iter().zip(responses.drain(..)) {
        // Proposals at or before this index either are this entry or were overwritten.
        while let Some(front) = slot.proposals.front() {
            if front.index > entry.index {
                break;
            }
            let proposal = slot.proposals.pop_front().expect("front exists");
            if proposal.index == entry.index && proposal.term == entry.term {
                out.completions.push(Completion::Applied {
                    token: proposal.token,
                    index: entry.index,
                    response,
                });
                break;
            }
            out.completions.push(Completion::Failed {
                token: proposal.token,
                error: RequestError::ProposalDropped,
            });
        }
    }
    if let Some(last) = entries.last() {
        slot.replica.on_applied(last.index);
    }
}

/// Follows this replica's membership change through the entries just applied: its entry
/// overwritten by another leader's fails it; once applied, the change is done when the joint
/// configuration it entered has been left (the leave-joint entry applied too).
fn settle_membership_change<S: StateMachine>(
    slot: &mut Group<S>,
    entries: &[Entry],
    out: &mut ShardOutput<S>,
) {
    let Some(change) = slot.membership_change.as_mut() else { return };
    if change.left.is_some() {
        return;
    }
    if !change.entered
        && let Some(entry) = entries.iter().find(|entry| entry.index == change.index)
    {
        if entry.term != change.term {
            let token = change.token;
            slot.membership_change = None;
            out.completions
                .push(Completion::Failed { token, error: RequestError::ProposalDropped });
            return;
        }
        change.entered = true;
    }
    if !change.entered {
        return;
    }
    // The next membership entry after the joint one is the leader's leave-joint (no other
    // change can be proposed in between): what it leaves to is the result — not the membership
    // in effect after this batch, which may already include a later change (cluster simulator
    // seed 2874: a removal reported a re-added learner). A snapshot may have covered both
    // entries: then the membership it installed stands.
    let left = entries
        .iter()
        .find(|entry| entry.index > change.index && entry.kind == EntryKind::Membership)
        .and_then(|entry| Some((entry.index, Membership::decode(&entry.payload).ok()?)));
    let membership = slot.replica.membership();
    match left {
        Some(left) => change.left = Some(left),
        // Covered by a leader's snapshot: this node no longer leads and cannot learn what the
        // others acknowledged; the change is reported as done here.
        None if !membership.is_joint() => {
            out.memberships.push((change.token, membership.clone()));
            slot.membership_change = None;
            return;
        }
        None => return,
    }
    finish_membership_change(slot, out);
}

/// Reports a membership change that left its joint configuration once every live member
/// acknowledged the leave-joint entry's commit ([`Replica::settled_index`]): from then on the
/// replica of a member it removed may be deleted at once. A member that had not learned the
/// commit would still be in the joint configuration, whose old half can need the removed
/// member's vote to elect anyone (cluster simulator seed 357 with eager deletion).
fn finish_membership_change<S: StateMachine>(slot: &mut Group<S>, out: &mut ShardOutput<S>) {
    let settled = slot.replica.settled_index();
    let Some(change) = slot
        .membership_change
        .take_if(|change| change.left.as_ref().is_some_and(|(index, _)| settled >= *index))
    else {
        return;
    };
    let (_, result) = change.left.expect("checked");
    out.memberships.push((change.token, result));
}

fn serve_reads<S: StateMachine>(slot: &mut Group<S>, out: &mut ShardOutput<S>) {
    let applied = slot.machine.applied_index();
    let machine = &slot.machine;
    let now = (slot.replica.term(), slot.replica.leader());
    slot.reads.retain(|read| match read.read_index {
        Some(index) if index <= applied => {
            out.completions.push(Completion::Read {
                token: read.token,
                applied,
                result: machine.query(&read.query),
            });
            false
        }
        // Leadership changed before the read was confirmed: it never will be. Fail it now
        // rather than at its deadline (a read has no effect, so the caller simply retries).
        None if read.asked != now => {
            out.completions.push(Completion::Failed {
                token: read.token,
                error: RequestError::NotLeader { leader_hint: now.1 },
            });
            false
        }
        _ => true,
    });
}
