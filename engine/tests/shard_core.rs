//! `ShardCore` in a three-node in-process cluster: each node's shard hosts many groups, persists
//! into per-group in-memory stores, and exchanges messages through a perfect network. The pure
//! loop alone must elect leaders, commit and apply proposals in every group, serve linearizable
//! reads on followers, batch messages per peer node, and keep replicas identical.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use flotilla::kv::{
    Command, KvConfig, KvStateMachine, Outcome, Proposal, Query, QueryResult, Reply, Request,
};
use flotilla::raftgroup::{Config, MemStorage, Message, NodeId, Ready, RecoveredState};
use flotilla::shard::{Completion, RequestError, ShardCore, ShardOutput, Token};
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
}

impl Cluster {
    fn new(nodes: u64, groups: u64) -> Cluster {
        let voters: Vec<NodeId> = (1..=nodes).map(NodeId).collect();
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            wire: VecDeque::new(),
            done: BTreeMap::new(),
            messages_per_frame_max: 0,
            isolated: None,
        };
        for id in 1..=nodes {
            let mut core = ShardCore::new(NodeId(id));
            for group in 1..=groups {
                let config =
                    Config { seed: id * 1_000 + group, ..Config::new(NodeId(id), voters.clone()) };
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
        for node in self.nodes.values_mut() {
            node.core.tick();
        }
        self.iterate();
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
                machine.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
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
