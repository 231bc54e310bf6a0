//! The simulated cluster: nodes, the network between them (frames of many groups' messages, one
//! per peer per flush, as the driver sends them), and time, which is a counter. Every random
//! choice comes from the run's seed. After every unit of time the Raft invariants are checked:
//! each replica's own `check_invariants`, at most one leader per term per group, and what the
//! [`Oracle`] saw applied.
//!
//! Groups start with every node a voter; membership changes (`membership.rs`) move them to any
//! set of members, so the end-of-run agreement compares the group's current members only (the
//! membership in effect on its leader), and replicas of removed nodes are deleted.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;

use bytes::Bytes;
use flotilla::kv::StateMachine;
use flotilla::raftgroup::testkit::{NetConfig, NetStats, Network, SimRng};
use flotilla::raftgroup::{Membership, NodeId, Role, Term};
use flotilla::shard::{Completion, MembershipEdit, RequestError, Token};
use flotilla::wal::GroupId;
use flotilla::wal::sim::{CrashMode, Keep};

use super::machine::{Oracle, TracedKv, digest, mix};
use super::node::{Frame, Node, NodeConfig, Outbox};
use super::workload::Frontend;

/// Room for history timestamps within one unit of time.
const STAMPS_PER_TIME: u64 = 1_000_000;

/// Tokens of membership changes: above the clients' and below the final reads' and probes'.
pub const MEMBERSHIP_TOKENS: std::ops::Range<Token> = u64::MAX / 4..u64::MAX / 2;

/// How a membership change ended: the membership it left in effect, or why it failed.
pub type MembershipResult = Result<Membership, RequestError>;

/// What the cluster went through.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterStats {
    /// Crashes at a quiet moment (unsynced writes lost).
    pub crashes: u64,
    /// Crashes in the middle of a WAL write: the disk died after a few more operations, and the
    /// unsynced writes survived in part, the last one torn.
    pub torn_crashes: u64,
    /// Of those, crashes with unsynced bytes on the disk at the moment of the crash.
    pub unsynced_at_crash: u64,
    /// Pauses.
    pub pauses: u64,
    /// Leadership transfers started.
    pub transfers: u64,
    /// Disk stalls.
    pub disk_stalls: u64,
    /// Highest term any replica reached.
    pub max_term: u64,
}

/// The whole simulated cluster.
pub struct Cluster {
    config: NodeConfig,
    seed: u64,
    now: u64,
    stamps_now: u64,
    nodes: Vec<Node>,
    ids: Vec<NodeId>,
    groups: Vec<GroupId>,
    network: Network<Frame>,
    rng: SimRng,
    oracle: Rc<RefCell<Oracle>>,
    /// `(group, term)` → the node that led it: at most one.
    leaders: HashMap<(GroupId, Term), NodeId>,
    outbox: Outbox,
    trace: u64,
    stats: ClusterStats,
    /// Raft messages handed to the network (node heartbeats, empty frames, are not counted).
    raft_messages: u64,
    /// By then every Raft message sent so far has been delivered or lost.
    raft_delivered_by: u64,
    /// Membership changes that finished or failed, not yet taken.
    membership_results: Vec<(Token, MembershipResult)>,
    /// Per-node directories (snapshot files, catalog); removed with the cluster.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster of `tick_units.len()` nodes hosting `groups` (every node a voter of every
    /// group), started.
    pub fn new(
        seed: u64,
        config: NodeConfig,
        tick_units: &[u64],
        groups: u64,
        network: NetConfig,
        mut rng: SimRng,
    ) -> Self {
        let dir = scratch_dir();
        let ids: Vec<NodeId> = (1..=tick_units.len() as u64).map(NodeId).collect();
        let nodes = ids
            .iter()
            .zip(tick_units)
            .map(|(&id, &units)| {
                let path = dir.path().join(format!("n{}", id.0));
                Node::new(id, path, units, 1 + rng.below(units), config.bug)
            })
            .collect();
        let network = Network::new(rng.fork(), network);
        let mut cluster = Cluster {
            config,
            seed,
            now: 0,
            stamps_now: 0,
            nodes,
            ids,
            groups: (1..=groups).map(GroupId).collect(),
            network,
            rng,
            oracle: Rc::new(RefCell::new(Oracle::default())),
            leaders: HashMap::new(),
            outbox: Outbox::default(),
            trace: seed,
            stats: ClusterStats::default(),
            raft_messages: 0,
            raft_delivered_by: 0,
            membership_results: Vec::new(),
            _dir: dir,
        };
        for index in 0..cluster.nodes.len() {
            cluster.start(index);
        }
        cluster
    }

    /// Node ids.
    pub fn ids(&self) -> &[NodeId] {
        &self.ids
    }

    /// Group ids.
    pub fn groups(&self) -> &[GroupId] {
        &self.groups
    }

    /// Current time.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The hash of everything that happened.
    pub fn trace(&self) -> u64 {
        self.trace
    }

    /// What the cluster went through.
    pub fn stats(&self) -> ClusterStats {
        self.stats
    }

    /// What the network did.
    pub fn network_stats(&self) -> NetStats {
        self.network.stats()
    }

    /// The network, to degrade or partition it.
    pub fn network(&mut self) -> &mut Network<Frame> {
        &mut self.network
    }

    /// What every replica applied.
    pub fn oracle(&self) -> std::cell::Ref<'_, Oracle> {
        self.oracle.borrow()
    }

    /// Records `value` in the trace.
    pub fn record(&mut self, value: u64) {
        self.trace = mix(self.trace, value);
    }

    /// Fails the run with a violation found outside the cluster (by the membership operator).
    pub fn violation(&self, what: &str) -> ! {
        self.fail(what)
    }

    fn fail(&self, what: &str) -> ! {
        panic!("violation at time {} (seed {}): {what}\n{}", self.now, self.seed, self.describe())
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[(id.0 - 1) as usize]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[(id.0 - 1) as usize]
    }

    fn start(&mut self, index: usize) {
        let oracle = Rc::clone(&self.oracle);
        let (now, groups, ids) = (self.now, self.groups.clone(), self.ids.clone());
        if let Err(error) = self.nodes[index].start(now, &self.config, &groups, &ids, &oracle) {
            self.fail(&error);
        }
        self.record(mix(index as u64, 0xC0DE));
    }

    // ----- faults -----

    /// Power loss at `node` at a quiet moment: its unsynced writes are lost.
    pub fn crash(&mut self, node: NodeId) {
        if !self.node(node).is_running() {
            return;
        }
        let rng = &mut self.rng;
        let lands = rng.next_u64();
        let mut lands_rng = SimRng::new(lands);
        self.node_mut(node).crash(CrashMode::LOSE_UNSYNCED, || lands_rng.percent(50));
        self.stats.crashes += 1;
        self.record(mix(node.0, 0xDEAD));
    }

    /// A crash in the middle of a write: `node`'s disk dies after a few more operations (its
    /// pending WAL rounds are written now and fail there); then it crashes keeping some of the
    /// unsynced writes and tearing the last one kept.
    pub fn crash_mid_write(&mut self, node: NodeId) {
        if !self.node(node).is_running() {
            return;
        }
        let after = self.rng.below(4);
        let index = (node.0 - 1) as usize;
        self.nodes[index].dying = true;
        self.nodes[index].disk().fail_all_after(after);
        // The rounds in flight reach the disk now; the disk dies among them.
        let mut outbox = std::mem::take(&mut self.outbox);
        // What succeeded was durable and its acknowledgements leave; what failed is the crash.
        let _ = self.nodes[index].flush_wal(&mut outbox);
        let now = self.now;
        for (from, to, frame) in outbox.frames.drain(..) {
            self.count_raft(&frame);
            self.network.send(now, from.0, to.0, frame);
        }
        self.outbox = outbox;
        self.torn_crash(node);
    }

    fn torn_crash(&mut self, node: NodeId) {
        let keep = match self.rng.below(3) {
            0 => Keep::All,
            1 => Keep::Prefix(self.rng.below(3) as usize),
            _ => Keep::Random(self.rng.next_u64()),
        };
        let mode = CrashMode { keep, tear_last: Some(self.rng.next_u64()) };
        if self.node(node).disk().unsynced_bytes() > 0 {
            self.stats.unsynced_at_crash += 1;
        }
        let mut lands_rng = SimRng::new(self.rng.next_u64());
        self.node_mut(node).crash(mode, || lands_rng.percent(50));
        self.stats.torn_crashes += 1;
        self.record(mix(node.0, 0x7EA2));
    }

    /// Restarts a crashed `node` from its disk.
    pub fn restart(&mut self, node: NodeId) {
        let index = (node.0 - 1) as usize;
        if !self.nodes[index].is_running() {
            self.start(index);
        }
    }

    /// Freezes `node` (SIGSTOP).
    pub fn pause(&mut self, node: NodeId) {
        let state = self.node_mut(node);
        if state.is_up() {
            state.paused = true;
            self.stats.pauses += 1;
            self.record(mix(node.0, 0x5700));
        }
    }

    /// Unfreezes `node`.
    pub fn resume(&mut self, node: NodeId) {
        let index = (node.0 - 1) as usize;
        let mut outbox = std::mem::take(&mut self.outbox);
        let (now, config) = (self.now, self.config.clone());
        self.nodes[index].resume(now, &config, &mut self.rng, &mut outbox);
        self.outbox = outbox;
        self.record(mix(node.0, 0x60));
    }

    /// Makes `node`'s disk slow until `until`.
    pub fn stall_disk(&mut self, node: NodeId, until: u64) {
        self.node_mut(node).slow_disk_until = until;
        self.stats.disk_stalls += 1;
    }

    /// Asks the leader of `group` to hand leadership to `to`.
    pub fn transfer(&mut self, group: GroupId, to: NodeId) {
        if let Some(leader) = self.leader_of(group)
            && self.node_mut(leader).transfer(group, to)
        {
            self.stats.transfers += 1;
            self.record(mix(group.0, to.0));
        }
    }

    /// Whether `node` runs unpaused.
    pub fn is_up(&self, node: NodeId) -> bool {
        self.node(node).is_up()
    }

    // ----- membership -----

    /// Whether `node` runs and hosts a replica of `group`.
    pub fn hosts(&self, node: NodeId, group: GroupId) -> bool {
        self.node(node).hosts(group)
    }

    /// The highest index of `group` that `node`'s WAL durably knows committed.
    pub fn durable_commit(&self, node: NodeId, group: GroupId) -> Option<u64> {
        self.node(node).durable_commit(group)
    }

    /// The index `node`'s replica of `group` applied.
    pub fn applied(&self, node: NodeId, group: GroupId) -> Option<u64> {
        Some(self.node(node).core()?.machine(group)?.applied_index().0)
    }

    /// The membership in effect on `node`'s replica of `group`.
    pub fn membership(&self, node: NodeId, group: GroupId) -> Option<&Membership> {
        self.node(node).membership(group)
    }

    /// Asks `node` to change `group`'s membership by `edit` (as `Engine::change_membership`);
    /// the outcome comes back through [`Cluster::take_membership_results`].
    pub fn change_membership(
        &mut self,
        node: NodeId,
        group: GroupId,
        edit: MembershipEdit,
        token: Token,
    ) -> Result<(), RequestError> {
        debug_assert!(MEMBERSHIP_TOKENS.contains(&token));
        self.record(mix(token, node.0 << 12));
        if super::node::debug() {
            eprintln!("t{} {node} g{group} change membership {edit:?} (token {token})", self.now);
        }
        let result = self.node_mut(node).change_membership(group, edit, token);
        if super::node::debug() {
            eprintln!("t{} {node} g{group} change membership: {result:?}", self.now);
        }
        result
    }

    /// Makes running `node` host an empty replica of `group` that learns everything from the
    /// leader (as `Engine::join_group`).
    pub fn host_group(&mut self, node: NodeId, group: GroupId) -> Result<(), RequestError> {
        let index = (node.0 - 1) as usize;
        let (now, config, oracle) = (self.now, self.config.clone(), Rc::clone(&self.oracle));
        let result = self.nodes[index].host_group(now, &config, &mut self.rng, group, &oracle);
        self.record(mix(mix(node.0, group.0), 0x4057 + u64::from(result.is_ok())));
        result
    }

    /// Deletes `node`'s replica of `group` and its data (as `Engine::remove_group`).
    pub fn remove_group(&mut self, node: NodeId, group: GroupId) -> Result<(), RequestError> {
        let index = (node.0 - 1) as usize;
        let (now, config) = (self.now, self.config.clone());
        let result = self.nodes[index].remove_group(now, &config, &mut self.rng, group);
        self.record(mix(mix(node.0, group.0), 0x2E30 + u64::from(result.is_ok())));
        result
    }

    /// Membership changes that finished or failed since the last call, in token order.
    pub fn take_membership_results(&mut self) -> Vec<(Token, MembershipResult)> {
        self.split_membership_results();
        let mut results = std::mem::take(&mut self.membership_results);
        results.sort_by_key(|(token, _)| *token);
        results
    }

    /// Moves what the nodes reported about membership changes out of the clients' way.
    fn split_membership_results(&mut self) {
        let results = &mut self.membership_results;
        for (token, membership) in self.outbox.memberships.drain(..) {
            results.push((token, Ok(membership)));
        }
        self.outbox.completions.retain(|completion| match completion {
            Completion::Failed { token, error } if MEMBERSHIP_TOKENS.contains(token) => {
                results.push((*token, Err(error.clone())));
                false
            }
            _ => true,
        });
        self.outbox.refusals.retain(|(token, error)| {
            if MEMBERSHIP_TOKENS.contains(token) {
                results.push((*token, Err(error.clone())));
                false
            } else {
                true
            }
        });
    }

    /// Once the cluster converged, as an operator would: deletes every replica whose node is
    /// not a member of its group (removed, or hosted for a change that never happened), on
    /// groups whose leader committed its whole log (so no change still in some log can make
    /// that node a member again). Returns how many it deleted.
    pub fn remove_non_members(&mut self) -> usize {
        let mut doomed = Vec::new();
        for &group in &self.groups {
            let Some(leader) = self.leader_of(group) else { continue };
            let replica = self.node(leader).core().and_then(|core| core.replica(group));
            let Some(replica) = replica else { continue };
            let membership = replica.membership();
            if membership.is_joint() || replica.status().last_index != replica.commit_index() {
                continue;
            }
            for &node in &self.ids {
                if !membership.is_member(node) && self.node(node).hosts(group) {
                    doomed.push((node, group));
                }
            }
        }
        doomed.into_iter().filter(|&(node, group)| self.remove_group(node, group).is_ok()).count()
    }

    /// The unpaused replica leading `group` in the highest term, if any.
    pub fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter(|node| !node.paused)
            .filter_map(|node| Some((node.id, node.core()?.replica(group)?)))
            .filter(|(_, replica)| replica.role() == Role::Leader)
            .max_by_key(|(_, replica)| replica.term())
            .map(|(id, _)| id)
    }

    // ----- time -----

    /// A history timestamp: increasing with every call.
    pub fn stamp(&mut self) -> u64 {
        assert!(self.stamps_now < STAMPS_PER_TIME, "too many events at time {}", self.now);
        self.stamps_now += 1;
        self.now * STAMPS_PER_TIME + self.stamps_now - 1
    }

    /// One unit of time: ticks, deliveries, completed IO, one loop iteration per node, checks.
    pub fn advance(&mut self) {
        self.now += 1;
        self.stamps_now = 0;
        let now = self.now;
        let config = self.config.clone();
        let mut outbox = std::mem::take(&mut self.outbox);
        for node in &mut self.nodes {
            node.run_ticks(now, &config, &mut self.rng, &mut outbox);
        }
        while let Some(envelope) = self.network.pop_due(now) {
            self.trace = mix(self.trace, envelope.from ^ (envelope.to << 8));
            let from = NodeId(envelope.from);
            self.nodes[(envelope.to - 1) as usize].deliver(now, from, envelope.message);
        }
        for index in 0..self.nodes.len() {
            if let Err(error) =
                self.nodes[index].complete_io(now, &config, &mut self.rng, &mut outbox)
            {
                self.storage_failed(index, &error);
            }
        }
        for index in 0..self.nodes.len() {
            let stamp = self.stamp();
            self.oracle.borrow_mut().now_stamp = stamp;
            match self.nodes[index].pump(now, &config, &mut self.rng, &mut outbox) {
                Ok(trace) => self.trace = mix(self.trace, trace),
                Err(error) => self.storage_failed(index, &error),
            }
        }
        for (from, to, frame) in outbox.frames.drain(..) {
            self.count_raft(&frame);
            if super::node::debug() {
                for (group, message) in &frame {
                    let body = format!("{:?}", message.body);
                    eprintln!("t{now} send {from}->{to} g{group} {body:.100}");
                }
            }
            self.network.send(now, from.0, to.0, frame);
        }
        self.outbox = outbox;
        self.check();
    }

    /// A node's storage failed: expected only on a disk told to die (then it is the crash).
    fn storage_failed(&mut self, index: usize, error: &str) {
        if !self.nodes[index].dying {
            self.fail(&format!("unexpected storage failure: {error}"));
        }
        self.torn_crash(self.nodes[index].id);
    }

    /// Every replica's own invariants, one leader per term per group, the oracle's findings.
    fn check(&mut self) {
        let mut problems = Vec::new();
        for node in &self.nodes {
            for (group, replica) in node.replicas() {
                if let Err(error) = replica.check_invariants() {
                    problems.push(format!("{} group {group}: {error}", node.id));
                }
                let term = replica.term();
                self.stats.max_term = self.stats.max_term.max(term.0);
                if replica.role() == Role::Leader {
                    let leader = *self.leaders.entry((group, term)).or_insert(node.id);
                    if leader != node.id {
                        problems.push(format!(
                            "election safety: {leader} and {} both led group {group} in term \
                             {term}",
                            node.id
                        ));
                    }
                }
            }
        }
        if let Some(first) = self.oracle.borrow().violations.first() {
            problems.push(first.clone());
        }
        if let Some(problem) = problems.first() {
            self.fail(problem);
        }
    }

    /// Raft messages sent so far (node heartbeats not counted).
    pub fn raft_messages(&self) -> u64 {
        self.raft_messages
    }

    /// The time by which every Raft message sent so far is delivered or lost: a message sent
    /// before the network healed may still be on a slow path, and wake a quiet group when it
    /// lands (as a late packet would).
    pub fn raft_delivered_by(&self) -> u64 {
        self.raft_delivered_by
    }

    fn count_raft(&mut self, frame: &Frame) {
        if !frame.is_empty() {
            self.raft_messages += frame.len() as u64;
            let config = self.network.config();
            let latest = self.now + config.delay_max.max(config.slow_delay_max);
            self.raft_delivered_by = self.raft_delivered_by.max(latest);
        }
    }

    /// Groups awake (ticked or queued to wake) on the nodes that run unpaused.
    pub fn awake_count(&self) -> usize {
        self.nodes
            .iter()
            .filter(|node| node.is_up())
            .filter_map(Node::core)
            .map(flotilla::shard::ShardCore::awake_count)
            .sum()
    }

    /// One `node:awake` pair per node that runs unpaused, and which groups are awake there.
    pub fn describe_awake(&self) -> String {
        let mut line = String::new();
        for node in self.nodes.iter().filter(|node| node.is_up()) {
            let core = node.core().expect("up");
            let mut awake: Vec<u64> =
                core.groups().filter(|g| !core.is_asleep(*g)).map(|g| g.0).collect();
            awake.sort_unstable();
            let _ = write!(line, " {}: {} awake {awake:?};", node.id, core.awake_count());
        }
        line
    }

    /// Fails every request pending on any node, as their deadlines would.
    pub fn expire_all(&mut self) {
        for node in &mut self.nodes {
            node.expire_all();
        }
    }

    /// Completions and refusals of client requests since the last call (those of membership
    /// changes wait for [`Cluster::take_membership_results`]).
    pub fn take_completions(&mut self) -> (Vec<Completion<TracedKv>>, Vec<(Token, RequestError)>) {
        self.split_membership_results();
        (std::mem::take(&mut self.outbox.completions), std::mem::take(&mut self.outbox.refusals))
    }

    // ----- the end -----

    /// True if every node runs unpaused with no IO pending, and every group has a leader, is
    /// not in the middle of a membership change, and has the same applied index and state on
    /// every member's replica (voters and learners of the membership in effect on the
    /// leader) and on the leader's — which may not be a member: a leader removed by a change
    /// leads until the members acknowledge its commit (seed 7086: the members, one commit
    /// behind it, agreed among themselves) —, with everything committed applied.
    pub fn converged(&self) -> bool {
        if !self.nodes.iter().all(|node| node.is_up() && node.io_pending() == 0) {
            return false;
        }
        self.groups.iter().all(|&group| {
            let Some(leader) = self.leader_of(group) else { return false };
            let membership = self.node(leader).membership(group).expect("the leader hosts it");
            if membership.is_joint() {
                return false;
            }
            let states: Option<Vec<(u64, u64, u64)>> = membership
                .members()
                .chain(std::iter::once(leader))
                .map(|member| {
                    let core = self.node(member).core().expect("up");
                    let machine = core.machine(group)?.inner();
                    let commit = core.replica(group)?.commit_index().0;
                    Some((machine.applied_index().0, commit, digest(machine)))
                })
                .collect();
            // A member that does not host the group never catches up: not converged.
            states.is_some_and(|states| {
                states.iter().all(|state| state.0 == state.1 && *state == states[0])
            })
        })
    }

    /// After convergence: every member of every group applied the membership its leader has in
    /// effect (the same log, so the same membership, also where it came from a snapshot).
    pub fn check_memberships(&self) {
        for &group in &self.groups {
            let Some(leader) = self.leader_of(group) else { continue };
            let Some(membership) = self.node(leader).membership(group) else { continue };
            for member in membership.members() {
                let theirs = self.node(member).membership(group);
                if theirs != Some(membership) {
                    self.fail(&format!(
                        "{member}, a member of group {group}, has membership {theirs:?} at the \
                         leader's applied index, where the leader {leader} has {membership:?}"
                    ));
                }
            }
        }
    }

    /// The value of `key` in `group` on its leader (after convergence: on every member).
    pub fn final_value(&self, group: GroupId, key: &[u8]) -> Option<Bytes> {
        let leader = self.leader_of(group).expect("converged groups have a leader");
        let core = self.node(leader).core().expect("up");
        core.machine(group).expect("hosted").inner().get(key).cloned()
    }

    /// One line per node, for failure reports.
    pub fn describe(&self) -> String {
        let mut lines = Vec::new();
        for node in &self.nodes {
            let Some(core) = node.core() else {
                lines.push(format!("  {}: crashed", node.id));
                continue;
            };
            let mut line = format!(
                "  {}{} io pending {}:",
                node.id,
                if node.paused { " (paused)" } else { "" },
                node.io_pending()
            );
            for (group, replica) in node.replicas() {
                let status = replica.status();
                let applied = core.machine(group).expect("hosted").inner().applied_index().0;
                let membership = replica.membership();
                let ids =
                    |list: &[NodeId]| list.iter().map(|id| id.0.to_string()).collect::<String>();
                let _ = write!(
                    line,
                    " g{}[{:?} t{} c{} a{} l{} s{} v{}",
                    group.0,
                    status.role,
                    status.term.0,
                    status.commit.0,
                    applied,
                    status.last_index.0,
                    status.snapshot_index.0,
                    ids(&membership.voters)
                );
                if membership.is_joint() {
                    let _ = write!(line, "/{}", ids(&membership.outgoing));
                }
                if !membership.learners.is_empty() {
                    let _ = write!(line, " L{}", ids(&membership.learners));
                }
                line.push(']');
            }
            lines.push(line);
        }
        lines.join("\n")
    }
}

impl Frontend for Cluster {
    fn stamp(&mut self) -> u64 {
        Cluster::stamp(self)
    }

    fn now(&self) -> u64 {
        self.now
    }

    fn propose(
        &mut self,
        node: NodeId,
        group: GroupId,
        payload: Bytes,
        token: Token,
    ) -> Result<(), RequestError> {
        self.record(mix(token, node.0));
        self.node_mut(node).propose(group, payload, token)
    }

    fn read(
        &mut self,
        node: NodeId,
        group: GroupId,
        key: Bytes,
        token: Token,
    ) -> Result<(), RequestError> {
        self.record(mix(token, node.0 << 4));
        self.node_mut(node).read(group, key, token)
    }

    fn expire(&mut self, node: NodeId, tokens: &[Token]) {
        self.node_mut(node).expire(tokens);
    }
}

/// A directory for the nodes' snapshot files and catalogs: on tmpfs when there is one, so the
/// stores' fsyncs cost nothing.
fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix("flotilla-cluster-sim-").tempdir_in(shm);
    match builder {
        Ok(dir) if shm.is_dir() => dir,
        _ => tempfile::tempdir().expect("a temporary directory"),
    }
}
