//! `ShardCore` in a three-node in-process cluster: each node's shard hosts many groups, persists
//! into per-group in-memory stores, and exchanges messages through a perfect network. The pure
//! loop alone must elect leaders, commit and apply proposals in every group, serve linearizable
//! reads on followers, batch messages per peer node, and keep replicas identical.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use flotilla::kv::StateMachine as _;
use flotilla::kv::{
    Command, KvConfig, KvStateMachine, Outcome, Proposal, Query, QueryResult, Reply, Request,
};
use flotilla::raftgroup::{Config, MemStorage, Message, NodeId, ReadMode, Ready, RecoveredState};
use flotilla::shard::{Completion, Quiescence, RequestError, ShardCore, ShardOutput, Token};
use flotilla::wal::GroupId;

struct Node {
    core: ShardCore<KvStateMachine>,
    stores: BTreeMap<GroupId, MemStorage>,
    out: ShardOutput<KvStateMachine>,
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    wire: VecDeque<(NodeId, GroupId, Message)>,
    done: BTreeMap<Token, Completion<KvStateMachine>>,
    /// Largest number of messages one node sent one peer in one iteration (one frame).
    messages_per_frame_max: usize,
    /// Messages to and from this node are lost.
    isolated: Option<NodeId>,
    /// Raft messages sent so far.
    messages: u64,
    /// Node-level liveness is reported to the cores on every tick (with quiescence).
    liveness: bool,
    /// Ticks since the isolated node was cut off (the age liveness reports for it).
    isolated_ticks: u32,
    /// `(observer, peer)`: the observer's liveness reports the peer silent although their
    /// messages flow (a false "down").
    blind: Option<(NodeId, NodeId)>,
}

impl Cluster {
    fn new(nodes: u64, groups: u64) -> Cluster {
        Self::new_with(nodes, groups, |_| {})
    }

    /// A cluster whose replicas' configurations `adjust` changes.
    fn new_with(nodes: u64, groups: u64, adjust: impl Fn(&mut Config)) -> Cluster {
        let voters: Vec<NodeId> = (1..=nodes).map(NodeId).collect();
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            wire: VecDeque::new(),
            done: BTreeMap::new(),
            messages_per_frame_max: 0,
            isolated: None,
            messages: 0,
            liveness: false,
            isolated_ticks: 0,
            blind: None,
        };
        for id in 1..=nodes {
            let mut core = ShardCore::new(NodeId(id));
            for group in 1..=groups {
                let mut config =
                    Config { seed: id * 1_000 + group, ..Config::new(NodeId(id), voters.clone()) };
                adjust(&mut config);
                let machine = KvStateMachine::new(KvConfig::default());
                core.create_group(GroupId(group), config, RecoveredState::default(), machine)
                    .unwrap();
            }
            let node = Node { core, stores: BTreeMap::new(), out: ShardOutput::default() };
            cluster.nodes.insert(NodeId(id), node);
        }
        cluster
    }

    /// One loop iteration on every node (collect, persist, send, acknowledge), then delivery.
    fn iterate(&mut self) {
        for (id, node) in &mut self.nodes {
            let from = *id;
            node.out.clear();
            node.core.collect(&mut node.out);
            for (group, item) in node.out.persist.drain(..) {
                let ready = Ready {
                    snapshot: item.snapshot,
                    entries: item.entries,
                    hard_state: item.hard_state,
                    ..Ready::default()
                };
                node.stores.entry(group).or_default().persist(&ready);
            }
            // Persistence above is synchronous, so both kinds of messages may go now.
            for (to, messages) in node.out.send_now.iter().chain(&node.out.send_after_persist) {
                self.messages_per_frame_max = self.messages_per_frame_max.max(messages.len());
                self.messages += messages.len() as u64;
                if self.isolated.is_some_and(|cut| cut == from || cut == *to) {
                    continue;
                }
                for (group, message) in messages {
                    self.wire.push_back((*to, *group, message.clone()));
                }
            }
            for (group, term, index) in node.out.persisted.drain(..) {
                node.core.on_persisted(group, term, index);
            }
            for (group, fetch) in node.out.fetches.drain(..) {
                let entries = node.stores.entry(group).or_default().fetch(&fetch);
                node.core.on_fetched(group, fetch, entries);
            }
            for completion in node.out.completions.drain(..) {
                let token = match &completion {
                    Completion::Applied { token, .. }
                    | Completion::Read { token, .. }
                    | Completion::Failed { token, .. } => *token,
                };
                assert!(self.done.insert(token, completion).is_none(), "token {token} twice");
            }
        }
        while let Some((to, group, message)) = self.wire.pop_front() {
            self.nodes.get_mut(&to).unwrap().core.step(group, message);
        }
    }

    fn tick(&mut self) {
        if self.isolated.is_some() {
            self.isolated_ticks += 1;
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for (id, node) in &mut self.nodes {
            if self.liveness {
                // Node-level heartbeats flow between every pair but across the cut.
                for peer in ids.iter().filter(|peer| *peer != id) {
                    let cut = self.isolated.is_some_and(|cut| cut == *id || cut == *peer);
                    let blind = self.blind == Some((*id, *peer));
                    let age = if blind {
                        u32::MAX
                    } else if cut {
                        self.isolated_ticks
                    } else {
                        0
                    };
                    node.core.node_contact(*peer, age);
                }
            }
            node.core.tick();
        }
        self.iterate();
    }

    fn quiesce(&mut self, quiescence: Quiescence) {
        self.liveness = true;
        for node in self.nodes.values_mut() {
            node.core.enable_quiescence(quiescence);
        }
    }

    fn awake(&self, node: NodeId) -> usize {
        self.nodes[&node].core.awake_count()
    }

    fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.nodes.iter().find(|(_, node)| node.core.is_leader(group)).map(|(id, _)| *id)
    }

    /// Ticks until every group in `groups` has a leader (bounded).
    fn elect(&mut self, groups: u64) {
        for _ in 0..1_000 {
            if (1..=groups).all(|g| self.leader(GroupId(g)).is_some()) {
                // Let the new leaders' first entries commit everywhere.
                for _ in 0..5 {
                    self.tick();
                }
                return;
            }
            self.tick();
        }
        panic!("not every group elected a leader within 1,000 ticks");
    }

    fn settle(&mut self, token: Token) -> &Completion<KvStateMachine> {
        for _ in 0..200 {
            if self.done.contains_key(&token) {
                return &self.done[&token];
            }
            self.iterate();
            self.tick();
        }
        panic!("request {token} never completed");
    }
}

fn put(key: &str, value: &str) -> Bytes {
    let command =
        Command::Put { key: Bytes::from(key.to_string()), value: Bytes::from(value.to_string()) };
    Proposal { leader_time_ms: 0, request: Request::Unsessioned(command) }.to_bytes()
}

#[test]
fn every_group_elects_commits_and_applies_on_every_replica() {
    let groups = 16;
    let mut cluster = Cluster::new(3, groups);
    cluster.elect(groups);
    for g in 1..=groups {
        let group = GroupId(g);
        let leader = cluster.leader(group).unwrap();
        let node = cluster.nodes.get_mut(&leader).unwrap();
        node.core.propose(group, put("k", &format!("v{g}")), g).unwrap();
    }
    for g in 1..=groups {
        match cluster.settle(g) {
            Completion::Applied { response: Ok(Reply::Done(Outcome::Written)), .. } => {}
            other => panic!("group {g}: {other:?}"),
        }
    }
    // Let followers apply too, then compare every replica's state machine.
    for _ in 0..10 {
        cluster.tick();
    }
    for g in 1..=groups {
        let group = GroupId(g);
        let states: Vec<Vec<(Bytes, Bytes)>> = cluster
            .nodes
            .values()
            .map(|node| {
                let machine = node.core.machine(group).unwrap();
                machine.iter().map(|(k, v)| (Bytes::copy_from_slice(k), v.clone())).collect()
            })
            .collect();
        assert_eq!(states[0], vec![(Bytes::from("k"), Bytes::from(format!("v{g}")))]);
        assert!(states.iter().all(|state| *state == states[0]), "group {g} diverged");
    }
    assert!(
        cluster.messages_per_frame_max > 1,
        "messages of many groups should share a frame per peer"
    );
}

#[test]
fn a_follower_serves_a_linearizable_read_and_refuses_proposals_with_a_hint() {
    let mut cluster = Cluster::new(3, 1);
    let group = GroupId(1);
    cluster.elect(1);
    let leader = cluster.leader(group).unwrap();
    cluster.nodes.get_mut(&leader).unwrap().core.propose(group, put("x", "1"), 1).unwrap();
    assert!(matches!(cluster.settle(1), Completion::Applied { .. }));
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let core = &mut cluster.nodes.get_mut(&follower).unwrap().core;
    let refused = core.propose(group, put("x", "2"), 2);
    assert_eq!(refused, Err(RequestError::NotLeader { leader_hint: Some(leader) }));
    core.read(group, Query::Get { key: Bytes::from("x") }, 3).unwrap();
    match cluster.settle(3) {
        Completion::Read { result: QueryResult::Value(Some(value)), .. } => {
            assert_eq!(value, &Bytes::from("1"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_groups_are_refused_at_once() {
    let mut cluster = Cluster::new(1, 1);
    let core = &mut cluster.nodes.get_mut(&NodeId(1)).unwrap().core;
    assert_eq!(
        core.propose(GroupId(9), put("a", "b"), 1),
        Err(RequestError::GroupNotFound(GroupId(9)))
    );
    assert_eq!(
        core.read(GroupId(9), Query::Get { key: Bytes::from("a") }, 2),
        Err(RequestError::GroupNotFound(GroupId(9)))
    );
}

#[test]
fn a_proposal_lost_to_a_leader_change_fails_and_is_never_applied() {
    let mut cluster = Cluster::new(3, 1);
    let group = GroupId(1);
    cluster.elect(1);
    let old = cluster.leader(group).unwrap();
    // The leader is cut off before its proposal reaches anyone.
    cluster.isolated = Some(old);
    cluster.nodes.get_mut(&old).unwrap().core.propose(group, put("lost", "1"), 1).unwrap();
    let new = loop {
        cluster.tick();
        if let Some(leader) = cluster
            .nodes
            .iter()
            .find_map(|(id, node)| (*id != old && node.core.is_leader(group)).then_some(*id))
        {
            break leader;
        }
    };
    cluster.nodes.get_mut(&new).unwrap().core.propose(group, put("kept", "2"), 2).unwrap();
    assert!(matches!(cluster.settle(2), Completion::Applied { .. }));
    // Heal: the old leader learns the new log, which overwrites its proposal.
    cluster.isolated = None;
    match cluster.settle(1) {
        Completion::Failed { error: RequestError::ProposalDropped, .. } => {}
        other => panic!("{other:?}"),
    }
    for _ in 0..10 {
        cluster.tick();
    }
    for node in cluster.nodes.values() {
        let machine = node.core.machine(group).unwrap();
        assert!(machine.get(b"lost").is_none(), "a dropped proposal was applied");
        assert_eq!(machine.get(b"kept").map(|v| &v[..]), Some(&b"2"[..]));
    }
}

/// Quiescence in the pure loop (issue 5): once everything is replicated, groups stop ticking
/// and not one message flows; when the node leading some of them is cut off, node-level
/// liveness wakes their followers at most `wakes_per_tick` per tick, they elect new leaders and
/// serve, and go quiet again without the lost node; the cut-off node's leaders, left without a
/// live quorum, refuse at once.
#[test]
fn quiet_groups_cost_nothing_and_a_lost_leader_node_wakes_them_a_few_at_a_time() {
    let groups = 120;
    let quiescence = Quiescence { dead_after_ticks: 10, wakes_per_tick: 4 };
    let mut cluster = quiet_cluster(groups, quiescence);
    let ids: Vec<NodeId> = cluster.nodes.keys().copied().collect();
    let sent = cluster.messages;
    for _ in 0..200 {
        cluster.tick();
    }
    assert_eq!(cluster.messages, sent, "quiet groups sent messages");
    assert!(ids.iter().all(|id| cluster.awake(*id) == 0));

    // Cut off the node leading the most groups.
    let led = |cluster: &Cluster, node: NodeId| {
        (1..=groups).filter(|g| cluster.leader(GroupId(*g)) == Some(node)).count()
    };
    let lost = *ids.iter().max_by_key(|id| led(&cluster, **id)).unwrap();
    let lost_led = led(&cluster, lost);
    assert!(lost_led > quiescence.wakes_per_tick, "enough groups to see the bound");
    cluster.isolated = Some(lost);
    let survivor = *ids.iter().find(|id| **id != lost).unwrap();
    let mut refused_at_once = false;
    let mut previous = 0;
    for _ in 0..500 {
        cluster.tick();
        // Each survivor wakes at most `wakes_per_tick` queued groups per tick; the campaigns of
        // those wake as many again on the other survivor (by message). No more than that.
        let ticking =
            (1..=groups).filter(|g| !cluster.nodes[&survivor].core.is_asleep(GroupId(*g))).count();
        assert!(
            ticking <= previous + 2 * quiescence.wakes_per_tick,
            "{} groups woke in one tick",
            ticking - previous
        );
        previous = ticking;
        if !refused_at_once && cluster.nodes[&lost].core.is_node_down(survivor) {
            // The first tick it knows: its leaders have no live quorum and say so at once.
            if let Some(g) = (1..=groups).find(|g| cluster.nodes[&lost].core.is_leader(GroupId(*g)))
            {
                let core = &mut cluster.nodes.get_mut(&lost).unwrap().core;
                assert_eq!(
                    core.propose(GroupId(g), put("k", "lost"), 1_000_000),
                    Err(RequestError::NoQuorum)
                );
            }
            refused_at_once = true;
        }
        if (1..=groups).all(|g| cluster.leader(GroupId(g)).is_some_and(|l| l != lost)) {
            break;
        }
    }
    assert!(refused_at_once, "the cut-off node never declared its peers down");
    for g in 1..=groups {
        let leader = cluster.leader(GroupId(g));
        assert!(leader.is_some_and(|l| l != lost), "group {g} led by {leader:?}");
    }
    // Every group serves again, then goes quiet although one member is gone.
    for g in 1..=groups {
        let group = GroupId(g);
        let leader = cluster.leader(group).unwrap();
        let token = 2_000 + g;
        cluster.nodes.get_mut(&leader).unwrap().core.propose(group, put("k", "w"), token).unwrap();
        assert!(matches!(cluster.settle(token), Completion::Applied { .. }), "group {g}");
    }
    let survivors: Vec<NodeId> = ids.iter().copied().filter(|id| *id != lost).collect();
    for _ in 0..100 {
        if survivors.iter().all(|id| cluster.awake(*id) == 0) {
            break;
        }
        cluster.tick();
    }
    assert!(survivors.iter().all(|id| cluster.awake(*id) == 0), "survivors never went quiet");
}

/// Quiet groups (`groups` of them, one write each) with node-level liveness on, every one of
/// them asleep on every node.
fn quiet_cluster(groups: u64, quiescence: Quiescence) -> Cluster {
    let mut cluster = Cluster::new(3, groups);
    cluster.quiesce(quiescence);
    cluster.elect(groups);
    for g in 1..=groups {
        let group = GroupId(g);
        let leader = cluster.leader(group).unwrap();
        cluster.nodes.get_mut(&leader).unwrap().core.propose(group, put("k", "v"), g).unwrap();
    }
    for g in 1..=groups {
        assert!(matches!(cluster.settle(g), Completion::Applied { .. }), "group {g}");
    }
    let ids: Vec<NodeId> = cluster.nodes.keys().copied().collect();
    for _ in 0..100 {
        if ids.iter().all(|id| cluster.awake(*id) == 0) {
            return cluster;
        }
        cluster.tick();
    }
    panic!("groups never went quiet");
}

/// Failover of quiet groups (issue 5: "within a few election timeouts"): once node-level
/// liveness declares the leaders' node down, each follower forgets its leader at once (no
/// stickiness left to refuse the survivors' campaigns) and one survivor per group, agreed on
/// by all, campaigns a few ticks after waking while the others wait a randomized timeout. So
/// every group has a new leader within one election timeout of the detection, each elected in
/// the first term it tried (no split vote). Before, a woken follower waited a whole
/// randomized election timeout (10–20 ticks) before its first campaign, which its peer, still
/// holding to the dead leader, could refuse.
#[test]
fn quiet_followers_elect_within_an_election_timeout_of_their_leader_node_being_declared_down() {
    let groups = 90;
    let election_ticks = 10; // `Config::new`'s.
    let quiescence = Quiescence { dead_after_ticks: 2 * election_ticks, wakes_per_tick: 16 };
    let mut cluster = quiet_cluster(groups, quiescence);
    let ids: Vec<NodeId> = cluster.nodes.keys().copied().collect();
    let led = |cluster: &Cluster, node: NodeId| {
        (1..=groups).filter(|g| cluster.leader(GroupId(*g)) == Some(node)).count()
    };
    let lost = *ids.iter().max_by_key(|id| led(&cluster, **id)).unwrap();
    let orphans: Vec<GroupId> =
        (1..=groups).map(GroupId).filter(|g| cluster.leader(*g) == Some(lost)).collect();
    // Enough to need several ticks of wake-ups even spread over both survivors.
    assert!(orphans.len() > 2 * quiescence.wakes_per_tick, "{} orphans", orphans.len());
    let terms: BTreeMap<GroupId, u64> = orphans
        .iter()
        .map(|g| (*g, cluster.nodes[&lost].core.replica(*g).unwrap().term().0))
        .collect();
    cluster.isolated = Some(lost);
    let survivors: Vec<NodeId> = ids.iter().copied().filter(|id| *id != lost).collect();
    let mut detected = None;
    let mut elected = None;
    for tick in 1..=200u32 {
        cluster.tick();
        if detected.is_none()
            && survivors.iter().all(|id| cluster.nodes[id].core.is_node_down(lost))
        {
            detected = Some(tick);
        }
        // The cut-off node may still believe it leads (until check-quorum deposes it).
        if orphans.iter().all(|g| survivors.iter().any(|id| cluster.nodes[id].core.is_leader(*g))) {
            elected = Some(tick);
            break;
        }
    }
    let detected = detected.expect("the survivors never declared the node down");
    let elected = elected.expect("not every group elected a new leader within 200 ticks");
    assert_eq!(detected, quiescence.dead_after_ticks, "declared down as soon as due");
    assert!(
        elected - detected <= election_ticks,
        "every group led by a survivor {} ticks after the detection (at most {election_ticks})",
        elected - detected
    );
    for g in &orphans {
        let leader = *survivors.iter().find(|id| cluster.nodes[id].core.is_leader(*g)).unwrap();
        let term = cluster.nodes[&leader].core.replica(*g).unwrap().term().0;
        assert_eq!(term, terms[g] + 1, "group {g} elected in its first new term");
    }
}

/// Node-level liveness is a hint: a node that wrongly declares a live leader's node down makes
/// its followers forget that leader (and campaign), but their pre-votes fail against the other
/// follower, which still hears from it — no group changes leader or term, and every group goes
/// quiet again.
#[test]
fn a_false_down_deposes_no_leader() {
    let groups = 30;
    let quiescence = Quiescence { dead_after_ticks: 20, wakes_per_tick: 8 };
    let mut cluster = quiet_cluster(groups, quiescence);
    let ids: Vec<NodeId> = cluster.nodes.keys().copied().collect();
    let before: Vec<(NodeId, u64)> = (1..=groups)
        .map(|g| {
            let leader = cluster.leader(GroupId(g)).unwrap();
            (leader, cluster.nodes[&leader].core.replica(GroupId(g)).unwrap().term().0)
        })
        .collect();
    let (observer, peer) = (ids[0], ids[1]);
    assert!(
        (1..=groups).any(|g| cluster.leader(GroupId(g)) == Some(peer)),
        "some group is led by the node wrongly declared down"
    );
    cluster.blind = Some((observer, peer));
    for _ in 0..300 {
        cluster.tick();
    }
    assert!(cluster.nodes[&observer].core.is_node_down(peer));
    for g in 1..=groups {
        let leader = cluster.leader(GroupId(g)).unwrap();
        let term = cluster.nodes[&leader].core.replica(GroupId(g)).unwrap().term().0;
        assert_eq!((leader, term), before[usize::try_from(g - 1).unwrap()], "group {g}");
    }
    assert!(ids.iter().all(|id| cluster.awake(*id) == 0), "groups never went quiet again");
}

/// A read that a deposed leader can no longer confirm fails as soon as leadership changes,
/// rather than waiting for the driver's deadline (found by the cluster simulator, seed 275).
#[test]
fn a_read_on_a_leader_that_loses_its_term_fails_at_once() {
    let mut cluster = Cluster::new(3, 1);
    let group = GroupId(1);
    cluster.elect(1);
    let old = cluster.leader(group).unwrap();
    // Cut off, the leader cannot confirm the read with a quorum round.
    cluster.isolated = Some(old);
    let core = &mut cluster.nodes.get_mut(&old).unwrap().core;
    core.read(group, Query::Get { key: Bytes::from("x") }, 7).unwrap();
    // `settle` ticks; check-quorum deposes the old leader within an election timeout or two.
    match cluster.settle(7) {
        Completion::Failed { error: RequestError::NotLeader { .. }, .. } => {}
        other => panic!("{other:?}"),
    }
    assert!(!cluster.nodes[&old].core.is_leader(group));
}

/// After its thread stalled (`ShardCore::clock_stalled`: the driver does not replay missed
/// ticks), a leader answers no lease read from acknowledgements older than the stall: the read
/// waits for a fresh heartbeat round, where before the stall the lease answered it at once.
#[test]
fn a_stalled_clock_drops_the_leases_until_a_fresh_heartbeat_round() {
    let mut cluster = Cluster::new_with(3, 1, |config| config.lease_reads = true);
    let group = GroupId(1);
    cluster.elect(1);
    // Peers' clock rates are measured over two election timeouts before a lease counts them.
    for _ in 0..60 {
        cluster.tick();
    }
    let leader = cluster.leader(group).unwrap();
    let get = || Query::Get { key: Bytes::from("x") };
    // Answered by the one iteration that takes it in: a quorum round needs the followers'
    // answers, which come back in a later iteration.
    let lease_read = |cluster: &mut Cluster, token: Token| {
        let core = &mut cluster.nodes.get_mut(&leader).unwrap().core;
        core.read_with(group, get(), ReadMode::Lease, token).unwrap();
        cluster.iterate();
        cluster.done.contains_key(&token)
    };
    assert!(lease_read(&mut cluster, 1), "served by the lease at once");

    cluster.nodes.get_mut(&leader).unwrap().core.clock_stalled();
    assert!(!lease_read(&mut cluster, 2), "the stall dropped the lease");
    for _ in 0..3 {
        cluster.iterate();
    }
    assert!(
        matches!(cluster.done.get(&2), Some(Completion::Read { .. })),
        "served after a fresh heartbeat round: {:?}",
        cluster.done.get(&2)
    );
    // That round renewed the lease.
    assert!(lease_read(&mut cluster, 3), "served by the renewed lease at once");
}

/// A leader does not compact a group under a follower that still needs the entries (it would
/// then need a snapshot — or, being sent one, a newer one) until the deferral bound; once every
/// follower holds them, it compacts at the threshold again.
#[test]
fn a_leader_defers_compaction_for_a_lagging_follower_up_to_a_bound() {
    let mut cluster = Cluster::new(3, 1);
    let group = GroupId(1);
    cluster.elect(1);
    let leader = cluster.leader(group).unwrap();
    let lagging = cluster.nodes.keys().copied().find(|id| *id != leader).unwrap();
    for node in cluster.nodes.values_mut() {
        node.core.set_compaction_defer_entries(50);
    }
    let mut token = 100;
    let mut write = |cluster: &mut Cluster, count: usize| {
        for _ in 0..count {
            token += 1;
            let core = &mut cluster.nodes.get_mut(&leader).unwrap().core;
            core.propose(group, put("k", &token.to_string()), token).unwrap();
            assert!(matches!(cluster.settle(token), Completion::Applied { .. }));
        }
    };
    let compacts = |cluster: &mut Cluster| {
        let mut out = Vec::new();
        cluster.nodes.get_mut(&leader).unwrap().core.compact_due(10, 1, |_| false, &mut out);
        !out.is_empty()
    };
    cluster.isolated = Some(lagging);
    write(&mut cluster, 20);
    assert!(!compacts(&mut cluster), "20 entries past the threshold, but a follower lags");
    write(&mut cluster, 40);
    assert!(compacts(&mut cluster), "past the deferral bound the log is compacted anyway");
    cluster.isolated = None;
    for _ in 0..100 {
        cluster.tick();
    }
    let caught_up = cluster.nodes[&lagging].core.machine(group).unwrap().applied_index();
    assert_eq!(caught_up, cluster.nodes[&leader].core.machine(group).unwrap().applied_index());
    write(&mut cluster, 12);
    assert!(compacts(&mut cluster), "every follower holds the entries: compacted at 10");
}
